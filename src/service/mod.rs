//! `predict()`: the one request path that the gRPC and HTTP front ends share.
//!
//! The front ends decode and check the wire format; this module resolves the model
//! version from one registry snapshot, checks the inputs against the model's interface,
//! queues the request, waits for the answer and records metrics and statistics.

pub mod mirror;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batcher::Submit;
use crate::error::{Error, Result};
use crate::metrics::{self, Protocol};
use crate::registry::{ModelVersion, Registry};
use crate::routing::control::Control;
use crate::routing::{self, Variant};
use crate::serve::Limits;
use crate::tensor::{Tensor, check_against_spec};

/// Shared state of a running server: what the request path and the admin calls use.
pub struct AppState {
    pub registry: Arc<Registry>,
    /// Routing changes, the audit log and the mirror budget.
    pub control: Arc<Control>,
    /// The drift detector's channel and state, and the webhook outbox.
    pub drift: crate::drift::Monitor,
    /// The capture writer's channels and state (records, feedback).
    pub capture: crate::capture::Capture,
    /// Tensor limits (elements, rows) every request is checked against.
    pub limits: Limits,
    /// Readiness means every model is ready (Triton's rule), not "can serve what it serves".
    pub strict_readiness: bool,
    /// Cancelled when shutdown begins: readiness turns false at once.
    pub shutdown: CancellationToken,
    /// Every task the server starts (mirrored runs, stream requests) joins it, so that
    /// shutdown waits for them.
    pub tasks: TaskTracker,
}

impl AppState {
    /// Ready to take traffic: not shutting down, and able to serve what it serves
    /// ([`crate::registry::Snapshot::serving_ready`]), or with `strict_readiness` every
    /// model has a ready version (Triton's rule).
    pub fn is_ready(&self) -> bool {
        if self.shutdown.is_cancelled() {
            return false;
        }
        let snapshot = self.registry.snapshot();
        if self.strict_readiness {
            snapshot.all_ready()
        } else {
            snapshot.serving_ready()
        }
    }
}

/// A decoded inference request, protocol-neutral.
#[derive(Debug)]
pub struct InferRequest {
    pub model: String,
    /// Explicit version; `None` (or empty) lets the server choose.
    pub version: Option<String>,
    pub id: String,
    pub inputs: Vec<Tensor>,
    /// Output names to return, in this order; empty means all, in the model's order.
    pub outputs: Vec<String>,
    /// How long the request may wait in the queue (gRPC deadline or the `timeout`
    /// parameter); `None` uses the model's default queue timeout.
    pub timeout: Option<Duration>,
    /// Triton's priority: 1 is the highest, 0 the model's default level.
    pub priority: u64,
    /// Sticky routing: the same key gets the same variant while the canary weight stays.
    pub routing_key: Option<String>,
}

/// Where the time went, for Server-Timing and statistics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    /// Waiting for a worker to start the batch.
    pub queue: Duration,
    /// The batch's execution, by phase.
    pub compute: crate::runtime::Phases,
    pub total: Duration,
}

impl Timing {
    /// The whole execution of the batch the request ran in.
    pub fn infer(&self) -> Duration {
        self.compute.total()
    }

    /// The `Server-Timing` header value (milliseconds, three decimals). Written digit
    /// by digit from whole microseconds: `format!` cost more than the rest of the header.
    pub fn server_timing(&self) -> String {
        let mut out = String::with_capacity(64);
        for (i, (name, d)) in [
            ("queue;dur=", self.queue),
            ("infer;dur=", self.infer()),
            ("total;dur=", self.total),
        ]
        .into_iter()
        .enumerate()
        {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(name);
            let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
            push_decimal(&mut out, us / 1000, 1);
            out.push('.');
            push_decimal(&mut out, us % 1000, 3);
        }
        out
    }
}

/// Appends `n` in decimal, zero-padded to at least `width` digits.
fn push_decimal(out: &mut String, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    while n > 0 || digits.len() - at < width {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend(digits[at..].iter().map(|&d| char::from(d)));
}

/// The answer to an [`InferRequest`].
#[derive(Debug)]
pub struct InferResponse {
    pub model: String,
    pub version: String,
    pub id: String,
    pub outputs: Vec<Tensor>,
    pub timing: Timing,
    /// Which part of the traffic answered.
    pub variant: Variant,
    /// A capture record was made of it: the client needs its id for feedback.
    pub captured: bool,
}

/// Runs one inference request end to end and records its metrics.
pub async fn predict(
    state: &AppState,
    mut req: InferRequest,
    protocol: Protocol,
) -> Result<InferResponse> {
    let started = Instant::now();
    // One snapshot for the whole request: it cannot see half of a swap.
    let snapshot = state.registry.snapshot();
    let model = snapshot.model(&req.model);
    let routed = model.and_then(|m| {
        let (mv, variant) = m.route(req.version.as_deref(), req.routing_key.as_deref())?;
        Ok((
            Arc::clone(mv),
            variant,
            mirror::plan(m, mv, variant),
            Arc::clone(&m.drift),
            Arc::clone(&m.capture),
        ))
    });
    let (mv, variant, mirrors, drift, capture) = match routed {
        Ok(r) => r,
        Err(e) => {
            // An unknown name must not become a metric label (unbounded cardinality).
            let model = if snapshot.models.contains_key(&req.model) {
                req.model.as_str()
            } else {
                ""
            };
            metrics::record_request(model, "", protocol, "", e.error_type(), started.elapsed());
            log_refused(&req.id, &req.model, protocol, &e);
            return Err(e);
        }
    };
    drop(snapshot);
    if let Err(e) = check_limits(&state.limits, &req) {
        record_failure(&mv, protocol, variant, &e, started.elapsed());
        log_refused(&req.id, &req.model, protocol, &e);
        return Err(e);
    }
    // Mirrors need the inputs after the primary consumed them: copies share the bytes.
    let inputs = (!mirrors.is_empty()).then(|| req.inputs.clone());
    // The id goes back on the answer; kept here (not copied) for the failure log.
    let mut request_id = std::mem::take(&mut req.id);
    // A drift sample needs the feature input after the primary consumed it.
    let drift_input = crate::drift::Monitor::wants(&drift, &mv.drift)
        .and_then(|name| req.inputs.iter().find(|t| t.name == name).cloned());
    // A capture record needs the inputs after the primary consumed them: copies share
    // the bytes, made only for a request that is captured.
    let capture_wanted = crate::capture::Capture::wants(&capture);
    let mut capture_inputs = capture_wanted.map(|_| req.inputs.clone());
    let routing_key = capture_wanted.and_then(|_| req.routing_key.clone());
    let arrived_ms = capture_wanted.map_or(0, |_| {
        crate::util::now_ms().saturating_sub(started.elapsed().as_millis() as u64)
    });
    let result = run_on(&mv, req, started).await.map(|mut r| {
        r.variant = variant;
        r.id = std::mem::take(&mut request_id);
        r.captured = capture_wanted.is_some_and(|w| w.success);
        r
    });
    let total = started.elapsed();
    match &result {
        Ok(resp) => {
            record_ok(&mv, resp, protocol, variant, total);
            // Off by default (RUST_LOG=modelgate=debug): one line per request, with its id.
            tracing::debug!(
                request_id = %log_id(&resp.id),
                model = %mv.model,
                version = mv.version,
                variant = variant.as_str(),
                micros = total.as_micros() as u64,
                "inference request served"
            );
            if let Some(t) = drift_input {
                state.drift.observe(&drift, &mv.drift, &t, &resp.outputs);
            }
            if let (Some(w), Some(inputs)) = (capture_wanted, capture_inputs.take())
                && w.success
            {
                state.capture.observe(crate::capture::Record {
                    version: Arc::clone(&mv.capture),
                    settings: Arc::clone(&capture),
                    id: resp.id.clone(),
                    time_ms: arrived_ms,
                    variant,
                    routing_key,
                    inputs,
                    outputs: resp.outputs.clone(),
                    error: None,
                    inference_us: resp.timing.infer().as_micros() as u64,
                    total_us: total.as_micros() as u64,
                });
            }
            if let Some(inputs) = inputs {
                mirror::spawn(
                    state,
                    &mv,
                    mirrors,
                    &inputs,
                    &resp.outputs,
                    resp.timing.infer(),
                    protocol,
                );
            }
        }
        Err(e) => {
            record_failure(&mv, protocol, variant, e, total);
            if let Some(inputs) = capture_inputs.take().filter(|_| capture.failed_requests) {
                state.capture.observe(crate::capture::Record {
                    version: Arc::clone(&mv.capture),
                    settings: Arc::clone(&capture),
                    id: request_id.clone(),
                    time_ms: arrived_ms,
                    variant,
                    routing_key,
                    inputs,
                    outputs: Vec::new(),
                    error: Some(e.to_string()),
                    inference_us: 0,
                    total_us: total.as_micros() as u64,
                });
            }
            // Server-side failures are logged with the request's id, so that a client's
            // report can be found; client errors are the client's to log.
            if e.http_status() >= 500 {
                tracing::warn!(
                    request_id = %request_id,
                    model = %mv.model,
                    version = mv.version,
                    variant = variant.as_str(),
                    error = %e,
                    "inference request failed"
                );
            } else if tracing::enabled!(tracing::Level::DEBUG) {
                tracing::debug!(
                    request_id = %log_id(&request_id),
                    model = %mv.model,
                    version = mv.version,
                    variant = variant.as_str(),
                    error = %e,
                    "inference request refused"
                );
            }
        }
    }
    result
}

/// Counts a request refused before it reached `predict` (it did not decode): the model
/// label only when the model exists, so clients cannot create label values.
pub fn record_rejected(state: &AppState, model: &str, protocol: Protocol, e: &Error) {
    let known = state.registry.snapshot().models.contains_key(model);
    metrics::record_request(
        if known { model } else { "" },
        "",
        protocol,
        "",
        e.error_type(),
        Duration::ZERO,
    );
    // The request did not decode, so it has no id of its own.
    log_refused("", model, protocol, e);
}

/// The id a log line names: the client's, or a generated one (`gen-…`) so that the
/// lines of one request can still be told apart.
fn log_id(id: &str) -> std::borrow::Cow<'_, str> {
    if id.is_empty() {
        std::borrow::Cow::Owned(format!("gen-{:016x}", fastrand::u64(..)))
    } else {
        std::borrow::Cow::Borrowed(id)
    }
}

/// Off by default (RUST_LOG=modelgate=debug): a request refused before it ran.
fn log_refused(id: &str, model: &str, protocol: Protocol, e: &Error) {
    if tracing::enabled!(tracing::Level::DEBUG) {
        tracing::debug!(
            request_id = %log_id(id),
            model,
            protocol = protocol.as_str(),
            error = %e,
            "inference request refused"
        );
    }
}

/// Refuses tensors with more elements, or requests with more rows, than the limits.
fn check_limits(limits: &Limits, req: &InferRequest) -> Result<()> {
    for t in &req.inputs {
        let n = t.element_count();
        if n > limits.max_tensor_elements {
            return Err(Error::invalid(format!(
                "input '{}' has {n} elements, more than the limit of {} (limits.max_tensor_elements)",
                t.name, limits.max_tensor_elements
            )));
        }
        if let Some(&rows) = t.shape.first()
            && t.shape.len() > 1
            && rows > limits.max_rows_per_request
        {
            return Err(Error::invalid(format!(
                "input '{}' has {rows} rows, more than the limit of {} (limits.max_rows_per_request)",
                t.name, limits.max_rows_per_request
            )));
        }
    }
    Ok(())
}

/// Records a request a version answered: statistics, metrics, rollout counters.
pub(crate) fn record_ok(
    mv: &ModelVersion,
    resp: &InferResponse,
    protocol: Protocol,
    variant: Variant,
    total: Duration,
) {
    mv.stats
        .record_success(total, resp.timing.queue, &resp.timing.compute);
    mv.metrics.record_ok(
        protocol,
        variant,
        total,
        resp.timing.queue,
        resp.timing.infer(),
    );
    // Shadow runs wait at the lowest priority: their latency says nothing of the version.
    if variant != Variant::Shadow {
        mv.counters.record(total, false);
    }
}

/// Records a request a version failed.
pub(crate) fn record_failure(
    mv: &ModelVersion,
    protocol: Protocol,
    variant: Variant,
    e: &Error,
    total: Duration,
) {
    mv.stats.record_failure(total);
    metrics::record_request(
        &mv.model,
        &mv.version_str,
        protocol,
        variant.as_str(),
        e.error_type(),
        total,
    );
    // A bad request or a client's short deadline says nothing of the version.
    if variant != Variant::Shadow && routing::counters::counts_against(e) {
        mv.counters.record(total, true);
    }
}

/// Runs a request on one version: checks, queues, waits, selects the outputs.
pub(crate) async fn run_on(
    mv: &Arc<ModelVersion>,
    req: InferRequest,
    started: Instant,
) -> Result<InferResponse> {
    let inputs = order_inputs(mv, req.inputs)?;
    let selected = select_outputs(mv, &req.outputs)?;
    let out = mv
        .pool
        .submit(
            inputs,
            Submit {
                outputs: selected.as_ref().map(|s| s.clone().into()),
                timeout: req.timeout,
                priority: req.priority,
                warmup: false,
            },
        )?
        .answer()
        .await?;
    let mut all = out.outputs;
    let outputs = match selected {
        None => all,
        Some(indices) => indices
            .iter()
            .map(|&i| std::mem::replace(&mut all[i], empty_tensor()))
            .collect(),
    };
    Ok(InferResponse {
        model: mv.model.clone(),
        version: mv.version_str.clone(),
        id: req.id,
        outputs,
        timing: Timing {
            queue: out.queue,
            compute: out.compute,
            total: started.elapsed(),
        },
        variant: Variant::Direct,
        captured: false,
    })
}

fn empty_tensor() -> Tensor {
    Tensor {
        name: String::new(),
        dtype: crate::tensor::DataType::Uint8,
        shape: Vec::new(),
        data: bytes::Bytes::new(),
    }
}

/// Checks the inputs against the model (names, types, shapes, rows) and puts them in
/// the model's input order.
fn order_inputs(mv: &ModelVersion, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
    let mut slots: Vec<Option<Tensor>> = (0..mv.inputs.len()).map(|_| None).collect();
    for t in inputs {
        let i = mv.input_index(&t.name).ok_or_else(|| {
            Error::invalid(format!(
                "unknown input '{}' for model '{}' (it takes {})",
                t.name,
                mv.model,
                names(&mv.inputs)
            ))
        })?;
        check_against_spec(&mv.inputs[i], t.dtype, &t.shape)?;
        if slots[i].is_some() {
            return Err(Error::invalid(format!(
                "input '{}' is given more than once",
                t.name
            )));
        }
        slots[i] = Some(t);
    }
    let mut ordered = Vec::with_capacity(slots.len());
    for (slot, spec) in slots.into_iter().zip(&mv.inputs) {
        ordered.push(slot.ok_or_else(|| {
            Error::invalid(format!(
                "missing input '{}' for model '{}'",
                spec.name, mv.model
            ))
        })?);
    }
    // Every batched input must carry the same number of rows, or ORT would fail the run.
    let batched = ordered
        .iter()
        .zip(&mv.inputs)
        .filter(|(_, s)| s.has_batch_dim());
    let mut rows = None;
    for (t, _) in batched {
        let r = t.shape.first().copied().unwrap_or(0);
        match rows {
            None => rows = Some(r),
            Some(prev) if prev != r => {
                return Err(Error::invalid(format!(
                    "input '{}' has {r} rows but other inputs have {prev}",
                    t.name
                )));
            }
            Some(_) => {}
        }
    }
    Ok(ordered)
}

/// Resolves requested output names to positions; `None` means all outputs.
fn select_outputs(mv: &ModelVersion, requested: &[String]) -> Result<Option<Vec<usize>>> {
    if requested.is_empty() {
        return Ok(None);
    }
    let mut picked = Vec::with_capacity(requested.len());
    for name in requested {
        let i = mv
            .outputs
            .iter()
            .position(|s| &s.name == name)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown output '{name}' for model '{}' (it has {})",
                    mv.model,
                    names(&mv.outputs)
                ))
            })?;
        if picked.contains(&i) {
            return Err(Error::invalid(format!(
                "output '{name}' is requested more than once"
            )));
        }
        picked.push(i);
    }
    Ok(Some(picked))
}

fn names(specs: &[crate::tensor::TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| format!("'{}'", s.name))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_timing_is_milliseconds_with_three_decimals() {
        let at = |queue_us, total_us| Timing {
            queue: Duration::from_micros(queue_us),
            compute: crate::runtime::Phases::default(),
            total: Duration::from_micros(total_us),
        };
        assert_eq!(
            at(0, 1).server_timing(),
            "queue;dur=0.000, infer;dur=0.000, total;dur=0.001"
        );
        assert_eq!(
            at(12_345, 1_234_567_890).server_timing(),
            "queue;dur=12.345, infer;dur=0.000, total;dur=1234567.890"
        );
        // What format!("{:.3}") gave, for any whole number of microseconds.
        for us in [7, 999, 1_000, 1_001, 98_765, 3_600_000_000] {
            let ms = Duration::from_micros(us).as_secs_f64() * 1e3;
            assert_eq!(
                at(us, us).server_timing(),
                format!("queue;dur={ms:.3}, infer;dur=0.000, total;dur={ms:.3}")
            );
        }
    }
}

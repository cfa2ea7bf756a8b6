//! `predict()`: the one request path that the gRPC and HTTP front ends share.
//!
//! The front ends decode and check the wire format; this module resolves the model
//! version from one registry snapshot, checks the inputs against the model's interface,
//! queues the request, waits for the answer and records metrics and statistics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::batcher::Entry;
use crate::batcher::policy::BatchKey;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::{self, Protocol};
use crate::registry::{ModelVersion, Registry};
use crate::tensor::{Tensor, check_against_spec};

/// Shared state of a running server.
pub struct AppState {
    pub registry: Arc<Registry>,
    pub config: Arc<Config>,
    pub metrics: PrometheusHandle,
    /// Cancelled when shutdown begins: readiness turns false at once.
    pub shutdown: CancellationToken,
}

impl AppState {
    /// Ready to take traffic: not shutting down and every model has a ready version.
    pub fn is_ready(&self) -> bool {
        !self.shutdown.is_cancelled() && self.registry.snapshot().all_ready()
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
}

/// Where the time went, for Server-Timing and statistics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    pub queue: Duration,
    pub infer: Duration,
    pub total: Duration,
}

impl Timing {
    /// The `Server-Timing` header value (milliseconds).
    pub fn server_timing(&self) -> String {
        format!(
            "queue;dur={:.3}, infer;dur={:.3}, total;dur={:.3}",
            self.queue.as_secs_f64() * 1e3,
            self.infer.as_secs_f64() * 1e3,
            self.total.as_secs_f64() * 1e3
        )
    }
}

/// The answer to an [`InferRequest`].
#[derive(Debug)]
pub struct InferResponse {
    pub model: String,
    pub version: String,
    pub id: String,
    pub outputs: Vec<Tensor>,
    pub timing: Timing,
}

/// Runs one inference request end to end and records its metrics.
pub async fn predict(
    state: &AppState,
    req: InferRequest,
    protocol: Protocol,
) -> Result<InferResponse> {
    let started = Instant::now();
    // One snapshot for the whole request: it cannot see half of a swap.
    let snapshot = state.registry.snapshot();
    let mv = match snapshot.resolve(&req.model, req.version.as_deref()) {
        Ok(mv) => Arc::clone(mv),
        Err(e) => {
            // An unknown name must not become a metric label (unbounded cardinality).
            let model = if snapshot.models.contains_key(&req.model) {
                req.model.as_str()
            } else {
                ""
            };
            metrics::record_request(model, "", protocol, e.error_type(), started.elapsed());
            return Err(e);
        }
    };
    drop(snapshot);
    let result = run_on(&mv, req, started).await;
    let total = started.elapsed();
    match &result {
        Ok(resp) => {
            let rows = resp_rows(&mv, resp);
            mv.stats
                .record_success(rows, total, resp.timing.queue, resp.timing.infer);
            mv.metrics
                .record_ok(protocol, total, resp.timing.queue, resp.timing.infer);
        }
        Err(e) => {
            mv.stats.record_failure(total);
            metrics::record_request(&mv.model, &mv.version_str, protocol, e.error_type(), total);
        }
    }
    result
}

/// Rows in a response: the first dimension for batching models, else 1.
fn resp_rows(mv: &ModelVersion, resp: &InferResponse) -> u64 {
    if mv.batchable() {
        resp.outputs
            .first()
            .and_then(|t| t.shape.first())
            .map_or(1, |&r| r as u64)
    } else {
        1
    }
}

async fn run_on(
    mv: &Arc<ModelVersion>,
    req: InferRequest,
    started: Instant,
) -> Result<InferResponse> {
    let inputs = order_inputs(mv, req.inputs)?;
    let selected = select_outputs(mv, &req.outputs)?;
    let (tx, rx) = oneshot::channel();
    let batching = mv.pool.batching();
    let rows = if batching {
        inputs
            .first()
            .and_then(|t| t.shape.first())
            .copied()
            .unwrap_or(1)
    } else {
        1
    };
    let key = BatchKey::of(
        &inputs,
        batching,
        selected.as_ref().map(|s| s.clone().into()),
    );
    let enqueued = tokio::time::Instant::now();
    let default_timeout = mv.settings.default_queue_timeout_us;
    let timeout = req
        .timeout
        .or_else(|| (default_timeout > 0).then(|| Duration::from_micros(default_timeout)));
    let levels = mv.settings.priority_levels;
    let level = match req.priority {
        0 => mv.settings.default_priority_level,
        p => usize::try_from(p).unwrap_or(usize::MAX).min(levels),
    };
    mv.pool.try_submit(Entry {
        inputs,
        rows,
        key,
        enqueued,
        deadline: timeout.map(|t| enqueued + t),
        priority: level - 1,
        reply: tx,
    })?;
    let out = rx
        .await
        .map_err(|_| Error::Internal("worker stopped before answering".into()))??;
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
            infer: out.infer,
            total: started.elapsed(),
        },
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

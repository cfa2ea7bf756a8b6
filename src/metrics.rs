//! Metric names, their descriptions, and the Prometheus exporter.
//!
//! Every metric is named here once and described once. Labels carry only bounded values
//! (model, version, protocol, code): never a request id, and never a model name a client
//! made up (unknown models are counted under `model=""`).

use std::sync::Mutex;
use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::{Error, Result};

pub const REQUESTS_TOTAL: &str = "modelgate_requests_total";
pub const REQUEST_DURATION: &str = "modelgate_request_duration_seconds";
pub const INFERENCE_DURATION: &str = "modelgate_inference_duration_seconds";
pub const QUEUE_DURATION: &str = "modelgate_queue_duration_seconds";
pub const MODEL_LOAD_FAILURES: &str = "modelgate_model_load_failures_total";
pub const MODEL_VERSIONS_READY: &str = "modelgate_model_versions_ready";
pub const MODEL_LOADS: &str = "modelgate_model_loads_total";
pub const MODEL_UNLOADS: &str = "modelgate_model_unloads_total";
pub const MODEL_LOAD_DURATION: &str = "modelgate_model_load_duration_seconds";
pub const MODEL_WARMUP_DURATION: &str = "modelgate_model_warmup_duration_seconds";
pub const ADMIN_AUTH_FAILURES: &str = "modelgate_admin_auth_failures_total";
pub const BATCHES_TOTAL: &str = "modelgate_batches_total";
pub const BATCH_SIZE: &str = "modelgate_batch_size_rows";
pub const BATCH_INFERENCE_DURATION: &str = "modelgate_batch_inference_duration_seconds";
pub const DEADLINE_EXCEEDED_TOTAL: &str = "modelgate_queue_deadline_exceeded_total";

/// Batch-size buckets (rows).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Latency buckets from 50 µs to 10 s: the fast models answer in tens of microseconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Installs the process-wide recorder (once) and returns the handle that renders it.
/// Several servers in one process (tests) share it; the lock makes concurrent first
/// calls install it once.
pub fn install() -> Result<PrometheusHandle> {
    let mut slot = HANDLE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(h) = slot.as_ref() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_BUCKETS))
        .and_then(|b| b.install_recorder())
        .map_err(|e| Error::Internal(format!("cannot install the metrics recorder: {e}")))?;
    describe();
    *slot = Some(handle.clone());
    Ok(handle)
}

fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        "Inference requests by model, version, protocol and result code (ok or the error type)."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "End-to-end inference request latency inside the server, decode to encode."
    );
    describe_histogram!(
        INFERENCE_DURATION,
        Unit::Seconds,
        "Time ONNX Runtime spent running a request."
    );
    describe_histogram!(
        QUEUE_DURATION,
        Unit::Seconds,
        "Time a request waited for a worker thread."
    );
    describe_counter!(MODEL_LOAD_FAILURES, "Model versions that failed to load.");
    describe_counter!(
        MODEL_LOADS,
        "Model versions loaded (sessions created and checked)."
    );
    describe_counter!(MODEL_UNLOADS, "Model versions taken out of service.");
    describe_histogram!(
        MODEL_LOAD_DURATION,
        Unit::Seconds,
        "Time to load a version: checksum, sessions, interface checks."
    );
    describe_histogram!(
        MODEL_WARMUP_DURATION,
        Unit::Seconds,
        "Time to warm a version up before it serves."
    );
    describe_counter!(
        BATCHES_TOTAL,
        "Batches run, by why they were released (full, preferred, delay, deadline, adaptive, immediate)."
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Rows per batch run.");
    describe_histogram!(
        BATCH_INFERENCE_DURATION,
        Unit::Seconds,
        "Time ONNX Runtime spent running one batch."
    );
    describe_counter!(
        DEADLINE_EXCEEDED_TOTAL,
        "Requests whose deadline passed while queued (answered DEADLINE_EXCEEDED, never run)."
    );
    describe_gauge!(
        MODEL_VERSIONS_READY,
        "Versions of each model ready to serve."
    );
}

/// Which front end a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc = 0,
    Http = 1,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Http => "http",
        }
    }
}

/// Records one finished inference request.
pub fn record_request(
    model: &str,
    version: &str,
    protocol: Protocol,
    code: &'static str,
    total: Duration,
) {
    let labels = [
        ("model", model.to_string()),
        ("version", version.to_string()),
        ("protocol", protocol.as_str().to_string()),
    ];
    counter!(
        REQUESTS_TOTAL,
        &[
            ("model", model.to_string()),
            ("version", version.to_string()),
            ("protocol", protocol.as_str().to_string()),
            ("code", code.to_string()),
        ]
    )
    .increment(1);
    histogram!(REQUEST_DURATION, &labels).record(total.as_secs_f64());
}

/// Metric handles of one model version, registered once at load so that the request
/// path records without building label sets or hashing them.
pub struct VersionMetrics {
    ok: [metrics::Counter; 2],
    duration: [metrics::Histogram; 2],
    queue: metrics::Histogram,
    infer: metrics::Histogram,
}

impl VersionMetrics {
    /// Registers the handles for `model` / `version`.
    pub fn new(model: &str, version: &str) -> VersionMetrics {
        let per_protocol = |p: Protocol| {
            let labels = [
                ("model", model.to_string()),
                ("version", version.to_string()),
                ("protocol", p.as_str().to_string()),
            ];
            let mut with_code = labels.to_vec();
            with_code.push(("code", "ok".to_string()));
            (
                counter!(REQUESTS_TOTAL, &with_code),
                histogram!(REQUEST_DURATION, &labels),
            )
        };
        let (ok_grpc, dur_grpc) = per_protocol(Protocol::Grpc);
        let (ok_http, dur_http) = per_protocol(Protocol::Http);
        let labels = [
            ("model", model.to_string()),
            ("version", version.to_string()),
        ];
        VersionMetrics {
            ok: [ok_grpc, ok_http],
            duration: [dur_grpc, dur_http],
            queue: histogram!(QUEUE_DURATION, &labels),
            infer: histogram!(INFERENCE_DURATION, &labels),
        }
    }

    /// Records a successful request with its stage timings.
    pub fn record_ok(&self, protocol: Protocol, total: Duration, queue: Duration, infer: Duration) {
        let i = protocol as usize;
        self.ok[i].increment(1);
        self.duration[i].record(total.as_secs_f64());
        self.queue.record(queue.as_secs_f64());
        self.infer.record(infer.as_secs_f64());
    }
}

/// Batcher metric handles of one model version, registered once.
pub struct BatchMetrics {
    reasons: Vec<(crate::batcher::policy::Reason, metrics::Counter)>,
    size: metrics::Histogram,
    infer: metrics::Histogram,
    pub deadline_exceeded: metrics::Counter,
}

impl BatchMetrics {
    pub fn new(model: &str, version: &str) -> BatchMetrics {
        use crate::batcher::policy::Reason;
        let labels = || {
            vec![
                ("model", model.to_string()),
                ("version", version.to_string()),
            ]
        };
        let reasons = [
            Reason::Full,
            Reason::Preferred,
            Reason::Delay,
            Reason::Deadline,
            Reason::Adaptive,
            Reason::Immediate,
            Reason::Drain,
        ]
        .into_iter()
        .map(|r| {
            let mut l = labels();
            l.push(("reason", r.as_str().to_string()));
            (r, counter!(BATCHES_TOTAL, &l))
        })
        .collect();
        BatchMetrics {
            reasons,
            size: histogram!(BATCH_SIZE, &labels()),
            infer: histogram!(BATCH_INFERENCE_DURATION, &labels()),
            deadline_exceeded: counter!(DEADLINE_EXCEEDED_TOTAL, &labels()),
        }
    }

    /// Counts a released batch.
    pub fn released(&self, reason: crate::batcher::policy::Reason) {
        if let Some((_, c)) = self.reasons.iter().find(|(r, _)| *r == reason) {
            c.increment(1);
        }
    }

    /// Records a batch that ran.
    pub fn ran(&self, rows: usize, took: Duration) {
        self.size.record(rows as f64);
        self.infer.record(took.as_secs_f64());
    }
}

/// Counts a version (or whole model) that failed to load.
pub fn record_load_failure(model: &str) {
    counter!(MODEL_LOAD_FAILURES, "model" => model.to_string()).increment(1);
}

/// Records a version loaded.
pub fn record_load(model: &str, took: Duration) {
    counter!(MODEL_LOADS, "model" => model.to_string()).increment(1);
    histogram!(MODEL_LOAD_DURATION, "model" => model.to_string()).record(took.as_secs_f64());
}

/// Records a version's warm-up.
pub fn record_warmup(model: &str, took: Duration) {
    histogram!(MODEL_WARMUP_DURATION, "model" => model.to_string()).record(took.as_secs_f64());
}

/// Counts versions taken out of service.
pub fn count_unloads(model: &str, n: usize) {
    counter!(MODEL_UNLOADS, "model" => model.to_string()).increment(n as u64);
}

/// Sets the number of ready versions of a model.
pub fn set_versions_ready(model: &str, n: usize) {
    gauge!(MODEL_VERSIONS_READY, "model" => model.to_string()).set(n as f64);
}

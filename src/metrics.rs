//! Metric names, their descriptions, and the Prometheus exporter.
//!
//! Every metric is named here once and described once. Labels carry only bounded values
//! (model, version, protocol, code): never a request id, and never a model name a client
//! made up (unknown models are counted under `model=""`).

use std::sync::{Mutex, OnceLock};
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
pub const REPOSITORY_SCANS: &str = "modelgate_repository_scans_total";
pub const ADMIN_AUTH_FAILURES: &str = "modelgate_admin_auth_failures_total";
pub const BATCHES_TOTAL: &str = "modelgate_batches_total";
pub const BATCH_SIZE: &str = "modelgate_batch_size_rows";
pub const BATCH_INFERENCE_DURATION: &str = "modelgate_batch_inference_duration_seconds";
pub const DEADLINE_EXCEEDED_TOTAL: &str = "modelgate_queue_deadline_exceeded_total";
pub const TRAFFIC_STABLE_VERSION: &str = "modelgate_traffic_stable_version";
pub const TRAFFIC_CANARY_VERSION: &str = "modelgate_traffic_canary_version";
pub const TRAFFIC_CANARY_WEIGHT: &str = "modelgate_traffic_canary_weight_percent";
pub const TRAFFIC_SHADOW_PERCENT: &str = "modelgate_traffic_shadow_percent";
pub const ROLLOUT_STEP: &str = "modelgate_rollout_step";
pub const ROLLOUT_INCONCLUSIVE: &str = "modelgate_rollout_inconclusive_total";
pub const ROUTING_GENERATION: &str = "modelgate_routing_generation";
pub const MODEL_VERSION_READY: &str = "modelgate_model_version_ready";
pub const QUEUE_DEPTH: &str = "modelgate_queue_depth";
pub const INFLIGHT: &str = "modelgate_inflight_requests";
pub const ROLLOUT_PROMOTIONS: &str = "modelgate_rollout_promotions_total";
pub const ROLLOUT_ROLLBACKS: &str = "modelgate_rollout_rollbacks_total";
pub const MIRROR_SHED: &str = "modelgate_mirror_shed_total";
pub const COMPARE_ROWS: &str = "modelgate_compare_rows_total";
pub const COMPARE_DISAGREED_ROWS: &str = "modelgate_compare_disagreed_rows_total";
pub const COMPARE_MEAN_ABS_DIFF: &str = "modelgate_compare_mean_abs_diff";
pub const COMPARE_LATENCY_DELTA: &str = "modelgate_compare_latency_delta_seconds";
pub const DRIFT_SAMPLES: &str = "modelgate_drift_samples_total";
pub const DRIFT_SAMPLES_DROPPED: &str = "modelgate_drift_samples_dropped_total";
pub const DRIFT_SCORE: &str = "modelgate_drift_score";
pub const DRIFT_STATE: &str = "modelgate_drift_state";
pub const DRIFT_SUPPRESSED: &str = "modelgate_drift_events_suppressed_total";
pub const DRIFT_CLAIM_ERRORS: &str = "modelgate_drift_claim_errors_total";
pub const CAPTURE_RECORDS: &str = "modelgate_capture_records_total";
pub const CAPTURE_DROPPED: &str = "modelgate_capture_dropped_total";
pub const CAPTURE_BYTES: &str = "modelgate_capture_bytes_written_total";
pub const CAPTURE_FILES_OPEN: &str = "modelgate_capture_files_open";
pub const CAPTURE_FILES_DELETED: &str = "modelgate_capture_files_deleted_total";
pub const FEEDBACK: &str = "modelgate_feedback_total";
pub const QUALITY_ACCURACY: &str = "modelgate_quality_accuracy";
pub const QUALITY_WINDOW_ACCURACY: &str = "modelgate_quality_window_accuracy";
pub const QUALITY_MAE: &str = "modelgate_quality_mae";
pub const QUALITY_RMSE: &str = "modelgate_quality_rmse";
pub const QUALITY_ROWS: &str = "modelgate_quality_labelled_rows_total";
pub const QUALITY_STATE: &str = "modelgate_quality_state";
pub const QUALITY_CLASS_ROWS: &str = "modelgate_quality_class_rows_total";
pub const QUALITY_CORRECT_ROWS: &str = "modelgate_quality_correct_rows_total";
pub const QUALITY_VALUE_ROWS: &str = "modelgate_quality_value_rows_total";
pub const QUALITY_ABS_ERROR_SUM: &str = "modelgate_quality_abs_error_sum";
pub const QUALITY_SQUARED_ERROR_SUM: &str = "modelgate_quality_squared_error_sum";
pub const WEBHOOK_DELIVERIES: &str = "modelgate_webhook_deliveries_total";
pub const WEBHOOK_BACKLOG: &str = "modelgate_webhook_backlog";
pub const SOURCE_ERRORS: &str = "modelgate_source_errors_total";
pub const SOURCE_PUBLISHED: &str = "modelgate_source_published_total";
pub const CONNECTIONS_OPEN: &str = "modelgate_connections_open";
pub const CONNECTIONS_REFUSED: &str = "modelgate_connections_refused_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "modelgate_tls_handshake_failures_total";

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

/// The comparison latency EWMAs (a gauge cannot be read back).
static LATENCY_DELTAS: std::sync::LazyLock<Mutex<std::collections::HashMap<String, f64>>> =
    std::sync::LazyLock::new(|| Mutex::new(std::collections::HashMap::new()));

/// Buckets of the mean absolute difference of compared answers.
const DIFF_BUCKETS: &[f64] = &[1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0];

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
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(COMPARE_MEAN_ABS_DIFF.into()), DIFF_BUCKETS)
        })
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
    describe_counter!(
        ADMIN_AUTH_FAILURES,
        "Admin and inference calls refused by authentication or authorization, by reason (missing, invalid, permission, host)."
    );
    describe_counter!(MODEL_LOAD_FAILURES, "Model versions that failed to load.");
    describe_counter!(
        MODEL_LOADS,
        "Model versions loaded (sessions created and checked)."
    );
    describe_counter!(MODEL_UNLOADS, "Model versions taken out of service.");
    describe_counter!(
        REPOSITORY_SCANS,
        "Reconciliation passes over the repository (change events, periodic rescans, settle retries, API calls)."
    );
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
        "Batches run, by why they were released (full, preferred, delay, deadline, adaptive, immediate, drain, inline)."
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
    describe_gauge!(
        TRAFFIC_STABLE_VERSION,
        "The version requests without a version go to unless routed to the canary (routing's stable when ready, else the newest ready version); 0 when none is ready."
    );
    describe_gauge!(
        TRAFFIC_CANARY_VERSION,
        "The canary version of each model; 0 when there is none."
    );
    describe_gauge!(
        TRAFFIC_CANARY_WEIGHT,
        "Percent of each model's traffic routed to its canary."
    );
    describe_gauge!(
        TRAFFIC_SHADOW_PERCENT,
        "Percent of each model's requests mirrored to a shadow version; 0 once it is no longer a shadow."
    );
    describe_gauge!(
        ROLLOUT_STEP,
        "Current step of each model's automated rollout (1-based); 0 when none runs."
    );
    describe_counter!(
        ROLLOUT_INCONCLUSIVE,
        "Looks at a rollout step that Prometheus could not answer (fleet analysis), by look (early, end); an inconclusive end-of-step look neither advances nor rolls back."
    );
    describe_gauge!(
        ROUTING_GENERATION,
        "Generation of the routing.toml this replica applies to each model (bumped by every routing change): replicas that disagree lag."
    );
    describe_gauge!(
        MODEL_VERSION_READY,
        "1 for each version of a model this replica has ready to serve; 0 once it no longer has."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Requests waiting in each model version's queue (sampled every second): the autoscaling signal."
    );
    describe_gauge!(
        INFLIGHT,
        "Batches of each model version running on its sessions (sampled every second)."
    );
    describe_counter!(
        ROLLOUT_PROMOTIONS,
        "Canaries promoted to stable (by the rollout controller or an operator)."
    );
    describe_counter!(
        ROLLOUT_ROLLBACKS,
        "Canaries rolled back (by the rollout controller or an operator)."
    );
    describe_counter!(
        MIRROR_SHED,
        "Shadow and comparison runs not made, by source and reason (budget, load, queue, deadline, shutdown)."
    );
    describe_counter!(
        COMPARE_ROWS,
        "Rows of a candidate version's answers compared with the primary's (source shadow or canary)."
    );
    describe_counter!(
        COMPARE_DISAGREED_ROWS,
        "Compared rows whose label or argmax differed (classifier outputs)."
    );
    describe_histogram!(
        COMPARE_MEAN_ABS_DIFF,
        "Mean absolute difference of a compared answer's float outputs from the primary's, per comparison."
    );
    describe_counter!(DRIFT_SAMPLES, "Request samples sent to the drift detector.");
    describe_counter!(
        CAPTURE_RECORDS,
        "Requests handed to the capture writer, by model."
    );
    describe_counter!(
        CAPTURE_DROPPED,
        "Capture records lost, by model and reason: channel_full (the writer fell behind), write_error (a full disk or another write error)."
    );
    describe_counter!(
        CAPTURE_BYTES,
        Unit::Bytes,
        "Bytes of closed capture and feedback Parquet files, by model."
    );
    describe_gauge!(
        CAPTURE_FILES_OPEN,
        "Capture and feedback Parquet files being written (not visible to readers yet)."
    );
    describe_counter!(
        CAPTURE_FILES_DELETED,
        "Capture files deleted by retention (age or total size)."
    );
    describe_counter!(
        FEEDBACK,
        "Feedback items, by model and outcome: joined, unknown, expired, malformed."
    );
    describe_gauge!(
        QUALITY_ACCURACY,
        "Accuracy of a version and variant on its labelled rows (joined feedback), cumulative."
    );
    describe_gauge!(
        QUALITY_WINDOW_ACCURACY,
        "Accuracy of a version and variant over its last full window of labelled rows."
    );
    describe_gauge!(
        QUALITY_MAE,
        "Mean absolute error of a version and variant on its labelled rows, cumulative."
    );
    describe_gauge!(
        QUALITY_RMSE,
        "Root mean squared error of a version and variant on its labelled rows, cumulative."
    );
    describe_counter!(
        QUALITY_ROWS,
        "Labelled rows (joined feedback) by model, version and variant."
    );
    describe_counter!(
        QUALITY_CLASS_ROWS,
        "Rows labelled with a class (joined feedback) by model, version and variant."
    );
    describe_counter!(
        QUALITY_CORRECT_ROWS,
        "Rows labelled with a class whose prediction was that class."
    );
    describe_counter!(
        QUALITY_VALUE_ROWS,
        "Rows labelled with a value (regression feedback) by model, version and variant."
    );
    describe_gauge!(
        QUALITY_ABS_ERROR_SUM,
        "Sum of the absolute errors of the rows labelled with a value (only grows; read it with increase() like a counter)."
    );
    describe_gauge!(
        QUALITY_SQUARED_ERROR_SUM,
        "Sum of the squared errors of the rows labelled with a value (only grows; read it with increase() like a counter)."
    );
    describe_gauge!(
        QUALITY_STATE,
        "Quality state of a version and variant: 0 OK, 1 DEGRADED (significantly below its reference)."
    );
    describe_counter!(
        DRIFT_SAMPLES_DROPPED,
        "Request samples dropped because the drift detector's channel was full (the request never waits)."
    );
    describe_gauge!(
        DRIFT_SCORE,
        "Drift statistic of the last window tested, by feature (or prediction:<output>) and test (psi, ks, chi2, js)."
    );
    describe_gauge!(
        DRIFT_STATE,
        "Drift state of each model: 0 OK, 1 WARN, 2 DRIFT."
    );
    describe_counter!(
        DRIFT_SUPPRESSED,
        "Drift episodes whose webhook was not sent, by model and reason: cooldown (an episode inside this replica's cooldown), fleet (another replica sharing the registry claimed it)."
    );
    describe_counter!(
        DRIFT_CLAIM_ERRORS,
        "Drift episodes this replica could not claim in the shared folder (it sent its own event), by model."
    );
    describe_counter!(
        WEBHOOK_DELIVERIES,
        "Webhook delivery attempts by target and outcome (delivered, failed, gone, outbox_error)."
    );
    describe_counter!(
        SOURCE_ERRORS,
        "Failed calls to an external model registry (MLflow), by source and kind (unreachable, refused, download, write_back)."
    );
    describe_counter!(
        SOURCE_PUBLISHED,
        "Versions an external model registry (MLflow) published into the repository, by source and model."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes that failed or timed out (bad client certificates included), by listener."
    );
    describe_gauge!(
        CONNECTIONS_OPEN,
        "Open connections, by listener (http, grpc, metrics)."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed at once because the listener had max_connections open."
    );
    describe_gauge!(
        WEBHOOK_BACKLOG,
        "Webhook events in the outbox waiting for delivery, by target."
    );
    describe_gauge!(
        COMPARE_LATENCY_DELTA,
        Unit::Seconds,
        "Inference time of the candidate minus the primary's, averaged over recent comparisons (EWMA)."
    );
}

/// Which part of the traffic a request belongs to: the `variant` label (and the
/// `x-variant` response header). Routing decides it; it is defined here because it is a
/// label's value set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The stable version, chosen by routing.
    Stable = 0,
    /// The canary version, chosen by routing.
    Canary = 1,
    /// A version the request named itself, neither stable nor canary.
    Direct = 2,
    /// A mirrored copy whose answer is compared, never returned.
    Shadow = 3,
}

impl Variant {
    /// Every variant, in label order.
    pub const ALL: [Variant; 4] = [
        Variant::Stable,
        Variant::Canary,
        Variant::Direct,
        Variant::Shadow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Stable => "stable",
            Variant::Canary => "canary",
            Variant::Direct => "direct",
            Variant::Shadow => "shadow",
        }
    }
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

/// Records one finished inference request (failures; successes go through
/// [`VersionMetrics::record_ok`]).
pub fn record_request(
    model: &str,
    version: &str,
    protocol: Protocol,
    variant: &str,
    code: &'static str,
    total: Duration,
) {
    let labels = [
        ("model", model.to_string()),
        ("version", version.to_string()),
        ("protocol", protocol.as_str().to_string()),
        ("variant", variant.to_string()),
    ];
    let mut with_code = labels.to_vec();
    with_code.push(("code", code.to_string()));
    counter!(REQUESTS_TOTAL, &with_code).increment(1);
    histogram!(REQUEST_DURATION, &labels).record(total.as_secs_f64());
}

/// Metric handles of one model version, registered at first use so that the request
/// path records without building label sets or hashing them (and variants a version
/// never serves add no series).
pub struct VersionMetrics {
    model: String,
    version: String,
    /// By protocol, then variant.
    ok: [[OnceLock<metrics::Counter>; 4]; 2],
    duration: [[OnceLock<metrics::Histogram>; 4]; 2],
    queue: metrics::Histogram,
    infer: metrics::Histogram,
}

impl VersionMetrics {
    /// Registers the handles for `model` / `version`.
    pub fn new(model: &str, version: &str) -> VersionMetrics {
        let labels = [
            ("model", model.to_string()),
            ("version", version.to_string()),
        ];
        VersionMetrics {
            model: model.to_string(),
            version: version.to_string(),
            ok: Default::default(),
            duration: Default::default(),
            queue: histogram!(QUEUE_DURATION, &labels),
            infer: histogram!(INFERENCE_DURATION, &labels),
        }
    }

    fn labels(&self, protocol: Protocol, variant: Variant) -> Vec<(&'static str, String)> {
        vec![
            ("model", self.model.clone()),
            ("version", self.version.clone()),
            ("protocol", protocol.as_str().to_string()),
            ("variant", variant.as_str().to_string()),
        ]
    }

    /// Records a successful request with its stage timings.
    pub fn record_ok(
        &self,
        protocol: Protocol,
        variant: Variant,
        total: Duration,
        queue: Duration,
        infer: Duration,
    ) {
        let (p, v) = (protocol as usize, variant as usize);
        self.ok[p][v]
            .get_or_init(|| {
                let mut l = self.labels(protocol, variant);
                l.push(("code", "ok".to_string()));
                counter!(REQUESTS_TOTAL, &l)
            })
            .increment(1);
        self.duration[p][v]
            .get_or_init(|| histogram!(REQUEST_DURATION, &self.labels(protocol, variant)))
            .record(total.as_secs_f64());
        self.queue.record(queue.as_secs_f64());
        self.infer.record(infer.as_secs_f64());
    }
}

/// Publishes a model's routing as gauges; shadows that `old` had and `spec` has not
/// are set to 0. `stable` is the version unpinned requests go to now (routing's stable,
/// or the newest ready version when routing names none or its stable is not ready).
pub fn set_routing(model: &str, now: &RoutingGauges, old: Option<&RoutingGauges>) {
    let m = || model.to_string();
    gauge!(TRAFFIC_STABLE_VERSION, "model" => m()).set(now.stable.unwrap_or(0) as f64);
    gauge!(TRAFFIC_CANARY_VERSION, "model" => m()).set(now.canary.map_or(0.0, |(v, _)| v as f64));
    gauge!(TRAFFIC_CANARY_WEIGHT, "model" => m()).set(now.canary.map_or(0.0, |(_, w)| w));
    gauge!(ROLLOUT_STEP, "model" => m()).set(now.step.map_or(0.0, |s| (s + 1) as f64));
    gauge!(ROUTING_GENERATION, "model" => m()).set(now.generation as f64);
    for &(version, percent) in &now.shadows {
        gauge!(TRAFFIC_SHADOW_PERCENT, "model" => m(), "version" => version.to_string())
            .set(percent);
    }
    for &(gone, _) in old
        .into_iter()
        .flat_map(|o| &o.shadows)
        .filter(|(v, _)| !now.shadows.iter().any(|(s, _)| s == v))
    {
        gauge!(TRAFFIC_SHADOW_PERCENT, "model" => m(), "version" => gone.to_string()).set(0.0);
    }
}

/// A model's routing as its gauges show it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutingGauges {
    /// The version unpinned requests go to now.
    pub stable: Option<u64>,
    /// Canary version and weight (percent).
    pub canary: Option<(u64, f64)>,
    /// The rollout's current step (0-based), when one runs.
    pub step: Option<usize>,
    /// Shadow versions and the percent mirrored to each.
    pub shadows: Vec<(u64, f64)>,
    /// routing.toml's generation.
    pub generation: u64,
}

/// Publishes a drift statistic (the detector thread; never the request path).
pub fn set_drift_score(model: &str, feature: &str, test: &'static str, value: f64) {
    gauge!(DRIFT_SCORE, "model" => model.to_string(), "feature" => feature.to_string(), "test" => test)
        .set(value);
}

/// Publishes a model's drift state (0 OK, 1 WARN, 2 DRIFT).
pub fn set_drift_state(model: &str, state: f64) {
    gauge!(DRIFT_STATE, "model" => model.to_string()).set(state);
}

/// Counts a drift episode whose webhook was not sent (`reason`: cooldown, fleet).
pub fn count_drift_suppressed(model: &str, reason: &'static str) {
    counter!(DRIFT_SUPPRESSED, "model" => model.to_string(), "reason" => reason).increment(1);
}

/// Counts a drift episode that could not be claimed in the shared folder.
pub fn count_drift_claim_error(model: &str) {
    counter!(DRIFT_CLAIM_ERRORS, "model" => model.to_string()).increment(1);
}

/// Counts a webhook delivery attempt.
pub fn count_webhook(target: &str, outcome: &'static str) {
    counter!(WEBHOOK_DELIVERIES, "target" => target.to_string(), "outcome" => outcome).increment(1);
}

/// Counts a failed call to an external source (`kind`: unreachable, refused, download,
/// write_back).
pub fn count_source_error(source: &'static str, kind: &'static str) {
    counter!(SOURCE_ERRORS, "source" => source, "kind" => kind).increment(1);
}

/// Counts a version an external source published.
pub fn count_source_published(source: &'static str, model: &str) {
    counter!(SOURCE_PUBLISHED, "source" => source, "model" => model.to_string()).increment(1);
}

/// Publishes a target's outbox backlog.
pub fn set_webhook_backlog(target: &str, n: usize) {
    gauge!(WEBHOOK_BACKLOG, "target" => target.to_string()).set(n as f64);
}

/// Publishes a listener's open connections.
pub fn set_connections_open(listener: &'static str, n: usize) {
    gauge!(CONNECTIONS_OPEN, "listener" => listener).set(n as f64);
}

/// Counts a failed TLS handshake.
pub fn count_tls_failure(listener: &'static str) {
    counter!(TLS_HANDSHAKE_FAILURES, "listener" => listener).increment(1);
}

/// Counts a connection refused for the connection limit.
pub fn count_connection_refused(listener: &'static str) {
    counter!(CONNECTIONS_REFUSED, "listener" => listener).increment(1);
}

/// Counts a rollout look Prometheus could not answer.
pub fn count_rollout_inconclusive(model: &str, look: &'static str) {
    counter!(ROLLOUT_INCONCLUSIVE, "model" => model.to_string(), "look" => look).increment(1);
}

/// Publishes which versions of a model are ready (1) and which no longer are (0).
pub fn set_version_ready(model: &str, version: u64, ready: bool) {
    gauge!(MODEL_VERSION_READY, "model" => model.to_string(), "version" => version.to_string())
        .set(if ready { 1.0 } else { 0.0 });
}

/// Publishes a version's queue depth and running batches.
pub fn set_queue_load(model: &str, version: u64, queued: usize, running: usize) {
    let labels = [
        ("model", model.to_string()),
        ("version", version.to_string()),
    ];
    gauge!(QUEUE_DEPTH, &labels).set(queued as f64);
    gauge!(INFLIGHT, &labels).set(running as f64);
}

/// Counts a promotion.
pub fn count_promotion(model: &str) {
    counter!(ROLLOUT_PROMOTIONS, "model" => model.to_string()).increment(1);
}

/// Counts a rollback.
pub fn count_rollback(model: &str) {
    counter!(ROLLOUT_ROLLBACKS, "model" => model.to_string()).increment(1);
}

/// Counts a mirrored run that was not made.
pub fn count_mirror_shed(model: &str, source: &'static str, reason: &'static str) {
    counter!(MIRROR_SHED, "model" => model.to_string(), "source" => source, "reason" => reason)
        .increment(1);
}

/// Records a comparison of a candidate version's answer with the primary's.
/// `rows` compared, `disagreed` of them, the answer's mean absolute difference (when
/// it had float values), and the inference time difference (candidate - primary).
pub fn record_comparison(
    model: &str,
    version: &str,
    source: &'static str,
    rows: u64,
    disagreed: u64,
    mean_abs_diff: Option<f64>,
    latency_delta: f64,
) {
    let labels = [
        ("model", model.to_string()),
        ("version", version.to_string()),
        ("source", source.to_string()),
    ];
    counter!(COMPARE_ROWS, &labels).increment(rows);
    counter!(COMPARE_DISAGREED_ROWS, &labels).increment(disagreed);
    if let Some(mad) = mean_abs_diff {
        histogram!(COMPARE_MEAN_ABS_DIFF, &labels).record(mad);
    }
    // An EWMA per label set, kept in the gauge itself: g += (x - g) / 8.
    let g = gauge!(COMPARE_LATENCY_DELTA, &labels);
    let key = labels
        .iter()
        .map(|(_, v)| v.as_str())
        .collect::<Vec<_>>()
        .join("\u{1f}");
    let mut deltas = LATENCY_DELTAS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let ewma = deltas.entry(key).or_insert(latency_delta);
    *ewma += (latency_delta - *ewma) / 8.0;
    g.set(*ewma);
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

/// Counts a reconciliation pass over the repository.
pub fn count_scan() {
    counter!(REPOSITORY_SCANS).increment(1);
}

/// Sets the number of ready versions of a model.
pub fn set_versions_ready(model: &str, n: usize) {
    gauge!(MODEL_VERSIONS_READY, "model" => model.to_string()).set(n as f64);
}

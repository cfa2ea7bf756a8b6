//! Inference capture and ground-truth feedback, in process and off the request path.
//!
//! The request path asks [`Capture::wants`] (is capture on for the model, is this request
//! sampled) and hands a [`Record`] (its id, time, variant, routing key, the tensors it
//! was sent and answered: clones that share their bytes) to [`Capture::observe`], which
//! `try_send`s it on a bounded channel: a full channel drops the record (counted), the
//! request never waits. One writer thread ([`writer`]) turns records into Parquet files,
//! one schema per model version ([`schema`]), under
//! `<dir>/<model>/<version>/date=YYYY-MM-DD/part-….parquet`; a file is written under a
//! hidden temporary name and renamed when it is closed (by size, age, date change, a
//! flush or shutdown), so readers only ever see complete files. Retention deletes files
//! by age and total size. A write error (a full disk) stops capture for a while
//! (counted, logged once per episode), never the serving.
//!
//! Feedback (`POST /v2/models/{m}/feedback`) goes to the same thread, which keeps a
//! bounded index of recent predictions by request id (size and age limits), joins each
//! item, answers per item and writes the joined pairs to `<dir>/<model>/feedback/`.

pub mod quality;
pub mod schema;
pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};
use crate::metrics::{self, Variant};
use crate::tensor::{Tensor, TensorSpec};

/// Server-wide capture settings (`[capture]` in the server config).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// Where captured datasets go; default `<model_repository>/.capture`.
    pub dir: Option<PathBuf>,
    /// Records waiting for the writer at most; beyond, records are dropped (counted).
    pub channel_capacity: usize,
    /// A file is closed (renamed into place) once it holds this many bytes.
    pub max_file_bytes: u64,
    /// ... or once it has been open this long, in seconds.
    pub max_file_secs: u64,
    /// Closed files older than this are deleted, in hours (0 = kept forever).
    pub max_age_hours: u64,
    /// The oldest files are deleted while the capture folder holds more (0 = no limit).
    pub max_total_bytes: u64,
    /// Predictions kept for joining feedback, at most (the oldest are forgotten first).
    pub feedback_index_size: usize,
    /// Feedback for a prediction older than this is `expired`, in seconds.
    pub feedback_max_age_secs: u64,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            dir: None,
            channel_capacity: 8192,
            max_file_bytes: 64 << 20,
            max_file_secs: 300,
            max_age_hours: 24 * 7,
            max_total_bytes: 10 << 30,
            feedback_index_size: 1_000_000,
            feedback_max_age_secs: 7 * 24 * 3600,
        }
    }
}

impl CaptureConfig {
    /// Checks the settings; the message names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: &str| Err(Error::Config(format!("capture.{f}: {why}")));
        if self.channel_capacity == 0 || self.channel_capacity > 1 << 20 {
            return bad("channel_capacity", "must be between 1 and 1048576");
        }
        if self.max_file_bytes < 4096 {
            return bad("max_file_bytes", "must be at least 4096");
        }
        if self.max_file_secs == 0 {
            return bad("max_file_secs", "must be at least 1");
        }
        if self.feedback_index_size > 100_000_000 {
            return bad("feedback_index_size", "at most 100000000");
        }
        if self.feedback_max_age_secs == 0 {
            return bad("feedback_max_age_secs", "must be at least 1");
        }
        Ok(())
    }

    /// Where the datasets are.
    pub fn dir_in(&self, repository: &Path) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| repository.join(".capture"))
    }
}

/// A model's capture settings: the `[capture]` table of its config.toml.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelCaptureConfig {
    pub enabled: bool,
    /// Share of successful requests captured (0 to 1).
    pub sample_rate: f64,
    /// Capture every failed request too (inputs and the error, no outputs).
    pub failed_requests: bool,
    /// Rows of each tensor kept per request (0 = all).
    pub max_rows_per_request: usize,
    /// Store the routing key as a hash (SHA-256, 16 hex digits) rather than as sent.
    pub hash_routing_key: bool,
    /// Labelled rows per quality window (tumbling: each full window is tested once).
    pub quality_window: usize,
    /// Significance of the one-sided test of a window against the reference.
    pub quality_alpha: f64,
    /// Worse windows in a row before `model.quality` fires.
    pub quality_bad_windows: u32,
    /// Windows in a row not worse before the episode ends.
    pub quality_good_windows: u32,
    /// The accuracy windows are tested against; unset: the stable variant's.
    pub reference_accuracy: Option<f64>,
    /// The mean absolute error windows are tested against; unset: the stable variant's.
    pub reference_mae: Option<f64>,
}

impl Default for ModelCaptureConfig {
    fn default() -> Self {
        ModelCaptureConfig {
            enabled: false,
            sample_rate: 1.0,
            failed_requests: false,
            max_rows_per_request: 0,
            hash_routing_key: true,
            quality_window: 500,
            quality_alpha: 0.001,
            quality_bad_windows: 2,
            quality_good_windows: 2,
            reference_accuracy: None,
            reference_mae: None,
        }
    }
}

impl ModelCaptureConfig {
    /// Checks the settings; the message names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: &str| Err(Error::Config(format!("capture.{f}: {why}")));
        if !(0.0..=1.0).contains(&self.sample_rate) {
            return bad("sample_rate", "must be between 0 and 1");
        }
        if self.quality_window < 10 || self.quality_window > 1_000_000 {
            return bad("quality_window", "must be between 10 and 1000000");
        }
        if !(self.quality_alpha > 0.0 && self.quality_alpha < 0.5) {
            return bad("quality_alpha", "must be between 0 and 0.5");
        }
        if self.quality_bad_windows == 0 || self.quality_good_windows == 0 {
            return bad(
                "quality_bad_windows",
                "bad and good windows must be at least 1",
            );
        }
        if self
            .reference_accuracy
            .is_some_and(|a| !(a > 0.0 && a <= 1.0))
        {
            return bad("reference_accuracy", "must be above 0 and at most 1");
        }
        if self
            .reference_mae
            .is_some_and(|m| !(m >= 0.0 && m.is_finite()))
        {
            return bad("reference_mae", "must be a non-negative number");
        }
        Ok(())
    }

    /// The quality settings of this model.
    /// The quality settings for a version whose profile measured `profile` (the
    /// config's reference, when set, wins).
    pub fn quality(
        &self,
        profile: Option<&crate::drift::profile::ReferenceQuality>,
    ) -> quality::QualitySettings {
        quality::QualitySettings {
            profile: profile.copied(),
            window: self.quality_window,
            alpha: self.quality_alpha,
            bad_windows: self.quality_bad_windows,
            good_windows: self.quality_good_windows,
            reference_accuracy: self.reference_accuracy,
            reference_mae: self.reference_mae,
        }
    }
}

/// What capture knows of one loaded version: its interface (the dataset's schema) and
/// its counters. Made when the version loads.
pub struct VersionCapture {
    pub model: String,
    pub version: u64,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// The version's reference quality from its profile (`--label-column`), used
    /// when the model's config sets none.
    pub reference: Option<crate::drift::profile::ReferenceQuality>,
    captured: ::metrics::Counter,
    dropped: ::metrics::Counter,
}

impl VersionCapture {
    pub fn new(model: &str, version: u64, inputs: &[TensorSpec], outputs: &[TensorSpec]) -> Self {
        VersionCapture {
            model: model.to_string(),
            version,
            inputs: inputs.to_vec(),
            outputs: outputs.to_vec(),
            reference: None,
            captured: ::metrics::counter!(metrics::CAPTURE_RECORDS, "model" => model.to_string()),
            dropped: ::metrics::counter!(metrics::CAPTURE_DROPPED, "model" => model.to_string(), "reason" => "channel_full"),
        }
    }
}

/// One captured request, as the writer receives it.
pub struct Record {
    pub version: Arc<VersionCapture>,
    pub settings: Arc<ModelCaptureConfig>,
    pub id: String,
    /// Unix milliseconds when the request arrived.
    pub time_ms: u64,
    pub variant: Variant,
    /// As sent; hashed by the writer unless configured otherwise.
    pub routing_key: Option<String>,
    pub inputs: Vec<Tensor>,
    /// The outputs answered (empty for a failed request).
    pub outputs: Vec<Tensor>,
    /// The error of a failed request.
    pub error: Option<String>,
    pub inference_us: u64,
    pub total_us: u64,
}

/// What the request path decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    /// Captured if it succeeds.
    pub success: bool,
}

/// One feedback item as sent: `{"id": ..., "label": 2}` or `{"id": ..., "value": 0.7}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackItem {
    pub id: serde_json::Value,
    #[serde(default)]
    pub label: Option<serde_json::Value>,
    #[serde(default)]
    pub value: Option<serde_json::Value>,
}

/// The answer for one feedback item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackResult {
    pub id: String,
    /// `joined`, `unknown`, `expired` or `malformed`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A request to the writer thread, answered on its oneshot channel.
pub enum Control {
    Feedback {
        model: String,
        items: Vec<FeedbackItem>,
        reply: tokio::sync::oneshot::Sender<Vec<FeedbackResult>>,
    },
    /// Closes every open file (renamed into place) and answers how many.
    Flush(tokio::sync::oneshot::Sender<usize>),
    /// The captured data behind a drift window (see [`Locator`]).
    Locate {
        model: String,
        version: u64,
        span: (u64, u64),
        reply: crossbeam_channel::Sender<serde_json::Value>,
    },
}

/// How long a drift event waits for the writer to name its files: the writer answers
/// control calls at once, so only a writer stuck on a slow disk makes it wait this long.
const LOCATE_WAIT: Duration = Duration::from_secs(2);

/// Names the captured data behind a drift window, for the drift detector's events: the
/// writer closes that version's open files (so the names it gives are readable files)
/// and lists those covering the window, as a quality event does.
pub struct Locator {
    control: crossbeam_channel::Sender<Control>,
}

impl crate::drift::DataLocator for Locator {
    fn locate(&self, model: &str, version: u64, span: (u64, u64)) -> Option<serde_json::Value> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.control
            .send_timeout(
                Control::Locate {
                    model: model.to_string(),
                    version,
                    span,
                    reply,
                },
                LOCATE_WAIT,
            )
            .ok()?;
        rx.recv_timeout(LOCATE_WAIT).ok()
    }
}

/// The capture state shown by `GET /admin/capture`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CaptureStatus {
    pub dir: String,
    /// False while a write error (a full disk) keeps capture stopped.
    pub writing: bool,
    pub last_error: Option<String>,
    pub files_open: usize,
    pub records_written: u64,
    pub records_dropped: u64,
    pub bytes_written: u64,
    /// Closed files in the capture folder, and their bytes (at the last retention pass).
    pub files: u64,
    pub total_bytes: u64,
    pub feedback_index_entries: usize,
    pub feedback_joined: u64,
    pub feedback_unknown: u64,
    pub feedback_expired: u64,
    pub feedback_malformed: u64,
    /// Live quality per model version and variant (from joined feedback).
    pub quality: Vec<quality::QualityStatus>,
}

/// Read access to the quality counts the writer publishes (every tick, about 10 ms
/// behind the feedback), for the rollout judge's quality criteria.
#[derive(Debug, Clone)]
pub struct QualityReader(Arc<Mutex<CaptureStatus>>);

impl QualityReader {
    /// The cumulative quality of one model version and variant; `None` before any of
    /// its feedback joined (or after a restart: the counts start over).
    pub fn status(
        &self,
        model: &str,
        version: u64,
        variant: &str,
    ) -> Option<quality::QualityStatus> {
        let s = self.0.lock().ok()?;
        s.quality
            .iter()
            .find(|q| q.model == model && q.version == version && q.variant == variant)
            .cloned()
    }
}

/// The capture side of a running server: the request path's end of the channel, the
/// admin calls' end of the control channel, and the writer's published state.
pub struct Capture {
    tx: crossbeam_channel::Sender<Box<Record>>,
    control: crossbeam_channel::Sender<Control>,
    pub status: Arc<Mutex<CaptureStatus>>,
    pub dir: PathBuf,
}

impl Capture {
    /// Starts the writer thread; it closes its files when `shutdown` is cancelled, and
    /// the tracker waits for that.
    pub fn start(
        config: &CaptureConfig,
        repository: &Path,
        outbox: Arc<crate::outbox::Outbox>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<Capture> {
        let dir = config.dir_in(repository);
        // A read-only registry (the default dir is inside it) or an unwritable dir must
        // not stop the gateway from serving: capture reports the error and the writer
        // retries (and counts what it drops) as it does for a full disk.
        let unwritable = std::fs::create_dir_all(&dir)
            .err()
            .map(|e| format!("capture.dir {}: {e}", dir.display()));
        if let Some(e) = &unwritable {
            tracing::warn!(error = %e, "capture directory cannot be created; capture is paused");
        }
        let (tx, rx) = crossbeam_channel::bounded(config.channel_capacity);
        let (control, control_rx) = crossbeam_channel::bounded(64);
        let status = Arc::new(Mutex::new(CaptureStatus {
            dir: dir.display().to_string(),
            writing: unwritable.is_none(),
            last_error: unwritable,
            ..CaptureStatus::default()
        }));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let w = writer::Writer::new(
            config.clone(),
            dir.clone(),
            repository.to_path_buf(),
            Arc::clone(&status),
            outbox,
        );
        let token = shutdown.clone();
        std::thread::Builder::new()
            .name("capture".into())
            .spawn(move || {
                w.run(rx, control_rx, token);
                let _ = done_tx.send(());
            })
            .map_err(|e| Error::Internal(format!("cannot start the capture thread: {e}")))?;
        // Shutdown waits (bounded by the grace period) for the files to be closed.
        tracker.spawn(async move {
            let _ = done_rx.await;
        });
        Ok(Capture {
            tx,
            control,
            status,
            dir,
        })
    }

    /// The request path's first question: is this request captured, if it succeeds or
    /// if it fails?
    pub fn wants(settings: &ModelCaptureConfig) -> Option<Wanted> {
        if !settings.enabled {
            return None;
        }
        let success = settings.sample_rate >= 1.0
            || (settings.sample_rate > 0.0 && fastrand::f64() < settings.sample_rate);
        (success || settings.failed_requests).then_some(Wanted { success })
    }

    /// The request path: hands a record to the writer (never waits).
    pub fn observe(&self, record: Record) {
        let version = Arc::clone(&record.version);
        match self.tx.try_send(Box::new(record)) {
            Ok(()) => version.captured.increment(1),
            Err(_) => version.dropped.increment(1),
        }
    }

    /// Joins feedback items with their predictions; one answer per item.
    pub async fn feedback(
        &self,
        model: &str,
        items: Vec<FeedbackItem>,
    ) -> Result<Vec<FeedbackResult>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send_control(Control::Feedback {
            model: model.to_string(),
            items,
            reply,
        })?;
        rx.await
            .map_err(|_| Error::Unavailable("the capture writer has stopped".into()))
    }

    /// The drift detector's way to the captured data (see [`Locator`]).
    pub fn locator(&self) -> Locator {
        Locator {
            control: self.control.clone(),
        }
    }

    /// The rollout controller's view of the live quality (see [`QualityReader`]).
    pub fn quality_reader(&self) -> QualityReader {
        QualityReader(Arc::clone(&self.status))
    }

    /// Closes every open file now: what was captured so far becomes visible.
    pub async fn flush(&self) -> Result<usize> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send_control(Control::Flush(reply))?;
        rx.await
            .map_err(|_| Error::Unavailable("the capture writer has stopped".into()))
    }

    fn send_control(&self, c: Control) -> Result<()> {
        self.control
            .send_timeout(c, Duration::from_secs(1))
            .map_err(|_| Error::Overloaded {
                reason: "the capture writer is busy; try again".into(),
                retry_after: Duration::from_secs(1),
            })
    }

    /// The state of capture and feedback.
    pub fn state(&self) -> CaptureStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// The id of a request that came without one: 16 random hex digits after `gen-`.
pub fn generate_id() -> String {
    // By hand: this runs for most requests, and `format!` costs several times as much.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u64(..);
    let mut id = String::with_capacity(20);
    id.push_str("gen-");
    for shift in (0..16).rev() {
        id.push(char::from(HEX[((n >> (shift * 4)) & 0xf) as usize]));
    }
    id
}

//! The capture writer thread: buffers records per dataset, writes them as Parquet row
//! groups into a hidden temporary file, renames the file into place when it is closed,
//! applies retention, and keeps the feedback index.
//!
//! A file is `<dataset>/date=YYYY-MM-DD/.part-….parquet.inprogress` while open (readers
//! skip names that start with a dot, and the suffix is not `.parquet`), and
//! `part-<start ms>-<seq>-<replica>.parquet` once closed: a killed gateway leaves only a
//! temporary file, which the next start deletes. A write error (a full disk) ends the
//! open file of that dataset (deleted: it could not be finished), pauses capture for
//! [`PAUSE`], counts every record lost, and is logged once until a file closes again.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arrow_schema::Schema;
use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use tokio_util::sync::CancellationToken;

use super::quality::{Labelled, Tracker};
use super::schema::{self, FeedbackRow};
use super::{CaptureConfig, CaptureStatus, Control, FeedbackItem, FeedbackResult, Record};
use super::{ModelCaptureConfig, VersionCapture};
use crate::drift::OutboxSink;
use crate::drift::detector::Sink;
use crate::drift::features::{Prediction, predictions_of};
use crate::error::{Error, Result};
use crate::metrics;
use crate::outbox::{Event, Outbox};

/// How long capture stays stopped after a write error before it tries again.
pub const PAUSE: Duration = Duration::from_secs(10);
/// Buffered records are written as a row group once this many are waiting ...
const BATCH_RECORDS: usize = 512;
/// ... or once they hold this many tensor bytes ...
const BATCH_BYTES: usize = 4 << 20;
/// ... or once the oldest waited this long.
const BATCH_AGE: Duration = Duration::from_secs(1);
/// Most rows of a request whose predictions the feedback index keeps.
const INDEX_ROWS: usize = 64;
/// How often retention looks at the folder.
const RETENTION_EVERY: Duration = Duration::from_secs(60);
/// Suffix of a file still being written.
const IN_PROGRESS: &str = ".inprogress";
/// How long the writer sleeps when no record waits (a control call wakes it at once).
/// Records wait at most this long: at 100,000 a second, 1,000 of the channel's places.
const POLL: Duration = Duration::from_millis(10);
/// Records taken before control calls are looked at again.
const DRAIN_PER_ROUND: usize = 4096;

#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    Capture(String, u64),
    Feedback(String),
}

enum Pending {
    Records(Vec<Record>),
    Feedback(Vec<FeedbackRow>),
}

impl Pending {
    fn len(&self) -> usize {
        match self {
            Pending::Records(r) => r.len(),
            Pending::Feedback(r) => r.len(),
        }
    }
}

struct OpenFile {
    writer: ArrowWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    opened: Instant,
    date: String,
    rows: u64,
}

struct Dataset {
    base: PathBuf,
    model: String,
    schema: Arc<Schema>,
    file: Option<OpenFile>,
    pending: Pending,
    pending_bytes: usize,
    pending_since: Option<Instant>,
    /// The date of the pending rows (a new date closes the file first).
    pending_date: String,
}

/// A prediction the feedback index remembers.
struct Entry {
    version: Arc<VersionCapture>,
    settings: Arc<ModelCaptureConfig>,
    variant: &'static str,
    time_ms: u64,
    predictions: Vec<Prediction>,
    /// Columns of a float output read by argmax: labels must be below it.
    classes: Option<usize>,
    seq: u64,
}

/// The bounded index of recent predictions by request id: at most `size` entries (the
/// oldest forgotten first); an entry older than the age limit answers `expired`.
struct Index {
    map: HashMap<String, Entry>,
    order: VecDeque<(String, u64)>,
    size: usize,
    seq: u64,
}

impl Index {
    fn insert(&mut self, id: String, mut e: Entry) {
        if self.size == 0 {
            return;
        }
        self.seq += 1;
        e.seq = self.seq;
        self.order.push_back((id.clone(), self.seq));
        self.map.insert(id, e);
        while self.map.len() > self.size {
            let Some((old, seq)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|e| e.seq == seq) {
                self.map.remove(&old);
            }
        }
        // Queue entries of ids seen again are stale: drop them so the queue stays bounded.
        while self.order.len() > 2 * self.size.max(1) {
            let Some((old, seq)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|e| e.seq == seq) {
                self.map.remove(&old);
            }
        }
    }
}

/// The writer thread's state.
pub struct Writer {
    config: CaptureConfig,
    dir: PathBuf,
    status: Arc<Mutex<CaptureStatus>>,
    datasets: HashMap<Key, Dataset>,
    index: Index,
    paused_until: Option<Instant>,
    /// Set while a write error episode lasts (logged once).
    failing: bool,
    last_retention: Option<Instant>,
    replica: u32,
    seq: u64,
    stats: CaptureStatus,
    /// Live quality per (model, version, variant).
    trackers: std::collections::BTreeMap<(String, u64, &'static str), Tracker>,
    /// The (model, version, variant) whose quality series exist (at 0 until feedback).
    announced: HashMap<String, std::collections::HashSet<(u64, &'static str)>>,
    /// `model.quality` events go through the webhook outbox.
    sink: OutboxSink,
}

impl Writer {
    pub fn new(
        config: CaptureConfig,
        dir: PathBuf,
        repository: PathBuf,
        status: Arc<Mutex<CaptureStatus>>,
        outbox: Arc<Outbox>,
    ) -> Writer {
        let stats = status.lock().map(|s| s.clone()).unwrap_or_default();
        Writer {
            index: Index {
                map: HashMap::new(),
                order: VecDeque::new(),
                size: config.feedback_index_size,
                seq: 0,
            },
            config,
            dir,
            status,
            datasets: HashMap::new(),
            paused_until: None,
            failing: false,
            last_retention: None,
            replica: fastrand::u32(..),
            seq: 0,
            stats,
            trackers: std::collections::BTreeMap::new(),
            announced: HashMap::new(),
            sink: OutboxSink {
                outbox,
                repository,
                // Quality events name their files themselves.
                locator: None,
                unwritten: Vec::new(),
                retry_at: None,
                // Quality alarms are per replica's own labelled traffic: not claimed.
                claims: None,
            },
        }
    }

    /// Runs until `shutdown`: then writes what is buffered, closes every file, returns.
    pub fn run(
        mut self,
        records: Receiver<Box<Record>>,
        control: Receiver<Control>,
        shutdown: CancellationToken,
    ) {
        remove_in_progress(&self.dir);
        loop {
            // Records are taken as they wait, never waited for: were this thread blocked
            // on `records`, every request's try_send would wake it (a futex call and a
            // context switch on the request's own thread). Bounded per round, so that
            // control calls are still answered while records keep coming.
            let (mut ended, mut taken) = (false, 0);
            while taken < DRAIN_PER_ROUND {
                match records.try_recv() {
                    Ok(r) => {
                        self.record(r);
                        taken += 1;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        ended = true;
                        break;
                    }
                }
            }
            if ended {
                break;
            }
            // Sleep unless the round stopped at its bound with records still waiting: a
            // record that arrived since is taken next round, in batches, not one by one.
            let call = if taken == DRAIN_PER_ROUND {
                control.try_recv().map_err(|e| match e {
                    TryRecvError::Empty => RecvTimeoutError::Timeout,
                    TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
                })
            } else {
                control.recv_timeout(POLL)
            };
            match call {
                Ok(c) => {
                    // Records sent before this call are in the channel: index them first,
                    // so feedback right after its prediction joins.
                    while let Ok(r) = records.try_recv() {
                        self.record(r);
                    }
                    self.control(c);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.tick();
            if shutdown.is_cancelled() {
                while let Ok(r) = records.try_recv() {
                    self.record(r);
                }
                break;
            }
        }
        let closed = self.close_all();
        tracing::info!(files = closed, "capture files closed");
        self.publish();
    }

    fn record(&mut self, r: Box<Record>) {
        if r.error.is_none() {
            self.index_prediction(&r);
        }
        if self.paused_until.is_some_and(|t| Instant::now() < t) {
            self.drop_records(&r.version.model, "write_error", 1);
            return;
        }
        let key = Key::Capture(r.version.model.clone(), r.version.version);
        let date = date_of(r.time_ms);
        let bytes: usize = r
            .inputs
            .iter()
            .chain(&r.outputs)
            .map(|t| t.data.len())
            .sum();
        let ds = self.datasets.entry(key).or_insert_with(|| Dataset {
            base: self
                .dir
                .join(&r.version.model)
                .join(r.version.version.to_string()),
            model: r.version.model.clone(),
            schema: schema::capture_schema(&r.version.inputs, &r.version.outputs),
            file: None,
            pending: Pending::Records(Vec::new()),
            pending_bytes: 0,
            pending_since: None,
            pending_date: date.clone(),
        });
        if ds.pending_date != date && ds.pending.len() > 0 {
            let key = Key::Capture(r.version.model.clone(), r.version.version);
            self.write_pending(&key);
        }
        let key = Key::Capture(r.version.model.clone(), r.version.version);
        let Some(ds) = self.datasets.get_mut(&key) else {
            return;
        };
        ds.pending_date = date;
        ds.pending_bytes += bytes;
        ds.pending_since.get_or_insert_with(Instant::now);
        if let Pending::Records(v) = &mut ds.pending {
            v.push(*r);
        }
        if ds.pending.len() >= BATCH_RECORDS || ds.pending_bytes >= BATCH_BYTES {
            self.write_pending(&key);
        }
    }

    fn index_prediction(&mut self, r: &Record) {
        let Some(first) = r.outputs.first() else {
            return;
        };
        let Some(predictions) = predictions_of(first, INDEX_ROWS) else {
            return;
        };
        let float = matches!(
            first.dtype,
            crate::tensor::DataType::Fp16
                | crate::tensor::DataType::Fp32
                | crate::tensor::DataType::Fp64
        );
        let rows = first.shape.first().copied().unwrap_or(1).max(1);
        let width = first.element_count() / rows;
        self.announce(&r.version.model, r.version.version, r.variant.as_str());
        self.index.insert(
            r.id.clone(),
            Entry {
                version: Arc::clone(&r.version),
                settings: Arc::clone(&r.settings),
                variant: r.variant.as_str(),
                time_ms: r.time_ms,
                predictions,
                classes: (float && width > 1).then_some(width),
                seq: 0,
            },
        );
    }

    /// Makes the quality counters of a (model, version, variant) exist at 0 once it has
    /// predictions that feedback may label: Prometheus' `increase()` counts nothing of a
    /// series' first sample, so a series born with its first labels would lose them.
    fn announce(&mut self, model: &str, version: u64, variant: &'static str) {
        // Looked up without allocating: this runs for every indexed prediction.
        if self
            .announced
            .get(model)
            .is_some_and(|seen| seen.contains(&(version, variant)))
        {
            return;
        }
        let labels = [
            ("model", model.to_string()),
            ("version", version.to_string()),
            ("variant", variant.to_string()),
        ];
        for name in [
            metrics::QUALITY_ROWS,
            metrics::QUALITY_CLASS_ROWS,
            metrics::QUALITY_CORRECT_ROWS,
            metrics::QUALITY_VALUE_ROWS,
        ] {
            ::metrics::counter!(name, &labels).increment(0);
        }
        for name in [
            metrics::QUALITY_ABS_ERROR_SUM,
            metrics::QUALITY_SQUARED_ERROR_SUM,
        ] {
            ::metrics::gauge!(name, &labels).increment(0.0);
        }
        self.announced
            .entry(model.to_string())
            .or_default()
            .insert((version, variant));
    }

    fn drop_records(&mut self, model: &str, reason: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        self.stats.records_dropped += n;
        ::metrics::counter!(metrics::CAPTURE_DROPPED, "model" => model.to_string(), "reason" => reason)
            .increment(n);
    }

    /// Writes a dataset's buffered rows as a row group (opening a file when none is
    /// open, closing it first when the date changed) and closes the file when it is
    /// full.
    fn write_pending(&mut self, key: &Key) {
        let max_bytes = self.config.max_file_bytes;
        let Some(ds) = self.datasets.get_mut(key) else {
            return;
        };
        if ds.pending.len() == 0 {
            return;
        }
        let date = ds.pending_date.clone();
        if ds.file.as_ref().is_some_and(|f| f.date != date) {
            self.close(key);
        }
        let result = self.append(key, &date);
        match result {
            Ok(full) => {
                if full
                    || self.datasets.get(key).is_none_or(|d| {
                        d.file.as_ref().is_some_and(|f| {
                            f.writer.bytes_written() as u64 + f.writer.in_progress_size() as u64
                                >= max_bytes
                        })
                    })
                {
                    self.close(key);
                }
            }
            Err(e) => self.fail(key, &e),
        }
    }

    fn append(&mut self, key: &Key, date: &str) -> Result<bool> {
        self.seq += 1;
        let (seq, replica) = (self.seq, self.replica);
        let Some(ds) = self.datasets.get_mut(key) else {
            return Ok(false);
        };
        let batch = match &ds.pending {
            Pending::Records(r) => schema::capture_batch(&ds.schema, r)?,
            Pending::Feedback(r) => schema::feedback_batch(&ds.schema, r)?,
        };
        if ds.file.is_none() {
            // Named by its first row's time, so that a time range finds it.
            let first = match &ds.pending {
                Pending::Records(r) => r.iter().map(|r| r.time_ms).min(),
                Pending::Feedback(r) => r.iter().map(|r| r.prediction_time_ms).min(),
            }
            .unwrap_or_else(crate::util::now_ms);
            ds.file = Some(open(&ds.base, &ds.schema, date, first, seq, replica)?);
            self.stats.files_open += 1;
            ::metrics::gauge!(metrics::CAPTURE_FILES_OPEN).increment(1.0);
        }
        let Some(f) = ds.file.as_mut() else {
            return Ok(false);
        };
        f.writer
            .write(&batch)
            .map_err(|e| Error::Unavailable(format!("{}: {e}", f.tmp.display())))?;
        // Row groups are encoded in memory: write them out before they grow large.
        if f.writer.in_progress_size() > 8 << 20 {
            f.writer
                .flush()
                .map_err(|e| Error::Unavailable(format!("{}: {e}", f.tmp.display())))?;
        }
        f.rows += batch.num_rows() as u64;
        ds.pending = match ds.pending {
            Pending::Records(_) => Pending::Records(Vec::new()),
            Pending::Feedback(_) => Pending::Feedback(Vec::new()),
        };
        ds.pending_bytes = 0;
        ds.pending_since = None;
        Ok(false)
    }

    /// Closes a dataset's file: footer written, flushed, renamed into place.
    fn close(&mut self, key: &Key) {
        let Some(ds) = self.datasets.get_mut(key) else {
            return;
        };
        let Some(f) = ds.file.take() else {
            return;
        };
        let model = ds.model.clone();
        self.stats.files_open = self.stats.files_open.saturating_sub(1);
        ::metrics::gauge!(metrics::CAPTURE_FILES_OPEN).decrement(1.0);
        let rows = f.rows;
        let tmp = f.tmp.clone();
        let done = (|| -> Result<u64> {
            let io =
                |e: &dyn std::fmt::Display| Error::Unavailable(format!("{}: {e}", tmp.display()));
            let file = f.writer.into_inner().map_err(|e| io(&e))?;
            file.sync_all().map_err(|e| io(&e))?;
            let len = file.metadata().map_err(|e| io(&e))?.len();
            std::fs::rename(&f.tmp, &f.path).map_err(|e| io(&e))?;
            if let Some(parent) = f.path.parent()
                && let Ok(d) = File::open(parent)
            {
                let _ = d.sync_all();
            }
            Ok(len)
        })();
        match done {
            Ok(len) => {
                if matches!(key, Key::Capture(..)) {
                    self.stats.records_written += rows;
                }
                self.stats.bytes_written += len;
                self.stats.files += 1;
                self.stats.total_bytes += len;
                ::metrics::counter!(metrics::CAPTURE_BYTES, "model" => model).increment(len);
                if self.failing {
                    self.failing = false;
                    self.stats.writing = true;
                    tracing::info!("capture writes again");
                }
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                self.lost(key, rows);
                self.stop(&e);
            }
        }
    }

    fn lost(&mut self, key: &Key, rows: u64) {
        if let Key::Capture(model, _) = key {
            let model = model.clone();
            self.drop_records(&model, "write_error", rows);
        }
    }

    /// A write error: the dataset's open file and buffered rows are lost (counted), and
    /// capture stops for a while.
    fn fail(&mut self, key: &Key, e: &Error) {
        let mut lost = 0;
        if let Some(ds) = self.datasets.get_mut(key) {
            lost += ds.pending.len() as u64;
            ds.pending = match ds.pending {
                Pending::Records(_) => Pending::Records(Vec::new()),
                Pending::Feedback(_) => Pending::Feedback(Vec::new()),
            };
            ds.pending_bytes = 0;
            ds.pending_since = None;
            if let Some(f) = ds.file.take() {
                lost += f.rows;
                let _ = std::fs::remove_file(&f.tmp);
                drop(f);
                self.stats.files_open = self.stats.files_open.saturating_sub(1);
                ::metrics::gauge!(metrics::CAPTURE_FILES_OPEN).decrement(1.0);
            }
        }
        self.lost(key, lost);
        self.stop(e);
    }

    fn stop(&mut self, e: &Error) {
        self.paused_until = Some(Instant::now() + PAUSE);
        self.stats.writing = false;
        self.stats.last_error = Some(e.to_string());
        if !self.failing {
            self.failing = true;
            tracing::error!(error = %e, pause_secs = PAUSE.as_secs(), "capture cannot write; records are dropped (counted) until it can, serving goes on");
        }
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::Feedback {
                model,
                items,
                reply,
            } => {
                let answers = self.feedback(&model, items);
                let _ = reply.send(answers);
            }
            Control::Flush(reply) => {
                let n = self.close_all();
                self.publish();
                let _ = reply.send(n);
            }
            Control::Locate {
                model,
                version,
                span,
                reply,
            } => {
                let refs = self.data_refs(&model, version, span);
                self.publish();
                let _ = reply.send(refs);
            }
        }
    }

    /// `data.capture` of an event about `model` `version` over `span` (unix ms): the
    /// closed capture files covering it and the model's feedback files, after closing
    /// what is open for them (the files an event names must exist), and the feedback
    /// rows joined for that version.
    fn data_refs(&mut self, model: &str, version: u64, span: (u64, u64)) -> serde_json::Value {
        self.write_pending(&Key::Capture(model.to_string(), version));
        self.close(&Key::Capture(model.to_string(), version));
        self.write_pending(&Key::Feedback(model.to_string()));
        self.close(&Key::Feedback(model.to_string()));
        serde_json::json!({
            "dir": self.dir.display().to_string(),
            "files": covering(&self.dir, model, version, span),
            "feedback_files": covering_feedback(&self.dir, model),
            "feedback_rows": self.trackers
                .iter()
                .filter(|((m, v, _), _)| m == model && *v == version)
                .map(|(_, t)| t.status.rows)
                .sum::<u64>(),
        })
    }

    fn feedback(&mut self, model: &str, items: Vec<FeedbackItem>) -> Vec<FeedbackResult> {
        let now = crate::util::now_ms();
        let max_age_ms = self.config.feedback_max_age_secs.saturating_mul(1000);
        let mut answers = Vec::with_capacity(items.len());
        let mut rows = Vec::new();
        for item in items {
            let (id, outcome) = match join(&self.index, model, &item, now, max_age_ms) {
                Ok(joined) => {
                    let id = joined.first().map(|r| r.id.clone()).unwrap_or_default();
                    rows.extend(joined);
                    (id, Ok("joined"))
                }
                Err(o) => (
                    item.id
                        .as_str()
                        .map_or_else(|| item.id.to_string(), str::to_string),
                    Err(o),
                ),
            };
            let (status, error) = match outcome {
                Ok(s) => (s, None),
                Err((s, e)) => (s, e),
            };
            match status {
                "joined" => self.stats.feedback_joined += 1,
                "unknown" => self.stats.feedback_unknown += 1,
                "expired" => self.stats.feedback_expired += 1,
                _ => self.stats.feedback_malformed += 1,
            }
            ::metrics::counter!(metrics::FEEDBACK, "model" => model.to_string(), "outcome" => status)
                .increment(1);
            answers.push(FeedbackResult {
                id,
                status: status.to_string(),
                error,
            });
        }
        for r in &rows {
            self.judge(r);
        }
        if !rows.is_empty() {
            let key = Key::Feedback(model.to_string());
            let date = date_of(now);
            let ds = self.datasets.entry(key.clone()).or_insert_with(|| Dataset {
                base: self.dir.join(model).join("feedback"),
                model: model.to_string(),
                schema: schema::feedback_schema(),
                file: None,
                pending: Pending::Feedback(Vec::new()),
                pending_bytes: 0,
                pending_since: None,
                pending_date: date.clone(),
            });
            if ds.pending_date != date && ds.pending.len() > 0 {
                self.write_pending(&key);
            }
            if let Some(ds) = self.datasets.get_mut(&key) {
                ds.pending_date = date;
                ds.pending_since.get_or_insert_with(Instant::now);
                if let Pending::Feedback(v) = &mut ds.pending {
                    v.extend(rows);
                }
            }
        }
        answers
    }

    /// Adds a joined row to its version's quality; an alarm becomes a `model.quality`
    /// event naming the capture and feedback files that cover the window.
    fn judge(&mut self, r: &FeedbackRow) {
        let Some(settings) = self
            .index
            .map
            .get(&r.id)
            .map(|e| e.settings.quality(e.version.reference.as_ref()))
        else {
            return;
        };
        let row = match (r.label, r.predicted_label, r.value, r.predicted_value) {
            (Some(label), Some(predicted), _, _) => Labelled::Class { label, predicted },
            (_, _, Some(value), Some(predicted)) => Labelled::Value { value, predicted },
            _ => return,
        };
        // A version that is not stable is compared with the stable variant's window.
        let baseline = (r.variant != "stable")
            .then(|| {
                self.trackers
                    .iter()
                    .find(|((m, v, var), _)| m == &r.model && *v != r.version && *var == "stable")
                    .and_then(|(_, t)| t.last_window)
            })
            .flatten();
        let key = (r.model.clone(), r.version, r.variant);
        let t = self.trackers.entry(key).or_insert_with(|| {
            let mut t = Tracker::default();
            t.status.model = r.model.clone();
            t.status.version = r.version;
            t.status.variant = r.variant.to_string();
            t.status.state = "OK".into();
            t
        });
        let alarm = t.add(row, r.prediction_time_ms, &settings, baseline);
        let s = &t.status;
        let labels = [
            ("model", s.model.clone()),
            ("version", s.version.to_string()),
            ("variant", s.variant.clone()),
        ];
        if let Some(a) = s.accuracy {
            ::metrics::gauge!(metrics::QUALITY_ACCURACY, &labels).set(a);
        }
        if let Some(a) = s.window_accuracy {
            ::metrics::gauge!(metrics::QUALITY_WINDOW_ACCURACY, &labels).set(a);
        }
        if let Some(m) = s.mae {
            ::metrics::gauge!(metrics::QUALITY_MAE, &labels).set(m);
        }
        if let Some(m) = s.rmse {
            ::metrics::gauge!(metrics::QUALITY_RMSE, &labels).set(m);
        }
        ::metrics::counter!(metrics::QUALITY_ROWS, &labels).increment(1);
        // The sums the rollout judge takes, for a fleet-wide judge to read from
        // Prometheus (`routing::analysis`): the same counts as the status'.
        ::metrics::counter!(metrics::QUALITY_CLASS_ROWS, &labels).absolute(s.class_rows);
        ::metrics::counter!(metrics::QUALITY_CORRECT_ROWS, &labels).absolute(s.correct);
        ::metrics::counter!(metrics::QUALITY_VALUE_ROWS, &labels)
            .absolute(s.rows.saturating_sub(s.class_rows));
        ::metrics::gauge!(metrics::QUALITY_ABS_ERROR_SUM, &labels).set(s.abs_error_sum);
        ::metrics::gauge!(metrics::QUALITY_SQUARED_ERROR_SUM, &labels).set(s.sq_error_sum);
        ::metrics::gauge!(metrics::QUALITY_STATE, &labels).set(if s.state == "DEGRADED" {
            1.0
        } else {
            0.0
        });
        let Some(a) = alarm else {
            return;
        };
        let (model, version, variant) = (s.model.clone(), s.version, r.variant);
        let capture = self.data_refs(&model, version, a.span);
        let now = SystemTime::now();
        let id = format!(
            "evt_{:013x}{:016x}",
            crate::util::unix_ms(now),
            fastrand::u64(..)
        );
        let at =
            |ms: u64| crate::util::rfc3339_ms(SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        tracing::warn!(model = %model, version, variant, metric = a.metric, live = a.live, reference = a.reference, p_value = a.p_value, "model quality below its reference");
        self.sink.deliver(Event {
            id: id.clone(),
            payload: serde_json::json!({
                "type": "model.quality",
                "id": id,
                "timestamp": crate::util::rfc3339_ms(now),
                "data": {
                    "model": model,
                    "version": version,
                    "variant": variant,
                    "state": "DEGRADED",
                    "metric": a.metric,
                    "live": a.live,
                    "reference": a.reference,
                    "reference_source": a.reference_source,
                    "p_value": a.p_value,
                    "window": {
                        "rows": a.window_rows,
                        "from": at(a.span.0),
                        "to": at(a.span.1),
                    },
                    "capture": capture,
                },
            }),
        });
    }

    /// Time-driven work: row groups of rows that waited long enough, files open too
    /// long, retention, the published state.
    fn tick(&mut self) {
        if self.paused_until.is_some_and(|t| Instant::now() >= t) {
            self.paused_until = None;
        }
        let max_open = Duration::from_secs(self.config.max_file_secs);
        let keys: Vec<Key> = self.datasets.keys().cloned().collect();
        for key in keys {
            let Some(ds) = self.datasets.get(&key) else {
                continue;
            };
            if ds.pending_since.is_some_and(|t| t.elapsed() >= BATCH_AGE) {
                self.write_pending(&key);
            }
            if self
                .datasets
                .get(&key)
                .and_then(|d| d.file.as_ref())
                .is_some_and(|f| f.opened.elapsed() >= max_open)
            {
                self.close(&key);
            }
        }
        if self
            .last_retention
            .is_none_or(|t| t.elapsed() >= RETENTION_EVERY)
        {
            self.last_retention = Some(Instant::now());
            self.retention();
        }
        self.sink.tick();
        self.publish();
    }

    fn close_all(&mut self) -> usize {
        let keys: Vec<Key> = self.datasets.keys().cloned().collect();
        let mut closed = 0;
        for key in keys {
            self.write_pending(&key);
            if self.datasets.get(&key).is_some_and(|d| d.file.is_some()) {
                self.close(&key);
                closed += 1;
            }
        }
        closed
    }

    /// Deletes closed files older than `max_age_hours`, then the oldest while the
    /// folder holds more than `max_total_bytes`.
    fn retention(&mut self) {
        let mut files = closed_files(&self.dir);
        let now = SystemTime::now();
        let max_age = Duration::from_secs(self.config.max_age_hours.saturating_mul(3600));
        files.sort_by_key(|f| f.1);
        let mut total: u64 = files.iter().map(|f| f.2).sum();
        let mut kept = files.len() as u64;
        for (path, modified, len) in &files {
            let old = self.config.max_age_hours > 0
                && now.duration_since(*modified).unwrap_or_default() > max_age;
            let over = self.config.max_total_bytes > 0 && total > self.config.max_total_bytes;
            if !(old || over) {
                continue;
            }
            if std::fs::remove_file(path).is_ok() {
                total -= len;
                kept -= 1;
                ::metrics::counter!(metrics::CAPTURE_FILES_DELETED).increment(1);
                if let Some(parent) = path.parent() {
                    // An empty date folder goes too (fails harmlessly when not empty).
                    let _ = std::fs::remove_dir(parent);
                }
            }
        }
        self.stats.files = kept;
        self.stats.total_bytes = total;
    }

    fn publish(&mut self) {
        self.stats.feedback_index_entries = self.index.map.len();
        self.stats.quality = self.trackers.values().map(|t| t.status.clone()).collect();
        if let Ok(mut s) = self.status.lock() {
            let dir = std::mem::take(&mut s.dir);
            *s = self.stats.clone();
            s.dir = dir;
        }
    }
}

/// Joins one feedback item: the labelled rows, or (status, error).
#[allow(clippy::type_complexity)]
fn join(
    index: &Index,
    model: &str,
    item: &FeedbackItem,
    now: u64,
    max_age_ms: u64,
) -> std::result::Result<Vec<FeedbackRow>, (&'static str, Option<String>)> {
    let malformed = |why: String| ("malformed", Some(why));
    let Some(id) = item.id.as_str() else {
        return Err(malformed("id must be a string".into()));
    };
    let (labels, values) = match (&item.label, &item.value) {
        (Some(l), None) => (
            Some(numbers(l, true).map_err(|e| malformed(format!("label {e}")))?),
            None,
        ),
        (None, Some(v)) => (
            None,
            Some(numbers(v, false).map_err(|e| malformed(format!("value {e}")))?),
        ),
        _ => return Err(malformed("give exactly one of label and value".into())),
    };
    let Some(e) = index.map.get(id) else {
        return Err(("unknown", Some("no recent prediction has this id".into())));
    };
    if e.version.model != model {
        return Err((
            "unknown",
            Some(format!(
                "no recent prediction of model '{model}' has this id"
            )),
        ));
    }
    if now.saturating_sub(e.time_ms) > max_age_ms {
        return Err((
            "expired",
            Some("the prediction is older than capture.feedback_max_age_secs".into()),
        ));
    }
    let n = labels.as_ref().or(values.as_ref()).map_or(0, Vec::len);
    if n != e.predictions.len() {
        return Err(malformed(format!(
            "the request had {} rows (predictions kept): give one {} per row",
            e.predictions.len(),
            if labels.is_some() { "label" } else { "value" }
        )));
    }
    let mut rows = Vec::with_capacity(n);
    for (row, p) in e.predictions.iter().enumerate() {
        let (label, value) = match (&labels, &values) {
            (Some(l), _) => (Some(l[row] as i64), None),
            (_, Some(v)) => (None, Some(v[row])),
            _ => (None, None),
        };
        let (predicted_label, predicted_value) = match p {
            Prediction::Class(c) => (Some(*c), None),
            Prediction::Score(s) => (None, Some(*s)),
        };
        if label.is_some() && predicted_label.is_none() {
            return Err(malformed(
                "this model predicts values: send value, not label".into(),
            ));
        }
        if value.is_some() && predicted_value.is_none() {
            return Err(malformed(
                "this model predicts classes: send label, not value".into(),
            ));
        }
        if let (Some(l), Some(c)) = (label, e.classes)
            && (l < 0 || l as usize >= c)
        {
            return Err(malformed(format!(
                "label {l} is outside the classes 0..{}",
                c - 1
            )));
        }
        rows.push(FeedbackRow {
            id: id.to_string(),
            time_ms: now,
            prediction_time_ms: e.time_ms,
            model: model.to_string(),
            version: e.version.version,
            variant: e.variant,
            row: row as u64,
            label,
            value,
            predicted_label,
            predicted_value,
        });
    }
    Ok(rows)
}

/// A number or an array of numbers; integers only for labels.
fn numbers(v: &serde_json::Value, integer: bool) -> std::result::Result<Vec<f64>, String> {
    let one = |x: &serde_json::Value| -> std::result::Result<f64, String> {
        if integer {
            x.as_i64()
                .map(|i| i as f64)
                .ok_or_else(|| format!("must be an integer, got {x}"))
        } else {
            x.as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| format!("must be a number, got {x}"))
        }
    };
    match v {
        serde_json::Value::Array(a) if !a.is_empty() => a.iter().map(one).collect(),
        other => Ok(vec![one(other)?]),
    }
}

/// `YYYY-MM-DD` (UTC) of a Unix millisecond time.
pub fn date_of(ms: u64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    let s = humantime::format_rfc3339_seconds(t).to_string();
    s.get(..10).unwrap_or("1970-01-01").to_string()
}

fn open(
    base: &Path,
    schema: &Arc<Schema>,
    date: &str,
    first_ms: u64,
    seq: u64,
    replica: u32,
) -> Result<OpenFile> {
    let dir = base.join(format!("date={date}"));
    let io = |e: &dyn std::fmt::Display| Error::Unavailable(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(&dir).map_err(|e| io(&e))?;
    let name = format!("part-{first_ms:013}-{seq:06}-{replica:08x}.parquet");
    let tmp = dir.join(format!(".{name}{IN_PROGRESS}"));
    let file = File::create(&tmp).map_err(|e| io(&e))?;
    // Request ids and tensor values are (nearly) all distinct: a dictionary for them is
    // built, found useless and dropped page by page, at a hash per value. Only the
    // columns that repeat keep one.
    let mut props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(64 * 1024))
        .set_dictionary_enabled(false);
    for column in ["model", "version", "variant", "routing_key", "error"] {
        props = props.set_column_dictionary_enabled(ColumnPath::from(column), true);
    }
    let props = props.build();
    let writer = ArrowWriter::try_new(file, Arc::clone(schema), Some(props)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(&e)
    })?;
    Ok(OpenFile {
        writer,
        path: dir.join(name),
        tmp,
        opened: Instant::now(),
        date: date.to_string(),
        rows: 0,
    })
}

/// Every `<dir>/<model>/<dataset>/date=*/<file>`, with the file's name.
fn data_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let sub = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    };
    for model in sub(dir).into_iter().filter(|p| p.is_dir()) {
        for ds in sub(&model).into_iter().filter(|p| p.is_dir()) {
            for date in sub(&ds).into_iter().filter(|p| p.is_dir()) {
                out.extend(sub(&date).into_iter().filter(|p| p.is_file()));
            }
        }
    }
    out
}

/// Closed files: (path, modified, length).
fn closed_files(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    data_files(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("part-") && n.ends_with(".parquet"))
        })
        .filter_map(|p| {
            let m = std::fs::metadata(&p).ok()?;
            Some((p, m.modified().ok()?, m.len()))
        })
        .collect()
}

/// Closed capture files of a version (paths relative to the capture folder) whose time
/// range (from the start time in the name to the last write) overlaps `span`.
fn covering(dir: &Path, model: &str, version: u64, span: (u64, u64)) -> Vec<String> {
    let base = dir.join(model).join(version.to_string());
    let mut out: Vec<String> = closed_files(dir)
        .into_iter()
        .filter(|(p, modified, _)| {
            let start = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("part-"))
                .and_then(|n| n.split('-').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            p.starts_with(&base) && start <= span.1 && crate::util::unix_ms(*modified) >= span.0
        })
        .filter_map(|(p, _, _)| Some(p.strip_prefix(dir).ok()?.display().to_string()))
        .collect();
    out.sort();
    out
}

/// Closed feedback files of a model, relative to the capture folder.
fn covering_feedback(dir: &Path, model: &str) -> Vec<String> {
    let base = dir.join(model).join("feedback");
    let mut out: Vec<String> = closed_files(dir)
        .into_iter()
        .filter(|(p, _, _)| p.starts_with(&base))
        .filter_map(|(p, _, _)| Some(p.strip_prefix(dir).ok()?.display().to_string()))
        .collect();
    out.sort();
    out
}

/// Deletes files a killed gateway left mid-write (never renamed into place).
fn remove_in_progress(dir: &Path) {
    for p in data_files(dir) {
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".part-") && n.ends_with(IN_PROGRESS))
        {
            tracing::info!(file = %p.display(), "removing a capture file left unfinished by a crash");
            let _ = std::fs::remove_file(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_days() {
        assert_eq!(date_of(0), "1970-01-01");
        assert_eq!(date_of(1_764_633_600_000), "2025-12-02");
        assert_eq!(date_of(1_764_633_599_999), "2025-12-01");
    }

    #[test]
    fn feedback_values_decode() {
        assert_eq!(numbers(&serde_json::json!(2), true), Ok(vec![2.0]));
        assert_eq!(
            numbers(&serde_json::json!([1, 0]), true),
            Ok(vec![1.0, 0.0])
        );
        assert!(numbers(&serde_json::json!(0.5), true).is_err());
        assert!(numbers(&serde_json::json!("x"), false).is_err());
        assert_eq!(numbers(&serde_json::json!(0.7), false), Ok(vec![0.7]));
    }
}

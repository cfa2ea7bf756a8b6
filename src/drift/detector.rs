//! The drift detector: a thread of its own that takes samples off the bounded channel,
//! and per model version feeds every row to the sequential statistics
//! ([`super::sequential`], the default mode) or tests a sliding window every `step`
//! rows (window mode), runs the OK / WARN / DRIFT episode machine ([`super::episode`]),
//! and hands one event per drift episode to the webhook outbox (`Detector::hand_off`).
//! In both modes the last `window` rows are kept: the window tests on them are the
//! effect sizes an event carries.
//!
//! Nothing here runs on the request path: requests only `try_send` their sample.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::json;

use super::profile::{self, Prediction, Profile};
use super::sequential::Sequential;
use super::{DriftMode, ModelDriftConfig};
use crate::metrics;

/// How long the detector sleeps when the channel is empty. Samples wait at most this
/// long; at 100,000 samples a second that is 1,000 of the channel's places.
const POLL: Duration = Duration::from_millis(10);

/// How often the status is published while a backlog drains.
const PUBLISH: Duration = Duration::from_millis(100);

/// A window that received no sample for this long is dropped.
const IDLE_WINDOW: Duration = Duration::from_secs(3600);

/// Feature values a version keeps while its thresholds are being calibrated (its rows
/// are replayed through the statistics once they are ready): 32 MB, a million rows of 4
/// features or 250,000 of 16. Past this, the oldest wait-listed rows are dropped.
const PENDING_VALUES: usize = 4 << 20;

/// One request's contribution: its feature rows and predictions.
pub struct Sample {
    pub model: String,
    pub version: u64,
    pub settings: Arc<ModelDriftConfig>,
    /// The version's profile; `None` when it has none (a live reference may be taken).
    pub profile: Option<Arc<Profile>>,
    pub input: String,
    pub output: String,
    pub rows: usize,
    pub width: usize,
    pub features: Vec<f64>,
    pub predictions: Vec<Prediction>,
}

pub use super::episode::State;
use super::episode::{Episode, Step};
use super::findings;
pub use super::findings::Evidence;
use super::findings::summary;

/// What `/admin/drift` shows for one model version.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub model: String,
    pub version: u64,
    pub state: State,
    /// Findings now (warn and drift levels only, furthest past its threshold first):
    /// the sequential statistics past 3/4 of their thresholds, or the last window's.
    pub evidence: Vec<Evidence>,
    /// Findings of the window that started the current (or last) drift episode.
    pub episode_evidence: Vec<Evidence>,
    /// `profile.json`, `live` (the first live rows), or `none` (waiting for rows).
    pub reference: String,
    pub rows_seen: u64,
    /// Windows tested (window mode), or rows the sequential statistics took.
    pub windows_tested: u64,
    pub window: usize,
    pub step: usize,
    /// Drift episodes seen, and events sent for them (cooldown may suppress some).
    pub episodes: u64,
    pub events: u64,
    pub last_event: Option<String>,
    /// Per feature of the reference (in its order), the share of the last tested
    /// window's rows in each of the reference's bins: what the operator's page draws
    /// against the profile. Left out of `/admin/drift` (it is `/admin/drift/{m}/histograms`).
    #[serde(skip)]
    pub window_bins: Vec<Vec<f64>>,
}

pub use crate::outbox::Event;

/// Where events go (the outbox), so the detector can be tested without one.
pub trait Sink: Send {
    fn deliver(&mut self, event: Event);
    /// Called every poll: a chance to retry what could not be delivered before.
    fn tick(&mut self) {}
}

struct Window {
    profile: Option<Arc<Profile>>,
    reference: String,
    /// Live reference rows collected while there is no profile.
    live: Vec<f64>,
    live_predictions: Vec<Prediction>,
    width: usize,
    rows: VecDeque<(Vec<f64>, Option<Prediction>)>,
    /// When the samples behind `rows` came: (rows seen once the sample was counted, unix
    /// ms), oldest first, so that an event can say which time its window covers.
    arrivals: VecDeque<(u64, u64)>,
    since_test: usize,
    /// The sequential statistics, built for the profile and settings in force.
    seq: Option<Sequential>,
    /// The calibration under way for `seq` (its ticket), when `seq` is not built yet.
    calibrating: Option<u64>,
    /// Rows that came while calibrating, replayed when the statistics are ready.
    /// Stored flat (`width` values a row), one prediction slot per row.
    pending: VecDeque<f64>,
    pending_predictions: VecDeque<Option<Prediction>>,
    /// Wait-listed rows dropped (the oldest, past [`PENDING_ROWS`]) this calibration.
    pending_dropped: u64,
    settings: Arc<ModelDriftConfig>,
    episode: Episode,
    status: Status,
    /// Changed since its status was last published.
    dirty: bool,
    /// When the last sample came: a version that no longer serves stops sending.
    last_sample: Instant,
}

/// The detector's state; `Detector::run` drives it from the channel.
pub struct Detector {
    /// By model, then version: a lookup by `&str` allocates nothing per sample.
    windows: HashMap<String, BTreeMap<u64, Window>>,
    status: Arc<Mutex<BTreeMap<(String, u64), Status>>>,
    sink: Box<dyn Sink>,
    calibrations: Calibrations,
}

/// A finished calibration: which window and ticket it was for, and the statistics.
struct Calibrated {
    model: String,
    version: u64,
    ticket: u64,
    seq: Sequential,
    ms: u64,
}

/// Threshold calibration off the detector thread. It takes seconds for a wide profile
/// (a run-length solve per statistic and bracket step), and the detector thread runs
/// at a lowered priority: calibrating there, under load, held every other model's
/// rows and every webhook back for as long (28 s was seen). Each calibration runs on a
/// thread of its own at normal priority; rows wait in the window's `pending` list.
struct Calibrations {
    tx: crossbeam_channel::Sender<Calibrated>,
    rx: crossbeam_channel::Receiver<Calibrated>,
    next_ticket: u64,
    /// Calibrations started and not yet received.
    outstanding: usize,
}

impl Calibrations {
    fn new() -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Calibrations {
            tx,
            rx,
            next_ticket: 0,
            outstanding: 0,
        }
    }

    /// Starts calibrating the statistics of `w` for its profile and `settings`;
    /// returns the ticket, or `None` when `w` has no profile or no thread could start.
    fn start(&mut self, w: &Window, settings: &ModelDriftConfig) -> Option<u64> {
        let profile = Arc::clone(w.profile.as_ref()?);
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        let (model, version) = (w.status.model.clone(), w.status.version);
        let (arl_rows, thin) = (settings.arl_rows, settings.thin);
        let predictions = settings.prediction_test != super::PredictionTest::Off;
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("drift-calibrate".into())
            .spawn(move || {
                let started = Instant::now();
                let seq = Sequential::new(&profile, arl_rows, thin, predictions);
                let ms = started.elapsed().as_millis() as u64;
                // The detector may be gone (shutdown): nothing to hand the result to.
                let _ = tx.send(Calibrated {
                    model,
                    version,
                    ticket,
                    seq,
                    ms,
                });
            });
        match spawned {
            Ok(_) => {
                self.outstanding += 1;
                Some(ticket)
            }
            Err(e) => {
                tracing::error!(model = %w.status.model, error = %e, "cannot start a drift calibration thread; retrying with the next row");
                None
            }
        }
    }
}

impl Detector {
    pub fn new(status: Arc<Mutex<BTreeMap<(String, u64), Status>>>, sink: Box<dyn Sink>) -> Self {
        Detector {
            windows: HashMap::new(),
            status,
            sink,
            calibrations: Calibrations::new(),
        }
    }

    /// Takes the calibrations that finished: each window gets its statistics and its
    /// wait-listed rows go through them. A result for a ticket no longer wanted (the
    /// profile or settings changed meanwhile) is dropped.
    fn take_calibrations(&mut self, block: bool) {
        loop {
            let got = if block && self.calibrations.outstanding > 0 {
                self.calibrations.rx.recv().ok()
            } else {
                self.calibrations.rx.try_recv().ok()
            };
            let Some(c) = got else {
                return;
            };
            self.calibrations.outstanding = self.calibrations.outstanding.saturating_sub(1);
            let Some(w) = self
                .windows
                .get_mut(c.model.as_str())
                .and_then(|m| m.get_mut(&c.version))
            else {
                continue;
            };
            if w.calibrating != Some(c.ticket) {
                continue;
            }
            tracing::info!(
                model = %c.model,
                version = c.version,
                statistics = c.seq.statistics,
                arl_rows = w.settings.arl_rows,
                ms = c.ms,
                pending_rows = w.pending_predictions.len(),
                dropped_rows = w.pending_dropped,
                "drift statistics calibrated"
            );
            w.pending_dropped = 0;
            w.calibrating = None;
            w.seq = Some(c.seq);
            w.dirty = true;
            let settings = Arc::clone(&w.settings);
            let now = Instant::now();
            let mut events = Vec::new();
            let mut values = std::mem::take(&mut w.pending);
            let predictions = std::mem::take(&mut w.pending_predictions);
            let width = w.width.max(1);
            for (row, pred) in values
                .make_contiguous()
                .chunks_exact(width)
                .zip(predictions)
            {
                events.extend(sequential_row(w, &settings, row, pred, now));
            }
            for e in events {
                self.hand_off(e);
            }
        }
    }

    /// Waits for every calibration under way and replays the rows that waited for it
    /// (for tests and tools that feed the detector directly).
    pub fn settle(&mut self) {
        self.take_calibrations(true);
    }

    /// Takes samples until the channel closes. It polls (drains the channel, then
    /// sleeps a few milliseconds) rather than blocking on it: a blocked receiver would
    /// make every request's `try_send` wake this thread, a system call and a context
    /// switch per request on the latency path.
    pub fn run(mut self, rx: crossbeam_channel::Receiver<Sample>) {
        let mut published = Instant::now();
        loop {
            loop {
                match rx.try_recv() {
                    Ok(sample) => {
                        self.add(sample);
                        // A backlog takes a while to drain: the status and finished
                        // calibrations still come in at least every PUBLISH.
                        if published.elapsed() >= PUBLISH {
                            self.take_calibrations(false);
                            self.publish();
                            published = Instant::now();
                        }
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        self.publish();
                        return;
                    }
                }
            }
            self.take_calibrations(false);
            self.publish();
            published = Instant::now();
            self.prune();
            self.sink.tick();
            std::thread::sleep(POLL);
        }
    }

    /// Forgets the windows of versions that sent nothing for [`IDLE_WINDOW`] (unloaded
    /// or replaced): otherwise every version ever served would keep its window.
    fn prune(&mut self) {
        let mut gone = Vec::new();
        for (model, versions) in &mut self.windows {
            versions.retain(|&v, w| {
                let keep = w.last_sample.elapsed() < IDLE_WINDOW;
                if !keep {
                    gone.push((model.clone(), v));
                }
                keep
            });
        }
        self.windows.retain(|_, versions| !versions.is_empty());
        if !gone.is_empty()
            && let Ok(mut all) = self.status.lock()
        {
            for key in gone {
                all.remove(&key);
            }
        }
    }

    /// Publishes the statuses that changed since the last time.
    pub fn publish(&mut self) {
        let changed = self
            .windows
            .values_mut()
            .flat_map(|m| m.values_mut())
            .filter(|w| w.dirty);
        let mut updates = Vec::new();
        for w in changed {
            w.dirty = false;
            let mut st = w.status.clone();
            st.reference = w.reference.clone();
            st.state = w.episode.state;
            if let (Some(seq), DriftMode::Sequential) = (&w.seq, w.settings.mode) {
                st.evidence = seq.evidence();
                if st.state == State::Ok && seq.warning() {
                    st.state = State::Warn;
                }
                // The share of its threshold each statistic is at (1 = alarm).
                for (feature, test, value, h) in seq.statistics() {
                    metrics::set_drift_score(&st.model, feature, test, value / h);
                }
                metrics::set_drift_state(&st.model, st.state.gauge());
            }
            updates.push(st);
        }
        if updates.is_empty() {
            return;
        }
        if let Ok(mut all) = self.status.lock() {
            for st in updates {
                all.insert((st.model.clone(), st.version), st);
            }
        }
    }

    /// Adds one sample; tests the window when a step is complete.
    pub fn add(&mut self, s: Sample) {
        let settings = Arc::clone(&s.settings);
        if !self.windows.contains_key(s.model.as_str()) {
            self.windows.insert(s.model.clone(), BTreeMap::new());
        }
        let Some(versions) = self.windows.get_mut(s.model.as_str()) else {
            return;
        };
        let w = versions.entry(s.version).or_insert_with(|| Window {
            profile: s.profile.clone(),
            reference: if s.profile.is_some() {
                "profile.json".into()
            } else {
                "none".into()
            },
            live: Vec::new(),
            live_predictions: Vec::new(),
            width: s.width,
            rows: VecDeque::new(),
            arrivals: VecDeque::new(),
            since_test: 0,
            seq: None,
            calibrating: None,
            pending: VecDeque::new(),
            pending_predictions: VecDeque::new(),
            pending_dropped: 0,
            settings: Arc::clone(&settings),
            episode: Episode::default(),
            status: Status {
                model: s.model.clone(),
                version: s.version,
                state: State::Ok,
                evidence: Vec::new(),
                episode_evidence: Vec::new(),
                reference: String::new(),
                rows_seen: 0,
                windows_tested: 0,
                window: settings.window,
                step: settings.step,
                episodes: 0,
                events: 0,
                last_event: None,
                window_bins: Vec::new(),
            },
            dirty: true,
            last_sample: Instant::now(),
        });
        // A new profile (the version reloaded with one) starts the window over.
        if let Some(p) = &s.profile
            && w.profile.as_ref().is_none_or(|old| !Arc::ptr_eq(old, p))
        {
            w.profile = Some(Arc::clone(p));
            w.reference = "profile.json".into();
            w.rows.clear();
            w.since_test = 0;
            w.seq = None;
            w.calibrating = None;
            w.pending.clear();
            w.pending_predictions.clear();
        }
        // New settings (the model's config.toml changed) recalibrate the statistics.
        if !Arc::ptr_eq(&w.settings, &settings) {
            if *w.settings != *settings {
                // The wait-listed rows stay: they are replayed under the new settings.
                w.seq = None;
                w.calibrating = None;
            }
            w.settings = Arc::clone(&settings);
        }
        if s.width != w.width {
            return;
        }
        let now = Instant::now();
        w.status.rows_seen += s.rows as u64;
        w.arrivals
            .push_back((w.status.rows_seen, crate::util::now_ms()));
        w.status.window = settings.window;
        w.status.step = settings.step;
        w.dirty = true;
        w.last_sample = now;
        let mut events = Vec::new();
        for r in 0..s.rows {
            let values = &s.features[r * s.width..(r + 1) * s.width];
            let pred = s.predictions.get(r).copied();
            if w.profile.is_none() {
                if settings.live_reference_rows == 0 {
                    continue;
                }
                w.live.extend_from_slice(values);
                w.live_predictions.extend(pred);
                if w.live.len() / w.width.max(1) >= settings.live_reference_rows {
                    let names: Vec<String> = (0..w.width).map(|i| format!("x{i}")).collect();
                    let rows = w.live.len() / w.width.max(1);
                    let preds = if w.live_predictions.len() == rows {
                        std::mem::take(&mut w.live_predictions)
                    } else {
                        Vec::new()
                    };
                    w.profile = Some(Arc::new(profile::build(
                        &s.model,
                        s.version,
                        "live",
                        &s.input,
                        &names,
                        rows,
                        &w.live,
                        &s.output,
                        &preds,
                        settings.bins,
                    )));
                    w.reference = "live".into();
                    w.live = Vec::new();
                }
                continue;
            }
            // The row leaving the window lends its buffer to the row coming in.
            let mut row = if w.rows.len() >= settings.window {
                w.rows.pop_front().map(|(v, _)| v).unwrap_or_default()
            } else {
                Vec::with_capacity(w.width)
            };
            row.clear();
            row.extend_from_slice(values);
            w.rows.push_back((row, pred));
            while w.rows.len() > settings.window {
                w.rows.pop_front();
            }
            match settings.mode {
                DriftMode::Window => {
                    w.since_test += 1;
                    if w.rows.len() >= settings.window && w.since_test >= settings.step {
                        let rows = w.since_test as u64;
                        w.since_test = 0;
                        events.extend(evaluate(w, &settings, rows, now));
                    }
                }
                DriftMode::Sequential if w.seq.is_none() => {
                    if w.calibrating.is_none() {
                        w.calibrating = self.calibrations.start(w, &settings);
                    }
                    if w.pending.len() + w.width > PENDING_VALUES {
                        w.pending.drain(..w.width);
                        w.pending_predictions.pop_front();
                        w.pending_dropped += 1;
                    }
                    w.pending.extend(values);
                    w.pending_predictions.push_back(pred);
                }
                DriftMode::Sequential => {
                    events.extend(sequential_row(w, &settings, values, pred, now));
                }
            }
        }
        // Samples whose rows have all left the window are no longer part of its span.
        let oldest = w.status.rows_seen.saturating_sub(w.rows.len() as u64);
        while w.arrivals.len() > 1 && w.arrivals.front().is_some_and(|&(n, _)| n <= oldest) {
            w.arrivals.pop_front();
        }
        for e in events {
            self.hand_off(e);
        }
    }

    /// Where an event leaves the detector: one place, so that what decides whether an
    /// event goes out at all (a fleet-wide claim of the episode) has one place to go.
    fn hand_off(&mut self, event: Event) {
        self.sink.deliver(event);
    }
}

/// One row through the sequential statistics and the episode machine. Returns the
/// event to send.
fn sequential_row(
    w: &mut Window,
    settings: &ModelDriftConfig,
    values: &[f64],
    pred: Option<Prediction>,
    now: Instant,
) -> Option<Event> {
    let seq = w.seq.as_mut()?;
    let over = seq.add(values, pred);
    w.status.windows_tested = seq.rows;
    // The page's histograms follow the window at the window tests' pace, not per row
    // (binning the whole window is O(window)); rows replayed after a calibration count
    // like rows arriving.
    w.since_test += 1;
    if w.since_test >= settings.step {
        w.since_test = 0;
        refresh_window_bins(w);
    }
    let step = w.episode.row(over, settings, now);
    episode_step(w, settings, step)
}

/// What an episode step does: counts, logs, and the event (when one is due).
fn episode_step(w: &mut Window, settings: &ModelDriftConfig, step: Step) -> Option<Event> {
    let model = w.status.model.clone();
    let evidence = |w: &Window| match (&w.seq, settings.mode) {
        (Some(seq), DriftMode::Sequential) => seq.evidence(),
        _ => w.status.evidence.clone(),
    };
    match step {
        Step::Same => None,
        Step::Ended => {
            tracing::info!(model = %model, version = w.status.version, "drift episode over");
            None
        }
        Step::Started { send } => {
            let ev = evidence(w);
            w.status.episodes += 1;
            w.status.episode_evidence = ev.clone();
            w.status.evidence = ev.clone();
            tracing::warn!(model = %model, version = w.status.version, evidence = %summary(&ev), "drift detected");
            if send {
                Some(event_for(w, settings, &ev, false))
            } else {
                metrics::count_drift_suppressed(&model, "cooldown");
                None
            }
        }
        Step::Late => {
            let ev = evidence(w);
            tracing::warn!(model = %model, version = w.status.version, evidence = %summary(&ev), "drift episode still open after the cooldown; sending its event");
            Some(event_for(w, settings, &ev, true))
        }
    }
}

fn event_for(
    w: &mut Window,
    settings: &ModelDriftConfig,
    evidence: &[Evidence],
    late: bool,
) -> Event {
    w.status.events += 1;
    let e = drift_event(w, settings, evidence, late);
    w.status.last_event = Some(e.id.clone());
    e
}

/// Tests one full window and moves the state machine (window mode). Returns the
/// event to send.
fn evaluate(w: &mut Window, settings: &ModelDriftConfig, rows: u64, now: Instant) -> Option<Event> {
    let profile = Arc::clone(w.profile.as_ref()?);
    let model = w.status.model.clone();
    let found = findings::test_window(&profile, &w.rows, settings);
    for (feature, test, value) in &found.scores {
        metrics::set_drift_score(&model, feature, test, *value);
    }
    let drifting = found.drifting();
    w.status.windows_tested += 1;
    w.status.evidence = found.evidence;
    refresh_window_bins(w);
    let warning = !w.status.evidence.is_empty();
    let step = w.episode.step(drifting, warning, rows, settings, now);
    let event = episode_step(w, settings, step);
    metrics::set_drift_state(&model, w.episode.state.gauge());
    event
}

/// The proportions of the window's rows in each feature's profile bins (what the page
/// draws next to the profile's).
fn refresh_window_bins(w: &mut Window) {
    let Some(profile) = w.profile.as_ref() else {
        return;
    };
    w.status.window_bins = profile
        .features
        .iter()
        .enumerate()
        .map(|(c, f)| {
            let column = w.rows.iter().filter_map(|(row, _)| row.get(c).copied());
            super::stats::proportions(&super::stats::bin_counts(column, &f.edges))
        })
        .collect();
}

/// The SHA-256 (hex) of a profile as serialized: a new reference is a new episode.
fn profile_checksum(p: &Profile) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(
        serde_json::to_vec(p).unwrap_or_default(),
    ))
}

fn drift_event(
    w: &Window,
    settings: &ModelDriftConfig,
    evidence: &[Evidence],
    late: bool,
) -> Event {
    let now = SystemTime::now();
    let id = format!(
        "evt_{:013x}{:016x}",
        crate::util::unix_ms(now),
        fastrand::u64(..)
    );
    // The window tests on the last rows: effect sizes of every feature, whichever
    // detector raised the event.
    let effects: Vec<serde_json::Value> = w
        .profile
        .as_ref()
        .map(|p| findings::test_window(p, &w.rows, settings).scores)
        .unwrap_or_default()
        .into_iter()
        .map(|(feature, test, statistic)| json!({"feature": feature, "test": test, "statistic": statistic}))
        .collect();
    let top = evidence.first();
    let detector = match (&w.seq, settings.mode) {
        (Some(seq), DriftMode::Sequential) => json!({
            "mode": "sequential",
            "test": top.map(|e| e.test),
            "feature": top.map(|e| e.feature.as_str()),
            "arl_rows": settings.arl_rows,
            "false_alarms_per_million_rows": 1e6 / settings.arl_rows,
            "statistics": seq.statistics,
            "thin": settings.thin,
            "rows_tested": seq.rows,
        }),
        _ => json!({
            "mode": "window",
            "test": top.map(|e| e.test),
            "feature": top.map(|e| e.feature.as_str()),
            "feature_test": settings.feature_test,
            "prediction_test": settings.prediction_test,
        }),
    };
    // The time the window's rows came in: a retrainer selects them by it, and the sink
    // names the captured files that cover it.
    let to_ms = crate::util::unix_ms(now);
    let from_ms = w.arrivals.front().map_or(to_ms, |&(_, ms)| ms.min(to_ms));
    let at = |ms: u64| crate::util::rfc3339_ms(SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
    let payload = json!({
        "type": "model.drift",
        "id": id,
        "timestamp": crate::util::rfc3339_ms(now),
        "data": {
            "model": w.status.model,
            "version": w.status.version,
            "state": "DRIFT",
            "detector": detector,
            "late": late,
            "evidence": evidence,
            "effects": effects,
            "reference": w.reference,
            // What a fleet-wide claim keys the episode by (see claim.rs).
            "profile_checksum": w.profile.as_ref().map(|p| profile_checksum(p)),
            "cooldown_secs": settings.cooldown_secs,
            "samples": {
                "window_rows": w.rows.len(),
                "rows_seen": w.status.rows_seen,
            },
            "window": {
                "size": settings.window,
                "step": settings.step,
                "windows_tested": w.status.windows_tested,
                "drift_windows": settings.drift_windows,
                "from": at(from_ms),
                "to": at(to_ms),
                "from_ms": from_ms,
                "to_ms": to_ms,
            },
        }
    });
    Event { id, payload }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drift::FeatureTest;

    struct Collect(Arc<Mutex<Vec<Event>>>);
    impl Sink for Collect {
        fn deliver(&mut self, event: Event) {
            self.0.lock().unwrap().push(event);
        }
    }

    fn normal(rng: &mut fastrand::Rng, mean: f64) -> f64 {
        // Box-Muller: enough for a test distribution.
        let (u, v) = (rng.f64().max(1e-12), rng.f64());
        mean + (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    fn reference(rng: &mut fastrand::Rng) -> Arc<Profile> {
        let rows = 5000;
        let mut values = Vec::new();
        let mut preds = Vec::new();
        for _ in 0..rows {
            let (a, b) = (normal(rng, 0.0), normal(rng, 5.0));
            values.extend([a, b]);
            preds.push(Prediction::Class(i64::from(a > 0.0)));
        }
        Arc::new(profile::build(
            "m",
            1,
            "test",
            "x",
            &["a".into(), "b".into()],
            rows,
            &values,
            "label",
            &preds,
            10,
        ))
    }

    fn feed(
        d: &mut Detector,
        p: &Arc<Profile>,
        s: &Arc<ModelDriftConfig>,
        rng: &mut fastrand::Rng,
        n: usize,
        shift: f64,
    ) {
        for _ in 0..n {
            let (a, b) = (normal(rng, shift), normal(rng, 5.0));
            d.add(one_row("m", s, Some(p), a, b));
        }
        d.settle();
        d.publish();
    }

    /// One row of features `a` and `b` of `model` version 1; its class is `a > 0`.
    fn one_row(
        model: &str,
        s: &Arc<ModelDriftConfig>,
        p: Option<&Arc<Profile>>,
        a: f64,
        b: f64,
    ) -> Sample {
        Sample {
            model: model.into(),
            version: 1,
            settings: Arc::clone(s),
            profile: p.cloned(),
            input: "x".into(),
            output: "label".into(),
            rows: 1,
            width: 2,
            features: vec![a, b],
            predictions: vec![Prediction::Class(i64::from(a > 0.0))],
        }
    }

    #[test]
    fn calibration_runs_off_the_detector_thread_and_the_rows_that_waited_are_replayed() {
        let mut rng = fastrand::Rng::with_seed(5);
        let p = reference(&mut rng);
        let events = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new(BTreeMap::new()));
        let mut d = Detector::new(Arc::clone(&status), Box::new(Collect(Arc::clone(&events))));
        // A run length no other test uses: the threshold cache cannot answer it.
        let s = Arc::new(ModelDriftConfig {
            cooldown_secs: 0,
            arl_rows: 3.3e7,
            ..ModelDriftConfig::default()
        });
        let sample = |rng: &mut fastrand::Rng, shift: f64| {
            one_row("m", &s, Some(&p), normal(rng, shift), normal(rng, 5.0))
        };
        d.add(sample(&mut rng, 0.0));
        // The first row started a calibration and waits for it; adding more rows does
        // not wait (they join the wait list).
        let w = &d.windows["m"][&1];
        assert!(w.seq.is_none() && w.calibrating.is_some());
        for _ in 0..999 {
            d.add(sample(&mut rng, 0.0));
        }
        for _ in 0..3000 {
            d.add(sample(&mut rng, 1.0));
        }
        let w = &d.windows["m"][&1];
        if w.seq.is_none() {
            assert_eq!(w.pending_predictions.len(), 4000);
            assert_eq!(w.pending.len(), 8000);
        }
        d.settle();
        d.publish();
        let w = &d.windows["m"][&1];
        assert!(w.seq.is_some() && w.calibrating.is_none() && w.pending.is_empty());
        // Every row went through the statistics, and the shift in them was caught.
        let st = status.lock().unwrap()[&("m".to_string(), 1)].clone();
        assert_eq!(st.windows_tested, 4000);
        assert_eq!(events.lock().unwrap().len(), 1);
        // The page's window shares follow the replayed rows, though none came after.
        assert_eq!(st.window_bins.len(), p.features.len());
        for shares in &st.window_bins {
            assert!(
                (shares.iter().sum::<f64>() - 1.0).abs() < 1e-9,
                "{shares:?}"
            );
        }
    }

    #[test]
    fn new_settings_mid_calibration_recalibrate_and_keep_the_waiting_rows() {
        let mut rng = fastrand::Rng::with_seed(6);
        let p = reference(&mut rng);
        let events = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new(BTreeMap::new()));
        let mut d = Detector::new(Arc::clone(&status), Box::new(Collect(Arc::clone(&events))));
        let first = Arc::new(ModelDriftConfig {
            arl_rows: 3.4e7,
            ..ModelDriftConfig::default()
        });
        let second = Arc::new(ModelDriftConfig {
            arl_rows: 3.5e7,
            ..ModelDriftConfig::default()
        });
        for (i, settings) in [&first, &second].into_iter().enumerate() {
            for _ in 0..500 {
                let (a, b) = (normal(&mut rng, 0.0), normal(&mut rng, 5.0));
                d.add(one_row("m", settings, Some(&p), a, b));
            }
            if i == 0 {
                d.take_calibrations(false);
            }
        }
        d.settle();
        d.publish();
        let w = &d.windows["m"][&1];
        // The statistics are those of the settings in force, and no row was lost.
        assert_eq!(w.seq.as_ref().unwrap().arl_rows, 3.5e7);
        let st = status.lock().unwrap()[&("m".to_string(), 1)].clone();
        assert!(st.windows_tested >= 500, "{}", st.windows_tested);
        assert_eq!(st.rows_seen, 1000);
    }

    #[test]
    fn one_event_per_episode_with_hysteresis() {
        let mut rng = fastrand::Rng::with_seed(11);
        let p = reference(&mut rng);
        let events = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new(BTreeMap::new()));
        let mut d = Detector::new(Arc::clone(&status), Box::new(Collect(Arc::clone(&events))));
        let s = Arc::new(ModelDriftConfig {
            cooldown_secs: 0,
            ..ModelDriftConfig::default()
        });
        // The reference distribution: no event.
        feed(&mut d, &p, &s, &mut rng, 20_000, 0.0);
        assert!(events.lock().unwrap().is_empty());
        // Feature `a` shifts by one standard deviation: one event, naming `a`.
        feed(&mut d, &p, &s, &mut rng, 10_000, 1.0);
        {
            let ev = events.lock().unwrap();
            assert_eq!(ev.len(), 1);
            let top = &ev[0].payload["data"]["evidence"][0];
            assert!(
                top["feature"] == "a" || top["feature"] == "prediction:label",
                "{top}"
            );
            let named: Vec<&str> = ev[0].payload["data"]["evidence"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["feature"].as_str().unwrap())
                .collect();
            assert!(named.contains(&"a") && !named.contains(&"b"), "{named:?}");
        }
        let st = status.lock().unwrap()[&("m".to_string(), 1)].clone();
        assert_eq!(st.state, State::Drift);
        // Back to normal: the episode ends; a second shift is a second event.
        feed(&mut d, &p, &s, &mut rng, 5_000, 0.0);
        assert_eq!(
            status.lock().unwrap()[&("m".to_string(), 1)].state,
            State::Ok
        );
        feed(&mut d, &p, &s, &mut rng, 5_000, -1.0);
        assert_eq!(events.lock().unwrap().len(), 2);
    }

    #[test]
    fn evidence_reads_as_text_in_logs() {
        let psi = Evidence {
            feature: "a".into(),
            test: "psi",
            statistic: 0.3125,
            p_value: None,
            threshold: 0.25,
            level: "drift",
        };
        assert_eq!(psi.to_string(), "a: psi 0.3125 >= 0.25 (drift)");
        let ks = Evidence {
            feature: "b".into(),
            test: "ks",
            statistic: 0.2,
            p_value: Some(1e-9),
            threshold: 5e-4,
            level: "drift",
        };
        let text = summary(&[psi, ks]);
        assert!(
            text.contains("b: ks 0.2000, p 1.000e-9") && !text.contains("Some"),
            "{text}"
        );
    }

    #[test]
    fn idle_windows_are_forgotten() {
        let mut rng = fastrand::Rng::with_seed(9);
        let p = reference(&mut rng);
        let status = Arc::new(Mutex::new(BTreeMap::new()));
        let mut d = Detector::new(Arc::clone(&status), Box::new(Collect(Default::default())));
        let s = Arc::new(ModelDriftConfig::default());
        feed(&mut d, &p, &s, &mut rng, 10, 0.0);
        d.prune();
        assert_eq!(status.lock().unwrap().len(), 1, "a recent window stays");
        let w = d.windows.get_mut("m").unwrap().get_mut(&1).unwrap();
        w.last_sample = Instant::now()
            .checked_sub(IDLE_WINDOW + Duration::from_secs(1))
            .unwrap();
        d.prune();
        assert!(d.windows.is_empty());
        assert!(status.lock().unwrap().is_empty());
    }

    #[test]
    fn cooldown_suppresses_a_second_event() {
        let mut rng = fastrand::Rng::with_seed(5);
        let p = reference(&mut rng);
        let events = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new(BTreeMap::new()));
        let mut d = Detector::new(status, Box::new(Collect(Arc::clone(&events))));
        let s = Arc::new(ModelDriftConfig::default());
        feed(&mut d, &p, &s, &mut rng, 5_000, 1.0);
        feed(&mut d, &p, &s, &mut rng, 5_000, 0.0);
        feed(&mut d, &p, &s, &mut rng, 5_000, 1.0);
        assert_eq!(
            events.lock().unwrap().len(),
            1,
            "the second episode is within the cooldown"
        );
    }

    #[test]
    fn ks_and_live_reference() {
        let mut rng = fastrand::Rng::with_seed(3);
        let events = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new(BTreeMap::new()));
        let mut d = Detector::new(Arc::clone(&status), Box::new(Collect(Arc::clone(&events))));
        let s = Arc::new(ModelDriftConfig {
            mode: DriftMode::Window,
            feature_test: FeatureTest::Ks,
            live_reference_rows: 3000,
            ..ModelDriftConfig::default()
        });
        let feed_live = |d: &mut Detector, rng: &mut fastrand::Rng, n: usize, shift: f64| {
            for _ in 0..n {
                let (a, b) = (normal(rng, shift), normal(rng, 5.0));
                d.add(one_row("live", &s, None, a, b));
            }
            d.settle();
            d.publish();
        };
        feed_live(&mut d, &mut rng, 10_000, 0.0);
        assert!(events.lock().unwrap().is_empty());
        assert_eq!(
            status.lock().unwrap()[&("live".to_string(), 1)].reference,
            "live"
        );
        feed_live(&mut d, &mut rng, 5_000, 1.0);
        let ev = events.lock().unwrap();
        assert_eq!(ev.len(), 1);
        let tests: Vec<&str> = ev[0].payload["data"]["evidence"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["test"].as_str().unwrap())
            .collect();
        assert!(tests.contains(&"ks"), "{tests:?}");
    }
}

//! Drift detection in process, and retraining webhooks that are never lost.
//!
//! The request path sends a compact sample of each sampled request (the feature rows of
//! its first 2-D input, its predictions) through a bounded channel with `try_send`: it
//! never waits, and a full channel drops the sample (counted). The detector thread
//! ([`detector`]) keeps a sliding window per model version, tests it against the
//! version's reference profile ([`profile`], `<version>/profile.json`) with the
//! statistics of [`stats`], and sends one signed webhook per drift episode through the
//! durable outbox ([`crate::outbox`]).

pub mod claim;
pub mod detector;
pub mod episode;
pub mod features;
pub mod findings;
pub mod make;
pub mod profile;
pub mod sequential;
pub mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};
use crate::metrics;
use crate::outbox::{self, Event, Outbox, WebhookTarget};
use crate::tensor::{Tensor, TensorSpec};
use detector::{Detector, Sample, Sink, Status};
use profile::Profile;

/// How the detector judges a version's rows.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DriftMode {
    /// Every sampled row updates CUSUMs calibrated to `arl_rows` ([`sequential`]).
    #[default]
    Sequential,
    /// The window tests (`feature_test`, `prediction_test`) every `step` rows.
    Window,
}

/// Which test judges features.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FeatureTest {
    /// Population stability index over the profile's quantile bins.
    #[default]
    Psi,
    /// Two-sample Kolmogorov-Smirnov against the profile's sample.
    Ks,
}

/// Which test judges the distribution of predicted classes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PredictionTest {
    /// Pearson's chi-squared goodness of fit.
    #[default]
    Chi2,
    /// Jensen-Shannon divergence against `js_drift`.
    Js,
    Off,
}

/// Correction for testing many features at once.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Correction {
    #[default]
    Bonferroni,
    None,
}

/// A model's drift settings: the `[drift]` table of its config.toml.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelDriftConfig {
    pub enabled: bool,
    /// `sequential` (the default) or `window`.
    pub mode: DriftMode,
    /// Sequential mode: expected sampled rows between two false alarms while nothing
    /// drifts (the average run length), for all features and statistics together.
    pub arl_rows: f64,
    /// Sequential mode: every n-th sampled row enters the statistics (1 = all), the
    /// remedy for autocorrelated traffic (docs/CONFIG.md).
    pub thin: u32,
    /// Rows back under every threshold before a drift episode ends (both modes).
    pub clean_rows: u64,
    /// Share of requests sampled (0 to 1).
    pub sample_rate: f64,
    /// Rows taken from one request at most.
    pub max_rows_per_request: usize,
    /// Rows in the sliding window.
    pub window: usize,
    /// Rows between two tests of the window.
    pub step: usize,
    pub feature_test: FeatureTest,
    pub prediction_test: PredictionTest,
    /// PSI levels (the industry rule of thumb: 0.1 warn, 0.25 drift).
    pub psi_warn: f64,
    pub psi_drift: f64,
    /// Significance of p-value tests (KS, chi-squared), before correction.
    pub alpha: f64,
    pub correction: Correction,
    /// Jensen-Shannon divergence counted as drift (half of it: warn).
    pub js_drift: f64,
    /// Drifting windows in a row before the state is DRIFT.
    pub drift_windows: u32,
    /// Clean windows in a row before a DRIFT state ends.
    pub clean_windows: u32,
    /// Least time between two webhooks for the same model version, in seconds.
    pub cooldown_secs: u64,
    /// Without a profile.json, take the first N live rows as the reference (0 = off).
    pub live_reference_rows: usize,
    /// Quantile bins of a live reference.
    pub bins: usize,
}

impl Default for ModelDriftConfig {
    fn default() -> Self {
        ModelDriftConfig {
            enabled: true,
            mode: DriftMode::Sequential,
            arl_rows: 1e7,
            thin: 1,
            clean_rows: 1000,
            sample_rate: 1.0,
            max_rows_per_request: 16,
            window: 1000,
            step: 500,
            feature_test: FeatureTest::Psi,
            prediction_test: PredictionTest::Chi2,
            psi_warn: 0.1,
            psi_drift: 0.25,
            // Low, because a window is tested every `step` rows for as long as the server
            // runs: real drift gives p-values far below it anyway.
            alpha: 0.001,
            correction: Correction::Bonferroni,
            js_drift: 0.1,
            drift_windows: 3,
            clean_windows: 3,
            cooldown_secs: 3600,
            live_reference_rows: 0,
            bins: 10,
        }
    }
}

impl ModelDriftConfig {
    /// Checks the settings; the message names the field, and when a default is what
    /// clashes, says so and what to set.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: String| Err(Error::Config(format!("drift.{f}: {why}")));
        let d = ModelDriftConfig::default();
        // "step = 500 (the default)" or "step = 200".
        let named = |f: &str, v: f64, dv: f64| {
            if v == dv {
                format!("{f} = {v} (the default)")
            } else {
                format!("{f} = {v}")
            }
        };
        if !(0.0..=1.0).contains(&self.sample_rate) {
            return bad("sample_rate", "must be between 0 and 1".into());
        }
        if !(self.arl_rows >= 100.0 && self.arl_rows <= 1e12) {
            return bad(
                "arl_rows",
                format!("{} must be between 100 and 1e12", self.arl_rows),
            );
        }
        if self.thin == 0 || self.thin > 10_000 {
            return bad("thin", "must be between 1 and 10000".into());
        }
        if self.clean_rows == 0 {
            return bad("clean_rows", "must be at least 1".into());
        }
        if self.window == 0 || self.window > 1_000_000 {
            return bad("window", "must be between 1 and 1000000".into());
        }
        if self.step == 0 {
            return bad("step", "must be at least 1".into());
        }
        if self.step > self.window {
            let (f, fix) = if self.step == d.step {
                ("window", format!("set step to at most {} too", self.window))
            } else {
                ("step", format!("set step to at most {}", self.window))
            };
            return bad(
                f,
                format!(
                    "window = {} is smaller than {}: {fix}",
                    self.window,
                    named("step", self.step as f64, d.step as f64)
                ),
            );
        }
        if self.max_rows_per_request == 0 {
            return bad("max_rows_per_request", "must be at least 1".into());
        }
        if self.psi_warn.is_nan() || self.psi_warn <= 0.0 {
            return bad("psi_warn", "must be above 0".into());
        }
        if !self.psi_drift.is_finite() {
            return bad("psi_drift", "must be finite".into());
        }
        if self.psi_warn > self.psi_drift {
            let (f, fix) = if self.psi_warn == d.psi_warn {
                (
                    "psi_drift",
                    format!("set psi_warn to at most {} too", self.psi_drift),
                )
            } else {
                (
                    "psi_warn",
                    format!("set psi_warn to at most {}", self.psi_drift),
                )
            };
            return bad(
                f,
                format!(
                    "psi_drift = {} is below {}: {fix}",
                    self.psi_drift,
                    named("psi_warn", self.psi_warn, d.psi_warn)
                ),
            );
        }
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return bad("alpha", "must be between 0 and 1".into());
        }
        if !(self.js_drift > 0.0 && self.js_drift <= 1.0) {
            return bad("js_drift", "must be between 0 and 1".into());
        }
        if self.drift_windows == 0 {
            return bad("drift_windows", "must be at least 1".into());
        }
        if self.clean_windows == 0 {
            return bad("clean_windows", "must be at least 1".into());
        }
        if !(2..=1000).contains(&self.bins) {
            return bad("bins", "must be between 2 and 1000".into());
        }
        Ok(())
    }
}

/// Server-wide drift and webhook settings (`[drift]` in the server config).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DriftConfig {
    /// Samples waiting for the detector at most; beyond, samples are dropped (counted).
    pub channel_capacity: usize,
    /// The webhook outbox; default `<model_repository>/.outbox`.
    pub outbox: Option<PathBuf>,
    pub webhooks: Vec<WebhookTarget>,
    /// One delivery attempt's time limit, in milliseconds.
    pub webhook_timeout_ms: u64,
    /// First retry delay; doubled per attempt (with jitter) up to `webhook_max_backoff_ms`.
    pub webhook_initial_backoff_ms: u64,
    pub webhook_max_backoff_ms: u64,
    /// Allow webhook targets on loopback, private, link-local or unspecified addresses.
    /// Off by default: a registry or config edit must not turn the gateway into a way
    /// to reach internal services (SSRF).
    pub allow_private_webhooks: bool,
    /// Claim each drift episode in a folder the replicas share before sending its
    /// event, so that replicas on one registry send one webhook per episode.
    pub fleet_claims: bool,
    /// The claims folder; default `<model_repository>/.fleet/drift`.
    pub claim_dir: Option<PathBuf>,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            channel_capacity: 8192,
            outbox: None,
            webhooks: Vec::new(),
            webhook_timeout_ms: 5000,
            webhook_initial_backoff_ms: 500,
            webhook_max_backoff_ms: 300_000,
            allow_private_webhooks: false,
            fleet_claims: true,
            claim_dir: None,
        }
    }
}

impl DriftConfig {
    /// Checks the settings; the message names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: String| Err(Error::Config(format!("drift.{f}: {why}")));
        if self.channel_capacity == 0 || self.channel_capacity > 1 << 20 {
            return bad("channel_capacity", "must be between 1 and 1048576".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for w in &self.webhooks {
            if !w.url.starts_with("http://") {
                return bad(
                    "webhooks.url",
                    format!("'{}': only http:// targets are supported", w.url),
                );
            }
            let Ok(uri) = w.url.parse::<hyper::Uri>() else {
                return bad("webhooks.url", format!("'{}' is not a URL", w.url));
            };
            if !self.allow_private_webhooks
                && let Some(ip) = uri.host().and_then(outbox::literal_ip)
                && outbox::is_private(ip)
            {
                return bad(
                    "webhooks.url",
                    format!(
                        "'{}' is a loopback or private address (set drift.allow_private_webhooks to allow it)",
                        w.url
                    ),
                );
            }
            outbox::secret_key(&w.secret)
                .map_err(|e| Error::Config(format!("drift.webhooks '{}': {e}", w.name)))?;
            if w.name.is_empty() || !names.insert(w.name.clone()) {
                return bad(
                    "webhooks.name",
                    format!("'{}': names must be unique and non-empty", w.name),
                );
            }
        }
        if self.webhook_timeout_ms == 0 || self.webhook_initial_backoff_ms == 0 {
            return bad(
                "webhook_timeout_ms",
                "timeouts and backoffs must be positive".into(),
            );
        }
        Ok(())
    }

    /// Where the drift claims are.
    pub fn claim_dir_in(&self, repository: &std::path::Path) -> PathBuf {
        self.claim_dir
            .clone()
            .unwrap_or_else(|| repository.join(".fleet").join("drift"))
    }

    /// Where the outbox is.
    pub fn outbox_dir(&self, repository: &std::path::Path) -> PathBuf {
        self.outbox
            .clone()
            .unwrap_or_else(|| repository.join(".outbox"))
    }
}

/// Finds the captured data behind a drift window, so that an event can name it (the
/// capture writer implements it; drift does not depend on capture).
pub trait DataLocator: Send + Sync {
    /// `data.capture` of an event about `model` `version` whose rows arrived within
    /// `span` (unix ms): the files covering it, the feedback files and rows. `None` when
    /// it cannot be told now (the writer did not answer in time).
    fn locate(&self, model: &str, version: u64, span: (u64, u64)) -> Option<serde_json::Value>;
}

/// Set once the capture writer runs (it starts after the drift monitor).
pub type Locator = Arc<std::sync::OnceLock<Arc<dyn DataLocator>>>;

/// The detector's sink: events go to the outbox. An event that cannot be written (a full
/// disk) is kept in memory and written again before the next one.
pub struct OutboxSink {
    pub outbox: Arc<Outbox>,
    /// The model repository: events get the lineage of the version they name.
    pub repository: PathBuf,
    /// Where the captured rows are: drift events name the files that cover their window.
    pub locator: Option<Locator>,
    pub unwritten: Vec<Event>,
    /// After a failed write, the next try waits a second (a full disk stays full a while).
    pub retry_at: Option<std::time::Instant>,
    /// Fleet-wide claims of drift episodes (`None`: every episode is sent).
    pub claims: Option<claim::Claims>,
}

impl Sink for OutboxSink {
    fn deliver(&mut self, mut event: Event) {
        if let Some(claims) = &self.claims
            && !claim_episode(claims, &mut event.payload)
        {
            return;
        }
        add_lineage(&mut event.payload, &self.repository);
        if let Some(l) = self.locator.as_ref().and_then(|l| l.get()) {
            add_capture(&mut event.payload, l.as_ref());
        }
        self.unwritten.push(event);
        self.tick();
    }

    fn tick(&mut self) {
        if self.unwritten.is_empty() || self.retry_at.is_some_and(|t| std::time::Instant::now() < t)
        {
            return;
        }
        let mut still = Vec::new();
        for e in self.unwritten.drain(..) {
            if let Err(err) = self.outbox.enqueue(&e) {
                tracing::error!(event = %e.id, error = %err, "cannot write a webhook event to the outbox; will retry");
                metrics::count_webhook("", "outbox_error");
                still.push(e);
            }
        }
        self.retry_at =
            (!still.is_empty()).then(|| std::time::Instant::now() + Duration::from_secs(1));
        self.unwritten = still;
    }
}

/// Claims a `model.drift` event's episode for this replica (see [`claim`]); false when
/// another replica claimed it (the event is not sent). Other events pass. A claim that
/// cannot be made sends the event anyway (counted): nothing is lost.
fn claim_episode(claims: &claim::Claims, payload: &mut serde_json::Value) -> bool {
    if payload.get("type").and_then(|t| t.as_str()) != Some("model.drift") {
        return true;
    }
    let Some(data) = payload.get_mut("data").and_then(|d| d.as_object_mut()) else {
        return true;
    };
    let model = data
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_string();
    let version = data
        .get("version")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let checksum = data
        .get("profile_checksum")
        .and_then(|c| c.as_str())
        .unwrap_or_default()
        .to_string();
    let cooldown_ms = data
        .get("cooldown_secs")
        .and_then(serde_json::Value::as_f64)
        .map_or(0, |s| (s.max(0.0) * 1000.0) as u64);
    match claims.claim(
        &model,
        version,
        &checksum,
        cooldown_ms,
        crate::util::now_ms(),
    ) {
        claim::Outcome::Claimed { seen, claim } => {
            data.insert(
                "fleet".into(),
                serde_json::json!({"claimed_by": claims.replica, "replicas_seen": seen, "claim": claim}),
            );
            true
        }
        claim::Outcome::Suppressed { by } => {
            tracing::info!(model = %model, version, claimed_by = %by, "drift episode claimed by another replica; its event is not sent from here");
            metrics::count_drift_suppressed(&model, "fleet");
            false
        }
        claim::Outcome::Failed(why) => {
            tracing::warn!(model = %model, version, error = %why, "cannot claim the drift episode in the shared folder; sending this replica's event");
            metrics::count_drift_claim_error(&model);
            data.insert(
                "fleet".into(),
                serde_json::json!({"claimed_by": null, "claim_error": why}),
            );
            true
        }
    }
}

/// Adds `data.lineage` (the named version's model.toml) to an event that names a model
/// and version and has none yet, so a retrainer knows what it is looking at. Read when
/// the event is made: once per episode, not per request.
fn add_lineage(payload: &mut serde_json::Value, repository: &std::path::Path) {
    let Some(data) = payload.get_mut("data").and_then(|d| d.as_object_mut()) else {
        return;
    };
    let (Some(model), Some(version)) = (
        data.get("model").and_then(|m| m.as_str()),
        data.get("version").and_then(serde_json::Value::as_u64),
    ) else {
        return;
    };
    // The name came from the registry; a path-like one is refused all the same.
    if data.contains_key("lineage") || model.contains('/') || model.starts_with('.') {
        return;
    }
    let vdir = repository.join(model).join(version.to_string());
    if let Ok(Some(l)) = crate::lineage::Lineage::read(&vdir) {
        data.insert("lineage".into(), l.to_json());
    }
}

/// Adds `data.capture` to a drift event that has a window span (`window.from_ms`,
/// `window.to_ms`) and no capture reference yet: the captured files and feedback of that
/// version covering the window, as a quality event names them.
fn add_capture(payload: &mut serde_json::Value, locator: &dyn DataLocator) {
    let Some(data) = payload.get_mut("data").and_then(|d| d.as_object_mut()) else {
        return;
    };
    let span = data
        .get("window")
        .and_then(|w| Some((w.get("from_ms")?.as_u64()?, w.get("to_ms")?.as_u64()?)));
    let (Some(model), Some(version), Some(span)) = (
        data.get("model").and_then(|m| m.as_str()),
        data.get("version").and_then(serde_json::Value::as_u64),
        span,
    ) else {
        return;
    };
    if data.contains_key("capture") {
        return;
    }
    if let Some(c) = locator.locate(model, version, span) {
        data.insert("capture".into(), c);
    }
}

/// The drift side of a running server: the request path's end of the channel and the
/// detector's published state.
pub struct Monitor {
    tx: crossbeam_channel::Sender<Sample>,
    pub status: Arc<Mutex<BTreeMap<(String, u64), Status>>>,
    pub outbox: Arc<Outbox>,
    /// Set by [`Monitor::set_locator`] once capture runs.
    locator: Locator,
}

impl Monitor {
    /// Starts the detector thread and one delivery task per webhook target.
    pub fn start(
        config: &DriftConfig,
        repository: &std::path::Path,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<Monitor> {
        let outbox = Arc::new(Outbox::open(
            &config.outbox_dir(repository),
            &config.webhooks,
        )?);
        let (tx, rx) = crossbeam_channel::bounded(config.channel_capacity);
        let status = Arc::new(Mutex::new(BTreeMap::new()));
        let locator = Locator::default();
        let detector = Detector::new(
            Arc::clone(&status),
            Box::new(OutboxSink {
                outbox: Arc::clone(&outbox),
                repository: repository.to_path_buf(),
                locator: Some(Arc::clone(&locator)),
                unwritten: Vec::new(),
                retry_at: None,
                claims: config
                    .fleet_claims
                    .then(|| claim::Claims::new(config.claim_dir_in(repository))),
            }),
        );
        std::thread::Builder::new()
            .name("drift".into())
            .spawn(move || {
                lower_priority();
                detector.run(rx)
            })
            .map_err(|e| Error::Internal(format!("cannot start the drift thread: {e}")))?;
        let delivery = outbox::Delivery {
            allow_private: config.allow_private_webhooks,
            timeout: Duration::from_millis(config.webhook_timeout_ms),
            initial_backoff: Duration::from_millis(config.webhook_initial_backoff_ms),
            max_backoff: Duration::from_millis(config.webhook_max_backoff_ms),
        };
        for t in outbox.targets() {
            tracker.spawn(outbox::deliver_loop(
                Arc::clone(t),
                delivery.clone(),
                shutdown.clone(),
            ));
        }
        Ok(Monitor {
            tx,
            status,
            outbox,
            locator,
        })
    }

    /// From now on drift events name the captured data of their window.
    pub fn set_locator(&self, locator: Arc<dyn DataLocator>) {
        let _ = self.locator.set(locator);
    }

    /// The request path: samples a successful request (never waits).
    pub fn observe(
        &self,
        settings: &Arc<ModelDriftConfig>,
        version: &VersionDrift,
        t: &Tensor,
        outputs: &[Tensor],
    ) {
        let Some((rows, width, features)) = features::features_of(t, settings.max_rows_per_request)
        else {
            return;
        };
        let Some(first) = outputs.first() else {
            return;
        };
        let predictions =
            features::predictions_of(first, settings.max_rows_per_request).unwrap_or_default();
        let sample = Sample {
            model: version.model.clone(),
            version: version.version,
            settings: Arc::clone(settings),
            profile: version.profile.clone(),
            input: t.name.clone(),
            output: first.name.clone(),
            rows,
            width,
            features,
            predictions,
        };
        match self.tx.try_send(sample) {
            Ok(()) => version.sampled.increment(1),
            Err(_) => version.dropped.increment(1),
        }
    }

    /// The request path's first question: is this request sampled? If so, the name of
    /// the input whose rows are the features.
    pub fn wants<'a>(settings: &ModelDriftConfig, version: &'a VersionDrift) -> Option<&'a str> {
        if !settings.enabled
            || (version.profile.is_none() && settings.live_reference_rows == 0)
            || (settings.sample_rate < 1.0 && fastrand::f64() >= settings.sample_rate)
        {
            return None;
        }
        version.feature_input.as_deref()
    }

    /// The state of every model version the detector has seen.
    pub fn statuses(&self, model: Option<&str>) -> Vec<Status> {
        self.status
            .lock()
            .map(|all| {
                all.values()
                    .filter(|s| model.is_none_or(|m| s.model == m))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Raises the calling thread's nice value to 10: the detector yields the CPU to the
/// threads that answer requests, and still gets its share when they keep every core
/// busy (it is not SCHED_IDLE, which would starve it and drop every sample under load).
#[allow(unsafe_code)] // libc / raw buffer calls, each with its SAFETY note
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid takes no arguments; setpriority on our own thread id only changes
    // this thread's nice value (raising it needs no privilege).
    unsafe {
        let tid = libc::gettid();
        if libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10) != 0 {
            tracing::debug!("cannot lower the drift thread's priority");
        }
    }
}

/// What drift detection knows of one loaded version: its reference profile, where its
/// features are, and its sample counters. Made when the version loads.
pub struct VersionDrift {
    pub model: String,
    pub version: u64,
    /// The reference profile (`profile.json`), when the version has one.
    pub profile: Option<Arc<Profile>>,
    /// The input whose columns are the features (the first 2-D numeric input).
    pub feature_input: Option<String>,
    sampled: ::metrics::Counter,
    dropped: ::metrics::Counter,
}

impl VersionDrift {
    /// Reads the version's profile from its folder: a broken one is reported and leaves
    /// drift off for the version (it still serves).
    pub fn load(model: &str, version: u64, vdir: &std::path::Path, inputs: &[TensorSpec]) -> Self {
        let profile = match profile::load(vdir) {
            Ok(p) => p.map(Arc::new),
            Err(e) => {
                tracing::error!(model, version, error = %e, "drift profile is invalid; drift detection is off for this version");
                metrics::record_load_failure(model);
                None
            }
        };
        VersionDrift {
            model: model.to_string(),
            version,
            profile,
            feature_input: features::feature_input(inputs).map(|i| inputs[i].name.clone()),
            sampled: ::metrics::counter!(metrics::DRIFT_SAMPLES, "model" => model.to_string()),
            dropped: ::metrics::counter!(metrics::DRIFT_SAMPLES_DROPPED, "model" => model.to_string()),
        }
    }
}

//! The model repository: scanning `<repo>/<model>/<version>/model.onnx`, loading each
//! version, and publishing what serves as one immutable [`Snapshot`] behind an `ArcSwap`.
//!
//! A request loads the snapshot once and uses it throughout, so it never sees half of a
//! change. Loading is fallible and happens off to the side; publishing is one `store`.
//! A version that fails to load is kept in the snapshot as a failure with its reason, so
//! that the repository index, metrics and logs can report it while the rest serves.

pub mod loader;
pub mod report;
pub mod scan;
pub mod settings;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::batcher::WorkerPool;
use crate::error::{Error, Result};
use crate::metrics;
use crate::routing::{ModelTrafficConfig, TrafficSpec};
use crate::runtime::Phases;
use crate::tensor::TensorSpec;
use crate::util::nanos;
use report::{Notice, Reports, Subject};
pub use scan::Fingerprint;
use settings::{ControlMode, ModelConfigFile, ModelSettings, VersionPolicy};

/// The ONNX file inside a version folder.
pub use crate::runtime::MODEL_FILE;

/// One loaded, serving version of a model.
pub struct ModelVersion {
    pub model: String,
    pub version: u64,
    pub path: PathBuf,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub settings: ModelSettings,
    pub pool: WorkerPool,
    pub stats: VersionStats,
    pub metrics: crate::metrics::VersionMetrics,
    /// Requests, errors, latency and agreement with stable, for rollout analysis.
    pub counters: crate::routing::counters::Counters,
    /// The drift reference profile and features of this version.
    pub drift: crate::drift::VersionDrift,
    /// The capture dataset's interface and counters of this version.
    pub capture: Arc<crate::capture::VersionCapture>,
    /// The files this version was loaded from, to tell whether they changed.
    pub fingerprint: Fingerprint,
    /// `version` as a string, kept to avoid formatting it on every request.
    pub version_str: String,
    /// The version's `model.toml`, when it has one.
    pub lineage: Option<Arc<crate::lineage::Lineage>>,
}

impl ModelVersion {
    /// True when every input and output has a dynamic first dimension, so requests may
    /// carry any number of rows (and Triton clients see a batching model).
    pub fn batchable(&self) -> bool {
        crate::batcher::batchable(&self.inputs, &self.outputs)
    }

    /// Position of an input by name.
    pub fn input_index(&self, name: &str) -> Option<usize> {
        self.inputs.iter().position(|s| s.name == name)
    }
}

/// Triton's per-request statistics of one version (`inference_stats`), recorded on the
/// request path; durations in nanoseconds. The per-execution ones (`inference_count`,
/// `execution_count`, `batch_stats`) are the batcher's ([`WorkerPool::executions`]).
#[derive(Default)]
pub struct VersionStats {
    pub success_count: AtomicU64,
    pub success_ns: AtomicU64,
    pub fail_count: AtomicU64,
    pub fail_ns: AtomicU64,
    pub queue_ns: AtomicU64,
    pub compute_input_ns: AtomicU64,
    pub compute_infer_ns: AtomicU64,
    pub compute_output_ns: AtomicU64,
    pub last_inference_ms: AtomicU64,
}

impl VersionStats {
    /// Records a successful request: its time in the server, its wait in the queue, and
    /// the phases of the batch it ran in.
    pub fn record_success(&self, total: Duration, queue: Duration, compute: &Phases) {
        self.success_count.fetch_add(1, Ordering::Relaxed);
        self.success_ns.fetch_add(nanos(total), Ordering::Relaxed);
        self.queue_ns.fetch_add(nanos(queue), Ordering::Relaxed);
        self.compute_input_ns
            .fetch_add(nanos(compute.input), Ordering::Relaxed);
        self.compute_infer_ns
            .fetch_add(nanos(compute.infer), Ordering::Relaxed);
        self.compute_output_ns
            .fetch_add(nanos(compute.output), Ordering::Relaxed);
        self.touch();
    }

    /// Records a failed request.
    pub fn record_failure(&self, total: Duration) {
        self.fail_count.fetch_add(1, Ordering::Relaxed);
        self.fail_ns.fetch_add(nanos(total), Ordering::Relaxed);
        self.touch();
    }

    fn touch(&self) {
        self.last_inference_ms
            .store(crate::util::now_ms(), Ordering::Relaxed);
    }
}

/// One model: its ready versions and the versions that failed, with reasons.
pub struct Model {
    pub name: String,
    pub versions: BTreeMap<u64, Arc<ModelVersion>>,
    /// Versions that failed to load, with the reason. A version may be here and in
    /// `versions` at once: its reload (new files or settings) failed, the previous load
    /// serves.
    pub failed: BTreeMap<u64, String>,
    /// Versions found but not loaded yet (still being written).
    pub pending: BTreeMap<u64, String>,
    /// Version folders present that the version policy does not serve.
    pub unloaded: BTreeSet<u64>,
    /// Set when config.toml cannot be used: invalid, or refused because versions it
    /// would serve do not match it. The settings in force stay (`settings`).
    pub error: Option<String>,
    /// The settings in force: from the last config.toml that was accepted. `None` when
    /// none ever was (nothing can load).
    pub settings: Option<ModelSettings>,
    /// True once a version of this model has served: a model that served and lost every
    /// version makes the server unready, one that never served does not.
    pub was_ready: bool,
    /// The routing state (routing.toml); empty when there is none.
    pub routing: TrafficSpec,
    /// Set when routing.toml cannot be used: the previous routing stays in force.
    pub routing_error: Option<String>,
    /// The `[traffic]` settings of config.toml.
    pub traffic: ModelTrafficConfig,
    /// The `[drift]` settings of config.toml.
    pub drift: Arc<crate::drift::ModelDriftConfig>,
    /// The `[capture]` settings of config.toml.
    pub capture: Arc<crate::capture::ModelCaptureConfig>,
    /// The version requests without a version go to (unless routed to the canary):
    /// routing's stable version when ready, else the newest ready version.
    pub stable: Option<u64>,
}

impl Model {
    /// The version a request without an explicit version goes to, routing aside: the
    /// stable version.
    pub fn default_version(&self) -> Option<&Arc<ModelVersion>> {
        self.stable.and_then(|v| self.versions.get(&v))
    }

    /// The version that answers a request, and its role: an explicit version wins;
    /// otherwise routing's canary by weight (sticky by `key`) when it is ready, else the
    /// stable version (routing's rules: [`TrafficSpec`]).
    pub fn route(
        &self,
        version: Option<&str>,
        key: Option<&str>,
    ) -> Result<(&Arc<ModelVersion>, crate::routing::Variant)> {
        if version.is_some_and(|v| !v.is_empty()) {
            let mv = self.resolve(version)?;
            return Ok((mv, self.routing.variant_of(mv.version)));
        }
        if let Some(mv) = self
            .routing
            .pick_canary(&self.name, key)
            .and_then(|v| self.versions.get(&v))
        {
            return Ok((mv, crate::routing::Variant::Canary));
        }
        Ok((self.resolve(None)?, crate::routing::Variant::Stable))
    }

    /// Resolves an explicit version string, or the default version.
    pub fn resolve(&self, version: Option<&str>) -> Result<&Arc<ModelVersion>> {
        match version.filter(|v| !v.is_empty()) {
            None => self.default_version().ok_or_else(|| {
                let why = self
                    .error
                    .clone()
                    .or_else(|| {
                        self.failed
                            .iter()
                            .next_back()
                            .map(|(v, r)| format!("version {v}: {r}"))
                    })
                    .unwrap_or_else(|| "nothing loaded".into());
                Error::Unavailable(format!(
                    "model '{}' has no ready version ({why})",
                    self.name
                ))
            }),
            Some(v) => {
                let n: u64 = v.parse().map_err(|_| {
                    Error::NotFound(format!("model '{}' has no version '{v}'", self.name))
                })?;
                if let Some(mv) = self.versions.get(&n) {
                    Ok(mv)
                } else if let Some(reason) = self.failed.get(&n).or_else(|| self.pending.get(&n)) {
                    Err(Error::Unavailable(format!(
                        "model '{}' version {n} is not ready: {reason}",
                        self.name
                    )))
                } else {
                    Err(Error::NotFound(format!(
                        "model '{}' has no version '{v}'",
                        self.name
                    )))
                }
            }
        }
    }

    /// Why nothing serves, for error messages.
    pub fn failure_summary(&self) -> String {
        self.error
            .clone()
            .or_else(|| {
                self.failed
                    .iter()
                    .next_back()
                    .map(|(v, r)| format!("version {v}: {r}"))
            })
            .or_else(|| {
                self.pending
                    .iter()
                    .next_back()
                    .map(|(v, r)| format!("version {v}: {r}"))
            })
            .unwrap_or_else(|| {
                if self.unloaded.is_empty() {
                    "no version folders".into()
                } else {
                    "the version policy selects none of the version folders".into()
                }
            })
    }

    /// Ready means at least one version serves.
    pub fn is_ready(&self) -> bool {
        !self.versions.is_empty()
    }
}

/// Everything that serves, at one moment.
#[derive(Default)]
pub struct Snapshot {
    pub models: BTreeMap<String, Arc<Model>>,
}

impl Snapshot {
    /// Looks a model up by name.
    pub fn model(&self, name: &str) -> Result<&Arc<Model>> {
        self.models
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("unknown model '{name}'")))
    }

    /// Resolves model and version in one step.
    pub fn resolve(&self, model: &str, version: Option<&str>) -> Result<&Arc<ModelVersion>> {
        self.model(model)?.resolve(version)
    }

    /// Every model in the repository has a ready version (Triton's readiness; true for
    /// an empty repository).
    pub fn all_ready(&self) -> bool {
        self.models.values().all(|m| m.is_ready())
    }

    /// Can serve what it serves: no model that served has lost every version, and some
    /// model is ready unless the repository is empty. A model that never became ready
    /// (one broken upload) does not count: it is reported (index, metrics, log, its own
    /// ready endpoint) while the rest serves.
    pub fn serving_ready(&self) -> bool {
        self.models.is_empty()
            || (self.models.values().any(|m| m.is_ready())
                && self.models.values().all(|m| m.is_ready() || !m.was_ready))
    }
}

/// True for a name we accept as a model folder: it also appears in URLs and metric labels.
pub fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Parses a version folder name: a positive integer in canonical form ("1", not "01").
pub fn parse_version(name: &str) -> Option<u64> {
    let v: u64 = name.parse().ok()?;
    (v > 0 && v.to_string() == name).then_some(v)
}

/// The live registry: the repository root, the snapshot that serves now, and what the
/// last reconciliation saw (so that unchanged versions are kept, not reloaded).
pub struct Registry {
    root: PathBuf,
    defaults: ModelSettings,
    env: &'static ort::environment::Environment,
    mode: ControlMode,
    settle: Duration,
    current: ArcSwap<Snapshot>,
    /// One reconciliation at a time; it owns the bookkeeping below.
    reload: Mutex<ReloadState>,
    /// Reconciliation passes so far (also the `modelgate_repository_scans_total` metric,
    /// which several registries in one process would share).
    scans: AtomicU64,
}

#[derive(Default)]
struct ReloadState {
    /// Explicit mode: the models the operator loaded.
    loaded: BTreeSet<String>,
    /// Fingerprints seen on the previous scan, to tell a file still being written.
    seen: HashMap<(String, u64), Fingerprint>,
    /// Versions that failed, with the fingerprint and settings they failed with:
    /// retried only when their folder or their settings change.
    failed: HashMap<(String, u64), (Fingerprint, ModelSettings, String)>,
    /// Models with a routing change in progress ([`Hold`]): the versions it names stay
    /// loaded, and routing.toml is not re-read until the change is committed or undone.
    holds: HashMap<String, BTreeSet<u64>>,
    /// Problems reported, so that each is logged and counted once per change.
    reports: Reports,
}

/// What a reconciliation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub loaded: Vec<(String, u64)>,
    pub unloaded: Vec<(String, u64)>,
    pub failed: Vec<(String, u64)>,
    /// Versions still being written: reconcile again after the settle time.
    pub pending: usize,
}

/// A routing change in progress on one model (from [`Registry::hold`]): keeps the
/// versions it names loaded and the routing in force unchanged. Dropping it ends the
/// hold at the next reconciliation; [`Hold::release`] ends it now.
#[must_use = "the hold ends when dropped"]
pub struct Hold<'a> {
    registry: &'a Registry,
    model: String,
}

impl Hold<'_> {
    /// Ends the hold and reconciles the model now: routing.toml as it is on disk is in
    /// force, and versions kept only for the change are unloaded. Blocking.
    pub fn release(self) -> Result<Outcome> {
        self.registry.lock_reload().holds.remove(&self.model);
        self.registry.refresh(&self.model)
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.registry.lock_reload().holds.remove(&self.model);
    }
}

impl Registry {
    /// Creates the registry and loads what should serve (in explicit mode, `load_models`).
    pub fn load(
        root: &Path,
        defaults: &ModelSettings,
        env: &'static ort::environment::Environment,
        mode: ControlMode,
        settle: Duration,
        load_models: &[String],
    ) -> Result<Registry> {
        if !root.is_dir() {
            return Err(Error::Config(format!(
                "model repository {} is not a directory",
                root.display()
            )));
        }
        let registry = Registry {
            root: root.to_path_buf(),
            defaults: defaults.clone(),
            env,
            mode,
            settle,
            current: ArcSwap::from_pointee(Snapshot::default()),
            reload: Mutex::new(ReloadState {
                loaded: load_models.iter().cloned().collect(),
                ..ReloadState::default()
            }),
            scans: AtomicU64::new(0),
        };
        // At start-up nothing is being copied, as far as anyone can tell: load at once.
        registry.reconcile_inner(None, Duration::ZERO)?;
        Ok(registry)
    }

    /// The snapshot serving now. Hold it for the whole request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The repository root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How long a new file must hold still before it loads.
    pub fn settle_time(&self) -> Duration {
        self.settle
    }

    /// The control mode.
    pub fn mode(&self) -> ControlMode {
        self.mode
    }

    /// Reconciliation passes so far: cheap evidence that an idle repository is not
    /// rescanned in a loop.
    pub fn scans(&self) -> u64 {
        self.scans.load(Ordering::Relaxed)
    }

    /// Brings what serves in line with the repository. Blocking (loads models): call it
    /// off the async threads.
    pub fn reconcile(&self) -> Result<Outcome> {
        self.reconcile_inner(None, self.settle)
    }

    /// Reconciles one model now (after a routing change): reads its routing.toml and
    /// loads the versions routing names. Blocking.
    pub fn refresh(&self, name: &str) -> Result<Outcome> {
        self.reconcile_inner(Some(name), self.settle)
    }

    /// Starts a routing change on `model` that names `versions`: each of them is loaded
    /// (one seen for the first time after it held still for the settle time) and kept
    /// loaded, and the routing in force stays as it is while the change writes
    /// routing.toml, until [`Hold::release`]. Refused, with nothing changed, when a
    /// version is not in the repository or cannot be made ready. Blocking.
    pub fn hold(&self, model: &str, versions: BTreeSet<u64>) -> Result<Hold<'_>> {
        let dir = self.root.join(model);
        let loaded_now = |snapshot: &Snapshot, v: &u64| {
            snapshot
                .models
                .get(model)
                .is_some_and(|m| m.versions.contains_key(v))
        };
        let snapshot = self.snapshot();
        if let Some(v) = versions
            .iter()
            .find(|v| !loaded_now(&snapshot, v) && !dir.join(v.to_string()).is_dir())
        {
            return Err(Error::invalid(format!(
                "model '{model}' has no version {v} in the repository"
            )));
        }
        self.lock_reload()
            .holds
            .insert(model.to_string(), versions.clone());
        let hold = Hold {
            registry: self,
            model: model.to_string(),
        };
        if versions.iter().all(|v| loaded_now(&snapshot, v)) {
            return Ok(hold);
        }
        drop(snapshot);
        let mut loaded = self.refresh(model);
        // A version seen for the first time must hold still for the settle time before it
        // loads (it could be a copy in progress): look again until it settled.
        for _ in 0..5 {
            let still_settling = self
                .snapshot()
                .models
                .get(model)
                .is_some_and(|m| versions.iter().any(|v| m.pending.contains_key(v)));
            if !still_settling || loaded.is_err() {
                break;
            }
            std::thread::sleep(self.settle);
            loaded = self.refresh(model);
        }
        let snapshot = self.snapshot();
        let unready = loaded.err().map(|e| e.to_string()).or_else(|| {
            let m = snapshot.models.get(model)?;
            versions
                .iter()
                .find(|v| !m.versions.contains_key(v))
                .map(|v| {
                    let why = m
                        .failed
                        .get(v)
                        .or_else(|| m.pending.get(v))
                        .cloned()
                        .unwrap_or_else(|| "not loaded".into());
                    format!("version {v} is not ready: {why}")
                })
        });
        match unready {
            None => Ok(hold),
            Some(why) => {
                // Unload what was loaded for nothing; the refusal is the error to report.
                let _ = hold.release();
                Err(Error::invalid(format!(
                    "model '{model}': {why}; routing unchanged"
                )))
            }
        }
    }

    /// Explicit load: (re)loads one model from the repository and keeps it loaded.
    pub fn load_model(&self, name: &str) -> Result<Outcome> {
        if !valid_model_name(name) || !self.root.join(name).is_dir() {
            return Err(Error::NotFound(format!(
                "no model '{name}' in the repository"
            )));
        }
        self.lock_reload().loaded.insert(name.to_string());
        let outcome = self.reconcile_inner(Some(name), Duration::ZERO)?;
        let snapshot = self.snapshot();
        let model = snapshot.model(name)?;
        if model.versions.is_empty() {
            let why = model.failure_summary();
            return Err(Error::Unavailable(format!(
                "model '{name}' failed to load: {why}"
            )));
        }
        Ok(outcome)
    }

    /// Explicit unload: stops serving a model (in-flight requests finish).
    pub fn unload_model(&self, name: &str) -> Result<Outcome> {
        let known = self.snapshot().models.contains_key(name);
        let was_loaded = self.lock_reload().loaded.remove(name);
        if !known && !was_loaded {
            return Err(Error::NotFound(format!("model '{name}' is not loaded")));
        }
        self.reconcile_inner(Some(name), Duration::ZERO)
    }

    fn lock_reload(&self) -> std::sync::MutexGuard<'_, ReloadState> {
        self.reload
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Scans (all models, or one), prepares what changed off to the side, then publishes
    /// a new snapshot in one store.
    fn reconcile_inner(&self, only: Option<&str>, settle: Duration) -> Result<Outcome> {
        let mut state = self.lock_reload();
        self.scans.fetch_add(1, Ordering::Relaxed);
        metrics::count_scan();
        let old = self.snapshot();
        let mut outcome = Outcome::default();
        let mut models: BTreeMap<String, Arc<Model>> = BTreeMap::new();
        let on_disk = scan::model_folders(&self.root)?;
        let poll = self.mode == ControlMode::Poll;
        let mut names: BTreeSet<String> = on_disk.iter().cloned().collect();
        names.extend(old.models.keys().cloned());
        for name in names {
            let old_model = old.models.get(&name);
            if only.is_some_and(|o| o != name) {
                // Not part of this reconciliation: keep as it is.
                if let Some(m) = old_model {
                    models.insert(name, Arc::clone(m));
                }
                continue;
            }
            if !on_disk.contains(&name) || !(poll || state.loaded.contains(&name)) {
                if let Some(m) = old_model {
                    outcome
                        .unloaded
                        .extend(m.versions.keys().map(|&v| (name.clone(), v)));
                    tracing::info!(model = %name, "model unloaded");
                    metrics::count_unloads(&name, m.versions.len());
                }
                continue;
            }
            let model = self.reconcile_model(
                &name,
                old_model.map(Arc::as_ref),
                &mut state,
                settle,
                &mut outcome,
            );
            metrics::set_versions_ready(&name, model.versions.len());
            for &v in model.versions.keys() {
                metrics::set_version_ready(&name, v, true);
            }
            for v in old_model
                .into_iter()
                .flat_map(|m| m.versions.keys())
                .filter(|v| !model.versions.contains_key(v))
            {
                metrics::set_version_ready(&name, *v, false);
            }
            models.insert(name, Arc::new(model));
        }
        for gone in old.models.keys().filter(|n| !models.contains_key(*n)) {
            metrics::set_versions_ready(gone, 0);
        }
        if only.is_none() {
            self.report_misplaced(&mut state.reports);
        }
        state.seen.retain(|(m, _), _| models.contains_key(m));
        state.failed.retain(|(m, _), _| models.contains_key(m));
        let state = &mut *state;
        let failed = &state.failed;
        state.reports.retain(|s| match s {
            Subject::Version(m, v) => failed.contains_key(&(m.clone(), *v)),
            other => other.model().is_none_or(|m| models.contains_key(m)),
        });
        self.current.store(Arc::new(Snapshot { models }));
        Ok(outcome)
    }

    /// Warns once about each model file that is not served because of where it is.
    fn report_misplaced(&self, reports: &mut Reports) {
        let found = scan::misplaced(&self.root);
        let now = Instant::now();
        for m in &found {
            if reports.note(Subject::Misplaced(m.path.clone()), &m.why, now) == Notice::New {
                tracing::warn!(path = %m.path.display(), "{}", m.why);
            }
        }
        reports.retain(|s| match s {
            Subject::Misplaced(p) => found.iter().any(|m| &m.path == p),
            _ => true,
        });
    }

    /// Reads routing.toml into `model`; an invalid one leaves the routing in force.
    fn read_routing(&self, name: &str, dir: &Path, model: &mut Model, reports: &mut Reports) {
        let subject = Subject::Routing(name.to_string());
        match crate::routing::store::read(dir) {
            Ok(spec) => {
                model.routing = spec.unwrap_or_default();
                if reports.resolve(&subject) {
                    tracing::info!(model = name, "routing.toml is valid again; in force");
                }
            }
            Err(e) => {
                // A hand edit gone wrong: the routing in force stays; the error is reported
                // once per version of the file.
                let e = e.to_string();
                let file = std::fs::metadata(dir.join(crate::routing::ROUTING_FILE))
                    .ok()
                    .map(|m| (m.len(), m.modified().ok()));
                match reports.note(subject, &(file, &e), Instant::now()) {
                    Notice::New => {
                        tracing::error!(model = name, error = %e, "routing.toml is invalid; keeping the routing in force");
                        metrics::record_load_failure(name);
                    }
                    Notice::Reminder => {
                        tracing::error!(model = name, error = %e, "routing.toml is still invalid; keeping the routing in force");
                    }
                    Notice::Quiet => {}
                }
                model.routing_error = Some(e);
            }
        }
    }

    /// Decides which config.toml is in force for `model`: the file on disk when it is
    /// valid and every loaded version it would serve matches its declared interface;
    /// else the previous one stays (and `model.error` says why), as a whole: its
    /// settings and `[traffic]`. A refused file is looked at again at every pass, so it
    /// takes effect once it and the versions agree. An invalid `[drift]` table alone
    /// never stops the rest: the drift settings in force (the previous ones, or the
    /// defaults) stay, and the refusal is reported once (and in the repository index).
    fn apply_config(
        &self,
        name: &str,
        dir: &Path,
        old: Option<&Model>,
        folders: &BTreeSet<u64>,
        model: &mut Model,
        reports: &mut Reports,
    ) {
        let (text, file) = ModelConfigFile::read(dir);
        let parsed = file.and_then(|f| {
            Ok((
                f.resolve(&self.defaults)?,
                f.traffic()?,
                f.drift(),
                f.capture()?,
            ))
        });
        let problem = match parsed {
            Err(e) => Some(format!("config.toml invalid: {e}")),
            Ok((settings, traffic, drift, capture)) => {
                match refusal(&settings, old, folders, model) {
                    Some(why) => Some(format!("config.toml refused: {why}")),
                    None => {
                        model.settings = Some(settings);
                        model.traffic = traffic;
                        self.apply_drift(name, &text, drift, model, reports);
                        if *model.capture != capture {
                            model.capture = Arc::new(capture);
                        }
                        None
                    }
                }
            }
        };
        let subject = Subject::Config(name.to_string());
        let Some(problem) = problem else {
            if reports.resolve(&subject) {
                tracing::info!(model = name, "config.toml accepted; in force");
            }
            return;
        };
        // What serves keeps serving under the config in force.
        match reports.note(subject, &(&text, &problem), Instant::now()) {
            Notice::New => {
                tracing::error!(model = name, error = %problem, "model config not applied; keeping the one in force and what serves");
                metrics::record_load_failure(name);
            }
            Notice::Reminder => {
                tracing::error!(model = name, error = %problem, "model config still not applied; keeping the one in force and what serves");
            }
            Notice::Quiet => {}
        }
        model.error = Some(problem);
    }

    /// Takes a valid `[drift]` table; reports an invalid one (once per change) and keeps
    /// the drift settings in force.
    fn apply_drift(
        &self,
        name: &str,
        text: &impl std::hash::Hash,
        drift: Result<crate::drift::ModelDriftConfig>,
        model: &mut Model,
        reports: &mut Reports,
    ) {
        let subject = Subject::Drift(name.to_string());
        match drift {
            Ok(drift) => {
                if *model.drift != drift {
                    model.drift = Arc::new(drift);
                }
                if reports.resolve(&subject) {
                    tracing::info!(model = name, "config.toml [drift] accepted; in force");
                }
            }
            Err(e) => {
                let problem =
                    format!("config.toml [drift] refused ({e}); the drift settings in force stay");
                match reports.note(subject, &(text, &problem), Instant::now()) {
                    Notice::New => {
                        tracing::error!(model = name, error = %problem, "drift settings not applied; the model serves as before");
                        metrics::record_load_failure(name);
                    }
                    Notice::Reminder => {
                        tracing::error!(model = name, error = %problem, "drift settings still not applied");
                    }
                    Notice::Quiet => {}
                }
                model.error = Some(problem);
            }
        }
    }

    fn reconcile_model(
        &self,
        name: &str,
        old: Option<&Model>,
        state: &mut ReloadState,
        settle: Duration,
        outcome: &mut Outcome,
    ) -> Model {
        let dir = self.root.join(name);
        let folders = scan::version_folders(&dir);
        let mut model = Model {
            name: name.to_string(),
            versions: BTreeMap::new(),
            failed: BTreeMap::new(),
            pending: BTreeMap::new(),
            unloaded: BTreeSet::new(),
            error: None,
            settings: old.and_then(|o| o.settings.clone()),
            was_ready: old.is_some_and(|o| o.was_ready),
            routing: old.map(|o| o.routing.clone()).unwrap_or_default(),
            routing_error: None,
            traffic: old.map(|o| o.traffic.clone()).unwrap_or_default(),
            drift: old.map(|o| Arc::clone(&o.drift)).unwrap_or_default(),
            capture: old.map(|o| Arc::clone(&o.capture)).unwrap_or_default(),
            stable: old.and_then(|o| o.stable),
        };
        if state.holds.contains_key(name) {
            // A routing change is writing routing.toml: what it wrote is in force only
            // once it is committed (audited), so the routing in force stays until then.
            model.routing_error = old.and_then(|o| o.routing_error.clone());
        } else {
            self.read_routing(name, &dir, &mut model, &mut state.reports);
        }
        self.apply_config(name, &dir, old, &folders, &mut model, &mut state.reports);
        let Some(settings) = model.settings.clone() else {
            // No config.toml was ever usable: nothing can load until one is.
            if let Some(old) = old {
                model.versions = old.versions.clone();
            }
            return finish(model, old, &folders);
        };
        let policy = policy_targets(&settings.version_policy, &folders);
        // Versions routing names serve whatever the version policy says; so does the
        // stable version while new versions enter as canary or shadow.
        let mut pinned = model
            .routing
            .pinned(model.traffic.new_versions, old.and_then(|o| o.stable));
        pinned.extend(state.holds.get(name).into_iter().flatten().copied());
        let mut targets: BTreeSet<u64> = policy.iter().copied().collect();
        targets.extend(pinned.iter().filter(|v| folders.contains(v)));
        // A version that only shadows runs in the background (idle CPU priority); one
        // that changes role is reloaded with the settings of its new role.
        let routing = &model.routing;
        let settings_for = |v: u64| {
            let mut s = settings.clone();
            s.background = routing.shadows.iter().any(|sh| sh.version == v)
                && routing.stable != Some(v)
                && routing.canary.as_ref().is_none_or(|c| c.version != v);
            s
        };
        let mut ready_targets = 0;
        // Nothing serves yet (a start, say after a crash) and the policy is "latest N": if
        // a newest version does not load, the next older ones are tried, so that what
        // served before the crash serves again.
        let want_latest = match settings.version_policy {
            VersionPolicy::Latest(n) if old.is_none_or(|o| o.versions.is_empty()) => n,
            _ => 0,
        };
        let fallback: Vec<u64> = folders
            .iter()
            .rev()
            .filter(|v| want_latest > 0 && !targets.contains(v))
            .copied()
            .collect();
        let now = Instant::now();
        for (i, &version) in targets.iter().chain(&fallback).enumerate() {
            let counts = policy.contains(&version) || i >= targets.len();
            if i >= targets.len() && ready_targets >= want_latest {
                break;
            }
            let vdir = dir.join(version.to_string());
            let fp = scan::fingerprint(&vdir);
            let key = (name.to_string(), version);
            let subject = Subject::Version(name.to_string(), version);
            let settings = settings_for(version);
            let previous_fp = state.seen.insert(key.clone(), fp.clone());
            // Keep a serving version whose files and settings did not change.
            if let Some(mv) = old.and_then(|m| m.versions.get(&version))
                && mv.fingerprint == fp
                && mv.settings == settings
            {
                model.versions.insert(version, Arc::clone(mv));
                ready_targets += usize::from(counts);
                continue;
            }
            // Failed with these files and these settings: not retried, reminded rarely.
            if let Some((failed_fp, failed_settings, reason)) = state.failed.get(&key)
                && *failed_fp == fp
                && *failed_settings == settings
            {
                if state.reports.note(subject, &(&fp, reason), now) == Notice::Reminder {
                    tracing::error!(model = name, version, error = %reason, "version still fails to load");
                }
                model.failed.insert(version, reason.clone());
                continue;
            }
            // A file still being written: changed since the last scan, or too recent.
            if !fp.settled(previous_fp.as_ref(), settle) {
                model
                    .pending
                    .insert(version, "files are still being written".into());
                outcome.pending += 1;
                continue;
            }
            match loader::load_version(name, version, &vdir, &settings, fp.clone(), self.env) {
                Ok(v) => {
                    tracing::info!(
                        model = name,
                        version,
                        instances = v.pool.instances(),
                        "version ready"
                    );
                    state.failed.remove(&key);
                    state.reports.resolve(&subject);
                    model.versions.insert(version, Arc::new(v));
                    outcome.loaded.push(key);
                    ready_targets += usize::from(counts);
                }
                Err(e) => {
                    let reason = e.to_string();
                    if state.reports.note(subject, &(&fp, &reason), now) == Notice::New {
                        tracing::error!(model = name, version, error = %reason, "version failed to load");
                        metrics::record_load_failure(name);
                    }
                    state
                        .failed
                        .insert(key.clone(), (fp, settings, reason.clone()));
                    model.failed.insert(version, reason);
                    outcome.failed.push(key);
                }
            }
        }
        // Everything that served keeps serving until its replacement is ready: while the
        // policy's targets are short of ready versions, keep the newest old ones on disk,
        // with the files and settings they were loaded with.
        if let Some(old) = old {
            let want = match &settings.version_policy {
                VersionPolicy::Latest(n) => *n,
                _ => policy.len(),
            };
            for (&v, mv) in old.versions.iter().rev() {
                if ready_targets >= want {
                    break;
                }
                if !model.versions.contains_key(&v) && folders.contains(&v) {
                    model.versions.insert(v, Arc::clone(mv));
                    ready_targets += 1;
                }
            }
            for &v in old.versions.keys() {
                if !model.versions.contains_key(&v) {
                    outcome.unloaded.push((name.to_string(), v));
                    metrics::count_unloads(name, 1);
                }
            }
        }
        finish(model, old, &folders)
    }
}

/// The parts of a reconciled model that follow from its versions.
fn finish(mut model: Model, old: Option<&Model>, folders: &BTreeSet<u64>) -> Model {
    // Without a config in force there is no policy, and nothing it left unloaded.
    if model.settings.is_some() {
        model.unloaded = folders
            .iter()
            .copied()
            .filter(|v| {
                !model.versions.contains_key(v)
                    && !model.failed.contains_key(v)
                    && !model.pending.contains_key(v)
            })
            .collect();
    }
    model.was_ready |= model.is_ready();
    model.stable = effective_stable(&model, old);
    metrics::set_routing(
        &model.name,
        &model.routing.gauges(model.stable),
        old.map(|o| o.routing.gauges(o.stable)).as_ref(),
    );
    model
}

/// Why a valid new config must not take effect while versions serve: a loaded version
/// it would serve (by its policy, or named by routing) does not match its declared
/// interface, or its policy selects none of the version folders (the model would go
/// offline). Loaded versions are checked as they are, without reloading them; versions
/// not loaded yet are checked as they load, and fail alone.
fn refusal(
    settings: &ModelSettings,
    old: Option<&Model>,
    folders: &BTreeSet<u64>,
    model: &Model,
) -> Option<String> {
    let old = old.filter(|o| o.is_ready())?;
    if old.settings.as_ref() == Some(settings) {
        return None;
    }
    let mut serve: BTreeSet<u64> = policy_targets(&settings.version_policy, folders)
        .into_iter()
        .collect();
    serve.extend(
        model
            .routing
            .versions()
            .iter()
            .filter(|v| folders.contains(v)),
    );
    if serve.is_empty() && !folders.is_empty() {
        let present: Vec<String> = folders.iter().map(u64::to_string).collect();
        return Some(format!(
            "its version_policy selects none of the versions present ({}), so nothing would serve",
            present.join(", ")
        ));
    }
    serve
        .iter()
        .filter_map(|v| old.versions.get(v))
        .find_map(|mv| {
            loader::check_interface(settings, &mv.inputs, &mv.outputs)
                .err()
                .map(|e| format!("version {} (serving): {e}", mv.version))
        })
}

/// The version unpinned requests go to: routing's stable when ready; while new versions
/// enter as canary or shadow, the one that was stable before; else the newest ready.
fn effective_stable(model: &Model, old: Option<&Model>) -> Option<u64> {
    if let Some(v) = model.routing.stable
        && !model.versions.contains_key(&v)
        // Logged when it becomes a problem, not at every rescan.
        && old.is_none_or(|o| o.routing.stable != Some(v) || o.versions.contains_key(&v))
    {
        tracing::warn!(model = %model.name, version = v, "routing's stable version is not ready; serving the newest ready version");
    }
    let ready: BTreeSet<u64> = model.versions.keys().copied().collect();
    crate::routing::spec::effective_stable(
        &model.routing,
        model.traffic.new_versions,
        old.and_then(|o| o.stable),
        &ready,
    )
}

/// The versions a policy selects among the folders present (ascending).
pub fn policy_targets(policy: &VersionPolicy, folders: &BTreeSet<u64>) -> Vec<u64> {
    match policy {
        VersionPolicy::All => folders.iter().copied().collect(),
        VersionPolicy::Latest(n) => {
            let mut v: Vec<u64> = folders.iter().rev().take(*n).copied().collect();
            v.reverse();
            v
        }
        VersionPolicy::Specific(list) => folders
            .iter()
            .copied()
            .filter(|v| list.contains(v))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names() {
        assert_eq!(parse_version("1"), Some(1));
        assert_eq!(parse_version("12"), Some(12));
        assert_eq!(parse_version("0"), None);
        assert_eq!(parse_version("01"), None);
        assert_eq!(parse_version("-1"), None);
        assert_eq!(parse_version("1.tmp"), None);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn model_names() {
        assert!(valid_model_name("iris"));
        assert!(valid_model_name("my-model_2.v1"));
        assert!(!valid_model_name(".hidden"));
        assert!(!valid_model_name("a b"));
        assert!(!valid_model_name("a/b"));
        assert!(!valid_model_name(""));
    }

    #[test]
    fn version_policies() {
        let folders: BTreeSet<u64> = [1, 2, 5, 7].into_iter().collect();
        assert_eq!(policy_targets(&VersionPolicy::Latest(1), &folders), vec![7]);
        assert_eq!(
            policy_targets(&VersionPolicy::Latest(2), &folders),
            vec![5, 7]
        );
        assert_eq!(
            policy_targets(&VersionPolicy::Latest(9), &folders),
            vec![1, 2, 5, 7]
        );
        assert_eq!(
            policy_targets(&VersionPolicy::All, &folders),
            vec![1, 2, 5, 7]
        );
        assert_eq!(
            policy_targets(&VersionPolicy::Specific(vec![2, 3, 7]), &folders),
            vec![2, 7]
        );
    }
}

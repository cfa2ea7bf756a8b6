//! The model repository: scanning `<repo>/<model>/<version>/model.onnx`, loading each
//! version, and publishing what serves as one immutable [`Snapshot`] behind an `ArcSwap`.
//!
//! A request loads the snapshot once and uses it throughout, so it never sees half of a
//! change. Loading is fallible and happens off to the side; publishing is one `store`.
//! A version that fails to load is kept in the snapshot as a failure with its reason, so
//! that the repository index, metrics and logs can report it while the rest serves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use crate::batcher::WorkerPool;
use crate::config::{ModelConfigFile, ModelSettings};
use crate::error::{Error, Result};
use crate::tensor::TensorSpec;

/// The ONNX file inside a version folder.
pub const MODEL_FILE: &str = "model.onnx";

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
    /// `version` as a string, kept to avoid formatting it on every request.
    pub version_str: String,
}

impl ModelVersion {
    /// True when every input and output has a dynamic first dimension, so requests may
    /// carry any number of rows (and Triton clients see a batching model).
    pub fn batchable(&self) -> bool {
        !self.inputs.is_empty()
            && self
                .inputs
                .iter()
                .chain(&self.outputs)
                .all(TensorSpec::has_batch_dim)
    }

    /// Position of an input by name.
    pub fn input_index(&self, name: &str) -> Option<usize> {
        self.inputs.iter().position(|s| s.name == name)
    }
}

/// Counters behind Triton's ModelStatistics, per version. Durations in nanoseconds.
#[derive(Default)]
pub struct VersionStats {
    pub inference_count: AtomicU64,
    pub execution_count: AtomicU64,
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

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl VersionStats {
    /// Records a successful request of `rows` rows.
    pub fn record_success(&self, rows: u64, total: Duration, queue: Duration, infer: Duration) {
        self.inference_count.fetch_add(rows, Ordering::Relaxed);
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        self.success_count.fetch_add(1, Ordering::Relaxed);
        self.success_ns.fetch_add(nanos(total), Ordering::Relaxed);
        self.queue_ns.fetch_add(nanos(queue), Ordering::Relaxed);
        self.compute_infer_ns
            .fetch_add(nanos(infer), Ordering::Relaxed);
        self.touch();
    }

    /// Records a failed request.
    pub fn record_failure(&self, total: Duration) {
        self.fail_count.fetch_add(1, Ordering::Relaxed);
        self.fail_ns.fetch_add(nanos(total), Ordering::Relaxed);
        self.touch();
    }

    fn touch(&self) {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.last_inference_ms.store(ms, Ordering::Relaxed);
    }
}

/// One model: its ready versions and the versions that failed, with reasons.
pub struct Model {
    pub name: String,
    pub versions: BTreeMap<u64, Arc<ModelVersion>>,
    pub failed: BTreeMap<u64, String>,
    /// Set when the model as a whole cannot load (for example a bad config.toml).
    pub error: Option<String>,
}

impl Model {
    /// The version a request without an explicit version goes to: the newest ready one.
    pub fn default_version(&self) -> Option<&Arc<ModelVersion>> {
        self.versions.values().next_back()
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
                } else if let Some(reason) = self.failed.get(&n) {
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

    /// The server is ready when every model in the repository has a ready version.
    pub fn all_ready(&self) -> bool {
        self.models.values().all(|m| m.is_ready())
    }
}

/// The live registry: a repository root and the snapshot that serves now.
pub struct Registry {
    root: PathBuf,
    current: ArcSwap<Snapshot>,
}

impl Registry {
    /// Scans and loads the whole repository. Individual failures are recorded in the
    /// snapshot; only an unreadable root is an error.
    pub fn load(
        root: &Path,
        defaults: &ModelSettings,
        env: &ort::environment::Environment,
    ) -> Result<Registry> {
        let snapshot = scan(root, defaults, env)?;
        Ok(Registry {
            root: root.to_path_buf(),
            current: ArcSwap::from_pointee(snapshot),
        })
    }

    /// The snapshot serving now. Hold it for the whole request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The repository root.
    pub fn root(&self) -> &Path {
        &self.root
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

fn scan(
    root: &Path,
    defaults: &ModelSettings,
    env: &ort::environment::Environment,
) -> Result<Snapshot> {
    let entries = std::fs::read_dir(root)
        .map_err(|e| Error::Config(format!("model repository {}: {e}", root.display())))?;
    let mut models = BTreeMap::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !path.is_dir() || name.starts_with('.') {
            continue;
        }
        if !valid_model_name(&name) {
            tracing::warn!(folder = %path.display(), "skipping folder: not a valid model name");
            continue;
        }
        if !has_version_folder(&path) {
            // Not a model (tooling, notes): nothing here is meant to serve.
            tracing::warn!(folder = %path.display(), "skipping folder: no version folders (<model>/<N>/model.onnx)");
            continue;
        }
        let model = load_model(&name, &path, defaults, env);
        models.insert(name, Arc::new(model));
    }
    Ok(Snapshot { models })
}

fn has_version_folder(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| parse_version(&e.file_name().to_string_lossy()).is_some() && e.path().is_dir())
    })
}

fn load_model(
    name: &str,
    dir: &Path,
    defaults: &ModelSettings,
    env: &ort::environment::Environment,
) -> Model {
    let mut model = Model {
        name: name.to_string(),
        versions: BTreeMap::new(),
        failed: BTreeMap::new(),
        error: None,
    };
    let settings = match ModelConfigFile::load(dir).and_then(|f| f.resolve(defaults)) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(model = name, error = %e, "model config is invalid; model not loaded");
            crate::metrics::record_load_failure(name);
            model.error = Some(e.to_string());
            return model;
        }
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        model.error = Some(format!("cannot read {}", dir.display()));
        return model;
    };
    for entry in entries.flatten() {
        let folder = entry.file_name().to_string_lossy().into_owned();
        let Some(version) = parse_version(&folder) else {
            continue;
        };
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        match load_version(name, version, &path, &settings, env) {
            Ok(v) => {
                tracing::info!(model = name, version, inputs = ?v.inputs, outputs = ?v.outputs, instances = v.pool.instances(), "version loaded");
                model.versions.insert(version, Arc::new(v));
            }
            Err(e) => {
                tracing::error!(model = name, version, error = %e, "version failed to load");
                crate::metrics::record_load_failure(name);
                model.failed.insert(version, e.to_string());
            }
        }
    }
    model
}

/// Loads one version: sessions, interface checks and worker threads.
pub fn load_version(
    model: &str,
    version: u64,
    dir: &Path,
    settings: &ModelSettings,
    env: &ort::environment::Environment,
) -> Result<ModelVersion> {
    let path = dir.join(MODEL_FILE);
    if !path.is_file() {
        return Err(Error::Config(format!("{} is missing", path.display())));
    }
    let label = format!("{model}-{version}");
    let metrics = crate::metrics::BatchMetrics::new(model, &version.to_string());
    let (pool, inputs, outputs) = WorkerPool::start(&label, &path, settings, env, metrics)?;
    if let Some(t) = inputs
        .iter()
        .chain(&outputs)
        .find(|t| t.dtype == crate::tensor::DataType::Bytes)
    {
        return Err(Error::Config(format!(
            "tensor '{}' is of type BYTES (string), which is not supported yet",
            t.name
        )));
    }
    Ok(ModelVersion {
        model: model.to_string(),
        version,
        path,
        inputs,
        outputs,
        settings: settings.clone(),
        pool,
        stats: VersionStats::default(),
        metrics: crate::metrics::VersionMetrics::new(model, &version.to_string()),
        version_str: version.to_string(),
    })
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
}

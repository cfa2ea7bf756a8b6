//! Per-model settings: the server config's `[model_defaults]` and each model's
//! `config.toml` over them ([`ModelSettings`], [`ModelConfigFile`]), the version policy,
//! the declared interface, and how the repository's contents become what serves
//! ([`ControlMode`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::batcher::{Batching, PoolSettings};
use crate::drift::ModelDriftConfig;
use crate::error::{Error, Result};
use crate::routing::ModelTrafficConfig;

/// How the repository's contents become what serves.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ControlMode {
    Poll,
    Explicit,
}

/// Settings that apply per model version: the server config's `[model_defaults]`, and each model's
/// `config.toml` (all keys optional there).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSettings {
    /// Worker threads per version, each owning its own ONNX Runtime session; 0 = auto
    /// (one per core without batching; one, using every core, with batching).
    pub instances: usize,
    /// ONNX Runtime intra-op threads per session; 0 = auto (the cores shared out among
    /// the instances).
    pub intra_op_threads: usize,
    /// Requests that may wait in the queue; a full queue answers 429 / RESOURCE_EXHAUSTED.
    pub max_queue_size: usize,
    /// Batching mode.
    pub batching: Batching,
    /// Most rows in one batch (and the max_batch_size Triton clients see).
    pub max_batch_size: usize,
    /// Longest a request waits for a batch to fill, in microseconds.
    pub max_queue_delay_us: u64,
    /// Batch sizes (rows) released as soon as they are reached.
    pub preferred_batch_sizes: Vec<usize>,
    /// Queue timeout for requests that carry no deadline, in microseconds; 0 = none.
    pub default_queue_timeout_us: u64,
    /// Priority levels (Triton's `priority`: 1 is the highest, 0 means the default level).
    pub priority_levels: usize,
    /// Level of requests without a priority (1-based, as Triton).
    pub default_priority_level: usize,
    /// A request that waited this long is served before higher priorities: no starvation.
    pub max_priority_wait_us: u64,
    /// Adaptive batching: the latency target waiting must not break, in milliseconds.
    pub target_p99_ms: f64,
    /// A batch whose learnt cost is at most this many microseconds may run on the
    /// thread that decoded the request (no hand-off to a worker); 0 = never.
    pub inline_budget_us: u64,
    /// Which version folders serve (Triton's version policy).
    pub version_policy: VersionPolicy,
    /// Warm up a version (zero-filled runs) before it serves.
    pub warmup: bool,
    /// Batch sizes (rows) of the warm-up runs; empty = 1, the preferred sizes and
    /// max_batch_size for a batching model, one run otherwise.
    pub warmup_batch_sizes: Vec<usize>,
    /// The interface the model must have, when declared: exactly these inputs (order
    /// free) and at least these outputs, each with this datatype and shape (-1 =
    /// dynamic). A version that does not match is refused, and so is a changed config
    /// that the versions serving now do not match (what served keeps serving).
    pub input: Option<Vec<DeclaredTensor>>,
    /// Outputs the model must have (it may have more); see `input`.
    pub output: Option<Vec<DeclaredTensor>>,
    /// Not a config key: set by the registry for a version that serves only as a shadow.
    /// It runs as one single-threaded session whose worker has idle CPU priority, so its
    /// mirrored work never takes a core from client requests.
    #[serde(skip)]
    pub background: bool,
}

/// Triton's version policies.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VersionPolicy {
    /// The newest N versions (`version_policy = { latest = 1 }`).
    Latest(usize),
    /// Every version (`version_policy = "all"`).
    All,
    /// These versions (`version_policy = { specific = [1, 3] }`).
    Specific(Vec<u64>),
}

/// A tensor as config.toml declares it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeclaredTensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            instances: 0,
            intra_op_threads: 0,
            max_queue_size: 1024,
            batching: Batching::Auto,
            max_batch_size: 64,
            max_queue_delay_us: 500,
            preferred_batch_sizes: Vec::new(),
            default_queue_timeout_us: 0,
            priority_levels: 1,
            default_priority_level: 1,
            max_priority_wait_us: 100_000,
            target_p99_ms: 50.0,
            inline_budget_us: 200,
            version_policy: VersionPolicy::Latest(1),
            warmup: true,
            warmup_batch_sizes: Vec::new(),
            input: None,
            output: None,
            background: false,
        }
    }
}

/// A model's `config.toml`: the keys of [`ModelSettings`], all optional, over the
/// server's defaults. Kept as a TOML table so a key is defined in one place only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelConfigFile {
    pub table: toml::Table,
}

impl ModelConfigFile {
    /// Reads `<model dir>/config.toml`; a missing file means "all defaults".
    pub fn load(model_dir: &Path) -> Result<ModelConfigFile> {
        Self::read(model_dir).1
    }

    /// Reads and parses `<model dir>/config.toml`, returning its text as well (empty when
    /// there is none), so that a problem can be told apart from the same problem in
    /// another version of the file.
    pub fn read(model_dir: &Path) -> (String, Result<ModelConfigFile>) {
        let path = model_dir.join("config.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let parsed = Self::parse(&text)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())));
                (text, parsed)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (String::new(), Ok(ModelConfigFile::default()))
            }
            Err(e) => (
                String::new(),
                Err(Error::Config(format!("{}: {e}", path.display()))),
            ),
        }
    }

    /// Parses the text of a config.toml (checked against the keys on resolve).
    pub fn parse(text: &str) -> Result<ModelConfigFile> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| Error::Config(e.message().to_string()))?;
        Ok(ModelConfigFile { table })
    }

    /// The effective settings: this file over `defaults`, validated. Unknown keys are errors.
    pub fn resolve(&self, defaults: &ModelSettings) -> Result<ModelSettings> {
        let mut merged = toml::Table::try_from(defaults)
            .map_err(|e| Error::Internal(format!("model defaults: {e}")))?;
        // `[traffic]` and `[drift]` are not the versions' (see `traffic()`, `drift()`).
        for (k, v) in self
            .table
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "traffic" | "drift" | "capture"))
        {
            merged.insert(k.clone(), v.clone());
        }
        let s: ModelSettings = toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config(e.message().to_string()))?;
        s.validate("")?;
        Ok(s)
    }
}

impl ModelConfigFile {
    /// The `[traffic]` table: what new versions get, the rollout plan. Unknown keys are
    /// errors, as everywhere.
    pub fn traffic(&self) -> Result<ModelTrafficConfig> {
        let t: ModelTrafficConfig = match self.table.get("traffic") {
            None => ModelTrafficConfig::default(),
            Some(v) => v
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| Error::Config(format!("traffic: {}", e.message())))?,
        };
        t.validate()?;
        Ok(t)
    }
}

impl ModelConfigFile {
    /// The `[drift]` table: sampling, windows, tests, thresholds.
    pub fn drift(&self) -> Result<ModelDriftConfig> {
        let d: ModelDriftConfig = match self.table.get("drift") {
            None => ModelDriftConfig::default(),
            Some(v) => v
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| Error::Config(format!("drift: {}", e.message())))?,
        };
        d.validate()?;
        Ok(d)
    }

    /// The `[capture]` table: whether requests are captured, and how.
    pub fn capture(&self) -> Result<crate::capture::ModelCaptureConfig> {
        let c: crate::capture::ModelCaptureConfig = match self.table.get("capture") {
            None => crate::capture::ModelCaptureConfig::default(),
            Some(v) => v
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| Error::Config(format!("capture: {}", e.message())))?,
        };
        c.validate()?;
        Ok(c)
    }
}

impl ModelSettings {
    /// Checks the values; `prefix` names where they came from (`model_defaults.`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let bad = |field: &str, why: &str| Err(Error::Config(format!("{prefix}{field}: {why}")));
        if self.instances > 256 {
            return bad("instances", "at most 256");
        }
        if self.intra_op_threads > 256 {
            return bad("intra_op_threads", "at most 256");
        }
        if self.max_queue_size == 0 {
            return bad("max_queue_size", "must be at least 1");
        }
        if self.max_batch_size == 0 || self.max_batch_size > 1 << 20 {
            return bad("max_batch_size", "must be between 1 and 1048576");
        }
        if self.max_queue_delay_us > 10_000_000 {
            return bad("max_queue_delay_us", "at most 10 s");
        }
        if self
            .preferred_batch_sizes
            .iter()
            .any(|&p| p == 0 || p > self.max_batch_size)
        {
            return bad(
                "preferred_batch_sizes",
                "each must be between 1 and max_batch_size",
            );
        }
        if self.priority_levels == 0 || self.priority_levels > 16 {
            return bad("priority_levels", "must be between 1 and 16");
        }
        if self.default_priority_level == 0 || self.default_priority_level > self.priority_levels {
            return bad(
                "default_priority_level",
                "must be between 1 and priority_levels",
            );
        }
        if !(self.target_p99_ms > 0.0 && self.target_p99_ms < 3_600_000.0) {
            return bad("target_p99_ms", "must be positive");
        }
        if self.inline_budget_us > 1_000_000 {
            return bad("inline_budget_us", "at most 1 s");
        }
        match &self.version_policy {
            VersionPolicy::Latest(0) => return bad("version_policy", "latest must be at least 1"),
            VersionPolicy::Specific(v) if v.is_empty() || v.contains(&0) => {
                return bad("version_policy", "specific needs positive version numbers");
            }
            _ => {}
        }
        if self
            .warmup_batch_sizes
            .iter()
            .any(|&b| b == 0 || b > self.max_batch_size.max(1))
        {
            return bad(
                "warmup_batch_sizes",
                "each must be between 1 and max_batch_size",
            );
        }
        for (field, tensors) in [("input", &self.input), ("output", &self.output)] {
            let mut names = std::collections::BTreeSet::new();
            for t in tensors.iter().flatten() {
                if crate::tensor::DataType::parse(&t.datatype).is_none() {
                    return bad(
                        field,
                        &format!("'{}': unknown datatype '{}'", t.name, t.datatype),
                    );
                }
                if !names.insert(t.name.as_str()) {
                    return bad(field, &format!("'{}' is declared twice", t.name));
                }
            }
        }
        Ok(())
    }
}

impl ModelSettings {
    /// What the version's worker pool needs of these settings.
    pub fn pool(&self) -> PoolSettings {
        PoolSettings {
            instances: self.instances,
            intra_op_threads: self.intra_op_threads,
            max_queue_size: self.max_queue_size,
            batching: self.batching,
            max_batch_size: self.max_batch_size,
            max_queue_delay_us: self.max_queue_delay_us,
            preferred_batch_sizes: self.preferred_batch_sizes.clone(),
            default_queue_timeout_us: self.default_queue_timeout_us,
            priority_levels: self.priority_levels,
            default_priority_level: self.default_priority_level,
            max_priority_wait_us: self.max_priority_wait_us,
            target_p99_ms: self.target_p99_ms,
            inline_budget: std::time::Duration::from_micros(self.inline_budget_us),
            background: self.background,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_errors() {
        let e = ModelConfigFile::parse("instance = 1")
            .unwrap()
            .resolve(&ModelSettings::default())
            .unwrap_err();
        assert!(e.to_string().contains("instance"), "{e}");
    }

    #[test]
    fn model_file_resolves_over_defaults() {
        let f = ModelConfigFile::parse(
            "instances = 3\nbatching = \"adaptive\"\npreferred_batch_sizes = [4, 8]",
        )
        .unwrap();
        let s = f.resolve(&ModelSettings::default()).unwrap();
        assert_eq!(s.instances, 3);
        assert_eq!(s.batching, Batching::Adaptive);
        assert_eq!(s.preferred_batch_sizes, vec![4, 8]);
        assert_eq!(s.max_queue_size, 1024);
        for (text, field) in [
            ("intra_op_threads = 300", "intra_op_threads"),
            ("preferred_batch_sizes = [128]", "preferred_batch_sizes"),
            ("batching = \"sometimes\"", "sometimes"),
            ("default_priority_level = 3", "default_priority_level"),
            ("instance = 1", "instance"),
        ] {
            let e = ModelConfigFile::parse(text)
                .unwrap()
                .resolve(&ModelSettings::default())
                .unwrap_err();
            assert!(e.to_string().contains(field), "{text}: {e}");
        }
    }
}

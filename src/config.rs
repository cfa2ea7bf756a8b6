//! Server configuration: defaults, then a TOML file, then environment, then CLI flags.
//!
//! Unknown keys are errors (`deny_unknown_fields`): a typo in a config file must not be
//! silently ignored on a production server. [`Config::validate`] names the bad field.
//! Per-model settings live in `<repo>/<model>/config.toml` ([`ModelConfig`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Global server settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Root of the model repository (`<repo>/<model>/<version>/model.onnx`).
    pub model_repository: PathBuf,
    /// Address the listeners bind to.
    pub host: String,
    /// HTTP/REST port (Triton's default 8000).
    pub http_port: u16,
    /// gRPC port (Triton's default 8001).
    pub grpc_port: u16,
    /// Prometheus metrics port (Triton's default 8002).
    pub metrics_port: u16,
    /// Path of the ONNX Runtime shared library; found automatically when unset.
    pub onnxruntime_lib: Option<PathBuf>,
    /// Largest accepted request body (HTTP) or message (gRPC), in bytes.
    pub max_request_bytes: usize,
    /// How long shutdown waits for in-flight requests, in seconds.
    pub shutdown_grace_secs: u64,
    /// `poll`: the repository is watched and every change is picked up. `explicit`:
    /// only the repository load/unload API changes what serves (as Triton's flag).
    pub model_control_mode: ControlMode,
    /// Models loaded at start-up in explicit mode.
    pub load_models: Vec<String>,
    /// Full rescan interval, a fallback for filesystems that send no change events.
    pub repository_poll_secs: u64,
    /// A new or changed model file must be this old (and unchanged) before it is loaded:
    /// a file still being copied is never served.
    pub settle_ms: u64,
    /// Bearer token the admin and repository APIs require; unset = no token needed.
    pub admin_token: Option<String>,
    /// Readiness (`/v2/health/ready`, gRPC ServerReady, grpc.health.v1) as Triton has it:
    /// every model must have a ready version. Off: ready when it can serve what it
    /// serves (a model that never became ready does not count; one that served and
    /// lost every version does).
    pub strict_readiness: bool,
    /// Defaults for every model, overridden by the model's own config.toml.
    pub model_defaults: ModelSettings,
    /// Canary, shadow and rollout settings of the server.
    pub traffic: TrafficConfig,
    /// Drift detection and webhook settings of the server.
    pub drift: crate::drift::DriftConfig,
    /// Connection and request limits.
    pub limits: crate::serve::Limits,
    /// Named tokens and their permissions.
    pub auth: AuthConfig,
    /// TLS for the HTTP and gRPC listeners; absent = plain TCP.
    pub tls: Option<crate::tls::TlsConfig>,
}

/// Who may call what (`[auth]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Inference needs a token with the `infer` permission.
    pub inference: bool,
    pub tokens: Vec<NamedToken>,
}

/// A named token, stored as the SHA-256 of the token (`modelgate hash-token`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NamedToken {
    /// Shown as the actor in the audit log and in logs.
    pub name: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    pub permissions: Vec<crate::api::admin::Permission>,
}

impl NamedToken {
    /// The hash as bytes (zeros if malformed; validate() refuses those).
    pub fn hash_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        if let Ok(v) = hex::decode(&self.sha256)
            && v.len() == 32
        {
            out.copy_from_slice(&v);
        }
        out
    }
}

/// Server-wide traffic settings (per-model ones are in each config.toml's `[traffic]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrafficConfig {
    /// Shadow and comparison runs in flight at most; more are shed (and counted).
    /// 0 = half the cores, at least 1.
    pub mirror_max_inflight: usize,
    /// Longest a mirrored run may wait in its queue, in milliseconds.
    pub mirror_timeout_ms: u64,
    /// The audit log of routing changes; default `<model_repository>/audit.jsonl`.
    pub audit_log: Option<PathBuf>,
    /// This replica runs rollouts and enters new versions as canary or shadow. With
    /// several replicas on one registry, set it on one of them only.
    pub controller: bool,
    /// How often the rollout controller looks, in milliseconds.
    pub controller_tick_ms: u64,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        TrafficConfig {
            mirror_max_inflight: 0,
            mirror_timeout_ms: 1000,
            audit_log: None,
            controller: true,
            controller_tick_ms: 1000,
        }
    }
}

impl TrafficConfig {
    /// The mirror budget with the automatic value resolved.
    pub fn mirror_inflight(&self) -> usize {
        match self.mirror_max_inflight {
            0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            n => n,
        }
    }

    /// Where the audit log is.
    pub fn audit_path(&self, repository: &Path) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| repository.join("audit.jsonl"))
    }
}

/// How the repository's contents become what serves.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ControlMode {
    Poll,
    Explicit,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            model_repository: PathBuf::from("models"),
            host: "0.0.0.0".into(),
            http_port: 8000,
            grpc_port: 8001,
            metrics_port: 8002,
            onnxruntime_lib: None,
            max_request_bytes: 64 << 20,
            shutdown_grace_secs: 30,
            model_control_mode: ControlMode::Poll,
            load_models: Vec::new(),
            repository_poll_secs: 10,
            settle_ms: 500,
            admin_token: None,
            strict_readiness: false,
            model_defaults: ModelSettings::default(),
            traffic: TrafficConfig::default(),
            drift: crate::drift::DriftConfig::default(),
            limits: crate::serve::Limits::default(),
            auth: AuthConfig::default(),
            tls: None,
        }
    }
}

/// How a version batches requests.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Batching {
    /// `adaptive` for models whose first dimension is dynamic, `off` for the others.
    Auto,
    /// Every request runs alone, as soon as a worker is free.
    Off,
    /// Triton-style: release when full, at a preferred size, or after `max_queue_delay_us`.
    Static,
    /// Static's bounds, plus release as soon as waiting would not pay off or would break
    /// `target_p99_ms`, from a learnt cost per batch (a + b * rows) and arrival rate.
    Adaptive,
}

/// Settings that apply per model version: the defaults in [`Config`], and each model's
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
            .filter(|(k, _)| !matches!(k.as_str(), "traffic" | "drift"))
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
    pub fn traffic(&self) -> Result<crate::routing::ModelTraffic> {
        let t: crate::routing::ModelTraffic = match self.table.get("traffic") {
            None => crate::routing::ModelTraffic::default(),
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
    pub fn drift(&self) -> Result<crate::drift::ModelDrift> {
        let d: crate::drift::ModelDrift = match self.table.get("drift") {
            None => crate::drift::ModelDrift::default(),
            Some(v) => v
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| Error::Config(format!("drift: {}", e.message())))?,
        };
        d.validate()?;
        Ok(d)
    }
}

impl ModelSettings {
    /// Worker threads and intra-op threads per session, resolving the automatic (0)
    /// values. Measured on the bundled benchmarks (BENCHMARKS.md): a batching model whose
    /// single row costs real compute (`heavy`) does best as one session using every core
    /// (batches stay whole, the GEMMs split across cores); anything else, including a tiny
    /// model for which waking a thread pool costs more than the work (`mlp`), as one
    /// single-threaded session per core.
    pub fn threads(&self, batching: bool, compute_heavy: bool) -> (usize, usize) {
        if self.background {
            return (1, 1);
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        match (self.instances, self.intra_op_threads) {
            (0, 0) if batching && compute_heavy => (1, cores),
            (0, 0) => (cores, 1),
            (0, t) => ((cores / t).max(1), t),
            (n, 0) => (n, (cores / n).max(1)),
            (n, t) => (n, t),
        }
    }

    fn validate(&self, prefix: &str) -> Result<()> {
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

impl Config {
    /// Reads a TOML config file over the defaults.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        toml::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {}", path.display(), e.message())))
    }

    /// Checks values that parse but make no sense; the message names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: String| Err(Error::Config(format!("{field}: {why}")));
        if !self.model_repository.is_dir() {
            return bad(
                "model_repository",
                format!("{} is not a directory", self.model_repository.display()),
            );
        }
        if self.host.parse::<std::net::IpAddr>().is_err() && self.host != "localhost" {
            return bad("host", format!("'{}' is not an IP address", self.host));
        }
        let ports = [
            ("http_port", self.http_port),
            ("grpc_port", self.grpc_port),
            ("metrics_port", self.metrics_port),
        ];
        for (i, (name, port)) in ports.iter().enumerate() {
            for (other, p) in &ports[i + 1..] {
                if *port != 0 && port == p {
                    return bad(name, format!("{port} is also {other}"));
                }
            }
        }
        if self.repository_poll_secs == 0 {
            return bad("repository_poll_secs", "must be at least 1".into());
        }
        if self.admin_token.as_deref().is_some_and(|t| t.len() < 16) {
            return bad("admin_token", "must be at least 16 characters".into());
        }
        if self.max_request_bytes < 1024 {
            return bad("max_request_bytes", "must be at least 1024".into());
        }
        if self.traffic.mirror_max_inflight > 4096 {
            return bad("traffic.mirror_max_inflight", "at most 4096".into());
        }
        if self.traffic.controller_tick_ms == 0 || self.traffic.controller_tick_ms > 3_600_000 {
            return bad(
                "traffic.controller_tick_ms",
                "must be between 1 and 3600000".into(),
            );
        }
        self.drift.validate()?;
        self.limits.validate()?;
        let mut names = std::collections::BTreeSet::new();
        for t in &self.auth.tokens {
            if t.name.is_empty() || !names.insert(t.name.as_str()) {
                return bad(
                    "auth.tokens.name",
                    format!("'{}': names must be unique and non-empty", t.name),
                );
            }
            if hex::decode(&t.sha256).map_or(true, |v| v.len() != 32) {
                return bad(
                    "auth.tokens.sha256",
                    format!("token '{}': 64 hex digits (modelgate hash-token)", t.name),
                );
            }
        }
        if self.auth.inference && self.auth.tokens.is_empty() && self.admin_token.is_none() {
            return bad(
                "auth.inference",
                "needs tokens: add [[auth.tokens]] with the infer permission".into(),
            );
        }
        // onnxruntime_lib is checked when it is loaded (runtime::resolve_library), with
        // the message that says how to get the library.
        self.model_defaults.validate("model_defaults.")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_errors() {
        let e = toml::from_str::<Config>("http_prot = 1").unwrap_err();
        assert!(e.message().contains("http_prot"), "{e}");
        let e = ModelConfigFile::parse("instance = 1")
            .unwrap()
            .resolve(&ModelSettings::default())
            .unwrap_err();
        assert!(e.to_string().contains("instance"), "{e}");
    }

    #[test]
    fn file_overrides_defaults() {
        let c: Config =
            toml::from_str("http_port = 9000\n[model_defaults]\nmax_queue_size = 8").unwrap();
        assert_eq!(c.http_port, 9000);
        assert_eq!(c.grpc_port, 8001);
        assert_eq!(c.model_defaults.max_queue_size, 8);
        assert_eq!(c.model_defaults.intra_op_threads, 0);
    }

    #[test]
    fn validate_names_the_field() {
        let mut c = Config {
            model_repository: std::env::temp_dir(),
            ..Config::default()
        };
        assert!(c.validate().is_ok());
        c.grpc_port = c.http_port;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("http_port")
        );
        c.grpc_port = 8001;
        c.model_defaults.max_queue_size = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("model_defaults.max_queue_size")
        );
        c.model_defaults.max_queue_size = 1;
        c.model_repository = "/nonexistent/dir".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("model_repository")
        );
    }

    #[test]
    fn automatic_thread_counts() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let auto = ModelSettings::default();
        assert_eq!(auto.threads(true, true), (1, cores));
        assert_eq!(auto.threads(true, false), (cores, 1));
        assert_eq!(auto.threads(false, true), (cores, 1));
        let two = ModelSettings {
            instances: 2,
            ..ModelSettings::default()
        };
        assert_eq!(two.threads(true, true), (2, (cores / 2).max(1)));
        let fixed = ModelSettings {
            instances: 3,
            intra_op_threads: 2,
            ..ModelSettings::default()
        };
        assert_eq!(fixed.threads(true, false), (3, 2));
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

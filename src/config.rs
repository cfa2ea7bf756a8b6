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
    /// Defaults for every model, overridden by the model's own config.toml.
    pub model_defaults: ModelSettings,
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
            model_defaults: ModelSettings::default(),
        }
    }
}

/// Settings that apply per model version: the defaults in [`Config`], and each model's
/// `config.toml` (all keys optional there).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSettings {
    /// Worker threads per version, each owning its own ONNX Runtime session; 0 = one per core.
    pub instances: usize,
    /// ONNX Runtime intra-op threads per session.
    pub intra_op_threads: usize,
    /// Requests that may wait for a worker; a full queue answers 429 / RESOURCE_EXHAUSTED.
    pub max_queue_size: usize,
    /// Rows reported to Triton clients as the model's max batch size (models with a
    /// dynamic first dimension only).
    pub max_batch_size: usize,
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            instances: 0,
            intra_op_threads: 1,
            max_queue_size: 1024,
            max_batch_size: 64,
        }
    }
}

/// A model's `config.toml`: every key optional, falling back to the server's defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfigFile {
    pub instances: Option<usize>,
    pub intra_op_threads: Option<usize>,
    pub max_queue_size: Option<usize>,
    pub max_batch_size: Option<usize>,
}

impl ModelConfigFile {
    /// Reads `<model dir>/config.toml`; a missing file means "all defaults".
    pub fn load(model_dir: &Path) -> Result<ModelConfigFile> {
        let path = model_dir.join("config.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| Error::Config(format!("{}: {}", path.display(), e.message()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ModelConfigFile::default()),
            Err(e) => Err(Error::Config(format!("{}: {e}", path.display()))),
        }
    }

    /// The effective settings: this file over `defaults`, validated.
    pub fn resolve(&self, defaults: &ModelSettings) -> Result<ModelSettings> {
        let s = ModelSettings {
            instances: self.instances.unwrap_or(defaults.instances),
            intra_op_threads: self.intra_op_threads.unwrap_or(defaults.intra_op_threads),
            max_queue_size: self.max_queue_size.unwrap_or(defaults.max_queue_size),
            max_batch_size: self.max_batch_size.unwrap_or(defaults.max_batch_size),
        };
        s.validate("")?;
        Ok(s)
    }
}

impl ModelSettings {
    /// Worker threads to start: `instances`, or one per core when it is 0.
    pub fn effective_instances(&self) -> usize {
        if self.instances > 0 {
            self.instances
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    fn validate(&self, prefix: &str) -> Result<()> {
        let bad = |field: &str, why: &str| Err(Error::Config(format!("{prefix}{field}: {why}")));
        if self.instances > 256 {
            return bad("instances", "at most 256");
        }
        if self.intra_op_threads == 0 || self.intra_op_threads > 256 {
            return bad("intra_op_threads", "must be between 1 and 256");
        }
        if self.max_queue_size == 0 {
            return bad("max_queue_size", "must be at least 1");
        }
        if self.max_batch_size == 0 {
            return bad("max_batch_size", "must be at least 1");
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
        if self.max_request_bytes < 1024 {
            return bad("max_request_bytes", "must be at least 1024".into());
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
        let e = toml::from_str::<ModelConfigFile>("instance = 1").unwrap_err();
        assert!(e.message().contains("instance"), "{e}");
    }

    #[test]
    fn file_overrides_defaults() {
        let c: Config =
            toml::from_str("http_port = 9000\n[model_defaults]\nmax_queue_size = 8").unwrap();
        assert_eq!(c.http_port, 9000);
        assert_eq!(c.grpc_port, 8001);
        assert_eq!(c.model_defaults.max_queue_size, 8);
        assert_eq!(c.model_defaults.intra_op_threads, 1);
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
    fn model_file_resolves_over_defaults() {
        let f: ModelConfigFile = toml::from_str("instances = 3").unwrap();
        let s = f.resolve(&ModelSettings::default()).unwrap();
        assert_eq!(s.instances, 3);
        assert_eq!(s.max_queue_size, 1024);
        let f: ModelConfigFile = toml::from_str("intra_op_threads = 0").unwrap();
        assert!(
            f.resolve(&ModelSettings::default())
                .unwrap_err()
                .to_string()
                .contains("intra_op_threads")
        );
    }
}

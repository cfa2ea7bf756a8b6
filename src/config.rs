//! Server configuration: defaults, then a TOML file, then environment, then CLI flags.
//!
//! This module only aggregates: each part of the file is the settings type of the module
//! it configures (registry, routing control, drift, listener limits, auth, TLS), and only
//! `lib.rs` and `main.rs` import it. Unknown keys are errors (`deny_unknown_fields`): a
//! typo in a config file must not be silently ignored on a production server.
//! [`Config::validate`] names the bad field. Per-model settings live in
//! `<repo>/<model>/config.toml` ([`crate::registry::settings::ModelConfigFile`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::auth::AuthConfig;
use crate::error::{Error, Result};
use crate::registry::settings::{ControlMode, ModelSettings};
use crate::routing::control::TrafficConfig;

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
    /// Threads that run the HTTP and gRPC connections, each a single-threaded runtime
    /// (`serve::IoCores`); unset = one per core; 0 = run connections on the shared
    /// multi-thread runtime instead.
    pub io_threads: Option<usize>,
    /// gRPC answers also carry `x-model-version`, `x-variant`, `server-timing` and
    /// `x-request-id` as initial metadata. Off by default: the body already names the
    /// version and the id, standard clients do not read initial metadata, and on a tiny
    /// model these headers cost about a tenth of the CPU per request (BENCHMARKS.md).
    pub grpc_answer_metadata: bool,
    /// Defaults for every model, overridden by the model's own config.toml.
    pub model_defaults: ModelSettings,
    /// Canary, shadow and rollout settings of the server.
    pub traffic: TrafficConfig,
    /// Drift detection and webhook settings of the server.
    pub drift: crate::drift::DriftConfig,
    /// Inference capture and feedback settings of the server.
    pub capture: crate::capture::CaptureConfig,
    /// Connection and request limits.
    pub limits: crate::serve::Limits,
    /// Named tokens and their permissions.
    pub auth: AuthConfig,
    /// TLS for the HTTP and gRPC listeners; absent = plain TCP.
    pub tls: Option<crate::tls::TlsConfig>,
    /// External model registries publishing into the repository (`[[sources.mlflow]]`).
    pub sources: crate::sources::SourcesConfig,
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
            io_threads: None,
            grpc_answer_metadata: false,
            model_defaults: ModelSettings::default(),
            traffic: TrafficConfig::default(),
            drift: crate::drift::DriftConfig::default(),
            capture: crate::capture::CaptureConfig::default(),
            limits: crate::serve::Limits::default(),
            auth: AuthConfig::default(),
            tls: None,
            sources: crate::sources::SourcesConfig::default(),
        }
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
        self.traffic.validate()?;
        self.drift.validate()?;
        self.capture.validate()?;
        self.sources.validate()?;
        self.limits.validate()?;
        self.auth.validate(self.admin_token.is_some())?;
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
}

//! Front ends: thin gRPC ([`grpc`], [`admin_grpc`]) and HTTP ([`http`]) adapters over
//! [`crate::service`], with what both share: the protocol-neutral front door of an
//! inference call ([`infer`]), who may call what ([`auth`]), the model descriptions
//! ([`describe`]), the admin operations ([`admin`]), the drift admin view
//! ([`drift_view`]), feedback and the capture state ([`feedback`]), and the views the
//! operator's page reads: every model at a glance ([`overview`]) and a rollout's
//! timeline ([`rollout_view`]).

pub mod admin;
pub mod admin_grpc;
pub mod auth;
pub mod describe;
pub mod drift_view;
pub mod feedback;
pub mod grpc;
pub mod http;
pub mod infer;
pub mod overview;
pub mod rollout_view;

use std::sync::Arc;

use crate::service::AppState;

/// What the front ends share: the service state, plus the settings only they use.
pub struct Api {
    pub service: Arc<AppState>,
    /// Who may call what.
    pub auth: auth::Auth,
    /// Largest request body or message, in bytes.
    pub max_request_bytes: usize,
    /// Time a client has to send a whole body (named in the 408 message).
    pub body_read_timeout_ms: u64,
    /// The readings behind the overview's live request rates.
    pub rates: overview::Rates,
    /// gRPC answers carry the full answer metadata (`grpc_answer_metadata`).
    pub grpc_answer_metadata: bool,
}

/// The front ends reach the service state through their own (`api.registry`, ...).
impl std::ops::Deref for Api {
    type Target = AppState;

    fn deref(&self) -> &AppState {
        &self.service
    }
}

pub use infer::{HEADER_MODEL_VERSION, HEADER_ROUTING_KEY, HEADER_VARIANT};

/// Server name reported by ServerMetadata.
pub const SERVER_NAME: &str = "modelgate";
/// Protocol extensions we serve, as Triton names them.
pub const EXTENSIONS: &[&str] = &[
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "statistics",
];
/// Platform reported for ONNX models (Triton's name, which its tools understand).
pub const PLATFORM: &str = "onnxruntime_onnx";

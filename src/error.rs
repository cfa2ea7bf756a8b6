//! One error type for the whole request path.
//!
//! Every variant has a stable `error_type()` string (used in logs, JSON bodies and the
//! `code` metric label) and exhaustive maps to a gRPC status and an HTTP status, so a new
//! variant cannot be added without deciding how each front end reports it.

use std::time::Duration;

/// Errors a request (or start-up) can end with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or does not fit the model: never retried by clients.
    #[error("{0}")]
    InvalidRequest(String),
    /// The request body is larger than the configured limit.
    #[error("request body is over the limit of {limit} bytes (max_request_bytes)")]
    PayloadTooLarge { limit: usize },
    /// Unknown model, or unknown version of a known model.
    #[error("{0}")]
    NotFound(String),
    /// The model (or the server) exists but cannot serve right now.
    #[error("{0}")]
    Unavailable(String),
    /// A queue is full: the client should back off and retry.
    #[error("{reason}")]
    Overloaded {
        reason: String,
        retry_after: Duration,
    },
    /// The request's deadline passed before it could run.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The client took too long to send its request.
    #[error("{0}")]
    ClientTimeout(String),
    /// Admin call without a valid token.
    #[error("{0}")]
    Unauthenticated(String),
    /// Admin call from an address that may not make it (no token configured and the
    /// caller is not on this host).
    #[error("{0}")]
    Forbidden(String),
    /// The model failed while running (ONNX Runtime's message is kept).
    #[error("inference failed: {0}")]
    Inference(String),
    /// A bug or an unexpected condition inside the server.
    #[error("internal error: {0}")]
    Internal(String),
    /// Configuration or repository problem found at start-up or validation.
    #[error("{0}")]
    Config(String),
}

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::InvalidRequest`] from anything printable.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidRequest(msg.into())
    }

    /// Stable machine-readable name of the variant: the `code` metric label and log field.
    pub fn error_type(&self) -> &'static str {
        match self {
            Error::InvalidRequest(_) => "invalid_request",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::NotFound(_) => "not_found",
            Error::Unavailable(_) => "unavailable",
            Error::Overloaded { .. } => "overloaded",
            Error::DeadlineExceeded(_) => "deadline_exceeded",
            Error::ClientTimeout(_) => "client_timeout",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::Forbidden(_) => "forbidden",
            Error::Inference(_) => "inference_failed",
            Error::Internal(_) => "internal",
            Error::Config(_) => "config",
        }
    }

    /// HTTP status for this error (DESIGN.md's error map).
    pub fn http_status(&self) -> u16 {
        match self {
            Error::InvalidRequest(_) => 400,
            Error::PayloadTooLarge { .. } => 413,
            Error::NotFound(_) => 404,
            Error::Unavailable(_) => 503,
            Error::Overloaded { .. } => 429,
            Error::DeadlineExceeded(_) => 504,
            Error::ClientTimeout(_) => 408,
            Error::Unauthenticated(_) => 401,
            Error::Forbidden(_) => 403,
            Error::Inference(_) => 500,
            Error::Internal(_) => 500,
            Error::Config(_) => 500,
        }
    }

    /// gRPC status code for this error.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Error::InvalidRequest(_) => tonic::Code::InvalidArgument,
            // gRPC's convention and Triton's (tonic's own OUT_OF_RANGE is never reached:
            // serve::Bounded refuses an over-size message from its prefix first).
            Error::PayloadTooLarge { .. } => tonic::Code::ResourceExhausted,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::Unavailable(_) => tonic::Code::Unavailable,
            Error::Overloaded { .. } => tonic::Code::ResourceExhausted,
            Error::DeadlineExceeded(_) => tonic::Code::DeadlineExceeded,
            Error::ClientTimeout(_) => tonic::Code::DeadlineExceeded,
            Error::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Error::Forbidden(_) => tonic::Code::PermissionDenied,
            Error::Inference(_) => tonic::Code::Internal,
            Error::Internal(_) => tonic::Code::Internal,
            Error::Config(_) => tonic::Code::Internal,
        }
    }

    /// How long a client should wait before retrying, when retrying can help.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Overloaded { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// [`Error::retry_after`] in whole seconds, rounded up: the value of HTTP's
    /// `Retry-After` header and of the gRPC `retry-after` metadata alike.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after()
            .map(|after| after.as_secs() + u64::from(after.subsec_nanos() > 0))
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let mut status = tonic::Status::new(err.grpc_code(), err.to_string());
        if let Some(secs) = err.retry_after_secs()
            && let Ok(v) = secs.to_string().parse()
        {
            status.metadata_mut().insert("retry-after", v);
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_maps_consistently() {
        let all = [
            Error::invalid("x"),
            Error::PayloadTooLarge { limit: 1 },
            Error::NotFound("x".into()),
            Error::Unavailable("x".into()),
            Error::Overloaded {
                reason: "x".into(),
                retry_after: Duration::from_millis(1500),
            },
            Error::DeadlineExceeded("x".into()),
            Error::ClientTimeout("x".into()),
            Error::Unauthenticated("x".into()),
            Error::Forbidden("x".into()),
            Error::Inference("x".into()),
            Error::Internal("x".into()),
            Error::Config("x".into()),
        ];
        let expected_http = [400, 413, 404, 503, 429, 504, 408, 401, 403, 500, 500, 500];
        for (e, want) in all.iter().zip(expected_http) {
            assert_eq!(e.http_status(), want, "{e:?}");
            assert!(!e.error_type().is_empty());
        }
        // Bad requests are never 5xx: clients would retry what cannot succeed.
        assert!(Error::invalid("bad").http_status() < 500);
        // gRPC's convention (and Triton's) for a message over the size limit.
        assert_eq!(
            Error::PayloadTooLarge { limit: 1 }.grpc_code(),
            tonic::Code::ResourceExhausted
        );
        let status: tonic::Status = all[4].clone_for_test().into();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status
                .metadata()
                .get("retry-after")
                .map(|v| v.to_str().ok()),
            Some(Some("2"))
        );
    }

    impl Error {
        fn clone_for_test(&self) -> Error {
            match self {
                Error::Overloaded {
                    reason,
                    retry_after,
                } => Error::Overloaded {
                    reason: reason.clone(),
                    retry_after: *retry_after,
                },
                other => Error::Internal(other.to_string()),
            }
        }
    }
}

//! HTTP/REST front end: the Open Inference Protocol's JSON API plus Triton's binary
//! tensor extension, model configuration and statistics. Decode and check, call the
//! service, encode.
//!
//! - `describe`: server and model metadata, readiness, configuration, statistics.
//! - `admin`: routing, audit, drift and repository calls (token or this host).
//! - `infer`: the inference handler and the JSON / binary tensor codec.
//! - `coding`: gzip and deflate bodies.
//! - `ui`: the operator's page at `/ui` (embedded HTML, CSS and script).
//!
//! JSON tensor `data` is kept as raw JSON text until the input's datatype is known, then
//! parsed straight into raw bytes. Binary inputs are zero-copy slices of the body.

mod admin;
mod coding;
mod describe;
mod infer;
mod ui;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::api::Api;
use crate::api::auth::Permission;
use crate::error::{Error, Result};

pub use infer::{OutputPrefs, decode_infer, encode_body, encode_infer};

/// Triton's header giving the length of the JSON part of a binary-extension body.
pub const HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";
/// The same, as a header name made at compile time (a lookup by `&str` parses it).
const HEADER_CONTENT_LENGTH_NAME: axum::http::HeaderName =
    axum::http::HeaderName::from_static(HEADER_CONTENT_LENGTH);

/// The HTTP listener's service: inference calls go straight to their handler
/// (`infer::direct`), everything else through [`router`]. Both answer an inference call
/// the same way; the direct one skips the router's matching and extractors.
#[derive(Clone)]
pub struct Front {
    router: Router,
    api: Arc<Api>,
}

/// The HTTP listener's service over `state`.
pub fn front(state: Arc<Api>) -> Front {
    Front {
        router: router(Arc::clone(&state)),
        api: state,
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> tower::Service<axum::http::Request<B>> for Front
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::result::Result<Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), Self::Error>> {
        // Neither side has back-pressure: the router is always ready.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        match infer::infer_route(&req) {
            Some((model, version)) => {
                let api = Arc::clone(&self.api);
                Box::pin(async move { Ok(infer::direct(api, model, version, req).await) })
            }
            None => Box::pin(tower::ServiceExt::oneshot(self.router.clone(), req)),
        }
    }
}

/// The inference API router.
pub fn router(state: Arc<Api>) -> Router {
    let limit = state.max_request_bytes;
    Router::new()
        .route("/v2", get(describe::server_metadata))
        .route("/v2/health/live", get(describe::live))
        .route("/v2/health/ready", get(describe::ready))
        .route("/v2/models/stats", get(describe::all_stats))
        .route("/v2/models/{model}", get(describe::metadata))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(describe::metadata_v),
        )
        .route("/v2/models/{model}/ready", get(describe::model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(describe::model_ready_v),
        )
        .route("/v2/models/{model}/config", get(describe::config))
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(describe::config_v),
        )
        .route("/v2/models/{model}/stats", get(describe::stats))
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(describe::stats_v),
        )
        .route("/v2/models/{model}/infer", post(infer::infer))
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(infer::infer_v),
        )
        .route("/v2/repository/index", post(admin::repository_index))
        .route(
            "/v2/repository/models/{model}/load",
            post(admin::repository_load),
        )
        .route(
            "/v2/repository/models/{model}/unload",
            post(admin::repository_unload),
        )
        .route(
            "/admin/models/{model}/traffic",
            get(admin::traffic_get).put(admin::traffic_put),
        )
        .route(
            "/admin/models/{model}/{action}",
            post(admin::traffic_action),
        )
        .route("/v2/models/{model}/feedback", post(admin::feedback))
        .route("/admin/capture", get(admin::capture_get))
        .route("/admin/capture/flush", post(admin::capture_flush))
        .route("/admin/models/{model}/rollout", get(admin::rollout))
        .route("/admin/audit", get(admin::audit_get))
        .route("/admin/overview", get(admin::overview))
        .route("/admin/outbox", get(admin::outbox))
        .route("/admin/drift", get(admin::drift_all))
        .route("/admin/drift/{model}", get(admin::drift_model))
        .route(
            "/admin/drift/{model}/histograms",
            get(admin::drift_histograms),
        )
        .route("/ui", get(ui::index))
        .route("/ui/", get(ui::index))
        .route("/ui/app.js", get(ui::script))
        .route("/ui/app.css", get(ui::style))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// An error as the HTTP API answers it: `{"error": "..."}` with the mapped status.
pub struct HttpError(pub Error);

impl From<Error> for HttpError {
    fn from(e: Error) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, axum::Json(json!({ "error": self.0.to_string() }))).into_response();
        if let Some(secs) = self.0.retry_after_secs() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

pub(super) type HttpResult<T> = std::result::Result<T, HttpError>;

async fn not_found() -> HttpError {
    HttpError(Error::NotFound("no such endpoint".into()))
}

pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// Admits an admin call (token, or this host when none is configured): its actor.
pub(super) fn admit(s: &Api, headers: &HeaderMap, needs: Permission) -> Result<String> {
    s.auth
        .authorize(bearer(headers), crate::serve::peer(), needs)
}

pub(super) type Query = axum::extract::Query<std::collections::HashMap<String, String>>;

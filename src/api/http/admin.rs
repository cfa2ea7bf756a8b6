//! The admin calls over HTTP: routing (get, set, promote, rollback), the audit log,
//! drift views and Triton's repository extension. Each is admitted by a token, or from
//! this host when no token is configured.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use serde_json::{Value, json};

use super::{HttpError, HttpResult, Query, admit};
use crate::api;
use crate::api::Api;
use crate::api::auth::Permission;
use crate::error::Error;

fn reason(q: &Query) -> &str {
    q.get("reason").map_or("", String::as_str)
}

pub(super) async fn traffic_get(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> HttpResult<axum::Json<api::admin::RoutingView>> {
    admit(&s, &headers, Permission::Read)?;
    Ok(axum::Json(api::admin::traffic_get(&s, &model)?))
}

pub(super) async fn traffic_put(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
    q: Query,
    headers: HeaderMap,
    body: Bytes,
) -> HttpResult<axum::Json<api::admin::RoutingView>> {
    let actor = admit(&s, &headers, Permission::Traffic)?;
    let change = api::admin::change_from_json(&body)?;
    let view = api::admin::traffic_change(&s.service, &model, &actor, change, reason(&q)).await?;
    Ok(axum::Json(view))
}

/// `POST .../promote` and `.../rollback`.
pub(super) async fn traffic_action(
    State(s): State<Arc<Api>>,
    Path((model, action)): Path<(String, String)>,
    q: Query,
    headers: HeaderMap,
) -> HttpResult<axum::Json<api::admin::RoutingView>> {
    let change = match action.as_str() {
        "promote" => api::admin::Change::Promote,
        "rollback" => api::admin::Change::Rollback,
        _ => return Err(HttpError(Error::NotFound("no such endpoint".into()))),
    };
    let actor = admit(&s, &headers, Permission::Traffic)?;
    let view = api::admin::traffic_change(&s.service, &model, &actor, change, reason(&q)).await?;
    Ok(axum::Json(view))
}

pub(super) async fn drift_all(
    State(s): State<Arc<Api>>,
    headers: HeaderMap,
) -> HttpResult<axum::Json<api::drift_view::Overview>> {
    admit(&s, &headers, Permission::Read)?;
    Ok(axum::Json(api::drift_view::all(&s)))
}

pub(super) async fn drift_model(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> HttpResult<axum::Json<api::drift_view::ModelView>> {
    admit(&s, &headers, Permission::Read)?;
    Ok(axum::Json(api::drift_view::model(&s, &model)?))
}

pub(super) async fn audit_get(
    State(s): State<Arc<Api>>,
    q: Query,
    headers: HeaderMap,
) -> HttpResult<axum::Json<Vec<crate::routing::store::AuditEntry>>> {
    admit(&s, &headers, Permission::Read)?;
    let limit = match q.get("limit") {
        None => api::admin::AUDIT_LIMIT,
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| Error::invalid(format!("limit '{l}' is not a number")))?,
    };
    let entries = api::admin::audit(&s.service, q.get("model").cloned(), limit).await?;
    Ok(axum::Json(entries))
}

pub(super) async fn repository_index(
    State(s): State<Arc<Api>>,
    headers: HeaderMap,
    body: Bytes,
) -> HttpResult<axum::Json<Value>> {
    admit(&s, &headers, Permission::Read)?;
    let ready = if body.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| Error::invalid(format!("malformed request JSON: {e}")))?;
        v.get("ready").and_then(Value::as_bool).unwrap_or(false)
    };
    let rows: Vec<Value> = api::admin::repository_index(&s, ready)
        .into_iter()
        .map(|r| {
            let mut v = json!({"name": r.name, "state": r.state, "reason": r.reason});
            if !r.version.is_empty() {
                v["version"] = json!(r.version);
            }
            if let Some(l) = &r.lineage {
                v["lineage"] = l.to_json();
            }
            v
        })
        .collect();
    Ok(axum::Json(Value::Array(rows)))
}

pub(super) async fn repository_load(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> HttpResult<StatusCode> {
    admit(&s, &headers, Permission::Repository)?;
    api::admin::load(&s.service, &model).await?;
    Ok(StatusCode::OK)
}

pub(super) async fn repository_unload(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> HttpResult<StatusCode> {
    admit(&s, &headers, Permission::Repository)?;
    api::admin::unload(&s.service, &model).await?;
    Ok(StatusCode::OK)
}

/// `POST /v2/models/{m}/feedback`: admitted as inference is (an `infer` token when
/// `auth.inference` is on).
pub(super) async fn feedback(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> HttpResult<axum::Json<api::feedback::FeedbackAnswer>> {
    api::infer::admit(&s, super::bearer(&headers))?;
    let items = api::feedback::items_from_json(&body)?;
    Ok(axum::Json(
        api::feedback::feedback(&s, &model, items).await?,
    ))
}

/// `GET /admin/capture`: the writer's state and counters.
pub(super) async fn capture_get(
    State(s): State<Arc<Api>>,
    headers: HeaderMap,
) -> HttpResult<axum::Json<crate::capture::CaptureStatus>> {
    admit(&s, &headers, Permission::Read)?;
    Ok(axum::Json(s.capture.state()))
}

/// `POST /admin/capture/flush`: closes the open files, so that what was captured so
/// far is visible to readers now.
pub(super) async fn capture_flush(
    State(s): State<Arc<Api>>,
    headers: HeaderMap,
) -> HttpResult<axum::Json<Value>> {
    admit(&s, &headers, Permission::Repository)?;
    let closed = s.capture.flush().await?;
    Ok(axum::Json(json!({ "files_closed": closed })))
}

/// `GET /admin/overview`: every model with its versions, routing and live figures.
pub(super) async fn overview(
    State(s): State<Arc<Api>>,
    headers: HeaderMap,
) -> HttpResult<axum::Json<api::overview::Overview>> {
    admit(&s, &headers, Permission::Read)?;
    let st = Arc::clone(&s);
    // The repository index lists the model folders: off the async threads.
    let view = crate::util::blocking("overview", move || {
        Ok(api::overview::overview(&st, &st.rates))
    })
    .await?;
    Ok(axum::Json(view))
}

/// `GET /admin/models/{model}/rollout`: the latest rollout's timeline (`null` when the
/// model never had one).
pub(super) async fn rollout(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> HttpResult<axum::Json<Option<api::rollout_view::RolloutView>>> {
    admit(&s, &headers, Permission::Read)?;
    Ok(axum::Json(
        api::rollout_view::model(&s.service, &model).await?,
    ))
}

/// `GET /admin/drift/{model}/histograms`: reference against live distributions.
pub(super) async fn drift_histograms(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> HttpResult<axum::Json<api::drift_view::Histograms>> {
    admit(&s, &headers, Permission::Read)?;
    Ok(axum::Json(api::drift_view::histograms(&s, &model)?))
}

/// `GET /admin/outbox`: each webhook target's backlog and last attempts.
pub(super) async fn outbox(
    State(s): State<Arc<Api>>,
    headers: HeaderMap,
) -> HttpResult<axum::Json<Vec<crate::outbox::TargetStatus>>> {
    admit(&s, &headers, Permission::Read)?;
    let st = Arc::clone(&s);
    // Reads the outbox folders: off the async threads.
    let view = crate::util::blocking("outbox status", move || Ok(st.drift.outbox.status())).await?;
    Ok(axum::Json(view))
}

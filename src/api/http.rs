//! HTTP/REST front end: the Open Inference Protocol's JSON API plus Triton's binary
//! tensor extension, model configuration and statistics. Decode and check, call the
//! service, encode.
//!
//! JSON tensor `data` is kept as raw JSON text until the input's datatype is known, then
//! parsed straight into raw bytes. Binary inputs are zero-copy slices of the body.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::api;
use crate::api::Api;
use crate::api::auth::Permission;
use crate::error::{Error, Result};
use crate::metrics::Protocol;
use crate::service::{InferRequest, InferResponse};
use crate::tensor::{DataType, Tensor, byte_len, checked_shape, parse_json_data, write_json_data};

/// Triton's header giving the length of the JSON part of a binary-extension body.
pub const HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

/// The inference API router.
pub fn router(state: Arc<Api>) -> Router {
    let limit = state.max_request_bytes;
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/models/{model}", get(metadata))
        .route("/v2/models/{model}/versions/{version}", get(metadata_v))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready_v),
        )
        .route("/v2/models/{model}/config", get(config))
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(config_v),
        )
        .route("/v2/models/{model}/stats", get(stats))
        .route("/v2/models/{model}/versions/{version}/stats", get(stats_v))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer_v))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(repository_load))
        .route(
            "/v2/repository/models/{model}/unload",
            post(repository_unload),
        )
        .route(
            "/admin/models/{model}/traffic",
            get(traffic_get).put(traffic_put),
        )
        .route("/admin/models/{model}/{action}", post(traffic_action))
        .route("/admin/audit", get(audit_get))
        .route("/admin/drift", get(drift_all))
        .route("/admin/drift/{model}", get(drift_model))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The body deadline's error, when reading the body failed because the client was too
/// slow (somewhere in the rejection's source chain).
fn body_timed_out(rej: &BytesRejection) -> Option<&crate::serve::BodyTimeout> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(rej);
    while let Some(e) = source {
        if let Some(t) = e.downcast_ref::<crate::serve::BodyTimeout>() {
            return Some(t);
        }
        source = e.source();
    }
    None
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

type HttpResult<T> = std::result::Result<T, HttpError>;

async fn not_found() -> HttpError {
    HttpError(Error::NotFound("no such endpoint".into()))
}

async fn server_metadata() -> impl IntoResponse {
    axum::Json(json!({
        "name": api::SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": api::EXTENSIONS,
    }))
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(state): State<Arc<Api>>) -> StatusCode {
    if state.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

fn metadata_json(state: &Api, model: &str, version: Option<&str>) -> Result<Value> {
    let snapshot = state.registry.snapshot();
    let m = snapshot.model(model)?;
    let mv = m.resolve(version)?;
    let md = api::describe::model_metadata(m, mv);
    let tensors = |ts: &[crate::proto::model_metadata_response::TensorMetadata]| -> Vec<Value> {
        ts.iter()
            .map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
            .collect()
    };
    Ok(json!({
        "name": md.name,
        "versions": md.versions,
        "platform": md.platform,
        "inputs": tensors(&md.inputs),
        "outputs": tensors(&md.outputs),
    }))
}

async fn metadata(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
) -> HttpResult<axum::Json<Value>> {
    Ok(axum::Json(metadata_json(&s, &model, None)?))
}

async fn metadata_v(
    State(s): State<Arc<Api>>,
    Path((model, version)): Path<(String, String)>,
) -> HttpResult<axum::Json<Value>> {
    Ok(axum::Json(metadata_json(&s, &model, Some(&version))?))
}

fn model_ready_status(state: &Api, model: &str, version: Option<&str>) -> HttpResult<StatusCode> {
    if state.shutdown.is_cancelled() {
        return Ok(StatusCode::SERVICE_UNAVAILABLE);
    }
    state.registry.snapshot().resolve(model, version)?;
    Ok(StatusCode::OK)
}

async fn model_ready(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
) -> HttpResult<StatusCode> {
    model_ready_status(&s, &model, None)
}

async fn model_ready_v(
    State(s): State<Arc<Api>>,
    Path((model, version)): Path<(String, String)>,
) -> HttpResult<StatusCode> {
    model_ready_status(&s, &model, Some(&version))
}

/// Triton's JSON rendering of a version policy.
fn policy_json(policy: Option<&crate::proto::ModelVersionPolicy>) -> Value {
    use crate::proto::model_version_policy::PolicyChoice;
    match policy.and_then(|p| p.policy_choice.as_ref()) {
        Some(PolicyChoice::All(_)) => json!({"all": {}}),
        Some(PolicyChoice::Specific(s)) => json!({"specific": {"versions": s.versions}}),
        Some(PolicyChoice::Latest(l)) => json!({"latest": {"num_versions": l.num_versions}}),
        // Triton's default.
        None => json!({"latest": {"num_versions": 1}}),
    }
}

/// Triton's JSON rendering of a ModelConfig (the fields we set).
fn config_json(state: &Api, model: &str, version: Option<&str>) -> Result<Value> {
    let snapshot = state.registry.snapshot();
    let mv = snapshot.resolve(model, version)?;
    let c = api::describe::model_config(mv);
    let type_name = |t: i32| {
        DataType::ALL
            .into_iter()
            .map(DataType::triton_type)
            .find(|&(_, v)| v == t)
            .map_or("TYPE_INVALID", |(n, _)| n)
    };
    let io =
        |name: &str, dt: i32, dims: &[i64], reshape: &Option<crate::proto::ModelTensorReshape>| {
            let mut v = json!({"name": name, "data_type": type_name(dt), "dims": dims});
            if let Some(r) = reshape {
                v["reshape"] = json!({"shape": r.shape});
            }
            v
        };
    let mut v = json!({
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "version_policy": policy_json(c.version_policy.as_ref()),
        "max_batch_size": c.max_batch_size,
        "input": c.input.iter().map(|i| io(&i.name, i.data_type, &i.dims, &i.reshape)).collect::<Vec<_>>(),
        "output": c.output.iter().map(|o| io(&o.name, o.data_type, &o.dims, &o.reshape)).collect::<Vec<_>>(),
        "instance_group": c.instance_group.iter().map(|g| json!({"name": g.name, "kind": "KIND_CPU", "count": g.count})).collect::<Vec<_>>(),
        "default_model_filename": c.default_model_filename,
    });
    if let Some(crate::proto::model_config::SchedulingChoice::DynamicBatching(d)) =
        &c.scheduling_choice
    {
        v["dynamic_batching"] = json!({
            "preferred_batch_size": d.preferred_batch_size,
            "max_queue_delay_microseconds": d.max_queue_delay_microseconds,
            "priority_levels": d.priority_levels,
            "default_priority_level": d.default_priority_level,
            "default_queue_policy": d.default_queue_policy.as_ref().map(|q| json!({
                "default_timeout_microseconds": q.default_timeout_microseconds,
                "allow_timeout_override": q.allow_timeout_override,
                "max_queue_size": q.max_queue_size,
            })),
        });
    }
    Ok(v)
}

async fn config(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
) -> HttpResult<axum::Json<Value>> {
    Ok(axum::Json(config_json(&s, &model, None)?))
}

async fn config_v(
    State(s): State<Arc<Api>>,
    Path((model, version)): Path<(String, String)>,
) -> HttpResult<axum::Json<Value>> {
    Ok(axum::Json(config_json(&s, &model, Some(&version))?))
}

fn stats_json(s: &crate::proto::ModelStatistics) -> Value {
    let d = |x: &Option<crate::proto::StatisticDuration>| {
        let x = x.unwrap_or_default();
        json!({"count": x.count, "ns": x.ns})
    };
    let i = s.inference_stats.unwrap_or_default();
    json!({
        "name": s.name,
        "version": s.version,
        "last_inference": s.last_inference,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": d(&i.success), "fail": d(&i.fail), "queue": d(&i.queue),
            "compute_input": d(&i.compute_input), "compute_infer": d(&i.compute_infer),
            "compute_output": d(&i.compute_output), "cache_hit": d(&i.cache_hit), "cache_miss": d(&i.cache_miss),
        },
        "batch_stats": [],
    })
}

fn model_stats_json(state: &Api, model: Option<&str>, version: Option<&str>) -> Result<Value> {
    let stats: Vec<Value> = api::describe::statistics(&state.registry.snapshot(), model, version)?
        .iter()
        .map(stats_json)
        .collect();
    Ok(json!({ "model_stats": stats }))
}

async fn all_stats(State(s): State<Arc<Api>>) -> HttpResult<axum::Json<Value>> {
    Ok(axum::Json(model_stats_json(&s, None, None)?))
}

async fn stats(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
) -> HttpResult<axum::Json<Value>> {
    Ok(axum::Json(model_stats_json(&s, Some(&model), None)?))
}

async fn stats_v(
    State(s): State<Arc<Api>>,
    Path((model, version)): Path<(String, String)>,
) -> HttpResult<axum::Json<Value>> {
    Ok(axum::Json(model_stats_json(
        &s,
        Some(&model),
        Some(&version),
    )?))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// Admits an admin call (token, or this host when none is configured): its actor.
fn admin(
    s: &Api,
    headers: &HeaderMap,
    ext: &axum::http::Extensions,
    needs: Permission,
) -> Result<String> {
    let peer = ext
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    s.auth.authorize(bearer(headers), peer, needs)
}

type Query = axum::extract::Query<std::collections::HashMap<String, String>>;

fn reason(q: &Query) -> &str {
    q.get("reason").map_or("", String::as_str)
}

async fn traffic_get(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    ext: axum::http::Extensions,
) -> HttpResult<axum::Json<api::admin::TrafficView>> {
    admin(&s, &headers, &ext, Permission::Read)?;
    Ok(axum::Json(api::admin::traffic_get(&s, &model)?))
}

async fn traffic_put(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
    q: Query,
    headers: HeaderMap,
    ext: axum::http::Extensions,
    body: Bytes,
) -> HttpResult<axum::Json<api::admin::TrafficView>> {
    let actor = admin(&s, &headers, &ext, Permission::Traffic)?;
    let spec: crate::routing::TrafficSpec = serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(format!("malformed traffic JSON: {e}")))?;
    let change = api::admin::Change::Set(spec);
    let view = api::admin::traffic_change(&s.service, &model, &actor, change, reason(&q)).await?;
    Ok(axum::Json(view))
}

/// `POST .../promote` and `.../rollback`.
async fn traffic_action(
    State(s): State<Arc<Api>>,
    Path((model, action)): Path<(String, String)>,
    q: Query,
    headers: HeaderMap,
    ext: axum::http::Extensions,
) -> HttpResult<axum::Json<api::admin::TrafficView>> {
    let change = match action.as_str() {
        "promote" => api::admin::Change::Promote,
        "rollback" => api::admin::Change::Rollback,
        _ => return Err(HttpError(Error::NotFound("no such endpoint".into()))),
    };
    let actor = admin(&s, &headers, &ext, Permission::Traffic)?;
    let view = api::admin::traffic_change(&s.service, &model, &actor, change, reason(&q)).await?;
    Ok(axum::Json(view))
}

async fn drift_all(
    State(s): State<Arc<Api>>,
    headers: HeaderMap,
    ext: axum::http::Extensions,
) -> HttpResult<axum::Json<api::drift_view::Overview>> {
    admin(&s, &headers, &ext, Permission::Read)?;
    Ok(axum::Json(api::drift_view::all(&s)))
}

async fn drift_model(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    ext: axum::http::Extensions,
) -> HttpResult<axum::Json<api::drift_view::ModelView>> {
    admin(&s, &headers, &ext, Permission::Read)?;
    Ok(axum::Json(api::drift_view::model(&s, &model)?))
}

async fn audit_get(
    State(s): State<Arc<Api>>,
    q: Query,
    headers: HeaderMap,
    ext: axum::http::Extensions,
) -> HttpResult<axum::Json<Vec<crate::routing::store::AuditEntry>>> {
    admin(&s, &headers, &ext, Permission::Read)?;
    let limit = match q.get("limit") {
        None => api::admin::AUDIT_LIMIT,
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| Error::invalid(format!("limit '{l}' is not a number")))?,
    };
    let entries = api::admin::audit(&s.service, q.get("model").cloned(), limit).await?;
    Ok(axum::Json(entries))
}

async fn repository_index(
    State(s): State<Arc<Api>>,
    headers: HeaderMap,
    ext: axum::http::Extensions,
    body: Bytes,
) -> HttpResult<axum::Json<Value>> {
    admin(&s, &headers, &ext, Permission::Read)?;
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
            v
        })
        .collect();
    Ok(axum::Json(Value::Array(rows)))
}

async fn repository_load(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    ext: axum::http::Extensions,
) -> HttpResult<StatusCode> {
    admin(&s, &headers, &ext, Permission::Repository)?;
    api::admin::load(&s.service, &model).await?;
    Ok(StatusCode::OK)
}

async fn repository_unload(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    ext: axum::http::Extensions,
) -> HttpResult<StatusCode> {
    admin(&s, &headers, &ext, Permission::Repository)?;
    api::admin::unload(&s.service, &model).await?;
    Ok(StatusCode::OK)
}

async fn infer(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    infer_inner(&s, model, None, &headers, body).await
}

async fn infer_v(
    State(s): State<Arc<Api>>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    infer_inner(&s, model, Some(version), &headers, body).await
}

async fn infer_inner(
    state: &Api,
    model: String,
    version: Option<String>,
    headers: &HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        api::infer::admit(state, bearer(headers))?;
        let body = body.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Error::PayloadTooLarge {
                    limit: state.max_request_bytes,
                }
            } else if let Some(t) = body_timed_out(&rej) {
                Error::ClientTimeout(t.to_string())
            } else {
                Error::invalid(format!("cannot read the request body: {rej}"))
            }
        })?;
        let name = model.clone();
        let limit = state.max_request_bytes;
        let decoded = match coding::decode_request(headers, body, limit).await {
            Ok(body) => decode_infer(model, version, headers, body),
            Err(e) => Err(e),
        };
        let (decoded, output_prefs) = match decoded {
            Ok((req, prefs)) => (Ok(req), prefs),
            Err(e) => (Err(e), OutputPrefs::default()),
        };
        let call = api::infer::Call {
            authorization: None,
            deadline: None,
            routing_key: headers.get(api::HEADER_ROUTING_KEY).map(|v| v.as_bytes()),
        };
        let resp = api::infer::infer(state, &name, decoded, &call, Protocol::Http).await?;
        let (head, binary) = encode_body(&resp, &output_prefs)?;
        let body = coding::encode_response(headers, head, binary).await?;
        infer_response(&resp, body)
    }
    .await;
    match result {
        Ok(resp) => resp,
        Err(e) => {
            let mut resp = HttpError(e).into_response();
            if coding::request_codings(headers).is_err() {
                // RFC 9110 15.5.16: say which codings would have been understood.
                resp.headers_mut().insert(
                    header::ACCEPT_ENCODING,
                    HeaderValue::from_static(coding::ACCEPTED),
                );
            }
            resp
        }
    }
}

#[derive(Deserialize)]
struct JsonInferRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow)]
    inputs: Vec<JsonInput<'a>>,
    #[serde(default)]
    outputs: Option<Vec<JsonOutput>>,
}

#[derive(Deserialize)]
struct JsonInput<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct JsonOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// How the client wants the outputs encoded: binary or JSON, per output name.
#[derive(Debug, Default)]
pub struct OutputPrefs {
    default_binary: bool,
    per_output: Vec<(String, bool)>,
}

impl OutputPrefs {
    fn binary(&self, name: &str) -> bool {
        self.per_output
            .iter()
            .find(|(n, _)| n == name)
            .map_or(self.default_binary, |&(_, b)| b)
    }
}

fn bool_param(params: &Option<Map<String, Value>>, key: &str, what: &str) -> Result<Option<bool>> {
    match params.as_ref().and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(Error::invalid(format!(
            "{what}: parameter '{key}' must be true or false, got {other}"
        ))),
    }
}

/// Splits a body into its JSON header and binary part, then decodes the request.
pub fn decode_infer(
    model: String,
    version: Option<String>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(InferRequest, OutputPrefs)> {
    let header_len = match headers.get(HEADER_CONTENT_LENGTH) {
        None => body.len(),
        Some(v) => {
            let n: usize = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| Error::invalid("Inference-Header-Content-Length is not a number"))?;
            if n > body.len() {
                return Err(Error::invalid(format!(
                    "Inference-Header-Content-Length {n} is larger than the body ({} bytes)",
                    body.len()
                )));
            }
            n
        }
    };
    let json_part = std::str::from_utf8(&body[..header_len])
        .map_err(|_| Error::invalid("request JSON is not valid UTF-8"))?;
    let req: JsonInferRequest<'_> = serde_json::from_str(json_part)
        .map_err(|e| Error::invalid(format!("malformed request JSON: {e}")))?;
    let binary = body.slice(header_len..);
    let mut offset = 0usize;
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for input in req.inputs {
        let dtype = DataType::parse_supported(&input.datatype, &input.name)?;
        let binary_size = match input
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
        {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "input '{}': binary_data_size must be a non-negative integer",
                            input.name
                        ))
                    })?,
            ),
        };
        let data = match (binary_size, input.data) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(format!(
                    "input '{}': give either data or binary_data_size, not both",
                    input.name
                )));
            }
            (Some(size), None) => {
                let end = offset.checked_add(size).filter(|&e| e <= binary.len()).ok_or_else(|| {
                    Error::invalid(format!(
                        "input '{}': binary_data_size {size} runs past the end of the binary data ({} bytes)",
                        input.name,
                        binary.len()
                    ))
                })?;
                let slice = binary.slice(offset..end);
                offset = end;
                slice
            }
            (None, Some(raw)) => {
                let (_, count) = checked_shape(&input.name, &input.shape)?;
                byte_len(&input.name, dtype, count)?;
                Bytes::from(parse_json_data(&input.name, dtype, raw.get(), count)?)
            }
            (None, None) => {
                return Err(Error::invalid(format!(
                    "input '{}' has no data",
                    input.name
                )));
            }
        };
        inputs.push(Tensor::from_raw(input.name, dtype, &input.shape, data)?);
    }
    if offset != binary.len() {
        return Err(Error::invalid(format!(
            "{} bytes of binary data are not claimed by any input's binary_data_size",
            binary.len() - offset
        )));
    }
    let default_binary =
        bool_param(&req.parameters, "binary_data_output", "request")?.unwrap_or(false);
    let params = api::infer::params(|key| {
        req.parameters
            .as_ref()
            .and_then(|p| p.get(key))
            .map(|v| match v {
                Value::Bool(b) => api::infer::ParamValue::Bool(*b),
                Value::String(s) => api::infer::ParamValue::Str(s),
                Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                    (Some(u), _) => api::infer::ParamValue::Uint(u),
                    (None, Some(i)) => api::infer::ParamValue::Int(i),
                    (None, None) => api::infer::ParamValue::Other(n.to_string()),
                },
                other => api::infer::ParamValue::Other(other.to_string()),
            })
    })?;
    let mut per_output = Vec::new();
    let mut names = Vec::new();
    for o in req.outputs.unwrap_or_default() {
        if let Some(b) = bool_param(
            &o.parameters,
            "binary_data",
            &format!("output '{}'", o.name),
        )? {
            per_output.push((o.name.clone(), b));
        }
        names.push(o.name);
    }
    Ok((
        InferRequest {
            model,
            version,
            id: req.id.unwrap_or_default(),
            inputs,
            outputs: names,
            timeout: params.timeout,
            priority: params.priority,
            routing_key: params.routing_key,
        },
        OutputPrefs {
            default_binary,
            per_output,
        },
    ))
}

/// Encodes the response: JSON, or a JSON header followed by binary outputs.
pub fn encode_infer(resp: InferResponse, prefs: &OutputPrefs) -> Result<Response> {
    let (head, binary) = encode_body(&resp, prefs)?;
    infer_response(&resp, coding::Encoded::plain(head, binary))
}

/// The inference answer around an encoded body. Inference-Header-Content-Length counts
/// the JSON header before any content coding, as Triton's clients read it.
fn infer_response(resp: &InferResponse, body: coding::Encoded) -> Result<Response> {
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::VARY, "accept-encoding");
    for (name, value) in api::infer::response_metadata(resp) {
        builder = builder.header(name, value);
    }
    builder = if body.binary {
        builder
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(HEADER_CONTENT_LENGTH, body.head_len)
    } else {
        builder.header(header::CONTENT_TYPE, "application/json")
    };
    if let Some(c) = body.coding {
        builder = builder.header(header::CONTENT_ENCODING, c.as_str());
    }
    let body = if body.chunks.len() == 1 {
        axum::body::Body::from(body.chunks.into_iter().next().unwrap_or_default())
    } else {
        axum::body::Body::new(Chunks::new(body.chunks.into()))
    };
    builder
        .body(body)
        .map_err(|e| Error::Internal(format!("building the response: {e}")))
}

/// The response's JSON (with `data`, or `binary_data_size` for binary outputs) and the
/// binary outputs to send after it, in order.
pub fn encode_body(resp: &InferResponse, prefs: &OutputPrefs) -> Result<(Vec<u8>, Vec<Bytes>)> {
    use std::io::Write;
    let mut head: Vec<u8> = Vec::with_capacity(256);
    let mut binary: Vec<Bytes> = Vec::new();
    let str_json = |s: &str| serde_json::to_string(s).map_err(|e| Error::Internal(e.to_string()));
    let io = |e: std::io::Error| Error::Internal(e.to_string());
    write!(
        head,
        "{{\"model_name\":{},\"model_version\":{}",
        str_json(&resp.model)?,
        str_json(&resp.version)?
    )
    .map_err(io)?;
    if !resp.id.is_empty() {
        write!(head, ",\"id\":{}", str_json(&resp.id)?).map_err(io)?;
    }
    head.extend_from_slice(b",\"outputs\":[");
    for (i, t) in resp.outputs.iter().enumerate() {
        if i > 0 {
            head.push(b',');
        }
        write!(
            head,
            "{{\"name\":{},\"datatype\":\"{}\",\"shape\":{}",
            str_json(&t.name)?,
            t.dtype.as_str(),
            serde_json::to_string(&t.shape).map_err(|e| Error::Internal(e.to_string()))?
        )
        .map_err(io)?;
        if prefs.binary(&t.name) {
            write!(
                head,
                ",\"parameters\":{{\"binary_data_size\":{}}}}}",
                t.data.len()
            )
            .map_err(io)?;
            binary.push(t.data.clone());
        } else {
            head.extend_from_slice(b",\"data\":");
            write_json_data(&mut head, t.dtype, &t.data)?;
            head.push(b'}');
        }
    }
    head.extend_from_slice(b"]}");
    Ok((head, binary))
}

/// A response body sent as the output buffers themselves, one after another: binary
/// outputs are not copied into one buffer. The exact length is known, so the response
/// keeps its Content-Length.
struct Chunks {
    chunks: std::collections::VecDeque<Bytes>,
    remaining: u64,
}

impl Chunks {
    fn new(chunks: std::collections::VecDeque<Bytes>) -> Chunks {
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        Chunks { chunks, remaining }
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<http_body::Frame<Bytes>, Self::Error>>> {
        let next = self.chunks.pop_front();
        if let Some(c) = &next {
            self.remaining -= c.len() as u64;
        }
        std::task::Poll::Ready(next.map(|c| Ok(http_body::Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

/// HTTP content codings (RFC 9110 8.4): gzip and deflate request bodies are decoded,
/// within `max_request_bytes` measured after decoding (a small body that inflates past
/// the limit is 413, and never more than the limit is inflated); inference answers are
/// compressed as the client's Accept-Encoding asks. Large bodies are inflated and
/// compressed on the blocking pool, off the async threads.
mod coding {
    use std::io::{Read, Write};

    use axum::http::{HeaderMap, header};
    use bytes::Bytes;

    use crate::error::{Error, Result};

    /// The codings this server decodes and applies (Accept-Encoding of a refusal).
    pub const ACCEPTED: &str = "gzip, deflate";
    /// Bodies at most this large (compressed) are tried inline, on the async thread...
    const INLINE_INPUT: usize = 16 << 10;
    /// ...as long as they inflate to at most this much; larger work goes to the blocking pool.
    const INLINE_OUTPUT: usize = 256 << 10;
    /// Answers above this are compressed on the blocking pool.
    const INLINE_COMPRESS: usize = 64 << 10;
    /// Answers below this are not worth compressing (unless identity was refused).
    const MIN_COMPRESS: usize = 512;
    /// Content codings stacked on one request body at most.
    const MAX_CODINGS: usize = 2;
    /// The header named in refusals.
    const UNSUPPORTED: &str = "Content-Encoding";

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Coding {
        Gzip,
        /// HTTP's "deflate": the zlib format (RFC 1950). Bare deflate (RFC 1951), which
        /// some clients send under this name, is accepted on requests too.
        Deflate,
    }

    impl Coding {
        pub fn as_str(self) -> &'static str {
            match self {
                Coding::Gzip => "gzip",
                Coding::Deflate => "deflate",
            }
        }
    }

    /// The request body's codings in the order they were applied; identity left out.
    pub fn request_codings(headers: &HeaderMap) -> Result<Vec<Coding>> {
        let mut out = Vec::new();
        for v in headers.get_all(header::CONTENT_ENCODING) {
            let v = v
                .to_str()
                .map_err(|_| Error::invalid(format!("{UNSUPPORTED} is not visible ASCII")))?;
            for token in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                match token.to_ascii_lowercase().as_str() {
                    "identity" => {}
                    "gzip" | "x-gzip" => out.push(Coding::Gzip),
                    "deflate" => out.push(Coding::Deflate),
                    _ => {
                        return Err(Error::invalid(format!(
                            "{UNSUPPORTED} '{token}' is not supported (gzip, deflate or identity)"
                        )));
                    }
                }
            }
        }
        if out.len() > MAX_CODINGS {
            return Err(Error::invalid(format!(
                "{UNSUPPORTED}: at most {MAX_CODINGS} codings on one body"
            )));
        }
        Ok(out)
    }

    /// Decodes the request body as its Content-Encoding says; the result is at most
    /// `limit` bytes (else 413).
    pub async fn decode_request(headers: &HeaderMap, body: Bytes, limit: usize) -> Result<Bytes> {
        let codings = request_codings(headers)?;
        if codings.is_empty() {
            return Ok(body);
        }
        let too_large = || Error::PayloadTooLarge { limit };
        if body.len() <= INLINE_INPUT {
            // Small bodies usually inflate to little: no thread hop for them.
            let cap = limit.min(INLINE_OUTPUT);
            match decode_all(body.clone(), &codings, cap)? {
                Some(b) => return Ok(b),
                None if cap == limit => return Err(too_large()),
                None => {}
            }
        }
        tokio::task::spawn_blocking(move || decode_all(body, &codings, limit))
            .await
            .map_err(|e| Error::Internal(format!("decompression task failed: {e}")))??
            .ok_or_else(too_large)
    }

    /// Undoes `codings` (last applied first); None when a result is over `cap` bytes.
    pub(super) fn decode_all(
        mut data: Bytes,
        codings: &[Coding],
        cap: usize,
    ) -> Result<Option<Bytes>> {
        for &c in codings.iter().rev() {
            let invalid = |why: String| {
                Error::invalid(format!("request body is not valid {}: {why}", c.as_str()))
            };
            let out = match c {
                Coding::Gzip => gunzip(&data, cap).map_err(|e| invalid(e.to_string()))?,
                Coding::Deflate => {
                    let zlib = zlib_header(&data);
                    match inflate(&data, zlib, cap) {
                        Ok(out) => out,
                        // A bare deflate stream whose first bytes happen to read as a
                        // zlib header.
                        Err(e) if zlib => inflate(&data, false, cap).map_err(|_| invalid(e))?,
                        Err(e) => return Err(invalid(e)),
                    }
                }
            };
            match out {
                Some(v) => data = Bytes::from(v),
                None => return Ok(None),
            }
        }
        Ok(Some(data))
    }

    /// RFC 1950's two header bytes: deflate method, window at most 32 KiB, check bits.
    fn zlib_header(data: &[u8]) -> bool {
        match data {
            [cmf, flg, ..] => {
                cmf & 0x0f == 8
                    && cmf >> 4 <= 7
                    && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0
            }
            _ => false,
        }
    }

    /// Room for `n` more bytes in `out`, growing by doubling but never past `cap + 1`
    /// (one byte over the cap is how "too large" is seen).
    fn grow(out: &mut Vec<u8>, n: usize, cap: usize) {
        if out.capacity() - out.len() < n {
            let room = cap.saturating_add(1) - out.len();
            out.reserve_exact(out.len().max(n).max(32 << 10).min(room));
        }
    }

    /// Gunzips (concatenated members too); None past `cap`. A truncated stream is an
    /// error: flate2 checks each member's CRC and length trailer.
    fn gunzip(data: &[u8], cap: usize) -> std::io::Result<Option<Vec<u8>>> {
        let mut r = flate2::read::MultiGzDecoder::new(data);
        let mut out = Vec::new();
        let mut buf = [0u8; 16 << 10];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                return Ok(Some(out));
            }
            if out.len() + n > cap {
                return Ok(None);
            }
            grow(&mut out, n, cap);
            out.extend_from_slice(&buf[..n]);
        }
    }

    /// Inflates a zlib (or bare deflate) stream; None past `cap`. Unlike flate2's
    /// readers, a stream that ends early is an error, as is data after its end.
    fn inflate(
        data: &[u8],
        zlib: bool,
        cap: usize,
    ) -> std::result::Result<Option<Vec<u8>>, String> {
        let mut d = flate2::Decompress::new(zlib);
        let mut out = Vec::new();
        loop {
            if out.len() == out.capacity() {
                if out.len() > cap {
                    return Ok(None);
                }
                grow(&mut out, 1, cap);
            }
            let (read, wrote) = (d.total_in(), d.total_out());
            let at = usize::try_from(read).unwrap_or(usize::MAX).min(data.len());
            let status = d
                .decompress_vec(&data[at..], &mut out, flate2::FlushDecompress::None)
                .map_err(|e| e.to_string())?;
            match status {
                flate2::Status::StreamEnd => {
                    if out.len() > cap {
                        return Ok(None);
                    }
                    if d.total_in() != data.len() as u64 {
                        return Err("data after the end of the stream".into());
                    }
                    return Ok(Some(out));
                }
                flate2::Status::Ok | flate2::Status::BufError => {
                    let stuck = d.total_in() == read && d.total_out() == wrote;
                    if stuck && out.len() < out.capacity() {
                        return Err("the stream ends early".into());
                    }
                }
            }
        }
    }

    /// A response body, perhaps compressed, as the chunks to send.
    pub struct Encoded {
        pub chunks: Vec<Bytes>,
        pub coding: Option<Coding>,
        /// Length of the JSON header (before any coding).
        pub head_len: usize,
        /// Binary outputs follow the header.
        pub binary: bool,
    }

    impl Encoded {
        pub fn plain(head: Vec<u8>, binary: Vec<Bytes>) -> Encoded {
            let head_len = head.len();
            let has_binary = !binary.is_empty();
            let mut chunks = Vec::with_capacity(binary.len() + 1);
            chunks.push(Bytes::from(head));
            chunks.extend(binary);
            Encoded {
                chunks,
                coding: None,
                head_len,
                binary: has_binary,
            }
        }
    }

    /// What Accept-Encoding asks for the answer.
    #[derive(Debug, PartialEq)]
    pub struct Accept {
        /// The coding to apply, None for identity.
        pub coding: Option<Coding>,
        /// Whether an uncompressed answer is acceptable.
        pub identity_ok: bool,
    }

    /// Reads Accept-Encoding (RFC 9110 12.5.3): the acceptable coding with the highest
    /// q-value, gzip on a tie, unless identity is explicitly preferred to it. Identity
    /// is acceptable unless refused (`identity;q=0`, or `*;q=0` without it).
    pub fn accept(headers: &HeaderMap) -> Accept {
        let (mut gzip, mut deflate, mut identity, mut star) = (None, None, None, None);
        for v in headers.get_all(header::ACCEPT_ENCODING) {
            let Ok(v) = v.to_str() else { continue };
            for item in v.split(',') {
                let mut parts = item.split(';');
                let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
                let mut q = Some(1.0f32);
                for p in parts {
                    if let Some((k, val)) = p.split_once('=')
                        && k.trim().eq_ignore_ascii_case("q")
                    {
                        q = val
                            .trim()
                            .parse()
                            .ok()
                            .filter(|q: &f32| (0.0..=1.0).contains(q));
                    }
                }
                // An element with a malformed q-value is ignored.
                let Some(q) = q else { continue };
                match name.as_str() {
                    "gzip" | "x-gzip" => gzip = Some(q),
                    "deflate" => deflate = Some(q),
                    "identity" => identity = Some(q),
                    "*" => star = Some(q),
                    _ => {}
                }
            }
        }
        let gzip = gzip.or(star).unwrap_or(0.0);
        let deflate = deflate.or(star).unwrap_or(0.0);
        let (best, q) = if deflate > gzip {
            (Coding::Deflate, deflate)
        } else {
            (Coding::Gzip, gzip)
        };
        let identity = identity.or(star);
        let coding = (q > 0.0 && identity.is_none_or(|i| i <= q)).then_some(best);
        Accept {
            coding,
            identity_ok: identity != Some(0.0),
        }
    }

    /// The answer's body, compressed when the client asked for it and it is worth it.
    pub async fn encode_response(
        headers: &HeaderMap,
        head: Vec<u8>,
        binary: Vec<Bytes>,
    ) -> Result<Encoded> {
        let plain = Encoded::plain(head, binary);
        let Accept {
            coding,
            identity_ok,
        } = accept(headers);
        let Some(coding) = coding else {
            return Ok(plain);
        };
        let len: usize = plain.chunks.iter().map(Bytes::len).sum();
        if len < MIN_COMPRESS && identity_ok {
            return Ok(plain);
        }
        let Encoded {
            chunks,
            head_len,
            binary,
            ..
        } = plain;
        let compressed = if len <= INLINE_COMPRESS {
            compress(coding, &chunks, len)?
        } else {
            tokio::task::spawn_blocking(move || compress(coding, &chunks, len))
                .await
                .map_err(|e| Error::Internal(format!("compression task failed: {e}")))??
        };
        Ok(Encoded {
            chunks: vec![Bytes::from(compressed)],
            coding: Some(coding),
            head_len,
            binary,
        })
    }

    fn compress(coding: Coding, chunks: &[Bytes], len: usize) -> Result<Vec<u8>> {
        let io = |e: std::io::Error| Error::Internal(format!("compressing the answer: {e}"));
        // The fastest level: the answer's latency matters more than the last few percent.
        let level = flate2::Compression::fast();
        let out = Vec::with_capacity(len / 4 + 64);
        match coding {
            Coding::Gzip => {
                let mut w = flate2::write::GzEncoder::new(out, level);
                chunks.iter().try_for_each(|c| w.write_all(c)).map_err(io)?;
                w.finish().map_err(io)
            }
            Coding::Deflate => {
                let mut w = flate2::write::ZlibEncoder::new(out, level);
                chunks.iter().try_for_each(|c| w.write_all(c)).map_err(io)?;
                w.finish().map_err(io)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(body: &str) -> Result<(InferRequest, OutputPrefs)> {
        decode_infer(
            "m".into(),
            None,
            &HeaderMap::new(),
            Bytes::from(body.to_string()),
        )
    }

    #[test]
    fn json_request_decodes() {
        let (r, p) = decode(
            r#"{"id":"a","inputs":[{"name":"X","shape":[1,2],"datatype":"FP32","data":[[1,2]]}],
               "outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#,
        )
        .unwrap();
        assert_eq!(r.id, "a");
        assert_eq!(r.inputs[0].shape, vec![1, 2]);
        assert_eq!(r.outputs, vec!["y".to_string()]);
        assert!(p.binary("y"));
        assert!(!p.binary("z"));
    }

    #[test]
    fn binary_request_decodes() {
        let head = r#"{"inputs":[{"name":"X","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = head.as_bytes().to_vec();
        body.extend_from_slice(&1f32.to_le_bytes());
        body.extend_from_slice(&2f32.to_le_bytes());
        let mut h = HeaderMap::new();
        h.insert(HEADER_CONTENT_LENGTH, head.len().into());
        let (r, _) = decode_infer("m".into(), None, &h, Bytes::from(body.clone())).unwrap();
        assert_eq!(r.inputs[0].data.len(), 8);
        // Extra trailing bytes nobody claims are an error.
        body.push(0);
        let e = decode_infer("m".into(), None, &h, Bytes::from(body)).unwrap_err();
        assert!(e.to_string().contains("not claimed"), "{e}");
    }

    #[test]
    fn malformed_requests_are_400() {
        for (body, want) in [
            ("{", "malformed request JSON"),
            (
                r#"{"inputs":[{"name":"X","shape":[2],"datatype":"FP32"}]}"#,
                "has no data",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[-2],"datatype":"FP32","data":[1]}]}"#,
                "negative",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[3],"datatype":"FP32","data":[1]}]}"#,
                "needs 3",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[1],"datatype":"BYTES","data":["a"]}]}"#,
                "BYTES",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[1],"datatype":"FP33","data":[1]}]}"#,
                "unknown datatype",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[4611686018427387904,4],"datatype":"FP32","data":[1]}]}"#,
                "too many",
            ),
        ] {
            let e = decode(body).expect_err(body);
            assert_eq!(e.http_status(), 400, "{body}");
            assert!(e.to_string().contains(want), "{body}: {e}");
        }
    }

    fn accept_of(v: &str) -> coding::Accept {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        coding::accept(&h)
    }

    #[test]
    fn accept_encoding_q_values() {
        use coding::Coding::{Deflate, Gzip};
        for (v, want, identity_ok) in [
            ("gzip", Some(Gzip), true),
            ("GZIP;Q=0.5", Some(Gzip), true),
            ("deflate", Some(Deflate), true),
            ("gzip;q=0.4, deflate;q=0.6", Some(Deflate), true),
            ("deflate, gzip", Some(Gzip), true),
            ("*", Some(Gzip), true),
            ("*;q=0", None, false),
            ("gzip;q=0, *", Some(Deflate), true),
            ("identity;q=0.9, gzip;q=0.5", None, true),
            ("identity;q=0, deflate", Some(Deflate), false),
            ("gzip;q=abc", None, true),
            ("gzip;q=2", None, true),
            ("br, zstd", None, true),
            ("", None, true),
        ] {
            let a = accept_of(v);
            assert_eq!(a.coding, want, "{v}");
            assert_eq!(a.identity_ok, identity_ok, "{v}");
        }
    }

    #[test]
    fn decoding_stops_at_the_cap_and_refuses_truncated_streams() {
        use std::io::Write;
        let plain = vec![b' '; 1 << 20];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&plain).unwrap();
        let gz = Bytes::from(gz.finish().unwrap());
        let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        zl.write_all(&plain).unwrap();
        let zl = Bytes::from(zl.finish().unwrap());
        for (c, data) in [(coding::Coding::Gzip, gz), (coding::Coding::Deflate, zl)] {
            // One byte short of the decoded size: refused.
            assert!(
                coding::decode_all(data.clone(), &[c], (1 << 20) - 1)
                    .unwrap()
                    .is_none()
            );
            let out = coding::decode_all(data.clone(), &[c], 1 << 20)
                .unwrap()
                .unwrap();
            assert_eq!(out.len(), 1 << 20);
            // Truncated streams are errors, not shorter bodies.
            let cut = data.slice(..data.len() - 6);
            let e = coding::decode_all(cut, &[c], 1 << 20).unwrap_err();
            assert_eq!(e.http_status(), 400, "{e}");
        }
        // Bare deflate is accepted as "deflate".
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        raw.write_all(b"{}").unwrap();
        let raw = Bytes::from(raw.finish().unwrap());
        let out = coding::decode_all(raw, &[coding::Coding::Deflate], 10)
            .unwrap()
            .unwrap();
        assert_eq!(&out[..], b"{}");
    }
}

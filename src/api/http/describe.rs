//! Describing the server and its models over HTTP: metadata, readiness, Triton's
//! model configuration and statistics.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::HttpResult;
use crate::api;
use crate::api::Api;
use crate::error::Result;
use crate::tensor::DataType;

pub(super) async fn server_metadata() -> impl IntoResponse {
    axum::Json(json!({
        "name": api::SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": api::EXTENSIONS,
    }))
}

pub(super) async fn live() -> StatusCode {
    StatusCode::OK
}

pub(super) async fn ready(State(state): State<Arc<Api>>) -> StatusCode {
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
    let mut v = json!({
        "name": md.name,
        "versions": md.versions,
        "platform": md.platform,
        "inputs": tensors(&md.inputs),
        "outputs": tensors(&md.outputs),
    });
    // OIP's parameters object (scalars): the version's lineage, when it has one.
    let lineage = api::describe::lineage_parameters(mv);
    if !lineage.is_empty() {
        v["parameters"] = json!(lineage);
    }
    Ok(v)
}

pub(super) async fn metadata(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
) -> HttpResult<axum::Json<Value>> {
    Ok(axum::Json(metadata_json(&s, &model, None)?))
}

pub(super) async fn metadata_v(
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

pub(super) async fn model_ready(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
) -> HttpResult<StatusCode> {
    model_ready_status(&s, &model, None)
}

pub(super) async fn model_ready_v(
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
    if !c.parameters.is_empty() {
        // Triton's rendering of ModelParameter: {"key": {"string_value": "..."}}.
        let params: serde_json::Map<String, Value> = c
            .parameters
            .iter()
            .map(|(k, p)| (k.clone(), json!({"string_value": p.string_value})))
            .collect();
        v["parameters"] = Value::Object(params);
    }
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

pub(super) async fn config(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
) -> HttpResult<axum::Json<Value>> {
    Ok(axum::Json(config_json(&s, &model, None)?))
}

pub(super) async fn config_v(
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
        "batch_stats": s.batch_stats.iter().map(|b| json!({
            "batch_size": b.batch_size,
            "compute_input": d(&b.compute_input),
            "compute_infer": d(&b.compute_infer),
            "compute_output": d(&b.compute_output),
        })).collect::<Vec<_>>(),
    })
}

fn model_stats_json(state: &Api, model: Option<&str>, version: Option<&str>) -> Result<Value> {
    let stats: Vec<Value> = api::describe::statistics(&state.registry.snapshot(), model, version)?
        .iter()
        .map(stats_json)
        .collect();
    Ok(json!({ "model_stats": stats }))
}

pub(super) async fn all_stats(State(s): State<Arc<Api>>) -> HttpResult<axum::Json<Value>> {
    Ok(axum::Json(model_stats_json(&s, None, None)?))
}

pub(super) async fn stats(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
) -> HttpResult<axum::Json<Value>> {
    Ok(axum::Json(model_stats_json(&s, Some(&model), None)?))
}

pub(super) async fn stats_v(
    State(s): State<Arc<Api>>,
    Path((model, version)): Path<(String, String)>,
) -> HttpResult<axum::Json<Value>> {
    Ok(axum::Json(model_stats_json(
        &s,
        Some(&model),
        Some(&version),
    )?))
}

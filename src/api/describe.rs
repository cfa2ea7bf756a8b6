//! Model descriptions both protocols serve: OIP metadata, Triton's model configuration
//! and statistics. They are built once here as the protobuf types; the HTTP adapter
//! renders the same values as JSON, so the two protocols cannot drift apart.

use std::sync::atomic::Ordering;

use super::PLATFORM;
use crate::proto as pb;
use crate::registry::{Model, ModelVersion, Snapshot};
use crate::tensor::TensorSpec;

/// Versions of a model as strings, oldest first.
pub fn version_list(model: &Model) -> Vec<String> {
    model.versions.keys().map(u64::to_string).collect()
}

/// Tensor metadata for ModelMetadata.
pub fn tensor_metadata(specs: &[TensorSpec]) -> Vec<pb::model_metadata_response::TensorMetadata> {
    specs
        .iter()
        .map(|s| pb::model_metadata_response::TensorMetadata {
            name: s.name.clone(),
            datatype: s.dtype.as_str().to_string(),
            shape: s.shape.clone(),
        })
        .collect()
}

/// ModelMetadata for one version (the versions list names every ready version).
pub fn model_metadata(model: &Model, mv: &ModelVersion) -> pb::ModelMetadataResponse {
    pb::ModelMetadataResponse {
        name: model.name.clone(),
        versions: version_list(model),
        platform: PLATFORM.to_string(),
        inputs: tensor_metadata(&mv.inputs),
        outputs: tensor_metadata(&mv.outputs),
        parameters: string_parameters(lineage_parameters(mv)),
    }
}

/// Flat `lineage.<field>` strings as gRPC string parameters.
pub fn string_parameters(
    flat: std::collections::BTreeMap<String, String>,
) -> std::collections::HashMap<String, pb::InferParameter> {
    flat.into_iter()
        .map(|(k, v)| {
            let p = pb::InferParameter {
                parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(v)),
            };
            (k, p)
        })
        .collect()
}

/// The version's lineage (model.toml) as flat `lineage.<field>` strings; empty without one.
pub fn lineage_parameters(mv: &ModelVersion) -> std::collections::BTreeMap<String, String> {
    mv.lineage
        .as_ref()
        .map(|l| l.parameters())
        .unwrap_or_default()
}

/// Triton's ModelConfig for a version. For a batchable model the batch dimension is
/// left out of `dims` and `max_batch_size` is set, as Triton reports batching models.
pub fn model_config(mv: &ModelVersion) -> pb::ModelConfig {
    let batchable = mv.batchable();
    let dims = |s: &TensorSpec| -> Vec<i64> {
        if batchable {
            s.shape[1..].to_vec()
        } else {
            s.shape.clone()
        }
    };
    // Triton shows a per-row scalar (shape [-1]) as dims [1] reshaped to [].
    let reshape = |s: &TensorSpec| -> (Vec<i64>, Option<pb::ModelTensorReshape>) {
        let d = dims(s);
        if batchable && d.is_empty() {
            (vec![1], Some(pb::ModelTensorReshape { shape: vec![] }))
        } else {
            (d, None)
        }
    };
    pb::ModelConfig {
        name: mv.model.clone(),
        platform: PLATFORM.to_string(),
        backend: "onnxruntime".to_string(),
        max_batch_size: if batchable {
            i32::try_from(mv.settings.max_batch_size).unwrap_or(i32::MAX)
        } else {
            0
        },
        input: mv
            .inputs
            .iter()
            .map(|s| {
                let (dims, reshape) = reshape(s);
                pb::ModelInput {
                    name: s.name.clone(),
                    data_type: s.dtype.triton_type().1,
                    dims,
                    reshape,
                    ..Default::default()
                }
            })
            .collect(),
        output: mv
            .outputs
            .iter()
            .map(|s| {
                let (dims, reshape) = reshape(s);
                pb::ModelOutput {
                    name: s.name.clone(),
                    data_type: s.dtype.triton_type().1,
                    dims,
                    reshape,
                    ..Default::default()
                }
            })
            .collect(),
        instance_group: vec![pb::ModelInstanceGroup {
            name: format!("{}_cpu", mv.model),
            kind: pb::model_instance_group::Kind::Cpu as i32,
            count: i32::try_from(mv.pool.instances()).unwrap_or(i32::MAX),
            ..Default::default()
        }],
        default_model_filename: crate::runtime::MODEL_FILE.to_string(),
        scheduling_choice: mv
            .pool
            .batching()
            .then(|| {
                let p = mv.pool.params();
                pb::ModelDynamicBatching {
                    preferred_batch_size: p
                        .preferred
                        .iter()
                        .map(|&n| i32::try_from(n).unwrap_or(i32::MAX))
                        .collect(),
                    max_queue_delay_microseconds: u64::try_from(p.max_queue_delay.as_micros())
                        .unwrap_or(u64::MAX),
                    priority_levels: mv.settings.priority_levels as u64,
                    default_priority_level: mv.settings.default_priority_level as u64,
                    default_queue_policy: Some(pb::ModelQueuePolicy {
                        default_timeout_microseconds: mv.settings.default_queue_timeout_us,
                        allow_timeout_override: true,
                        max_queue_size: u32::try_from(mv.settings.max_queue_size)
                            .unwrap_or(u32::MAX),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            })
            .map(pb::model_config::SchedulingChoice::DynamicBatching),
        version_policy: Some(version_policy(&mv.settings.version_policy)),
        parameters: lineage_parameters(mv)
            .into_iter()
            .map(|(k, string_value)| (k, pb::ModelParameter { string_value }))
            .collect(),
        ..Default::default()
    }
}

/// A version policy as Triton's ModelVersionPolicy.
pub fn version_policy(policy: &crate::registry::settings::VersionPolicy) -> pb::ModelVersionPolicy {
    use crate::registry::settings::VersionPolicy;
    use pb::model_version_policy::{All, Latest, PolicyChoice, Specific};
    let choice = match policy {
        VersionPolicy::Latest(n) => PolicyChoice::Latest(Latest {
            num_versions: u32::try_from(*n).unwrap_or(u32::MAX),
        }),
        VersionPolicy::All => PolicyChoice::All(All {}),
        VersionPolicy::Specific(v) => PolicyChoice::Specific(Specific {
            versions: v
                .iter()
                .map(|&n| i64::try_from(n).unwrap_or(i64::MAX))
                .collect(),
        }),
    };
    pb::ModelVersionPolicy {
        policy_choice: Some(choice),
    }
}

/// Triton's statistics for one version: `inference_count`, `execution_count` and
/// `batch_stats` count the batches the workers ran for clients (rows, batches, and per
/// batch size the time of each phase); `inference_stats` counts requests (successes and
/// failures with their time in the server, and per successful request its wait in the
/// queue and the phases of the batch it ran in).
pub fn model_statistics(mv: &ModelVersion) -> pb::ModelStatistics {
    let s = &mv.stats;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let dur = |count: u64, ns: u64| Some(pb::StatisticDuration { count, ns });
    let success = get(&s.success_count);
    let ex = mv.pool.executions();
    pb::ModelStatistics {
        name: mv.model.clone(),
        version: mv.version_str.clone(),
        last_inference: get(&s.last_inference_ms),
        inference_count: ex.inferences,
        execution_count: ex.executions,
        inference_stats: Some(pb::InferStatistics {
            success: dur(success, get(&s.success_ns)),
            fail: dur(get(&s.fail_count), get(&s.fail_ns)),
            queue: dur(success, get(&s.queue_ns)),
            compute_input: dur(success, get(&s.compute_input_ns)),
            compute_infer: dur(success, get(&s.compute_infer_ns)),
            compute_output: dur(success, get(&s.compute_output_ns)),
            cache_hit: dur(0, 0),
            cache_miss: dur(0, 0),
        }),
        batch_stats: ex
            .sizes
            .iter()
            .map(|b| pb::InferBatchStatistics {
                batch_size: b.batch_size,
                compute_input: dur(b.count, b.input_ns),
                compute_infer: dur(b.count, b.infer_ns),
                compute_output: dur(b.count, b.output_ns),
            })
            .collect(),
        ..Default::default()
    }
}

/// Triton's statistics listing: every version of every model, every version of one
/// model, or one version (an empty name or version means "all").
pub fn statistics(
    snapshot: &Snapshot,
    model: Option<&str>,
    version: Option<&str>,
) -> crate::error::Result<Vec<pb::ModelStatistics>> {
    let Some(name) = model.filter(|m| !m.is_empty()) else {
        return Ok(snapshot
            .models
            .values()
            .flat_map(|m| m.versions.values().map(|v| model_statistics(v)))
            .collect());
    };
    let m = snapshot.model(name)?;
    Ok(match version.filter(|v| !v.is_empty()) {
        None => m.versions.values().map(|v| model_statistics(v)).collect(),
        Some(v) => vec![model_statistics(m.resolve(Some(v))?)],
    })
}

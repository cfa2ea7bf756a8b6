//! Mirrored runs: shadow copies of a request, and comparison runs of canary requests on
//! stable. They start after the primary answer is ready, never change it, run at the
//! lowest priority of their version's queue, and are shed first: when the mirror budget
//! is spent, when the primary's or the mirrored version's workers are all busy or have
//! requests waiting (the server is under load), or when shutting down. Each shed run is
//! counted by reason. A version that only shadows also runs its workers at idle CPU
//! priority (see `ModelSettings::background`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{AppState, InferRequest};
use crate::error::Error;
use crate::metrics;
use crate::registry::{Model, ModelVersion};
use crate::routing::Variant;
use crate::routing::compare::{self, Comparison};
use crate::tensor::Tensor;

/// Why a mirror exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A shadow version gets a copy of a request; its answer is compared with the
    /// primary's.
    Shadow,
    /// A request the canary answered is run on stable too, to measure the canary's
    /// agreement with stable.
    Canary,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Shadow => "shadow",
            Source::Canary => "canary",
        }
    }
}

/// One mirrored run to make after the primary answered.
pub struct Mirror {
    /// The version the copy runs on.
    pub run_on: Arc<ModelVersion>,
    /// The version whose agreement with stable is measured.
    pub candidate: Arc<ModelVersion>,
    pub source: Source,
    /// The comparison is against stable (the rollout's disagreement counts only then).
    pub against_stable: bool,
}

/// The mirrors a request gets, given where routing sent it.
pub fn plan(model: &Model, answered: &Arc<ModelVersion>, variant: Variant) -> Vec<Mirror> {
    let primary_is_stable = model.stable == Some(answered.version);
    let mut mirrors: Vec<Mirror> = model
        .routing
        .sample_shadows(answered.version)
        .filter_map(|v| model.versions.get(&v))
        .map(|mv| Mirror {
            run_on: Arc::clone(mv),
            candidate: Arc::clone(mv),
            source: Source::Shadow,
            against_stable: primary_is_stable,
        })
        .collect();
    if variant == Variant::Canary
        && model.traffic.compare_canary
        && let Some(stable) = model.stable.and_then(|v| model.versions.get(&v))
        && stable.version != answered.version
    {
        mirrors.push(Mirror {
            run_on: Arc::clone(stable),
            candidate: Arc::clone(answered),
            source: Source::Canary,
            against_stable: true,
        });
    }
    mirrors
}

/// Starts the mirrored runs of a request that was answered with `primary` (taking
/// `primary_infer` of compute). Returns at once.
pub fn spawn(
    state: &AppState,
    primary_version: &ModelVersion,
    mirrors: Vec<Mirror>,
    inputs: &[Tensor],
    primary: &[Tensor],
    primary_infer: Duration,
    protocol: metrics::Protocol,
) {
    for m in mirrors {
        let model = m.run_on.model.clone();
        if state.shutdown.is_cancelled() {
            metrics::count_mirror_shed(&model, m.source.as_str(), "shutdown");
            continue;
        }
        if primary_version.pool.saturated() || m.run_on.pool.saturated() {
            metrics::count_mirror_shed(&model, m.source.as_str(), "load");
            continue;
        }
        let Ok(permit) = Arc::clone(&state.control.mirror_budget).try_acquire_owned() else {
            metrics::count_mirror_shed(&model, m.source.as_str(), "budget");
            continue;
        };
        let req = InferRequest {
            model: model.clone(),
            version: None,
            id: String::new(),
            // Tensors share their bytes: these copies are reference counts.
            inputs: inputs.to_vec(),
            outputs: Vec::new(),
            timeout: Some(state.control.mirror_timeout),
            // Below every real request in the mirrored version's queue.
            priority: u64::MAX,
            routing_key: None,
        };
        let primary = primary.to_vec();
        let timeout = state.control.mirror_timeout;
        state.tasks.spawn(async move {
            let _permit = permit;
            let started = Instant::now();
            let result = super::run_on(&m.run_on, req, started).await;
            let total = started.elapsed();
            let variant = match m.source {
                Source::Shadow => Variant::Shadow,
                Source::Canary => Variant::Stable,
            };
            match result {
                Ok(resp) => {
                    if m.source == Source::Shadow {
                        super::record_ok(&m.run_on, &resp, protocol, variant, total);
                    }
                    let (reference, candidate) = match m.source {
                        Source::Shadow => (&primary, &resp.outputs),
                        Source::Canary => (&resp.outputs, &primary),
                    };
                    let c: Comparison = compare::compare(reference, candidate);
                    let delta = match m.source {
                        Source::Shadow => {
                            resp.timing.infer().as_secs_f64() - primary_infer.as_secs_f64()
                        }
                        Source::Canary => {
                            primary_infer.as_secs_f64() - resp.timing.infer().as_secs_f64()
                        }
                    };
                    metrics::record_comparison(
                        &m.candidate.model,
                        &m.candidate.version_str,
                        m.source.as_str(),
                        c.rows,
                        c.disagreed_rows,
                        (c.values > 0).then(|| c.abs_diff_sum / c.values as f64),
                        delta,
                    );
                    if m.against_stable {
                        m.candidate.counters.record_comparison(&c);
                    }
                }
                Err(Error::Overloaded { .. }) => {
                    metrics::count_mirror_shed(&model, m.source.as_str(), "queue");
                }
                Err(Error::DeadlineExceeded(_)) => {
                    tracing::debug!(model = %model, ?timeout, "mirrored run expired in its queue");
                    metrics::count_mirror_shed(&model, m.source.as_str(), "deadline");
                }
                Err(e) => {
                    if m.source == Source::Shadow {
                        super::record_failure(&m.run_on, protocol, variant, &e, total);
                    }
                }
            }
        });
    }
}

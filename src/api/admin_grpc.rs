//! gRPC adapter of the admin API (`modelgate.admin.v1.TrafficAdmin`): converts between
//! the protobuf messages and [`TrafficSpec`] or the drift view, and calls the shared
//! functions in [`crate::api::admin`] and [`crate::api::drift_view`], exactly as the
//! HTTP admin endpoints do.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::admin_proto as pb;
use crate::api::Api;
use crate::api::admin::{self, Change, RoutingView};
use crate::api::auth::Permission;
use crate::api::drift_view;
use crate::api::grpc::admit;
use crate::drift::ModelDriftConfig;
use crate::drift::detector::{Evidence, State, Status as DriftStatus};
use crate::error::Error;
use crate::routing::{Canary, PlanPatch, RolloutState, Shadow, TrafficSpec};

/// The gRPC admin service.
pub struct AdminService {
    state: Arc<Api>,
}

impl AdminService {
    pub fn new(state: Arc<Api>) -> Self {
        AdminService { state }
    }
}

/// Converts a protobuf spec: the state, and a rollout's plan as a patch (fields left
/// unset come from the model's configured plan when the change is applied).
fn change_from_pb(p: pb::TrafficSpec) -> Change {
    let plan = p
        .rollout
        .as_ref()
        .and_then(|r| r.plan.clone())
        .map(|p| PlanPatch {
            steps: (!p.steps.is_empty()).then_some(p.steps),
            interval_secs: p.interval_secs,
            min_requests: p.min_requests,
            max_error_rate: p.max_error_rate,
            max_p99_ratio: p.max_p99_ratio,
            p99_slack_ms: p.p99_slack_ms,
            max_disagreement: p.max_disagreement,
            max_mean_abs_diff: p.max_mean_abs_diff,
            max_accuracy_drop: p.max_accuracy_drop,
            max_mae_increase: p.max_mae_increase,
            min_labelled: p.min_labelled,
            alpha: p.alpha,
            early_alpha: p.early_alpha,
        });
    let spec = TrafficSpec {
        stable: p.stable,
        canary: p.canary.map(|c| Canary {
            version: c.version,
            weight: c.weight,
        }),
        shadows: p
            .shadows
            .into_iter()
            .map(|s| Shadow {
                version: s.version,
                percent: s.percent,
            })
            .collect(),
        rollout: p.rollout.map(|r| RolloutState {
            plan: None,
            step: usize::try_from(r.step).unwrap_or(usize::MAX),
            step_started_ms: r.step_started_ms,
            ..RolloutState::default()
        }),
        rejected: p.rejected,
        // The server sets it: every change bumps the generation it was made over.
        generation: 0,
    };
    Change::Set { spec, plan }
}

fn spec_to_pb(s: &TrafficSpec) -> pb::TrafficSpec {
    pb::TrafficSpec {
        stable: s.stable,
        canary: s.canary.as_ref().map(|c| pb::Canary {
            version: c.version,
            weight: c.weight,
        }),
        shadows: s
            .shadows
            .iter()
            .map(|s| pb::Shadow {
                version: s.version,
                percent: s.percent,
            })
            .collect(),
        rollout: s.rollout.as_ref().map(|r| pb::Rollout {
            plan: r.plan.as_ref().map(|p| pb::RolloutPlan {
                steps: p.steps.clone(),
                interval_secs: Some(p.interval_secs),
                min_requests: Some(p.min_requests),
                max_error_rate: Some(p.max_error_rate),
                max_p99_ratio: Some(p.max_p99_ratio),
                p99_slack_ms: Some(p.p99_slack_ms),
                max_disagreement: Some(p.max_disagreement),
                max_mean_abs_diff: p.max_mean_abs_diff,
                max_accuracy_drop: p.max_accuracy_drop,
                max_mae_increase: p.max_mae_increase,
                min_labelled: Some(p.min_labelled),
                alpha: Some(p.alpha),
                early_alpha: Some(p.early_alpha),
            }),
            step: r.step as u64,
            step_started_ms: r.step_started_ms,
            started_ms: r.started_ms,
        }),
        rejected: s.rejected.clone(),
    }
}

fn state_to_pb(v: RoutingView) -> pb::TrafficState {
    pb::TrafficState {
        spec: Some(spec_to_pb(&v.routing)),
        model: v.model,
        effective_stable: v.effective_stable.unwrap_or(0),
        ready_versions: v.ready_versions,
        routing_error: v.routing_error.unwrap_or_default(),
    }
}

/// The name an enum setting has in config.toml and the HTTP view (its serde name), so
/// that gRPC cannot spell it differently.
fn serde_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn settings_to_pb(d: &ModelDriftConfig) -> pb::DriftSettings {
    pb::DriftSettings {
        enabled: d.enabled,
        sample_rate: d.sample_rate,
        max_rows_per_request: d.max_rows_per_request as u64,
        window: d.window as u64,
        step: d.step as u64,
        feature_test: serde_name(&d.feature_test),
        prediction_test: serde_name(&d.prediction_test),
        psi_warn: d.psi_warn,
        psi_drift: d.psi_drift,
        alpha: d.alpha,
        correction: serde_name(&d.correction),
        js_drift: d.js_drift,
        drift_windows: d.drift_windows,
        clean_windows: d.clean_windows,
        cooldown_secs: d.cooldown_secs,
        live_reference_rows: d.live_reference_rows as u64,
        bins: d.bins as u64,
        mode: serde_name(&d.mode),
        arl_rows: d.arl_rows,
        thin: d.thin,
        clean_rows: d.clean_rows,
    }
}

fn evidence_to_pb(e: &[Evidence]) -> Vec<pb::DriftEvidence> {
    e.iter()
        .map(|e| pb::DriftEvidence {
            feature: e.feature.clone(),
            test: e.test.to_string(),
            statistic: e.statistic,
            p_value: e.p_value,
            threshold: e.threshold,
            level: e.level.to_string(),
        })
        .collect()
}

fn window_to_pb(s: DriftStatus) -> pb::DriftWindow {
    let state = match s.state {
        State::Ok => pb::DriftState::Ok,
        State::Warn => pb::DriftState::Warn,
        State::Drift => pb::DriftState::Drift,
    };
    pb::DriftWindow {
        evidence: evidence_to_pb(&s.evidence),
        episode_evidence: evidence_to_pb(&s.episode_evidence),
        model: s.model,
        version: s.version,
        state: state.into(),
        reference: s.reference,
        rows_seen: s.rows_seen,
        windows_tested: s.windows_tested,
        window: s.window as u64,
        step: s.step as u64,
        episodes: s.episodes,
        events: s.events,
        last_event: s.last_event,
    }
}

fn drift_model_to_pb(v: drift_view::ModelView) -> pb::GetDriftResponse {
    pb::GetDriftResponse {
        model: v.model,
        settings: Some(settings_to_pb(&v.settings)),
        versions: v
            .versions
            .into_iter()
            .map(|v| pb::DriftVersion {
                version: v.version,
                profile: v.profile.map(|p| pb::ProfileSummary {
                    source: p.source,
                    rows: p.rows,
                    created_at: p.created_at,
                    features: p.features,
                }),
            })
            .collect(),
        windows: v.windows.into_iter().map(window_to_pb).collect(),
    }
}

#[tonic::async_trait]
impl pb::traffic_admin_server::TrafficAdmin for AdminService {
    async fn get_traffic(
        &self,
        req: Request<pb::GetTrafficRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        admit(&self.state, &req, Permission::Read)?;
        let view = admin::traffic_get(&self.state, &req.get_ref().model)?;
        Ok(Response::new(state_to_pb(view)))
    }

    async fn set_traffic(
        &self,
        req: Request<pb::SetTrafficRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let actor = admit(&self.state, &req, Permission::Traffic)?;
        let r = req.into_inner();
        let change = change_from_pb(
            r.spec
                .ok_or_else(|| Error::invalid("SetTraffic needs a spec"))?,
        );
        let view =
            admin::traffic_change(&self.state.service, &r.model, &actor, change, &r.reason).await?;
        Ok(Response::new(state_to_pb(view)))
    }

    async fn promote(
        &self,
        req: Request<pb::ChangeRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let actor = admit(&self.state, &req, Permission::Traffic)?;
        let r = req.into_inner();
        let view = admin::traffic_change(
            &self.state.service,
            &r.model,
            &actor,
            Change::Promote,
            &r.reason,
        )
        .await?;
        Ok(Response::new(state_to_pb(view)))
    }

    async fn rollback(
        &self,
        req: Request<pb::ChangeRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let actor = admit(&self.state, &req, Permission::Traffic)?;
        let r = req.into_inner();
        let view = admin::traffic_change(
            &self.state.service,
            &r.model,
            &actor,
            Change::Rollback,
            &r.reason,
        )
        .await?;
        Ok(Response::new(state_to_pb(view)))
    }

    async fn get_audit(
        &self,
        req: Request<pb::GetAuditRequest>,
    ) -> Result<Response<pb::GetAuditResponse>, Status> {
        admit(&self.state, &req, Permission::Read)?;
        let r = req.into_inner();
        let model = (!r.model.is_empty()).then_some(r.model);
        let limit = if r.limit == 0 {
            admin::AUDIT_LIMIT
        } else {
            r.limit as usize
        };
        let entries = admin::audit(&self.state.service, model, limit).await?;
        let entries_json = entries
            .iter()
            .map(|e| serde_json::to_string(e).map_err(|e| Error::Internal(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(pb::GetAuditResponse { entries_json }))
    }

    async fn get_drift(
        &self,
        req: Request<pb::GetDriftRequest>,
    ) -> Result<Response<pb::GetDriftResponse>, Status> {
        admit(&self.state, &req, Permission::Read)?;
        let model = &req.get_ref().model;
        let resp = if model.is_empty() {
            pb::GetDriftResponse {
                windows: drift_view::all(&self.state)
                    .models
                    .into_iter()
                    .map(window_to_pb)
                    .collect(),
                ..pb::GetDriftResponse::default()
            }
        } else {
            drift_model_to_pb(drift_view::model(&self.state, model)?)
        };
        Ok(Response::new(resp))
    }

    async fn feedback(
        &self,
        req: Request<pb::FeedbackRequest>,
    ) -> Result<Response<pb::FeedbackResponse>, Status> {
        crate::api::infer::admit(&self.state, crate::api::grpc::bearer(&req))?;
        let inner = req.into_inner();
        let items = inner
            .feedback
            .into_iter()
            .map(|i| {
                let mut v = serde_json::json!({ "id": i.id });
                match i.truth {
                    Some(pb::feedback_item::Truth::Label(l)) => v["label"] = l.into(),
                    Some(pb::feedback_item::Truth::Value(x)) => v["value"] = x.into(),
                    None if !i.labels.is_empty() => v["label"] = i.labels.into(),
                    None if !i.values.is_empty() => v["value"] = i.values.into(),
                    None => {}
                }
                v
            })
            .collect();
        let a = crate::api::feedback::feedback(&self.state, &inner.model, items).await?;
        Ok(Response::new(pb::FeedbackResponse {
            joined: a.joined as u64,
            unknown: a.unknown as u64,
            expired: a.expired as u64,
            malformed: a.malformed as u64,
            results: a
                .results
                .into_iter()
                .map(|r| pb::FeedbackResult {
                    id: r.id,
                    status: r.status,
                    error: r.error.unwrap_or_default(),
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RolloutPlan;

    /// What SetTraffic asks for, for a model configured with `configured`.
    fn spec_from_pb(p: pb::TrafficSpec, configured: &RolloutPlan) -> TrafficSpec {
        match change_from_pb(p) {
            Change::Set { spec, plan } => admin::planned(spec, plan, configured),
            _ => unreachable!("SetTraffic is a Set"),
        }
    }

    #[test]
    fn spec_round_trips_through_protobuf() {
        let spec = TrafficSpec {
            stable: Some(1),
            canary: Some(Canary {
                version: 2,
                weight: 5.0,
            }),
            shadows: vec![Shadow {
                version: 3,
                percent: 50.0,
            }],
            rollout: Some(RolloutState {
                plan: Some(RolloutPlan::default()),
                step: 0,
                step_started_ms: 42,
                ..RolloutState::default()
            }),
            rejected: vec![7],
            generation: 0,
        };
        let back = spec_from_pb(spec_to_pb(&spec), &RolloutPlan::default());
        assert_eq!(back, spec);
        // Unset plan fields take the configured plan.
        let partial = pb::TrafficSpec {
            stable: Some(1),
            canary: Some(pb::Canary {
                version: 2,
                weight: 10.0,
            }),
            rollout: Some(pb::Rollout {
                plan: Some(pb::RolloutPlan {
                    steps: vec![10.0, 100.0],
                    interval_secs: Some(2.0),
                    ..pb::RolloutPlan::default()
                }),
                ..pb::Rollout::default()
            }),
            ..pb::TrafficSpec::default()
        };
        let plan = spec_from_pb(partial, &RolloutPlan::default())
            .rollout
            .unwrap()
            .plan
            .unwrap();
        assert_eq!(plan.steps, vec![10.0, 100.0]);
        assert_eq!(plan.interval_secs, 2.0);
        assert_eq!(plan.min_requests, RolloutPlan::default().min_requests);
        assert_eq!(plan.alpha, RolloutPlan::default().alpha);
        // The significance levels travel both ways.
        let mut strict = spec.clone();
        if let Some(p) = strict.rollout.as_mut().and_then(|r| r.plan.as_mut()) {
            p.alpha = 0.001;
            p.early_alpha = 1e-6;
        }
        let back = spec_from_pb(spec_to_pb(&strict), &RolloutPlan::default());
        assert_eq!(back, strict);
    }

    #[test]
    fn drift_settings_are_named_as_in_config_toml() {
        let d = ModelDriftConfig {
            feature_test: crate::drift::FeatureTest::Ks,
            prediction_test: crate::drift::PredictionTest::Off,
            correction: crate::drift::Correction::None,
            ..ModelDriftConfig::default()
        };
        let p = settings_to_pb(&d);
        assert_eq!(
            (p.feature_test.as_str(), p.prediction_test.as_str()),
            ("ks", "off")
        );
        assert_eq!(p.correction, "none");
        let p = settings_to_pb(&ModelDriftConfig::default());
        assert_eq!(
            (p.feature_test.as_str(), p.prediction_test.as_str()),
            ("psi", "chi2")
        );
        assert_eq!(p.correction, "bonferroni");
    }
}

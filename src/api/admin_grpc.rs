//! gRPC adapter of the traffic admin API (`modelgate.admin.v1.TrafficAdmin`): converts
//! between the protobuf messages and [`TrafficSpec`], and calls the shared functions in
//! [`crate::api::admin`], exactly as the HTTP admin endpoints do.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::admin_proto as pb;
use crate::api::Api;
use crate::api::admin::{self, Change, RoutingView};
use crate::api::auth::Permission;
use crate::api::grpc::admit;
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
        }),
        rejected: p.rejected,
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
                alpha: Some(p.alpha),
                early_alpha: Some(p.early_alpha),
            }),
            step: r.step as u64,
            step_started_ms: r.step_started_ms,
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
            }),
            rejected: vec![7],
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
}

//! A model's latest rollout as a timeline (`GET /admin/models/{m}/rollout`): each step of
//! its plan with its canary weight, whether it passed, failed, is running or is still to
//! come, and the audit entry that decided it with the numbers the verdict stood on.
//!
//! Built from the routing state (the rollout in progress) and the audit log (where the
//! verdicts and their analyses are recorded); [`timeline`] is a pure function of the two.

use std::sync::Arc;

use serde::Serialize;

use crate::error::Result;
use crate::routing::judge::Analysis;
use crate::routing::store::AuditEntry;
use crate::routing::{RolloutPlan, TrafficSpec};
use crate::service::AppState;

/// Audit entries of the model read to find its latest rollout.
const AUDIT_DEPTH: usize = 500;

/// The latest rollout of a model.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RolloutView {
    pub model: String,
    /// A rollout is in progress now.
    pub running: bool,
    /// The canary version rolled out, and the stable version it was rolled out over.
    pub canary: Option<u64>,
    pub stable: Option<u64>,
    pub plan: RolloutPlan,
    /// The current step (0-based index into `plan.steps`) while running.
    pub step: Option<usize>,
    /// The audit entry that started it (`None` when the audit log no longer holds it).
    pub started: Option<Decision>,
    /// The audit entry that ended it: `promote`, `rollback`, or an operator's `set`.
    pub ended: Option<Decision>,
    pub steps: Vec<StepView>,
}

/// One step of the plan.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepView {
    /// 0-based, as `routing.rollout.step`.
    pub index: usize,
    /// Canary weight, percent.
    pub weight: f64,
    /// `passed`, `failed`, `running`, `pending` (not reached yet), or `skipped` (the
    /// rollout ended before it).
    pub status: &'static str,
    /// Unix milliseconds when the step began, when known.
    pub started_ms: Option<u64>,
    /// The audit entry that decided the step.
    pub decision: Option<Decision>,
}

/// An audit entry, as the timeline shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Decision {
    pub time: String,
    pub unix_ms: u64,
    pub actor: String,
    pub action: String,
    pub reason: String,
    /// The numbers a controller's verdict stood on.
    pub analysis: Option<Analysis>,
}

impl From<&AuditEntry> for Decision {
    fn from(e: &AuditEntry) -> Self {
        Decision {
            time: e.time.clone(),
            unix_ms: e.unix_ms,
            actor: e.actor.clone(),
            action: e.action.clone(),
            reason: e.reason.clone(),
            analysis: e.analysis.clone(),
        }
    }
}

/// The latest rollout of `model` (`None` when it never had one the audit log holds),
/// from its routing now and its audit entries (oldest first). `configured` is the plan
/// of config.toml, for a rollout whose state names none.
pub fn timeline(
    model: &str,
    now: &TrafficSpec,
    entries: &[AuditEntry],
    configured: &RolloutPlan,
) -> Option<RolloutView> {
    // The latest entry that started a rollout: after has one, before had none (or
    // another canary's).
    let start = entries.iter().rposition(|e| {
        e.after.rollout.is_some()
            && (e.before.rollout.is_none()
                || e.before.canary.as_ref().map(|c| c.version)
                    != e.after.canary.as_ref().map(|c| c.version))
    });
    let running = now.rollout.is_some();
    if start.is_none() && !running {
        return None;
    }
    let since = start.map_or(&entries[entries.len()..], |i| &entries[i..]);
    let first = since.first();
    let state = now
        .rollout
        .as_ref()
        .or_else(|| first.and_then(|e| e.after.rollout.as_ref()));
    let plan = state
        .and_then(|r| r.plan.clone())
        .unwrap_or_else(|| configured.clone());
    let (canary, stable) = if running {
        (now.canary.as_ref().map(|c| c.version), now.stable)
    } else {
        let a = first.map(|e| &e.after);
        (
            a.and_then(|s| s.canary.as_ref().map(|c| c.version)),
            a.and_then(|s| s.stable),
        )
    };
    let mut steps: Vec<StepView> = plan
        .steps
        .iter()
        .enumerate()
        .map(|(index, &weight)| StepView {
            index,
            weight,
            status: "pending",
            started_ms: None,
            decision: None,
        })
        .collect();
    let mut ended = None;
    if let Some(r) = first.and_then(|e| e.after.rollout.as_ref())
        && let Some(s) = steps.get_mut(r.step)
    {
        s.started_ms = Some(r.step_started_ms);
    }
    for e in since.iter().skip(1) {
        let Some(at) = e.before.rollout.as_ref().map(|r| r.step) else {
            continue;
        };
        match e.after.rollout.as_ref() {
            // Moved on to the next step: this one passed.
            Some(next) => {
                if let Some(s) = steps.get_mut(at) {
                    s.status = "passed";
                    s.decision = Some(Decision::from(e));
                }
                if let Some(s) = steps.get_mut(next.step) {
                    s.started_ms = Some(next.step_started_ms);
                }
            }
            // Ended: promoted (the step passed), rolled back, or replaced by hand.
            None => {
                if let Some(s) = steps.get_mut(at) {
                    s.status = if e.action == "promote" {
                        "passed"
                    } else {
                        "failed"
                    };
                    s.decision = Some(Decision::from(e));
                }
                ended = Some(Decision::from(e));
                break;
            }
        }
    }
    let step = now.rollout.as_ref().map(|r| r.step);
    for s in &mut steps {
        if s.status == "pending" {
            if Some(s.index) == step {
                s.status = "running";
                if let Some(r) = &now.rollout {
                    s.started_ms = Some(r.step_started_ms);
                }
            } else if step.is_some_and(|at| s.index < at) {
                // Decided before the audit entries read: it passed.
                s.status = "passed";
            } else if !running {
                s.status = "skipped";
            }
        }
    }
    Some(RolloutView {
        model: model.to_string(),
        running,
        canary,
        stable,
        plan,
        step,
        started: first.map(Decision::from),
        ended,
        steps,
    })
}

/// The latest rollout of `model` (`None` when it never had one the audit log holds);
/// an unknown model is [`crate::error::Error::NotFound`].
pub async fn model(state: &Arc<AppState>, name: &str) -> Result<Option<RolloutView>> {
    let (now, configured) = {
        let snapshot = state.registry.snapshot();
        let m = snapshot.model(name)?;
        (m.routing.clone(), m.traffic.rollout.clone())
    };
    let entries = super::admin::audit(state, Some(name.to_string()), AUDIT_DEPTH).await?;
    Ok(timeline(name, &now, &entries, &configured))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> TrafficSpec {
        serde_json::from_value(v).unwrap()
    }

    fn rolling(step: usize, weight: f64, started: u64) -> serde_json::Value {
        json!({"stable": 1, "canary": {"version": 2, "weight": weight},
               "rollout": {"plan": {"steps": [10.0, 50.0, 100.0]}, "step": step, "step_started_ms": started}})
    }

    fn entry(
        action: &str,
        before: serde_json::Value,
        after: serde_json::Value,
        ms: u64,
    ) -> AuditEntry {
        AuditEntry {
            time: format!("t{ms}"),
            unix_ms: ms,
            actor: if action == "set" { "admin" } else { "auto" }.into(),
            model: "m".into(),
            action: action.into(),
            replica: String::new(),
            before: spec(before),
            after: spec(after),
            reason: format!("{action} reason"),
            analysis: None,
            lineage: Default::default(),
        }
    }

    #[test]
    fn a_running_rollout_shows_passed_running_and_pending_steps() {
        let entries = vec![
            // An earlier, unrelated change.
            entry("set", json!({}), json!({"stable": 1}), 1),
            entry("set", json!({"stable": 1}), rolling(0, 10.0, 100), 100),
            entry("advance", rolling(0, 10.0, 100), rolling(1, 50.0, 200), 200),
        ];
        let now = spec(rolling(1, 50.0, 200));
        let v = timeline("m", &now, &entries, &RolloutPlan::default()).unwrap();
        assert!(v.running);
        assert_eq!((v.canary, v.stable, v.step), (Some(2), Some(1), Some(1)));
        assert_eq!(v.plan.steps, vec![10.0, 50.0, 100.0]);
        let st: Vec<&str> = v.steps.iter().map(|s| s.status).collect();
        assert_eq!(st, ["passed", "running", "pending"]);
        assert_eq!(v.steps[0].started_ms, Some(100));
        assert_eq!(v.steps[1].started_ms, Some(200));
        assert_eq!(v.steps[0].decision.as_ref().unwrap().action, "advance");
        assert_eq!(v.started.as_ref().unwrap().unix_ms, 100);
        assert!(v.ended.is_none());
    }

    #[test]
    fn a_rolled_back_rollout_shows_the_failed_step_and_what_ended_it() {
        let rolled_back = json!({"stable": 1, "rejected": [2]});
        let entries = vec![
            entry("set", json!({"stable": 1}), rolling(0, 10.0, 100), 100),
            entry("advance", rolling(0, 10.0, 100), rolling(1, 50.0, 200), 200),
            entry("rollback", rolling(1, 50.0, 200), rolled_back.clone(), 300),
            entry("set", rolled_back.clone(), json!({"stable": 1}), 400),
        ];
        let now = spec(json!({"stable": 1}));
        let v = timeline("m", &now, &entries, &RolloutPlan::default()).unwrap();
        assert!(!v.running);
        assert_eq!((v.canary, v.stable, v.step), (Some(2), Some(1), None));
        let st: Vec<&str> = v.steps.iter().map(|s| s.status).collect();
        assert_eq!(st, ["passed", "failed", "skipped"]);
        let ended = v.ended.unwrap();
        assert_eq!(ended.action, "rollback");
        assert_eq!(ended.reason, "rollback reason");
    }

    #[test]
    fn a_promoted_rollout_passes_every_step_and_no_rollout_is_none() {
        let entries = vec![
            entry("set", json!({"stable": 1}), rolling(0, 10.0, 100), 100),
            entry("advance", rolling(0, 10.0, 100), rolling(1, 50.0, 200), 200),
            entry(
                "advance",
                rolling(1, 50.0, 200),
                rolling(2, 100.0, 300),
                300,
            ),
            entry("promote", rolling(2, 100.0, 300), json!({"stable": 2}), 400),
        ];
        let now = spec(json!({"stable": 2}));
        let v = timeline("m", &now, &entries, &RolloutPlan::default()).unwrap();
        let st: Vec<&str> = v.steps.iter().map(|s| s.status).collect();
        assert_eq!(st, ["passed", "passed", "passed"]);
        assert_eq!(v.ended.unwrap().action, "promote");
        assert!(timeline("m", &now, &entries[..0], &RolloutPlan::default()).is_none());
    }

    #[test]
    fn a_rollout_older_than_the_audit_log_uses_the_configured_plan_when_none_is_named() {
        let now = spec(
            json!({"stable": 1, "canary": {"version": 2, "weight": 25.0},
                              "rollout": {"step": 1, "step_started_ms": 7}}),
        );
        let v = timeline("m", &now, &[], &RolloutPlan::default()).unwrap();
        assert_eq!(v.plan.steps, RolloutPlan::default().steps);
        let st: Vec<&str> = v.steps.iter().map(|s| s.status).collect();
        assert_eq!(st, ["passed", "running", "pending", "pending"]);
        assert_eq!(v.steps[1].started_ms, Some(7));
        assert!(v.started.is_none());
    }
}

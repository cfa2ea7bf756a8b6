//! Admin side of the API, shared by both protocols: Triton's model repository extension
//! (index, load, unload) and traffic routing (get, set, promote, rollback, audit log).
//! Who may call what is [`super::auth`]'s.

use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::registry::scan;
use crate::routing::control::{self, Action};
use crate::routing::store::AuditEntry;
use crate::routing::{PlanPatch, RolloutPlan, TrafficSpec};
use crate::service::AppState;
use crate::util::blocking;

/// Audit entries an audit call returns when it names no limit.
pub const AUDIT_LIMIT: usize = 100;

/// One row of the repository index.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: &'static str,
    pub reason: String,
    /// The version's model.toml: as loaded for a ready version, as on disk otherwise.
    pub lineage: Option<Arc<crate::lineage::Lineage>>,
}

/// Every model and version the repository holds or serves, with its state: READY,
/// LOADING (files still being written), UNAVAILABLE (failed, with the reason; or
/// `unloaded`: not selected by the version policy, or not loaded in explicit mode).
/// A READY row's reason says when config.toml is not in force or a reload failed.
/// `ready_only` keeps the READY rows.
pub fn repository_index(state: &AppState, ready_only: bool) -> Vec<IndexEntry> {
    let snapshot = state.registry.snapshot();
    let mut rows = Vec::new();
    let entry = |name: &str, version: String, st: &'static str, reason: String| IndexEntry {
        name: name.to_string(),
        version,
        state: st,
        reason,
        lineage: None,
    };
    for (name, model) in &snapshot.models {
        let mut versions: std::collections::BTreeMap<u64, IndexEntry> = Default::default();
        for v in model.versions.keys() {
            // Serving the previous load of a version whose reload failed.
            let reason = model.failed.get(v).map_or_else(String::new, |r| {
                format!("serving the previous load; reloading failed: {r}")
            });
            versions.insert(*v, entry(name, v.to_string(), "READY", reason));
        }
        for (v, r) in &model.pending {
            versions
                .entry(*v)
                .or_insert_with(|| entry(name, v.to_string(), "LOADING", r.clone()));
        }
        for (v, r) in &model.failed {
            versions
                .entry(*v)
                .or_insert_with(|| entry(name, v.to_string(), "UNAVAILABLE", r.clone()));
        }
        for v in &model.unloaded {
            versions
                .entry(*v)
                .or_insert_with(|| entry(name, v.to_string(), "UNAVAILABLE", "unloaded".into()));
        }
        for (v, e) in &mut versions {
            e.lineage = match model.versions.get(v) {
                Some(mv) => mv.lineage.clone(),
                // Not loaded: what its folder says (a broken model.toml shows no lineage;
                // its reason says why).
                None => crate::lineage::Lineage::read(
                    &state.registry.root().join(name).join(v.to_string()),
                )
                .ok()
                .flatten()
                .map(Arc::new),
            };
        }
        if versions.is_empty() {
            rows.push(entry(
                name,
                String::new(),
                "UNAVAILABLE",
                model.failure_summary(),
            ));
        } else if let Some(err) = &model.error {
            // config.toml is not in force: what serves runs under the previous one.
            for e in versions.values_mut().filter(|e| e.state == "READY") {
                e.reason = err.clone();
            }
        }
        rows.extend(versions.into_values());
    }
    // Models on disk that are not loaded (explicit mode, or just appeared).
    if let Ok(on_disk) = scan::model_folders(state.registry.root()) {
        for name in on_disk.iter().filter(|n| !snapshot.models.contains_key(*n)) {
            rows.push(entry(name, String::new(), "UNAVAILABLE", "unloaded".into()));
        }
    }
    if ready_only {
        rows.retain(|r| r.state == "READY");
    }
    rows.sort_by(|a, b| {
        (&a.name, a.version.parse::<u64>().ok()).cmp(&(&b.name, b.version.parse::<u64>().ok()))
    });
    rows
}

/// Loads (or reloads) a model. Blocking work runs off the async threads.
pub async fn load(state: &Arc<AppState>, model: &str) -> Result<()> {
    let registry = Arc::clone(&state.registry);
    let name = model.to_string();
    blocking("load", move || registry.load_model(&name)).await?;
    Ok(())
}

/// Unloads a model (explicit mode only: in poll mode the repository decides).
pub async fn unload(state: &Arc<AppState>, model: &str) -> Result<()> {
    if state.registry.mode() == crate::registry::settings::ControlMode::Poll {
        return Err(Error::invalid(
            "unload needs --model-control-mode explicit; in poll mode, remove the model's folder",
        ));
    }
    let registry = Arc::clone(&state.registry);
    let name = model.to_string();
    blocking("unload", move || registry.unload_model(&name)).await?;
    Ok(())
}

/// A model's routing as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingView {
    pub model: String,
    /// The routing state (routing.toml).
    pub routing: TrafficSpec,
    /// The version unpinned requests go to now (unless routed to the canary).
    pub effective_stable: Option<u64>,
    /// Versions ready to serve.
    pub ready_versions: Vec<u64>,
    /// Why routing.toml is not in force, when it is not.
    pub routing_error: Option<String>,
}

/// The routing of `model` now.
pub fn traffic_get(state: &AppState, model: &str) -> Result<RoutingView> {
    let snapshot = state.registry.snapshot();
    let m = snapshot.model(model)?;
    Ok(RoutingView {
        model: m.name.clone(),
        routing: m.routing.clone(),
        effective_stable: m.stable,
        ready_versions: m.versions.keys().copied().collect(),
        routing_error: m.routing_error.clone(),
    })
}

/// What an admin call changes.
// One value per admin call, moved once: a box would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Change {
    /// A routing state; a rollout's plan, when named, as a patch over the configured one.
    Set {
        spec: TrafficSpec,
        plan: Option<PlanPatch>,
    },
    Promote,
    Rollback,
}

/// The state a [`Change::Set`] asks for: its rollout's plan patch laid over the model's
/// configured plan (a rollout named without a plan gets the configured plan later, in
/// `control`).
pub fn planned(
    mut spec: TrafficSpec,
    plan: Option<PlanPatch>,
    configured: &RolloutPlan,
) -> TrafficSpec {
    if let (Some(patch), Some(r)) = (plan, spec.rollout.as_mut()) {
        r.plan = Some(patch.over(configured));
    }
    spec
}

/// Reads a routing change from JSON (the HTTP body `modelgate ctl` sends too): the
/// state, and a rollout's plan as a patch (fields left out come from the model's
/// configured plan when the change is applied).
pub fn change_from_json(body: &[u8]) -> Result<Change> {
    let malformed = |e: serde_json::Error| Error::invalid(format!("malformed traffic JSON: {e}"));
    let mut v: serde_json::Value = serde_json::from_slice(body).map_err(malformed)?;
    let plan =
        match v
            .get_mut("rollout")
            .and_then(serde_json::Value::as_object_mut)
            .and_then(|r| r.remove("plan"))
        {
            None | Some(serde_json::Value::Null) => None,
            Some(p) => Some(serde_json::from_value(p).map_err(|e| {
                Error::invalid(format!("malformed traffic JSON: rollout.plan: {e}"))
            })?),
        };
    let spec = serde_json::from_value(v).map_err(malformed)?;
    Ok(Change::Set { spec, plan })
}

/// Applies a routing change (off the async threads: it may load versions) and returns
/// the routing after it.
pub async fn traffic_change(
    state: &Arc<AppState>,
    model: &str,
    actor: &str,
    change: Change,
    reason: &str,
) -> Result<RoutingView> {
    let (st, name, actor, reason) = (
        Arc::clone(state),
        model.to_string(),
        actor.to_string(),
        reason.to_string(),
    );
    blocking("routing change", move || {
        let (action, default_reason) = match &change {
            Change::Set { .. } => (Action::Set, "set by an operator"),
            Change::Promote => (Action::Promote, "promoted by an operator"),
            Change::Rollback => (Action::Rollback, "rolled back by an operator"),
        };
        let reason = if reason.is_empty() {
            default_reason
        } else {
            &reason
        };
        control::apply(
            &st.registry,
            &st.control,
            &name,
            &actor,
            action,
            reason,
            |now, model| match change {
                Change::Set { spec, plan } => Ok(planned(spec, plan, &model.traffic.rollout)),
                Change::Promote => control::promoted(now),
                Change::Rollback => control::rolled_back(now),
            },
        )
    })
    .await?;
    traffic_get(state, model)
}

/// The newest audit entries (at most `limit`, oldest first), optionally of one model.
pub async fn audit(
    state: &Arc<AppState>,
    model: Option<String>,
    limit: usize,
) -> Result<Vec<AuditEntry>> {
    let st = Arc::clone(state);
    blocking("audit read", move || {
        st.control.audit.read(model.as_deref(), limit)
    })
    .await
}

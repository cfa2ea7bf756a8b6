//! Changing a model's routing: the one path the admin API (both protocols), the CLI
//! (through the API), the rollout controller and automatic entry of new versions share.
//!
//! A change is validated against the spec's rules and against the repository (every
//! version it names must load and be ready: a version not loaded yet is loaded first),
//! then written to `routing.toml` atomically and recorded in the audit log, then
//! published by reconciling the model. If any step fails, nothing changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::judge::Analysis;
use super::store::{self, AuditEntry, AuditLog};
use super::{Canary, NewVersions, RolloutState, Shadow, TrafficSpec};
use crate::error::{Error, Result};
use crate::metrics;
use crate::registry::{Model, Registry};
use serde::{Deserialize, Serialize};

/// Server-wide traffic settings (per-model ones are in each config.toml's `[traffic]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrafficConfig {
    /// Shadow and comparison runs in flight at most; more are shed (and counted).
    /// 0 = half the cores, at least 1.
    pub mirror_max_inflight: usize,
    /// Longest a mirrored run may wait in its queue, in milliseconds.
    pub mirror_timeout_ms: u64,
    /// The audit log of routing changes; default `<model_repository>/audit.jsonl`.
    pub audit_log: Option<PathBuf>,
    /// This replica runs rollouts and enters new versions as canary or shadow. With
    /// several replicas on one registry and `analysis.source = "prometheus"` every
    /// replica may (they reach the same verdicts and write each once); with local
    /// analysis, set it on one of them only.
    pub controller: bool,
    /// How often the rollout controller looks, in milliseconds.
    pub controller_tick_ms: u64,
    /// Where a step's figures come from (`[traffic.analysis]`).
    pub analysis: super::analysis::AnalysisConfig,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        TrafficConfig {
            mirror_max_inflight: 0,
            mirror_timeout_ms: 1000,
            audit_log: None,
            controller: true,
            controller_tick_ms: 1000,
            analysis: super::analysis::AnalysisConfig::default(),
        }
    }
}

impl TrafficConfig {
    /// Checks the values; the message names the field.
    pub fn validate(&self) -> Result<()> {
        if self.mirror_max_inflight > 4096 {
            return Err(Error::Config(
                "traffic.mirror_max_inflight: at most 4096".into(),
            ));
        }
        if self.controller_tick_ms == 0 || self.controller_tick_ms > 3_600_000 {
            return Err(Error::Config(
                "traffic.controller_tick_ms: must be between 1 and 3600000".into(),
            ));
        }
        self.analysis.validate()
    }

    /// The mirror budget with the automatic value resolved.
    pub fn mirror_inflight(&self) -> usize {
        match self.mirror_max_inflight {
            0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            n => n,
        }
    }

    /// Where the audit log is.
    pub fn audit_path(&self, repository: &Path) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| repository.join("audit.jsonl"))
    }
}

/// Routing-wide state of a running server.
pub struct Control {
    pub audit: AuditLog,
    /// Shadow and comparison runs in flight at most; beyond, mirrors are shed.
    pub mirror_budget: Arc<tokio::sync::Semaphore>,
    /// How long a mirrored run may wait in its queue before it is dropped.
    pub mirror_timeout: Duration,
    /// This replica runs rollouts and enters new versions (one replica should).
    pub controller: bool,
    /// One change at a time: each reads the state the previous one left.
    change: Mutex<()>,
}

impl Control {
    pub fn new(
        audit: AuditLog,
        mirror_inflight: usize,
        mirror_timeout: Duration,
        controller: bool,
    ) -> Control {
        Control {
            audit,
            mirror_budget: Arc::new(tokio::sync::Semaphore::new(mirror_inflight)),
            mirror_timeout,
            controller,
            change: Mutex::new(()),
        }
    }
}

/// What a change does (the audit log's `action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Replace the routing state (admin PUT).
    Set,
    /// The canary becomes stable.
    Promote,
    /// The canary's weight goes to 0 and it is marked rejected.
    Rollback,
    /// A rollout moves to its next step.
    Advance,
    /// A newly published version enters as canary or shadow.
    Enter,
    /// Prometheus could not answer for a step: counted, nothing else changes.
    Inconclusive,
    /// Too many inconclusive looks: the rollout stops being judged.
    Pause,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Set => "set",
            Action::Promote => "promote",
            Action::Rollback => "rollback",
            Action::Advance => "advance",
            Action::Enter => "enter",
            Action::Inconclusive => "inconclusive",
            Action::Pause => "pause",
        }
    }
}

/// Applies a change to `model`'s routing. `change` computes the new spec from the
/// current one. Blocking (it may load versions): call it off the async threads.
pub fn apply(
    registry: &Registry,
    control: &Control,
    model: &str,
    actor: &str,
    action: Action,
    reason: &str,
    change: impl FnOnce(&TrafficSpec, &Model) -> Result<TrafficSpec>,
) -> Result<TrafficSpec> {
    apply_with_analysis(
        registry, control, model, actor, action, reason, None, change,
    )
}

/// [`apply`], recording in the audit entry the analysis a rollout verdict stood on.
#[allow(clippy::too_many_arguments)]
pub fn apply_with_analysis(
    registry: &Registry,
    control: &Control,
    model: &str,
    actor: &str,
    action: Action,
    reason: &str,
    analysis: Option<Analysis>,
    change: impl FnOnce(&TrafficSpec, &Model) -> Result<TrafficSpec>,
) -> Result<TrafficSpec> {
    let _one = control
        .change
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let snapshot = registry.snapshot();
    let current = snapshot.model(model)?;
    let dir = registry.root().join(model);
    // Other replicas write this file too: one writer at a time across processes (a
    // kernel lock on a file beside it, released if its holder dies), and the state on
    // disk, not this replica's snapshot of it, is what the change is made over.
    let _file = lock_routing(&dir)?;
    let before = match store::read(&dir) {
        Ok(Some(on_disk)) => on_disk,
        Ok(None) => TrafficSpec::default(),
        // A file that does not parse is not in force: the snapshot's routing is.
        Err(_) => current.routing.clone(),
    };
    let mut after = change(&before, current)?;
    normalize(&mut after, current, &before);
    after.generation = before.generation;
    after.validate()?;
    if after == before {
        return Ok(after);
    }
    after.generation = before.generation + 1;
    drop(snapshot);
    // Every named version must be ready, and the routing in force must stay as it is
    // until the change is written and audited: a watcher that saw the new routing.toml
    // before an audit failure put the old one back would otherwise apply it.
    let hold = registry.hold(model, after.versions())?;
    let written = store::write(&dir, &after).and_then(|()| {
        let entry = AuditEntry::now(actor, model, action.as_str(), &before, &after, reason)
            .with_analysis(analysis)
            .with_lineage(&dir);
        control.audit.append(&entry).inspect_err(|_| {
            // Unaudited changes are not allowed: put the old state back.
            if let Err(e) = store::write(&dir, &before) {
                tracing::error!(model, error = %e, "cannot restore routing.toml after an audit failure");
            }
        })
    });
    let refreshed = hold.release();
    written?;
    refreshed?;
    tracing::info!(
        model,
        actor,
        action = action.as_str(),
        reason,
        "routing changed"
    );
    match action {
        Action::Promote => metrics::count_promotion(model),
        Action::Rollback => metrics::count_rollback(model),
        _ => {}
    }
    Ok(after)
}

/// Takes the cross-process lock of a model's routing file (`<model>/.routing.lock`,
/// `flock`): held until the returned file is dropped.
fn lock_routing(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join(".routing.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    f.lock()
        .map_err(|e| Error::Unavailable(format!("cannot lock {}: {e}", path.display())))?;
    Ok(f)
}

/// Fills in what a change may leave out: the stable version (the one serving now), a
/// new rollout's plan (the model's configured plan), start time and weight.
fn normalize(spec: &mut TrafficSpec, model: &Model, before: &TrafficSpec) {
    if spec.stable.is_none() && (spec.canary.is_some() || !spec.shadows.is_empty()) {
        spec.stable = model.stable;
    }
    // A version that serves as stable is no longer a rejected one.
    let stable = spec.stable;
    spec.rejected.retain(|&v| Some(v) != stable);
    let now = crate::util::now_ms();
    let canary_version = spec.canary.as_ref().map(|c| c.version);
    if let Some(r) = spec.rollout.as_mut() {
        let plan = r
            .plan
            .get_or_insert_with(|| model.traffic.rollout.clone())
            .clone();
        let continuing = before.rollout.as_ref().is_some_and(|b| {
            b.step == r.step && before.canary.as_ref().map(|c| c.version) == canary_version
        });
        if r.step_started_ms == 0 || !continuing && r.step_started_ms > now {
            r.step_started_ms = now;
        }
        // The same canary's rollout keeps its beginning through step changes and edits.
        let began = before
            .rollout
            .as_ref()
            .filter(|_| before.canary.as_ref().map(|c| c.version) == canary_version)
            .map_or(0, |b| b.started_ms);
        if r.started_ms == 0 || r.started_ms > now {
            r.started_ms = if began > 0 && began <= r.step_started_ms {
                began
            } else {
                r.step_started_ms
            };
        }
        if let (Some(c), Some(&w)) = (spec.canary.as_mut(), plan.steps.get(r.step)) {
            c.weight = w;
        }
    }
}

/// The change `promote` makes: the canary becomes stable.
pub fn promoted(spec: &TrafficSpec) -> Result<TrafficSpec> {
    let c = spec
        .canary
        .as_ref()
        .ok_or_else(|| Error::invalid("there is no canary to promote"))?;
    let mut after = spec.clone();
    after.stable = Some(c.version);
    after.canary = None;
    after.rollout = None;
    after.shadows.retain(|s| s.version != c.version);
    Ok(after)
}

/// The change `rollback` makes: the canary gets no traffic and is marked rejected.
pub fn rolled_back(spec: &TrafficSpec) -> Result<TrafficSpec> {
    let c = spec
        .canary
        .as_ref()
        .ok_or_else(|| Error::invalid("there is no canary to roll back"))?;
    let mut after = spec.clone();
    let v = c.version;
    after.canary = Some(Canary {
        version: v,
        weight: 0.0,
    });
    after.rollout = None;
    if !after.rejected.contains(&v) {
        after.rejected.push(v);
    }
    Ok(after)
}

/// Automatic entry: the change that makes a newly published version canary or shadow
/// under the model's `new_versions` policy, or `None` when there is nothing to do.
pub fn entry_for(model: &Model) -> Option<(TrafficSpec, String)> {
    let policy = model.traffic.new_versions;
    if policy == NewVersions::Serve {
        return None;
    }
    let stable = model.stable?;
    let (&newest, _) = model.versions.iter().next_back()?;
    let spec = &model.routing;
    if newest <= stable
        || spec.rejected.contains(&newest)
        || spec.canary.as_ref().is_some_and(|c| c.version >= newest)
        || spec.shadows.iter().any(|s| s.version == newest)
    {
        return None;
    }
    let mut after = spec.clone();
    after.stable = Some(stable);
    match policy {
        NewVersions::Canary => {
            if spec.live_canary().is_some() || spec.rollout.is_some() {
                // One rollout at a time: the newer version waits for this one to end.
                return None;
            }
            after.canary = Some(Canary {
                version: newest,
                weight: model.traffic.rollout.steps.first().copied().unwrap_or(0.0),
            });
            after.rollout = Some(RolloutState {
                plan: Some(model.traffic.rollout.clone()),
                ..RolloutState::default()
            });
        }
        NewVersions::Shadow => after.shadows.push(Shadow {
            version: newest,
            percent: model.traffic.shadow_percent,
        }),
        NewVersions::Serve => return None,
    }
    Some((
        after,
        format!("version {newest} was published (new_versions = {policy:?})").to_lowercase(),
    ))
}

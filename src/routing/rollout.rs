//! Automated rollout, in process: the controller task that judges each rollout step
//! (through [`judge`], a pure function, over the per-version
//! [counters](super::counters)), then advances, promotes or rolls back, and enters
//! newly published versions.
//!
//! The controller keeps a copy of the counters from the start of each step and judges
//! the difference. It looks at every tick: before the interval ends only a breach that
//! is already certain acts; at its end every criterion is tested once, and a step short
//! of data waits.
//!
//! The quality criteria read the labelled rows (joined feedback) of both arms since the
//! rollout began, from the capture writer's published counts ([`QualityReader`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::TrafficSpec;
use super::analysis::{self, AnalysisConfig, LookAt};
use super::control::{self, Action};
use super::counters::Counts;
use super::judge::{self, Analysis, Labelled, Latency, StepFigures, Verdict};
use crate::capture::{QualityReader, quality::QualityStatus};
use crate::error::Error;
use crate::registry::{Model, ModelVersion, Registry};

/// Where the controller stands with one model's rollout step.
struct Baseline {
    canary_version: u64,
    step: usize,
    /// Which loaded instance the counts belong to (a reload starts them over).
    canary_ptr: usize,
    stable_ptr: usize,
    canary: Counts,
    stable: Counts,
    /// Stable's latency over the latest step that measured it, and that step: the
    /// reference of a 100 % step, where stable gets no traffic.
    reference: Option<(Latency, usize)>,
    /// The step's wait for data was logged (once per step, not every tick).
    wait_logged: bool,
    /// The labelled rows of canary and stable when the rollout of this canary began
    /// (here: when this controller first saw it); `None` when capture is off.
    labelled: Option<(Labelled, Labelled)>,
}

/// One variant's labelled rows as the judge counts them.
fn labelled(q: Option<QualityStatus>) -> Labelled {
    q.map_or_else(Labelled::default, |q| Labelled {
        class_rows: q.class_rows,
        correct: q.correct,
        value_rows: q.rows.saturating_sub(q.class_rows),
        abs_sum: q.abs_error_sum,
        sq_sum: q.sq_error_sum,
    })
}

fn ptr(mv: &Arc<ModelVersion>) -> usize {
    Arc::as_ptr(mv) as usize
}

/// A change the controller makes, with why and the analysis it stood on.
struct Decision {
    action: Action,
    spec: TrafficSpec,
    reason: String,
    analysis: Option<Analysis>,
}

/// The controller: every tick, judges each rollout and enters new versions.
pub async fn run(
    registry: Arc<Registry>,
    control: Arc<control::Control>,
    tick: Duration,
    analysis: AnalysisConfig,
    quality: Option<QualityReader>,
    shutdown: CancellationToken,
) {
    let client = match analysis.client() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "rollout controller not started");
            return;
        }
    };
    let mut looked: HashMap<String, (u64, LookAt)> = HashMap::new();
    let mut baselines: HashMap<String, Baseline> = HashMap::new();
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let snapshot = registry.snapshot();
        baselines.retain(|name, _| {
            snapshot
                .models
                .get(name)
                .is_some_and(|m| m.routing.rollout.is_some())
        });
        for (name, model) in &snapshot.models {
            let paused = model.routing.rollout.as_ref().is_some_and(|r| r.paused);
            let decision = if paused {
                None
            } else if let (Some(client), Some(_)) = (&client, &model.routing.rollout) {
                fleet_decision(model, client, &analysis, &mut looked).await
            } else if model.routing.rollout.is_some() {
                step_decision(model, &mut baselines, quality.as_ref())
            } else {
                control::entry_for(model).map(|(spec, reason)| Decision {
                    action: Action::Enter,
                    spec,
                    reason,
                    analysis: None,
                })
            };
            let Some(Decision {
                action,
                spec,
                reason,
                analysis,
            }) = decision
            else {
                continue;
            };
            if action != Action::Advance {
                baselines.remove(name);
            }
            let judged = model.routing.clone();
            let (registry, control, name, reason_log) = (
                Arc::clone(&registry),
                Arc::clone(&control),
                name.clone(),
                reason.clone(),
            );
            let result = crate::util::blocking("rollout action", move || {
                control::apply_with_analysis(
                    &registry,
                    &control,
                    &name,
                    "auto",
                    action,
                    &reason,
                    analysis,
                    move |now, _| {
                        // Only if nobody changed the routing since it was judged.
                        if *now == judged {
                            Ok(spec)
                        } else {
                            Err(Error::invalid("routing changed meanwhile"))
                        }
                    },
                )
            })
            .await;
            if let Err(e) = result {
                tracing::warn!(model = %model.name, action = action.as_str(), reason = %reason_log, error = %e, "rollout action not applied");
            }
        }
    }
}

/// Judges a model's rollout step against its baseline (taken when the step was first
/// seen). Returns the change to make, if any.
fn step_decision(
    model: &Model,
    baselines: &mut HashMap<String, Baseline>,
    quality: Option<&QualityReader>,
) -> Option<Decision> {
    let spec = &model.routing;
    let rollout = spec.rollout.as_ref()?;
    // A hand-written rollout may leave the plan out: the model's configured plan.
    let plan = rollout.plan.as_ref().unwrap_or(&model.traffic.rollout);
    let canary = spec.canary.as_ref()?;
    let Some(canary_mv) = model.versions.get(&canary.version) else {
        return failed_canary(model, canary.version);
    };
    let stable_mv = model.stable.and_then(|v| model.versions.get(&v))?;
    let now = (canary_mv.counters.read(), stable_mv.counters.read());
    let labelled_now = quality.filter(|_| model.capture.enabled).map(|q| {
        (
            labelled(q.status(&model.name, canary.version, "canary")),
            labelled(q.status(&model.name, stable_mv.version, "stable")),
        )
    });
    let fresh = |b: &Baseline| {
        b.canary_version == canary.version
            && b.step == rollout.step
            && b.canary_ptr == ptr(canary_mv)
            && b.stable_ptr == ptr(stable_mv)
    };
    match baselines.get(&model.name) {
        Some(b) if fresh(b) => {}
        _ => {
            // The reference and the labelled rows' start survive from step to step of
            // the same canary.
            let (reference, labelled_start) = baselines
                .remove(&model.name)
                .filter(|b| b.canary_version == canary.version)
                .map_or((None, None), |b| (b.reference, b.labelled));
            baselines.insert(
                model.name.clone(),
                Baseline {
                    canary_version: canary.version,
                    step: rollout.step,
                    canary_ptr: ptr(canary_mv),
                    stable_ptr: ptr(stable_mv),
                    canary: now.0,
                    stable: now.1,
                    reference,
                    wait_logged: false,
                    labelled: labelled_start.or(labelled_now),
                },
            );
            return None;
        }
    }
    let base = baselines.get_mut(&model.name)?;
    let canary_arm = now.0.since(&base.canary);
    let stable_window = now.1.since(&base.stable);
    let stable_arm = stable_window.arm();
    let compared = canary_arm.compared();
    let full = canary.weight >= 100.0;
    // At 100 % stable only gets requests that name it: compare with an earlier step.
    let reference = if full {
        base.reference.as_ref().map(|(l, s)| (l, *s))
    } else {
        Some((&stable_arm.latency, rollout.step))
    };
    if base.labelled.is_none() {
        // Capture was turned on during the rollout: count from now.
        base.labelled = labelled_now;
    }
    let labelled_rows = labelled_now
        .zip(base.labelled)
        .map(|(now, start)| (now.0.since(&start.0), now.1.since(&start.1)));
    let started = SystemTime::UNIX_EPOCH + Duration::from_millis(rollout.step_started_ms);
    let elapsed = SystemTime::now()
        .duration_since(started)
        .unwrap_or(Duration::ZERO);
    let judgement = judge::judge(
        plan,
        &StepFigures {
            step: rollout.step,
            elapsed,
            canary: &canary_arm.arm(),
            stable: &stable_arm,
            reference,
            compared: model.traffic.compare_canary.then_some(&compared),
            labelled: labelled_rows.as_ref().map(|(c, s)| (c, s)),
        },
    );
    let reason = judgement.reason(plan.steps.len());
    let decision = |action, spec| {
        Some(Decision {
            action,
            spec,
            reason: reason.clone(),
            analysis: Some(judgement.analysis.clone()),
        })
    };
    match judgement.verdict {
        Verdict::Wait => {
            if judgement.analysis.look == judge::Look::End && !base.wait_logged {
                base.wait_logged = true;
                tracing::info!(model = %model.name, canary = canary.version, %reason, "rollout step waits for data");
            }
            None
        }
        Verdict::Rollback => decision(Action::Rollback, control::rolled_back(spec).ok()?),
        Verdict::Promote => decision(Action::Promote, control::promoted(spec).ok()?),
        Verdict::Advance => {
            if !full {
                base.reference = Some((stable_arm.latency.clone(), rollout.step));
            }
            let mut next = spec.clone();
            let r = next.rollout.as_mut()?;
            r.step += 1;
            r.reference_start_ms = r.step_started_ms;
            r.step_started_ms = crate::util::now_ms();
            let weight = *plan.steps.get(r.step)?;
            next.canary.as_mut()?.weight = weight;
            Some(Decision {
                action: Action::Advance,
                spec: next,
                reason: format!("{reason}; weight now {weight}"),
                analysis: Some(judgement.analysis.clone()),
            })
        }
    }
}

/// The rollback of a canary whose version failed to load (None while it is loading).
fn failed_canary(model: &Model, version: u64) -> Option<Decision> {
    let why = model.failed.get(&version)?;
    Some(Decision {
        action: Action::Rollback,
        spec: control::rolled_back(&model.routing).ok()?,
        reason: format!("canary version {version} is not ready: {why}"),
        analysis: None,
    })
}

/// Judges a model's rollout step from the fleet's figures in Prometheus: the window is
/// a function of the step's state in routing.toml ([`analysis::look_at`]), so every
/// replica that judges it reaches the same verdict and proposes the same file.
/// `looked` keeps the last window judged per model, so a window is asked once.
async fn fleet_decision(
    model: &Model,
    client: &crate::promql::Client,
    cfg: &AnalysisConfig,
    looked: &mut HashMap<String, (u64, LookAt)>,
) -> Option<Decision> {
    let spec = &model.routing;
    let rollout = spec.rollout.as_ref()?;
    let plan = rollout.plan.as_ref().unwrap_or(&model.traffic.rollout);
    let canary = spec.canary.as_ref()?;
    // Not loaded here yet is no verdict: the other replicas may serve it already.
    if !model.versions.contains_key(&canary.version)
        && let Some(rollback) = failed_canary(model, canary.version)
    {
        return Some(rollback);
    }
    let stable = spec.stable.or(model.stable)?;
    let now = crate::util::now_ms();
    let interval_ms = (plan.interval_secs * 1000.0) as u64;
    let settle_ms = cfg.settle().as_millis() as u64;
    let scrape_ms = (cfg.scrape_interval_secs * 1000.0) as u64;
    let look = analysis::look_at(
        rollout.step_started_ms,
        interval_ms,
        settle_ms,
        2 * scrape_ms,
        now,
    )?;
    // An early look at most once a scrape interval; a closed window once (a step that
    // waits for data is looked at again one interval later, a new window).
    if let Some((generation, last)) = looked.get(&model.name)
        && *generation == spec.generation
        && (*last == look
            || (!look.closed && !last.closed && look.end_ms < last.end_ms + scrape_ms))
    {
        return None;
    }
    if look.closed
        && rollout.inconclusive > 0
        && now < rollout.inconclusive_ms + (cfg.retry_secs * 1000.0) as u64
    {
        return None;
    }
    let full = canary.weight >= 100.0;
    let window = analysis::Window {
        model: &model.name,
        canary: canary.version,
        stable,
        start_ms: rollout.step_started_ms,
        end_ms: look.end_ms,
        previous_interval_ms: (full && rollout.step > 0).then(|| {
            let since = rollout.reference_start_ms;
            if since > 0 && since < rollout.step_started_ms {
                rollout.step_started_ms - since
            } else {
                interval_ms
            }
        }),
        // Labelled rows count from the rollout's beginning, as the local judge's do.
        labelled_since_ms: model.capture.enabled.then(|| {
            let began = rollout.started_ms;
            if began > 0 && began <= rollout.step_started_ms {
                began
            } else {
                rollout.step_started_ms
            }
        }),
    };
    let figures = match analysis::fleet_figures(client, cfg, &window).await {
        Ok(f) => f,
        Err(e) => {
            crate::metrics::count_rollout_inconclusive(
                &model.name,
                if look.closed { "end" } else { "early" },
            );
            if !look.closed {
                tracing::debug!(model = %model.name, error = %e, "early look at the rollout step inconclusive");
                return None;
            }
            tracing::warn!(model = %model.name, canary = canary.version, step = rollout.step + 1, error = %e, "rollout step inconclusive: Prometheus did not answer");
            let mut next = spec.clone();
            let r = next.rollout.as_mut()?;
            r.inconclusive += 1;
            r.inconclusive_ms = now;
            let pause = r.inconclusive >= cfg.max_inconclusive;
            r.paused = pause;
            let looks = r.inconclusive;
            return Some(Decision {
                action: if pause {
                    Action::Pause
                } else {
                    Action::Inconclusive
                },
                spec: next,
                reason: if pause {
                    format!(
                        "step {} inconclusive {looks} times (at most {}): rollout paused: {e}",
                        rollout.step + 1,
                        cfg.max_inconclusive
                    )
                } else {
                    format!(
                        "step {} inconclusive ({looks} of {}), retried in {} s: {e}",
                        rollout.step + 1,
                        cfg.max_inconclusive,
                        cfg.retry_secs
                    )
                },
                analysis: None,
            });
        }
    };
    looked.insert(model.name.clone(), (spec.generation, look));
    let reference = if full {
        figures
            .previous_stable
            .as_ref()
            .map(|l| (l, rollout.step.saturating_sub(1)))
    } else {
        Some((&figures.stable.latency, rollout.step))
    };
    let elapsed = Duration::from_millis(look.end_ms.saturating_sub(rollout.step_started_ms));
    let mut judgement = judge::judge(
        plan,
        &StepFigures {
            step: rollout.step,
            elapsed,
            canary: &figures.canary,
            stable: &figures.stable,
            reference,
            compared: model.traffic.compare_canary.then_some(&figures.compared),
            labelled: figures.labelled.as_ref().map(|(c, s)| (c, s)),
        },
    );
    judgement.analysis.fleet = Some(judge::FleetWindow {
        replicas: figures.replicas,
        start_ms: rollout.step_started_ms,
        end_ms: look.end_ms,
    });
    let reason = format!(
        "{} (fleet: {} replicas, Prometheus)",
        judgement.reason(plan.steps.len()),
        figures.replicas
    );
    let analysis = Some(judgement.analysis.clone());
    match judgement.verdict {
        Verdict::Wait => {
            if look.closed {
                tracing::info!(model = %model.name, canary = canary.version, %reason, "rollout step waits for data");
            }
            None
        }
        Verdict::Rollback => Some(Decision {
            action: Action::Rollback,
            spec: control::rolled_back(spec).ok()?,
            reason,
            analysis,
        }),
        Verdict::Promote => Some(Decision {
            action: Action::Promote,
            spec: control::promoted(spec).ok()?,
            reason,
            analysis,
        }),
        Verdict::Advance => {
            let mut next = spec.clone();
            let r = next.rollout.as_mut()?;
            r.step += 1;
            // The next step starts where the judged window ended: the same on every
            // replica, so all of them propose the same file.
            r.reference_start_ms = rollout.step_started_ms;
            r.step_started_ms = look.end_ms;
            r.inconclusive = 0;
            r.inconclusive_ms = 0;
            let weight = *plan.steps.get(r.step)?;
            next.canary.as_mut()?.weight = weight;
            Some(Decision {
                action: Action::Advance,
                spec: next,
                reason: format!("{reason}; weight now {weight}"),
                analysis,
            })
        }
    }
}

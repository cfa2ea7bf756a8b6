//! Automated rollout, in process: per-version traffic counters, and the controller task
//! that judges each rollout step (through [`judge`](super::judge), a pure function),
//! then advances, promotes or rolls back, and enters newly published versions.
//!
//! The counters are cumulative on each [`ModelVersion`]: atomics for counts, and an
//! hdrhistogram of microseconds (2 significant digits: buckets under 1 % wide, finer
//! than any threshold a plan sets) behind one uncontended lock, so the request path
//! stays cheap. The controller keeps a copy from the start of each step and judges the
//! difference. It looks at every tick: before the interval ends only a breach that is
//! already certain acts; at its end every criterion is tested once, and a step short of
//! data waits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;
use tokio_util::sync::CancellationToken;

use super::compare::Comparison;
use super::control::{self, Action};
use super::judge::{self, Analysis, Arm, Compared, Latency, StepFigures, Verdict};
use super::{TrafficSpec, store};
use crate::error::Error;
use crate::registry::{Model, ModelVersion};
use crate::service::AppState;

/// The longest latency told apart (100 s, in microseconds); longer ones count as it.
const MAX_LATENCY_US: u64 = 100_000_000;

/// An empty latency histogram: microseconds, 2 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("constant bounds are valid")
}

/// Cumulative counters of one version, recorded on the request path.
pub struct TrafficCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Latency of successful requests.
    latency: Mutex<Histogram<u64>>,
    compared_rows: AtomicU64,
    disagreed_rows: AtomicU64,
    /// Sum of absolute differences, in billionths.
    abs_diff_nano: AtomicU64,
    compared_values: AtomicU64,
}

impl Default for TrafficCounters {
    fn default() -> Self {
        TrafficCounters {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: Mutex::new(new_histogram()),
            compared_rows: AtomicU64::new(0),
            disagreed_rows: AtomicU64::new(0),
            abs_diff_nano: AtomicU64::new(0),
            compared_values: AtomicU64::new(0),
        }
    }
}

/// Whether an error counts against a version: failures of the server or the model, not
/// of the request (a bad request or a client's short deadline says nothing of it).
pub fn counts_against(e: &Error) -> bool {
    match e {
        Error::Inference(_) | Error::Internal(_) => true,
        Error::InvalidRequest(_)
        | Error::PayloadTooLarge { .. }
        | Error::NotFound(_)
        | Error::Unavailable(_)
        | Error::Overloaded { .. }
        | Error::DeadlineExceeded(_)
        | Error::ClientTimeout(_)
        | Error::Unauthenticated(_)
        | Error::Forbidden(_)
        | Error::Config(_) => false,
    }
}

impl TrafficCounters {
    /// Records a request this version answered (or failed).
    pub fn record(&self, total: Duration, failed: bool) {
        self.requests.fetch_add(1, Relaxed);
        if failed {
            self.errors.fetch_add(1, Relaxed);
        } else {
            let us = u64::try_from(total.as_micros()).unwrap_or(u64::MAX).max(1);
            // A panic elsewhere while holding the lock left whole counts behind: go on.
            self.latency
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .saturating_record(us);
        }
    }

    /// Records a comparison of this version's answer with stable's.
    pub fn record_comparison(&self, c: &Comparison) {
        self.compared_rows.fetch_add(c.rows, Relaxed);
        self.disagreed_rows.fetch_add(c.disagreed_rows, Relaxed);
        let nano = (c.abs_diff_sum * 1e9).clamp(0.0, 1e18) as u64;
        self.abs_diff_nano.fetch_add(nano, Relaxed);
        self.compared_values.fetch_add(c.values, Relaxed);
    }

    /// A copy of the counters now.
    pub fn read(&self) -> Counts {
        let latency = self
            .latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Counts {
            requests: self.requests.load(Relaxed),
            errors: self.errors.load(Relaxed),
            latency,
            compared_rows: self.compared_rows.load(Relaxed),
            disagreed_rows: self.disagreed_rows.load(Relaxed),
            abs_diff_nano: self.abs_diff_nano.load(Relaxed),
            compared_values: self.compared_values.load(Relaxed),
        }
    }
}

/// Counter values at one moment, or the difference over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
    /// Latency of successful requests, microseconds.
    pub latency: Histogram<u64>,
    pub compared_rows: u64,
    pub disagreed_rows: u64,
    pub abs_diff_nano: u64,
    pub compared_values: u64,
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            requests: 0,
            errors: 0,
            latency: new_histogram(),
            compared_rows: 0,
            disagreed_rows: 0,
            abs_diff_nano: 0,
            compared_values: 0,
        }
    }
}

impl Counts {
    /// What happened between `base` and `self` (the same counters, later).
    pub fn since(&self, base: &Counts) -> Counts {
        let mut latency = self.latency.clone();
        if latency.subtract(&base.latency).is_err() {
            // Not a later reading of the same counters: nothing to tell from it.
            latency = new_histogram();
        }
        Counts {
            requests: self.requests.saturating_sub(base.requests),
            errors: self.errors.saturating_sub(base.errors),
            latency,
            compared_rows: self.compared_rows.saturating_sub(base.compared_rows),
            disagreed_rows: self.disagreed_rows.saturating_sub(base.disagreed_rows),
            abs_diff_nano: self.abs_diff_nano.saturating_sub(base.abs_diff_nano),
            compared_values: self.compared_values.saturating_sub(base.compared_values),
        }
    }

    /// The judge's view of one arm.
    pub fn arm(&self) -> Arm {
        Arm {
            requests: self.requests,
            errors: self.errors,
            latency: Latency::from_hdr(&self.latency),
        }
    }

    /// The judge's view of the comparisons.
    pub fn compared(&self) -> Compared {
        Compared {
            rows: self.compared_rows,
            disagreed_rows: self.disagreed_rows,
            values: self.compared_values,
            abs_diff_sum: self.abs_diff_nano as f64 / 1e9,
        }
    }
}

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
pub async fn run(state: Arc<AppState>, tick: Duration, shutdown: CancellationToken) {
    let mut baselines: HashMap<String, Baseline> = HashMap::new();
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let snapshot = state.registry.snapshot();
        baselines.retain(|name, _| {
            snapshot
                .models
                .get(name)
                .is_some_and(|m| m.routing.rollout.is_some())
        });
        for (name, model) in &snapshot.models {
            let decision = if model.routing.rollout.is_some() {
                step_decision(model, &mut baselines)
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
            let (st, name, reason_log) = (Arc::clone(&state), name.clone(), reason.clone());
            let result = tokio::task::spawn_blocking(move || {
                control::apply_with_analysis(
                    &st.registry,
                    &st.traffic,
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
            match result {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(model = %model.name, action = action.as_str(), reason = %reason_log, error = %e, "rollout action not applied");
                }
                Err(e) => tracing::error!(error = %e, "rollout action task failed"),
            }
        }
    }
}

/// Judges a model's rollout step against its baseline (taken when the step was first
/// seen). Returns the change to make, if any.
fn step_decision(model: &Model, baselines: &mut HashMap<String, Baseline>) -> Option<Decision> {
    let spec = &model.routing;
    let rollout = spec.rollout.as_ref()?;
    // A hand-written rollout may leave the plan out: the model's configured plan.
    let plan = rollout.plan.as_ref().unwrap_or(&model.traffic.rollout);
    let canary = spec.canary.as_ref()?;
    let Some(canary_mv) = model.versions.get(&canary.version) else {
        if let Some(why) = model.failed.get(&canary.version) {
            let reason = format!("canary version {} is not ready: {why}", canary.version);
            return control::rolled_back(spec).ok().map(|s| Decision {
                action: Action::Rollback,
                spec: s,
                reason,
                analysis: None,
            });
        }
        return None;
    };
    let stable_mv = model.stable.and_then(|v| model.versions.get(&v))?;
    let now = (canary_mv.traffic.read(), stable_mv.traffic.read());
    let fresh = |b: &Baseline| {
        b.canary_version == canary.version
            && b.step == rollout.step
            && b.canary_ptr == ptr(canary_mv)
            && b.stable_ptr == ptr(stable_mv)
    };
    match baselines.get(&model.name) {
        Some(b) if fresh(b) => {}
        _ => {
            // The reference survives from step to step of the same canary.
            let reference = baselines
                .remove(&model.name)
                .filter(|b| b.canary_version == canary.version)
                .and_then(|b| b.reference);
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
            r.step_started_ms = store::unix_ms(SystemTime::now());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_recorded_finely_and_windows_subtract() {
        let c = TrafficCounters::default();
        c.record(Duration::from_micros(100), false);
        let base = c.read();
        c.record(Duration::from_micros(100), true);
        for us in [1000, 1010, 1020, 5000] {
            c.record(Duration::from_micros(us), false);
        }
        let w = c.read().since(&base);
        assert_eq!((w.requests, w.errors), (5, 1));
        let arm = w.arm();
        assert_eq!(arm.latency.count(), 4);
        // 1 % resolution: 1.00, 1.01 and 1.02 ms stay apart.
        assert_eq!(arm.latency.count_surely_above(1.005), 3, "{arm:?}");
        assert_eq!(arm.latency.count_surely_above(1.015), 2, "{arm:?}");
        assert!((arm.latency.quantile(0.99).unwrap() - 5.0).abs() < 0.05);
        // The base's 100 us request is not in the window.
        assert_eq!(arm.latency.count_maybe_above(0.2), 4);
        // A reading of other counters (a reloaded version) subtracts to nothing.
        let other = TrafficCounters::default();
        other.record(Duration::from_micros(7), false);
        let odd = other.read().since(&c.read());
        assert_eq!(odd.latency.len(), 0);
        // Beyond the histogram's range: counted as the longest.
        c.record(Duration::from_secs(1000), false);
        assert_eq!(c.read().latency.len(), 6);
    }

    #[test]
    fn comparisons_add_up() {
        let c = TrafficCounters::default();
        c.record_comparison(&Comparison {
            rows: 10,
            disagreed_rows: 2,
            classifier: true,
            abs_diff_sum: 0.5,
            values: 30,
            mismatched_outputs: 0,
        });
        let k = c.read().compared();
        assert_eq!((k.rows, k.disagreed_rows, k.values), (10, 2, 30));
        assert!((k.abs_diff_sum - 0.5).abs() < 1e-9);
    }
}

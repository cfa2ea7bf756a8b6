//! Automated rollout, in process: per-version traffic counters, the judgement of one
//! step (canary against stable over the step's interval), and the controller task that
//! advances, promotes or rolls back, and enters newly published versions.
//!
//! The counters are cumulative atomics on each [`ModelVersion`], cheap on the request
//! path; the controller keeps a copy from the start of each step and judges the
//! difference. Breaches are checked at every tick once a step has `min_requests`
//! canary requests (a bad canary is stopped early); advancing waits for the interval.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::compare::Comparison;
use super::control::{self, Action};
use super::{RolloutPlan, TrafficSpec, store};
use crate::error::Error;
use crate::registry::{Model, ModelVersion};
use crate::service::AppState;

/// Latency buckets: bucket 0 is under 10 µs, bucket i ends at 10 µs x 1.25^i (about
/// 13 s for the last): 12 % resolution, plenty to compare two p99s.
const BUCKETS: usize = 64;

fn bucket_of(d: Duration) -> usize {
    let us = d.as_secs_f64() * 1e6;
    if us < 10.0 {
        return 0;
    }
    (((us / 10.0).ln() / 1.25f64.ln()).ceil() as usize).clamp(1, BUCKETS - 1)
}

fn bucket_upper(i: usize) -> Duration {
    Duration::from_secs_f64(10e-6 * 1.25f64.powi(i as i32))
}

/// Cumulative counters of one version, recorded on the request path.
pub struct TrafficCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; BUCKETS],
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
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
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
            self.latency[bucket_of(total)].fetch_add(1, Relaxed);
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
        Counts {
            requests: self.requests.load(Relaxed),
            errors: self.errors.load(Relaxed),
            latency: self.latency.iter().map(|a| a.load(Relaxed)).collect(),
            compared_rows: self.compared_rows.load(Relaxed),
            disagreed_rows: self.disagreed_rows.load(Relaxed),
            abs_diff_nano: self.abs_diff_nano.load(Relaxed),
            compared_values: self.compared_values.load(Relaxed),
        }
    }
}

/// Counter values at one moment, or the difference over a window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
    pub latency: Vec<u64>,
    pub compared_rows: u64,
    pub disagreed_rows: u64,
    pub abs_diff_nano: u64,
    pub compared_values: u64,
}

impl Counts {
    /// What happened between `base` and `self`.
    pub fn since(&self, base: &Counts) -> Counts {
        Counts {
            requests: self.requests.saturating_sub(base.requests),
            errors: self.errors.saturating_sub(base.errors),
            latency: self
                .latency
                .iter()
                .enumerate()
                .map(|(i, &n)| n.saturating_sub(base.latency.get(i).copied().unwrap_or(0)))
                .collect(),
            compared_rows: self.compared_rows.saturating_sub(base.compared_rows),
            disagreed_rows: self.disagreed_rows.saturating_sub(base.disagreed_rows),
            abs_diff_nano: self.abs_diff_nano.saturating_sub(base.abs_diff_nano),
            compared_values: self.compared_values.saturating_sub(base.compared_values),
        }
    }

    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// The 99th percentile of successful requests' latency (a bucket's upper bound).
    pub fn p99(&self) -> Option<Duration> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (total as f64 * 0.99).ceil() as u64;
        let mut seen = 0;
        for (i, &n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(bucket_upper(i));
            }
        }
        Some(bucket_upper(BUCKETS - 1))
    }

    pub fn disagreement(&self) -> Option<f64> {
        (self.compared_rows > 0).then(|| self.disagreed_rows as f64 / self.compared_rows as f64)
    }

    pub fn mean_abs_diff(&self) -> Option<f64> {
        (self.compared_values > 0)
            .then(|| self.abs_diff_nano as f64 / 1e9 / self.compared_values as f64)
    }
}

/// What the controller does with a rollout step.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not enough traffic or time yet.
    Wait,
    /// The step held: go to the next weight.
    Advance,
    /// The last step held: the canary becomes stable.
    Promote,
    /// A threshold was breached (the reason says which, with the figures).
    Rollback(String),
}

/// Judges one step: `canary` and `stable` are the counts since the step began,
/// `stable_p99` the stable p99 to compare with (this window's, or the last known one when
/// stable gets no traffic at a 100 % step), `elapsed` the time since the step began.
pub fn judge(
    plan: &RolloutPlan,
    step: usize,
    elapsed: Duration,
    canary: &Counts,
    stable_p99: Option<Duration>,
) -> Verdict {
    if canary.requests < plan.min_requests.max(1) {
        return Verdict::Wait;
    }
    let rate = canary.error_rate();
    if rate > plan.max_error_rate {
        return Verdict::Rollback(format!(
            "error rate {:.3} > {:.3} ({} of {} canary requests failed)",
            rate, plan.max_error_rate, canary.errors, canary.requests
        ));
    }
    if let (Some(c), Some(s)) = (canary.p99(), stable_p99) {
        let limit = s
            .mul_f64(plan.max_p99_ratio)
            .max(s + Duration::from_secs_f64(plan.p99_slack_ms / 1e3));
        if c > limit {
            return Verdict::Rollback(format!(
                "p99 {:.3} ms > {:.3} ms (stable p99 {:.3} ms x {})",
                c.as_secs_f64() * 1e3,
                limit.as_secs_f64() * 1e3,
                s.as_secs_f64() * 1e3,
                plan.max_p99_ratio
            ));
        }
    }
    // Agreement is judged once as many rows were compared as a step needs requests.
    if canary.compared_rows >= plan.min_requests.max(1) {
        if let Some(d) = canary.disagreement()
            && d > plan.max_disagreement
        {
            return Verdict::Rollback(format!(
                "disagreement with stable {:.3} > {:.3} ({} of {} rows)",
                d, plan.max_disagreement, canary.disagreed_rows, canary.compared_rows
            ));
        }
        if let (Some(limit), Some(mad)) = (plan.max_mean_abs_diff, canary.mean_abs_diff())
            && mad > limit
        {
            return Verdict::Rollback(format!(
                "mean absolute difference from stable {mad:.6} > {limit}"
            ));
        }
    }
    if elapsed < Duration::from_secs_f64(plan.interval_secs) {
        return Verdict::Wait;
    }
    if step + 1 >= plan.steps.len() {
        Verdict::Promote
    } else {
        Verdict::Advance
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
    /// The stable p99 last measured, for steps where stable gets no traffic.
    stable_p99: Option<Duration>,
}

fn ptr(mv: &Arc<ModelVersion>) -> usize {
    Arc::as_ptr(mv) as usize
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
                control::entry_for(model).map(|(spec, why)| (Action::Enter, spec, why))
            };
            let Some((action, spec, reason)) = decision else {
                continue;
            };
            if action != Action::Advance {
                baselines.remove(name);
            }
            let judged = model.routing.clone();
            let (st, name, reason_log) = (Arc::clone(&state), name.clone(), reason.clone());
            let result = tokio::task::spawn_blocking(move || {
                control::apply(
                    &st.registry,
                    &st.traffic,
                    &name,
                    "auto",
                    action,
                    &reason,
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
fn step_decision(
    model: &Model,
    baselines: &mut HashMap<String, Baseline>,
) -> Option<(Action, TrafficSpec, String)> {
    let spec = &model.routing;
    let rollout = spec.rollout.as_ref()?;
    // A hand-written rollout may leave the plan out: the model's configured plan.
    let plan = rollout.plan.as_ref().unwrap_or(&model.traffic.rollout);
    let canary = spec.canary.as_ref()?;
    let Some(canary_mv) = model.versions.get(&canary.version) else {
        if let Some(why) = model.failed.get(&canary.version) {
            let reason = format!("canary version {} is not ready: {why}", canary.version);
            return control::rolled_back(spec)
                .ok()
                .map(|s| (Action::Rollback, s, reason));
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
    let previous_p99 = baselines.get(&model.name).and_then(|b| b.stable_p99);
    match baselines.get(&model.name) {
        Some(b) if fresh(b) => {}
        _ => {
            baselines.insert(
                model.name.clone(),
                Baseline {
                    canary_version: canary.version,
                    step: rollout.step,
                    canary_ptr: ptr(canary_mv),
                    stable_ptr: ptr(stable_mv),
                    canary: now.0,
                    stable: now.1,
                    stable_p99: previous_p99,
                },
            );
            return None;
        }
    }
    let base = baselines.get_mut(&model.name)?;
    let canary_window = now.0.since(&base.canary);
    let stable_window = now.1.since(&base.stable);
    if stable_window.requests >= plan.min_requests.max(1) {
        base.stable_p99 = stable_window.p99().or(base.stable_p99);
    }
    let started = SystemTime::UNIX_EPOCH + Duration::from_millis(rollout.step_started_ms);
    let elapsed = SystemTime::now()
        .duration_since(started)
        .unwrap_or(Duration::ZERO);
    let summary = |w: &Counts| {
        format!(
            "{} canary requests, error rate {:.3}, p99 {}, disagreement {}",
            w.requests,
            w.error_rate(),
            w.p99()
                .map_or("n/a".into(), |d| format!("{:.3} ms", d.as_secs_f64() * 1e3)),
            w.disagreement().map_or("n/a".into(), |d| format!("{d:.3}"))
        )
    };
    match judge(plan, rollout.step, elapsed, &canary_window, base.stable_p99) {
        Verdict::Wait => None,
        Verdict::Rollback(why) => control::rolled_back(spec)
            .ok()
            .map(|s| (Action::Rollback, s, why)),
        Verdict::Promote => control::promoted(spec).ok().map(|s| {
            (
                Action::Promote,
                s,
                format!(
                    "rollout completed {} steps: {}",
                    plan.steps.len(),
                    summary(&canary_window)
                ),
            )
        }),
        Verdict::Advance => {
            let mut next = spec.clone();
            let r = next.rollout.as_mut()?;
            r.step += 1;
            r.step_started_ms = store::unix_ms(SystemTime::now());
            let weight = *plan.steps.get(r.step)?;
            next.canary.as_mut()?.weight = weight;
            Some((
                Action::Advance,
                next,
                format!(
                    "step {} held: {}; weight now {weight}",
                    rollout.step + 1,
                    summary(&canary_window)
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, errors: u64, latency_us: u64) -> Counts {
        let c = TrafficCounters::default();
        for i in 0..requests {
            c.record(Duration::from_micros(latency_us), i < errors);
        }
        c.read()
    }

    fn plan() -> RolloutPlan {
        RolloutPlan {
            steps: vec![10.0, 50.0],
            interval_secs: 10.0,
            min_requests: 100,
            ..RolloutPlan::default()
        }
    }

    #[test]
    fn buckets_and_p99() {
        assert_eq!(bucket_of(Duration::from_micros(5)), 0);
        let d = Duration::from_millis(3);
        assert!(bucket_upper(bucket_of(d)) >= d);
        assert!(bucket_upper(bucket_of(d)) < d.mul_f64(1.26));
        let c = counts(1000, 0, 200);
        let p = c.p99().unwrap();
        assert!(p >= Duration::from_micros(200) && p < Duration::from_micros(251));
        assert_eq!(Counts::default().p99(), None);
    }

    #[test]
    fn windows_subtract() {
        let c = TrafficCounters::default();
        c.record(Duration::from_micros(100), false);
        let base = c.read();
        c.record(Duration::from_micros(100), true);
        c.record(Duration::from_micros(100), false);
        let w = c.read().since(&base);
        assert_eq!((w.requests, w.errors), (2, 1));
        assert_eq!(w.latency.iter().sum::<u64>(), 1);
    }

    #[test]
    fn verdicts() {
        let ten = Duration::from_secs(10);
        let p99 = Some(Duration::from_micros(200));
        // Too few requests: wait, whatever happened.
        assert_eq!(
            judge(&plan(), 0, ten, &counts(99, 99, 200), p99),
            Verdict::Wait
        );
        // Errors roll back at once, before the interval is over.
        let v = judge(&plan(), 0, Duration::ZERO, &counts(100, 5, 200), p99);
        assert!(
            matches!(v, Verdict::Rollback(ref r) if r.contains("error rate")),
            "{v:?}"
        );
        // Healthy: wait for the interval, then advance, and promote after the last step.
        let ok = counts(100, 0, 200);
        assert_eq!(
            judge(&plan(), 0, Duration::from_secs(9), &ok, p99),
            Verdict::Wait
        );
        assert_eq!(judge(&plan(), 0, ten, &ok, p99), Verdict::Advance);
        assert_eq!(judge(&plan(), 1, ten, &ok, p99), Verdict::Promote);
        // Slower than stable x 1.5 and beyond the slack: roll back.
        let slow = counts(100, 0, 5000);
        let v = judge(&plan(), 0, ten, &slow, p99);
        assert!(
            matches!(v, Verdict::Rollback(ref r) if r.contains("p99")),
            "{v:?}"
        );
        // Twice as slow but within the 1 ms slack: fine.
        assert_eq!(
            judge(&plan(), 0, ten, &counts(100, 0, 400), p99),
            Verdict::Advance
        );
        // Disagreement.
        let mut d = ok.clone();
        d.compared_rows = 100;
        d.disagreed_rows = 6;
        let v = judge(&plan(), 0, ten, &d, p99);
        assert!(
            matches!(v, Verdict::Rollback(ref r) if r.contains("disagreement")),
            "{v:?}"
        );
        d.disagreed_rows = 5;
        assert_eq!(judge(&plan(), 0, ten, &d, p99), Verdict::Advance);
    }
}

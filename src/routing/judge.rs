//! The verdict on one rollout step: a pure function of the step's figures per arm
//! (canary and stable), the plan and the time since the step began. It returns the
//! verdict and the [`Analysis`] it stood on, which goes into the audit log.
//!
//! The figures are plain counts and latency buckets ([`Arm`], [`Latency`],
//! [`Compared`]), so they can come from this process's counters (an hdrhistogram per
//! version, see `rollout.rs`) or from a fleet's Prometheus series (`increase()` of the
//! request, error and comparison counters, and the summed `_bucket` series of the
//! latency histogram, through [`Latency::from_cumulative`]).
//!
//! # How a step is judged
//!
//! A step is a test of "the canary meets the plan's thresholds" (H0) that rolls back
//! only on evidence against it. Every criterion is tested separately; each one's chance
//! of rolling back a canary that meets it is at most `alpha` at the end of the step plus
//! `early_alpha` before it, whatever the traffic and however often the controller looks.
//!
//! - **Errors and disagreement** (server-side failures of canary requests against
//!   `max_error_rate`; compared rows whose label differs from stable's against
//!   `max_disagreement`): a failure count `k` of `n` is binomial with rate `p` under
//!   H0 `p <= p0`.
//!   - *Before the interval ends* (and while a finished step waits for data) only a
//!     breach that is already certain acts: Wald's likelihood ratio of `k` in `n` under
//!     `p1 = min(3 p0, (1 + p0) / 2)` against `p0` must reach `1 / early_alpha`. Under
//!     H0 that ratio is a non-negative supermartingale, so by Ville's inequality the
//!     chance that it *ever* reaches `1 / early_alpha` is at most `early_alpha`, however
//!     many looks are taken (every tick, after a restart, by several replicas). A
//!     binomial test at every tick would instead spend its level again at each look.
//!   - *At the end of the step*, once `min_requests` requests (rows) arrived: the
//!     one-sided binomial test, roll back if `P(Binomial(n, p0) >= k) < alpha`. This
//!     look is taken once per step: the step ends at the first look at which every
//!     criterion has its data.
//! - **Latency** (p99), at the end of the step only, as a one-sided test with an
//!   effect-size limit built in. Chosen over a rank test (Mann-Whitney) because it asks
//!   the plan's question itself (is the canary's p99 above `max_p99_ratio` x stable's,
//!   and by more than `p99_slack_ms`?) where a rank test answers "is the canary slower
//!   at all?" (true of microseconds, given traffic enough) and needs a separate effect
//!   gate; and because it needs only counts above a limit and one quantile, which
//!   histogram buckets (local or Prometheus) give, where a rank test needs the samples.
//!   1. `U`, an upper confidence bound of stable's p99 at level `1 - alpha/2`: the
//!      order statistic `X_(r)` of stable's `n_s` samples with the smallest `r` such
//!      that `P(Binomial(n_s, 0.99) >= r) <= alpha/2` (valid for any distribution).
//!      It exists from `n_s >= ln(alpha/2) / ln(0.99)` samples (528 at alpha 0.01): with
//!      fewer, and with fewer canary samples than that, the step waits.
//!   2. The limit `L = max(max_p99_ratio x U, U + p99_slack_ms)`.
//!   3. `k` of the canary's `n_c` samples are above `L`. A canary whose p99 is within
//!      the limit has `P(X > L) <= 1 %`; roll back if `P(Binomial(n_c, 0.01) >= k) <
//!      alpha/2` (equivalently: the canary's p99 is above `L` at that confidence).
//!   4. ... and only if the canary is above `L` more often than stable in the same
//!      window: Fisher's exact (hypergeometric) test of the canary's `k` against
//!      stable's count above `L`, at `alpha/2`.
//!
//!   Rolling back a canary that meets the limit needs `U` below stable's p99 (chance
//!   at most `alpha/2`) or test 3 to reject a true H0 (at most `alpha/2`): `alpha` in
//!   all. That rests on independent samples, which a shared machine does not give: a
//!   stall (another process, a noisy neighbour) delays every request in flight at once.
//!   Test 4 does not need independence: routing picks each request's arm at random, so
//!   for a canary no slower than stable, whichever requests a stall hit, the canary's
//!   share of those above `L` is hypergeometric. Requiring both tests keeps the chance
//!   of a false rollback within `alpha/2` even when the bursts break test 3's premise.
//!   At a 100 % step stable gets no traffic: `U` comes from stable's samples of the
//!   latest earlier step (the reference step is recorded).
//! - **Mean absolute difference** from stable (`max_mean_abs_diff`, when set): the mean
//!   over the step's compared values at its end, against the limit (no test: it is a
//!   measured size, not a rate).
//! - **Quality on labelled traffic** (`max_accuracy_drop` for classes,
//!   `max_mae_increase` for values, when set), at the end of the step, from the
//!   feedback joined since the rollout began (ground truth often arrives late, and a
//!   low-weight step alone sees few labels) for both arms, once each has
//!   `min_labelled` rows. A non-inferiority test: H0 is "the canary is at most the
//!   margin worse than stable", rolled back when rejected at `alpha`. Accuracy: the
//!   difference of the two proportions with Agresti and Caffo's adjustment (one
//!   success and one failure added to each arm, which keeps the z-test near its level
//!   at small counts and accuracies near 1); MAE: Welch's z-test of the two means of
//!   absolute errors. Both are large-sample tests, hence the `min_labelled` floor.
//!
//! A step with too little data at its end waits (and says which criterion waits for
//! what); it neither passes nor fails.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::RolloutPlan;
use super::stats;

/// The latency quantile the plan's `max_p99_ratio` is about.
pub const LATENCY_QUANTILE: f64 = 0.99;

/// `count` latency samples, each somewhere in `[low_ms, high_ms]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub low_ms: f64,
    pub high_ms: f64,
    pub count: u64,
}

/// A latency distribution as buckets, sorted, empty ones left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Latency {
    buckets: Vec<Bucket>,
    total: u64,
}

impl Latency {
    /// From buckets in any order.
    pub fn from_buckets(mut buckets: Vec<Bucket>) -> Latency {
        buckets.retain(|b| b.count > 0);
        buckets.sort_by(|a, b| a.high_ms.total_cmp(&b.high_ms));
        let total = buckets.iter().map(|b| b.count).sum();
        Latency { buckets, total }
    }

    /// From an hdrhistogram of microseconds: each recorded value stands for its range
    /// of equivalent values.
    pub fn from_hdr(h: &hdrhistogram::Histogram<u64>) -> Latency {
        let buckets = h
            .iter_recorded()
            .map(|v| {
                let at = v.value_iterated_to();
                Bucket {
                    low_ms: h.lowest_equivalent(at) as f64 / 1e3,
                    high_ms: h.highest_equivalent(at) as f64 / 1e3,
                    count: v.count_at_value(),
                }
            })
            .collect();
        Latency::from_buckets(buckets)
    }

    /// From a Prometheus histogram's cumulative buckets: `(le in seconds, samples at or
    /// below it)`, sorted by `le`, the last possibly `+Inf`. A bucket's samples are taken
    /// to lie anywhere between the previous bound and its own.
    pub fn from_cumulative(buckets: &[(f64, u64)]) -> Latency {
        let mut prev = (0.0f64, 0u64);
        let mut out = Vec::with_capacity(buckets.len());
        for &(le, cumulative) in buckets {
            out.push(Bucket {
                // A bucket's samples are above the previous bound (`le` is inclusive):
                // the smallest value above it, so that `count_surely_above(bound)`
                // counts them.
                low_ms: (prev.0 * 1e3).next_up(),
                high_ms: le * 1e3,
                count: cumulative.saturating_sub(prev.1),
            });
            prev = (le, cumulative.max(prev.1));
        }
        Latency::from_buckets(out)
    }

    /// Samples.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The largest value the `rank`-th smallest sample (1-based) can have.
    pub fn rank_high(&self, rank: u64) -> Option<f64> {
        if rank == 0 || rank > self.total {
            return None;
        }
        let mut seen = 0;
        for b in &self.buckets {
            seen += b.count;
            if seen >= rank {
                return Some(b.high_ms);
            }
        }
        None
    }

    /// The `q`-quantile by nearest rank (a bucket's upper end).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let rank = ((self.total as f64 * q).ceil() as u64).clamp(1, self.total.max(1));
        self.rank_high(rank)
    }

    /// Samples that are above `ms` for certain (their whole bucket is).
    pub fn count_surely_above(&self, ms: f64) -> u64 {
        self.buckets
            .iter()
            .filter(|b| b.low_ms > ms)
            .map(|b| b.count)
            .sum()
    }

    /// Samples that may be above `ms` (some of their bucket is).
    pub fn count_maybe_above(&self, ms: f64) -> u64 {
        self.buckets
            .iter()
            .filter(|b| b.high_ms > ms)
            .map(|b| b.count)
            .sum()
    }
}

/// One arm's figures over the step: requests, server-side failures, and the latency of
/// the successful ones.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Arm {
    pub requests: u64,
    pub errors: u64,
    pub latency: Latency,
}

/// Comparisons of canary answers with stable's over the step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Compared {
    pub rows: u64,
    pub disagreed_rows: u64,
    /// Float values compared, and the sum of their absolute differences.
    pub values: u64,
    pub abs_diff_sum: f64,
}

/// One arm's labelled rows (predictions joined with their ground truth).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Labelled {
    /// Rows labelled with a class, and how many of them were predicted right.
    pub class_rows: u64,
    pub correct: u64,
    /// Rows labelled with a value, the sum of their absolute errors and of the squares.
    pub value_rows: u64,
    pub abs_sum: f64,
    pub sq_sum: f64,
}

impl Labelled {
    /// The rows added since `base` was taken (counts only grow, but a restarted
    /// tracker starts over: then everything is new).
    pub fn since(&self, base: &Labelled) -> Labelled {
        if self.class_rows < base.class_rows || self.value_rows < base.value_rows {
            return *self;
        }
        Labelled {
            class_rows: self.class_rows - base.class_rows,
            correct: self.correct.saturating_sub(base.correct),
            value_rows: self.value_rows - base.value_rows,
            abs_sum: (self.abs_sum - base.abs_sum).max(0.0),
            sq_sum: (self.sq_sum - base.sq_sum).max(0.0),
        }
    }
}

/// What a step is judged on.
#[derive(Debug, Clone, Copy)]
pub struct StepFigures<'a> {
    /// The step (0-based index into the plan's steps).
    pub step: usize,
    /// Time since the step began.
    pub elapsed: Duration,
    pub canary: &'a Arm,
    pub stable: &'a Arm,
    /// Stable's latency to compare the canary with, and the step (0-based) it was
    /// measured in: this step's, or at a 100 % step an earlier one's; `None` when there
    /// is none (a plan that starts at 100 %).
    pub reference: Option<(&'a Latency, usize)>,
    /// `None` when canary answers are not compared with stable's (`compare_canary` off).
    pub compared: Option<&'a Compared>,
    /// Labelled rows since the rollout began, canary's and stable's; `None` when no
    /// feedback is joined for the model (capture off).
    pub labelled: Option<(&'a Labelled, &'a Labelled)>,
}

/// What the controller does with a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not over, or not enough data yet.
    Wait,
    /// The step held: on to the next weight.
    Advance,
    /// The last step held: the canary becomes stable.
    Promote,
    /// A criterion is breached.
    Rollback,
}

/// When a step was looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Look {
    /// Before the interval ended: only certain breaches act.
    Early,
    /// The interval is over.
    End,
}

/// A criterion of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    Errors,
    Disagreement,
    Latency,
    MeanAbsDiff,
    Accuracy,
    Mae,
}

/// Where a criterion stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Tested at the end of the step: no breach.
    Pass,
    /// Breached: the canary is rolled back.
    Breach,
    /// The interval is over but the data is not enough: the step waits.
    Wait,
    /// The interval is not over (and no breach is certain yet).
    Pending,
    /// Not checked (off in the plan, or nothing to compare with).
    NotJudged,
}

/// The sequential (early) test of a rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sequential {
    /// The likelihood ratio of the counts under `alternative` against the threshold.
    pub likelihood_ratio: f64,
    pub alternative: f64,
    /// `1 / early_alpha`: the ratio that rolls back.
    pub rolls_back_at: f64,
}

/// The latency test's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyTest {
    /// Samples each side needs.
    pub min_samples: u64,
    /// The step (1-based) whose stable samples are the reference.
    pub reference_step: usize,
    pub stable_samples: u64,
    /// The upper confidence bound of stable's p99 and the rank it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_p99_upper_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_rank: Option<u64>,
    /// Stable samples that may be above the limit, and the two-sample p-value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_above: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p_value_vs_stable: Option<f64>,
}

/// One criterion's figures and outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub criterion: Criterion,
    pub status: Status,
    /// The test that decided (or would decide) it.
    pub test: String,
    /// The measured value: a rate, the canary's p99 in ms, or a mean difference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<f64>,
    /// The threshold: the plan's rate, the latency limit in ms, or the plan's mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Failures, disagreeing rows, or canary requests above the latency limit ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// ... of this many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p_value: Option<f64>,
    /// The significance level the p-value is held against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequential: Option<Sequential>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencyTest>,
    /// In words.
    pub note: String,
}

/// One arm's figures as the analysis shows them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmFigures {
    pub requests: u64,
    pub errors: u64,
    /// Successful requests, the latency samples.
    pub latency_samples: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

/// The numbers a verdict stood on (the audit log's `analysis`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// The step, 1-based, and its canary weight.
    pub step: usize,
    pub weight: f64,
    pub look: Look,
    pub elapsed_secs: f64,
    pub interval_secs: f64,
    pub alpha: f64,
    pub early_alpha: f64,
    pub canary: ArmFigures,
    pub stable: ArmFigures,
    pub checks: Vec<Check>,
    /// With fleet analysis: the window judged and how many replicas it summed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetWindow>,
}

/// The window a fleet-wide verdict was read over (Unix ms) and the replicas in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetWindow {
    pub replicas: u64,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// A verdict and its analysis.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub verdict: Verdict,
    pub analysis: Analysis,
}

/// Only finite numbers go into the analysis (JSON has no infinity).
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Judges one step.
pub fn judge(plan: &RolloutPlan, f: &StepFigures<'_>) -> Judgement {
    let over = f.elapsed >= Duration::from_secs_f64(plan.interval_secs);
    let min = plan.min_requests.max(1);
    let mut checks = vec![rate_check(
        Criterion::Errors,
        plan,
        f.canary.errors,
        f.canary.requests,
        plan.max_error_rate,
        min,
        over,
    )];
    checks.push(match f.compared {
        Some(c) => rate_check(
            Criterion::Disagreement,
            plan,
            c.disagreed_rows,
            c.rows,
            plan.max_disagreement,
            min,
            over,
        ),
        None => not_judged(
            Criterion::Disagreement,
            "canary answers are not compared with stable's (compare_canary = false)",
        ),
    });
    checks.push(if over {
        latency_check(plan, f)
    } else {
        Check {
            status: Status::Pending,
            note: "judged at the end of the step".into(),
            ..not_judged(Criterion::Latency, "")
        }
    });
    checks.push(mean_abs_diff_check(plan, f.compared, min, over));
    checks.push(accuracy_check(plan, f.labelled, over));
    checks.push(mae_check(plan, f.labelled, over));
    let breached = checks.iter().any(|c| c.status == Status::Breach);
    let waiting = checks.iter().any(|c| c.status == Status::Wait);
    let verdict = if breached {
        Verdict::Rollback
    } else if !over || waiting {
        Verdict::Wait
    } else if f.step + 1 >= plan.steps.len() {
        Verdict::Promote
    } else {
        Verdict::Advance
    };
    let figures = |a: &Arm| ArmFigures {
        requests: a.requests,
        errors: a.errors,
        latency_samples: a.latency.count(),
        p50_ms: a.latency.quantile(0.5).and_then(finite),
        p99_ms: a.latency.quantile(LATENCY_QUANTILE).and_then(finite),
    };
    Judgement {
        verdict,
        analysis: Analysis {
            step: f.step + 1,
            weight: plan.steps.get(f.step).copied().unwrap_or(0.0),
            look: if over { Look::End } else { Look::Early },
            elapsed_secs: f.elapsed.as_secs_f64(),
            interval_secs: plan.interval_secs,
            alpha: plan.alpha,
            early_alpha: plan.early_alpha,
            canary: figures(f.canary),
            stable: figures(f.stable),
            checks,
            fleet: None,
        },
    }
}

fn not_judged(criterion: Criterion, note: &str) -> Check {
    Check {
        criterion,
        status: Status::NotJudged,
        test: String::new(),
        observed: None,
        threshold: None,
        count: None,
        of: None,
        p_value: None,
        level: None,
        sequential: None,
        latency: None,
        note: note.to_string(),
    }
}

/// Errors or disagreement: `k` of `n` against the rate `p0`.
fn rate_check(
    criterion: Criterion,
    plan: &RolloutPlan,
    k: u64,
    n: u64,
    p0: f64,
    min: u64,
    over: bool,
) -> Check {
    let (what, unit) = match criterion {
        Criterion::Errors => ("canary requests failed", "requests"),
        _ => ("compared rows disagreed with stable", "compared rows"),
    };
    let p1 = (3.0 * p0).min((1.0 + p0) / 2.0);
    let ln_lr = stats::ln_likelihood_ratio(k, n, p0, p1);
    let rolls_back_at = 1.0 / plan.early_alpha;
    let certain = ln_lr >= rolls_back_at.ln();
    let rate = if n == 0 { 0.0 } else { k as f64 / n as f64 };
    let mut c = Check {
        test: "binomial tail".into(),
        observed: finite(rate),
        threshold: finite(p0),
        count: Some(k),
        of: Some(n),
        sequential: Some(Sequential {
            likelihood_ratio: ln_lr.exp().min(1e300),
            alternative: p1,
            rolls_back_at,
        }),
        ..not_judged(criterion, "")
    };
    let seq_note = format!(
        "likelihood ratio {:.3e} against a rate of {p1:.4} (rolls back at {rolls_back_at:.0})",
        ln_lr.exp().min(1e300)
    );
    if certain {
        c.status = Status::Breach;
        c.test = "sequential likelihood ratio".into();
        c.note = format!(
            "{k} of {n} {what} ({:.2} %, threshold {:.2} %): certain, {seq_note}",
            rate * 100.0,
            p0 * 100.0
        );
        return c;
    }
    if !over {
        c.status = Status::Pending;
        c.note = format!("{k} of {n} {what} so far; {seq_note}");
        return c;
    }
    if n < min {
        c.status = Status::Wait;
        c.note = format!("needs {min} {unit} (min_requests), has {n}");
        return c;
    }
    let p = stats::binomial_sf(k, n, p0);
    c.p_value = Some(p);
    c.level = Some(plan.alpha);
    let verdict = if p < plan.alpha {
        c.status = Status::Breach;
        "<"
    } else {
        c.status = Status::Pass;
        ">="
    };
    c.note = format!(
        "{k} of {n} {what} ({:.2} %, threshold {:.2} %): P(>= {k} | {p0}) = {p:.3e} {verdict} alpha {}",
        rate * 100.0,
        p0 * 100.0,
        plan.alpha
    );
    c
}

/// The canary's p99 against the limit built from stable's (see the module docs).
fn latency_check(plan: &RolloutPlan, f: &StepFigures<'_>) -> Check {
    let level = plan.alpha / 2.0;
    let need = plan
        .min_requests
        .max(stats::min_samples_for_quantile(LATENCY_QUANTILE, level));
    let canary = &f.canary.latency;
    let n_c = canary.count();
    let base = Check {
        test: "p99 exceedance: binomial + Fisher exact vs stable".into(),
        observed: canary.quantile(LATENCY_QUANTILE).and_then(finite),
        of: Some(n_c),
        level: Some(level),
        ..not_judged(Criterion::Latency, "")
    };
    let Some((reference, ref_step)) = f.reference else {
        return Check {
            status: Status::NotJudged,
            note: "stable served no traffic in this rollout: nothing to compare with".into(),
            ..base
        };
    };
    let n_s = reference.count();
    let mut detail = LatencyTest {
        min_samples: need,
        reference_step: ref_step + 1,
        stable_samples: n_s,
        stable_p99_upper_ms: None,
        stable_rank: None,
        stable_above: None,
        p_value_vs_stable: None,
    };
    let rank = stats::quantile_upper_rank(n_s, LATENCY_QUANTILE, level);
    let upper = rank.and_then(|r| reference.rank_high(r));
    let (Some(rank), Some(upper)) = (rank.filter(|_| n_s >= need && n_c >= need), upper) else {
        return Check {
            status: Status::Wait,
            note: format!(
                "needs {need} successful requests on each side for a p99 at alpha {}: canary has {n_c}, stable {n_s}",
                plan.alpha
            ),
            latency: Some(detail),
            ..base
        };
    };
    let limit = (upper * plan.max_p99_ratio).max(upper + plan.p99_slack_ms);
    let k = canary.count_surely_above(limit);
    let k_s = reference.count_maybe_above(limit);
    let p = stats::binomial_sf(k, n_c, 1.0 - LATENCY_QUANTILE);
    let p_vs = stats::hypergeometric_sf(k, n_c + n_s, k + k_s, n_c);
    detail.stable_p99_upper_ms = finite(upper);
    detail.stable_rank = Some(rank);
    detail.stable_above = Some(k_s);
    detail.p_value_vs_stable = Some(p_vs);
    let breach = p < level && p_vs < level;
    let limit_text = format!(
        "limit {limit:.3} ms = max({} x {upper:.3}, {upper:.3} + {}) ms, {upper:.3} ms bounding stable's p99 (the {rank}th of {n_s}, step {})",
        plan.max_p99_ratio,
        plan.p99_slack_ms,
        ref_step + 1
    );
    Check {
        status: if breach { Status::Breach } else { Status::Pass },
        threshold: finite(limit),
        count: Some(k),
        p_value: Some(p),
        latency: Some(detail),
        note: format!(
            "canary p99 {} ms; {k} of {n_c} canary requests above the {limit_text} (binomial p {p:.3e}), stable {k_s} of {n_s} (Fisher p {p_vs:.3e}); {} alpha/2 {level}",
            base.observed.map_or("n/a".into(), |v| format!("{v:.3}")),
            if breach { "both <" } else { "not both <" }
        ),
        ..base
    }
}

fn mean_abs_diff_check(
    plan: &RolloutPlan,
    compared: Option<&Compared>,
    min: u64,
    over: bool,
) -> Check {
    let Some(limit) = plan.max_mean_abs_diff else {
        return not_judged(Criterion::MeanAbsDiff, "max_mean_abs_diff is unset");
    };
    let Some(c) = compared else {
        return not_judged(
            Criterion::MeanAbsDiff,
            "canary answers are not compared with stable's (compare_canary = false)",
        );
    };
    let mean = (c.values > 0).then(|| c.abs_diff_sum / c.values as f64);
    let check = Check {
        test: "mean".into(),
        observed: mean.and_then(finite),
        threshold: finite(limit),
        count: Some(c.values),
        ..not_judged(Criterion::MeanAbsDiff, "")
    };
    if !over {
        return Check {
            status: Status::Pending,
            note: "judged at the end of the step".into(),
            ..check
        };
    }
    if c.rows < min {
        return Check {
            status: Status::Wait,
            note: format!("needs {min} compared rows (min_requests), has {}", c.rows),
            ..check
        };
    }
    let Some(mean) = mean else {
        return Check {
            note: "no float outputs to compare".into(),
            ..check
        };
    };
    let breach = mean > limit;
    Check {
        status: if breach { Status::Breach } else { Status::Pass },
        note: format!(
            "mean absolute difference from stable {mean:.6} {} {limit} over {} values",
            if breach { ">" } else { "<=" },
            c.values
        ),
        ..check
    }
}

/// What is common to both quality checks before a test can run: the plan's margin,
/// the labelled rows, the step's end, and `min_labelled` rows on both arms.
#[allow(clippy::result_large_err)] // a Check is what both outcomes are
fn quality_rows<'a>(
    criterion: Criterion,
    margin: Option<f64>,
    labelled: Option<(&'a Labelled, &'a Labelled)>,
    rows: impl Fn(&Labelled) -> u64,
    plan: &RolloutPlan,
    over: bool,
) -> Result<(f64, &'a Labelled, &'a Labelled), Check> {
    let field = match criterion {
        Criterion::Accuracy => "max_accuracy_drop",
        _ => "max_mae_increase",
    };
    let Some(margin) = margin else {
        return Err(not_judged(criterion, &format!("{field} is unset")));
    };
    let Some((canary, stable)) = labelled else {
        return Err(not_judged(
            criterion,
            "no labelled rows reach this judge (capture is off for the model, or the analysis is fleet-wide, which reads no quality yet)",
        ));
    };
    let base = Check {
        count: Some(rows(canary)),
        ..not_judged(criterion, "")
    };
    if !over {
        return Err(Check {
            status: Status::Pending,
            note: "judged at the end of the step".into(),
            ..base
        });
    }
    let other = match criterion {
        Criterion::Accuracy => canary.value_rows + stable.value_rows,
        _ => canary.class_rows + stable.class_rows,
    };
    if rows(canary) + rows(stable) == 0 && other > 0 {
        let kind = if criterion == Criterion::Accuracy {
            "values, not classes"
        } else {
            "classes, not values"
        };
        return Err(Check {
            note: format!("the feedback carries {kind}"),
            ..base
        });
    }
    let need = plan.min_labelled.max(1);
    if rows(canary) < need || rows(stable) < need {
        return Err(Check {
            status: Status::Wait,
            note: format!(
                "needs {need} labelled rows per arm (min_labelled), has canary {} and stable {}",
                rows(canary),
                rows(stable)
            ),
            ..base
        });
    }
    Ok((margin, canary, stable))
}

/// The canary's accuracy against stable's less `max_accuracy_drop` (see the module
/// docs).
fn accuracy_check(
    plan: &RolloutPlan,
    labelled: Option<(&Labelled, &Labelled)>,
    over: bool,
) -> Check {
    let (drop, canary, stable) = match quality_rows(
        Criterion::Accuracy,
        plan.max_accuracy_drop,
        labelled,
        |l| l.class_rows,
        plan,
        over,
    ) {
        Ok(x) => x,
        Err(check) => return check,
    };
    let acc = |l: &Labelled| l.correct as f64 / l.class_rows as f64;
    // Agresti-Caffo: one success and one failure more on each arm.
    let adjusted = |l: &Labelled| {
        let n = l.class_rows as f64 + 2.0;
        let p = (l.correct as f64 + 1.0) / n;
        (p, p * (1.0 - p) / n)
    };
    let ((pc, vc), (ps, vs)) = (adjusted(canary), adjusted(stable));
    // Evidence against H0 is a canary below stable less the margin: the lower tail.
    let z = (pc - ps + drop) / (vc + vs).sqrt();
    let p = stats::normal_sf(-z);
    let breach = p < plan.alpha;
    Check {
        criterion: Criterion::Accuracy,
        status: if breach { Status::Breach } else { Status::Pass },
        test: "non-inferiority z-test of two proportions (Agresti-Caffo)".into(),
        observed: finite(acc(canary)),
        threshold: finite(acc(stable) - drop),
        count: Some(canary.correct),
        of: Some(canary.class_rows),
        p_value: Some(p),
        level: Some(plan.alpha),
        note: format!(
            "canary {} of {} right ({:.2} %), stable {} of {} ({:.2} %), margin {:.2} points: P = {p:.3e} {} alpha {}",
            canary.correct,
            canary.class_rows,
            acc(canary) * 100.0,
            stable.correct,
            stable.class_rows,
            acc(stable) * 100.0,
            drop * 100.0,
            if breach { "<" } else { ">=" },
            plan.alpha
        ),
        ..not_judged(Criterion::Accuracy, "")
    }
}

/// The canary's mean absolute error against stable's plus `max_mae_increase`.
fn mae_check(plan: &RolloutPlan, labelled: Option<(&Labelled, &Labelled)>, over: bool) -> Check {
    let (rise, canary, stable) = match quality_rows(
        Criterion::Mae,
        plan.max_mae_increase,
        labelled,
        |l| l.value_rows,
        plan,
        over,
    ) {
        Ok(x) => x,
        Err(check) => return check,
    };
    let moments = |l: &Labelled| {
        let n = l.value_rows as f64;
        let mean = l.abs_sum / n;
        (mean, (l.sq_sum / n - mean * mean).max(0.0) / n)
    };
    let ((mc, vc), (ms_, vs)) = (moments(canary), moments(stable));
    let excess = mc - ms_ - rise;
    let se = (vc + vs).sqrt();
    let p = if se > 0.0 {
        stats::normal_sf(excess / se)
    } else if excess > 0.0 {
        0.0
    } else {
        1.0
    };
    let breach = p < plan.alpha;
    Check {
        criterion: Criterion::Mae,
        status: if breach { Status::Breach } else { Status::Pass },
        test: "non-inferiority Welch z-test of mean absolute errors".into(),
        observed: finite(mc),
        threshold: finite(ms_ + rise),
        count: Some(canary.value_rows),
        of: Some(canary.value_rows),
        p_value: Some(p),
        level: Some(plan.alpha),
        note: format!(
            "canary MAE {mc:.6} over {} rows, stable {ms_:.6} over {}, margin {rise}: P = {p:.3e} {} alpha {}",
            canary.value_rows,
            stable.value_rows,
            if breach { "<" } else { ">=" },
            plan.alpha
        ),
        ..not_judged(Criterion::Mae, "")
    }
}

impl Criterion {
    pub fn as_str(self) -> &'static str {
        match self {
            Criterion::Errors => "error rate",
            Criterion::Disagreement => "disagreement with stable",
            Criterion::Latency => "latency p99",
            Criterion::MeanAbsDiff => "mean absolute difference",
            Criterion::Accuracy => "accuracy on labelled traffic",
            Criterion::Mae => "mean absolute error on labelled traffic",
        }
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.3} ms"))
}

impl Judgement {
    /// The verdict in words, with the figures it stood on (the audit log's `reason`).
    pub fn reason(&self, steps: usize) -> String {
        let a = &self.analysis;
        let with = |status: Status| {
            a.checks
                .iter()
                .filter(|c| c.status == status)
                .map(|c| format!("{}: {}", c.criterion.as_str(), c.note))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let summary = || {
            let passed: Vec<String> = a
                .checks
                .iter()
                .filter(|c| c.status == Status::Pass)
                .map(|c| format!("{}: {}", c.criterion.as_str(), c.note))
                .collect();
            format!(
                "canary {} requests, {} errors, p50 {}, p99 {}; stable {} requests, p99 {}; {}",
                a.canary.requests,
                a.canary.errors,
                ms(a.canary.p50_ms),
                ms(a.canary.p99_ms),
                a.stable.requests,
                ms(a.stable.p99_ms),
                passed.join("; ")
            )
        };
        let at = format!(
            "step {} (weight {}) after {:.1} s of {} s",
            a.step, a.weight, a.elapsed_secs, a.interval_secs
        );
        match self.verdict {
            Verdict::Rollback => format!(
                "rollback at {at}{}: {}",
                if a.look == Look::Early {
                    ", before the interval ended"
                } else {
                    ""
                },
                with(Status::Breach)
            ),
            Verdict::Promote => format!("rollout completed {steps} steps: {}", summary()),
            Verdict::Advance => format!("step {} held: {}", a.step, summary()),
            Verdict::Wait if a.look == Look::End => {
                format!("{at} waits for data: {}", with(Status::Wait))
            }
            Verdict::Wait => format!("{at}: the interval is not over"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> RolloutPlan {
        RolloutPlan {
            steps: vec![10.0, 50.0],
            interval_secs: 10.0,
            min_requests: 100,
            ..RolloutPlan::default()
        }
    }

    /// `n` samples spread evenly over `[lo, hi]` ms, in buckets 1 % wide as an
    /// hdrhistogram with 2 significant digits has them.
    fn spread(n: u64, lo: f64, hi: f64) -> Latency {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 100_000_000, 2).unwrap();
        for i in 0..n {
            let ms = lo + (hi - lo) * (i as f64 + 0.5) / n as f64;
            h.record((ms * 1e3) as u64).unwrap();
        }
        Latency::from_hdr(&h)
    }

    fn arm(requests: u64, errors: u64, latency: Latency) -> Arm {
        Arm {
            requests,
            errors,
            latency,
        }
    }

    fn judged(
        plan: &RolloutPlan,
        step: usize,
        secs: u64,
        canary: &Arm,
        stable: &Arm,
        compared: Option<&Compared>,
    ) -> Judgement {
        judge(
            plan,
            &StepFigures {
                step,
                elapsed: Duration::from_secs(secs),
                canary,
                stable,
                reference: Some((&stable.latency, step)),
                compared,
                labelled: None,
            },
        )
    }

    fn check(j: &Judgement, c: Criterion) -> &Check {
        j.analysis.checks.iter().find(|x| x.criterion == c).unwrap()
    }

    #[test]
    fn latency_buckets() {
        let l = spread(1000, 1.0, 2.0);
        assert_eq!(l.count(), 1000);
        let p99 = l.quantile(0.99).unwrap();
        assert!((p99 - 1.99).abs() < 0.02, "{p99}");
        assert!((l.quantile(0.5).unwrap() - 1.5).abs() < 0.02);
        assert!(l.count_surely_above(1.5) <= 500 && l.count_surely_above(1.5) > 480);
        assert!(l.count_maybe_above(1.5) >= 500 && l.count_maybe_above(1.5) < 520);
        assert_eq!(l.rank_high(0), None);
        assert_eq!(l.rank_high(1001), None);
        assert_eq!(Latency::default().quantile(0.99), None);
        // Prometheus buckets: le in seconds, cumulative, +Inf last.
        let p = Latency::from_cumulative(&[
            (0.001, 50),
            (0.0025, 90),
            (0.005, 99),
            (0.01, 100),
            (f64::INFINITY, 100),
        ]);
        assert_eq!(p.count(), 100);
        assert_eq!(p.quantile(0.5), Some(1.0));
        assert_eq!(p.quantile(0.99), Some(5.0));
        // Conservative both ways: surely above needs the whole bucket above (`le` is
        // inclusive, so the samples of (2.5, 5] are above 2.5).
        assert_eq!(p.count_surely_above(2.5), 10);
        assert_eq!(p.count_surely_above(2.6), 1);
        assert_eq!(p.count_surely_above(2.4), 10);
        assert_eq!(p.count_maybe_above(2.5), 10);
        assert_eq!(p.count_maybe_above(2.0), 50);
    }

    #[test]
    fn a_healthy_canary_waits_for_the_interval_then_advances_and_promotes() {
        let (c, s) = (
            arm(600, 0, spread(600, 0.3, 0.5)),
            arm(5400, 0, spread(5400, 0.3, 0.5)),
        );
        let j = judged(&plan(), 0, 9, &c, &s, None);
        assert_eq!(j.verdict, Verdict::Wait);
        assert_eq!(j.analysis.look, Look::Early);
        assert_eq!(check(&j, Criterion::Latency).status, Status::Pending);
        let j = judged(&plan(), 0, 10, &c, &s, None);
        assert_eq!(j.verdict, Verdict::Advance, "{}", j.reason(2));
        assert_eq!(check(&j, Criterion::Latency).status, Status::Pass);
        assert_eq!(check(&j, Criterion::Errors).status, Status::Pass);
        assert_eq!(check(&j, Criterion::Disagreement).status, Status::NotJudged);
        assert!(j.reason(2).starts_with("step 1 held"), "{}", j.reason(2));
        let j = judged(&plan(), 1, 10, &c, &s, None);
        assert_eq!(j.verdict, Verdict::Promote);
        assert!(j.reason(2).starts_with("rollout completed 2 steps"));
        // The analysis is plain JSON and reads back.
        let text = serde_json::to_string(&j.analysis).unwrap();
        let back: Analysis = serde_json::from_str(&text).unwrap();
        assert_eq!(back, j.analysis);
    }

    /// The case: a p99 that is the worst request or two of 100 is no evidence.
    #[test]
    fn latency_needs_enough_samples_on_both_sides() {
        let mut slow = spread(118, 0.3, 0.5).buckets;
        slow.push(Bucket {
            low_ms: 5.1,
            high_ms: 5.2,
            count: 2,
        });
        let c = arm(120, 0, Latency::from_buckets(slow));
        let s = arm(1080, 0, spread(1080, 0.3, 0.5));
        let j = judged(&plan(), 0, 10, &c, &s, None);
        assert_eq!(j.verdict, Verdict::Wait, "{}", j.reason(2));
        let l = check(&j, Criterion::Latency);
        assert_eq!(l.status, Status::Wait);
        assert_eq!(l.latency.as_ref().unwrap().min_samples, 528);
        assert!(j.reason(2).contains("waits for data"), "{}", j.reason(2));
        assert!(l.note.contains("needs 528"), "{}", l.note);
        // Stable short of samples: also a wait.
        let c = arm(600, 0, spread(600, 0.3, 0.5));
        let s = arm(300, 0, spread(300, 0.3, 0.5));
        assert_eq!(judged(&plan(), 0, 10, &c, &s, None).verdict, Verdict::Wait);
    }

    #[test]
    fn a_slow_canary_rolls_back_at_the_end_of_the_step_only() {
        // Three times slower, well beyond 1.5 x and the 1 ms slack.
        let c = arm(600, 0, spread(600, 3.0, 6.0));
        let s = arm(600, 0, spread(600, 1.0, 2.0));
        let j = judged(&plan(), 0, 5, &c, &s, None);
        assert_eq!(j.verdict, Verdict::Wait);
        let j = judged(&plan(), 0, 10, &c, &s, None);
        assert_eq!(j.verdict, Verdict::Rollback);
        let l = check(&j, Criterion::Latency);
        assert_eq!(l.status, Status::Breach);
        let limit = l.threshold.unwrap();
        // U is the 596th of 600 (2 ms at most), so the limit is 2 ms + 1 ms slack.
        assert!((2.95..3.05).contains(&limit), "{limit}");
        assert!(l.count.unwrap() > 550);
        assert!(l.p_value.unwrap() < 1e-100);
        assert!(j.reason(2).contains("latency p99"), "{}", j.reason(2));
        // A little slower (within 1.5 x, and in the slack): passes.
        let c = arm(600, 0, spread(600, 1.2, 2.4));
        let j = judged(&plan(), 0, 10, &c, &s, None);
        assert_eq!(j.verdict, Verdict::Advance, "{}", j.reason(2));
    }

    /// Stalls of the machine delay both arms: when stable is as often above the limit
    /// as the canary, the excess is not the canary's.
    #[test]
    fn a_tail_that_stable_shares_does_not_roll_back() {
        // 3 % of both arms stall at 20 ms; the stable bound lands in the stall.
        let with_stalls = |n: u64| {
            let mut b = spread(n * 97 / 100, 0.3, 0.5).buckets;
            b.push(Bucket {
                low_ms: 20.0,
                high_ms: 20.2,
                count: n * 3 / 100,
            });
            Latency::from_buckets(b)
        };
        let c = arm(1000, 0, with_stalls(1000));
        let s = arm(9000, 0, with_stalls(9000));
        let j = judged(&plan(), 0, 10, &c, &s, None);
        assert_eq!(j.verdict, Verdict::Advance, "{}", j.reason(2));
    }

    /// Identical arms on a machine that stalls in bursts (every request in flight is
    /// delayed, whichever arm it is on), routed at random at 10 %: simulated steps
    /// (seeded, so deterministic) roll back no more often than alpha allows.
    #[test]
    fn bursts_of_stalls_do_not_roll_back_identical_arms() {
        let mut rng = fastrand::Rng::with_seed(5);
        let (trials, n) = (300, 6000);
        let (mut rolled_back, mut binomial_alone) = (0, 0);
        for t in 0..trials {
            let new =
                || hdrhistogram::Histogram::<u64>::new_with_bounds(1, 100_000_000, 2).unwrap();
            let (mut hc, mut hs) = (new(), new());
            // Stall shares around the quantile (0.3 % to 1.5 % of requests) are the
            // hard case: bursts of 5 to 40 requests, each delayed by 2 to 20 ms.
            let start = 0.0001 + 0.0004 * (t % 4) as f64 / 3.0;
            let mut left = 0u32;
            let mut delay = 0.0;
            for _ in 0..n {
                if left == 0 && rng.f64() < start {
                    left = rng.u32(5..=40);
                    delay = rng.f64() * 18.0 + 2.0;
                }
                let mut ms = 0.3 + rng.f64() * 0.2 + (-rng.f64().ln()) * 0.05;
                if left > 0 {
                    left -= 1;
                    ms += delay * rng.f64();
                }
                let us = (ms * 1e3) as u64;
                if rng.f64() < 0.1 {
                    hc.record(us).unwrap();
                } else {
                    hs.record(us).unwrap();
                }
            }
            let c = arm(hc.len(), 0, Latency::from_hdr(&hc));
            let s = arm(hs.len(), 0, Latency::from_hdr(&hs));
            let j = judged(&plan(), 0, 10, &c, &s, None);
            let l = check(&j, Criterion::Latency);
            if l.status == Status::Breach {
                rolled_back += 1;
            }
            if l.p_value.is_some_and(|p| p < 0.005) {
                binomial_alone += 1;
            }
        }
        eprintln!(
            "{rolled_back} of {trials} simulated identical steps rolled back ({binomial_alone} by the binomial test alone)"
        );
        // alpha = 0.01: 3 of 300 expected at most; allow for sampling error.
        assert!(
            rolled_back <= 6,
            "{rolled_back} of {trials} identical steps rolled back"
        );
    }

    #[test]
    fn errors_roll_back_early_only_when_certain() {
        let lat = || spread(600, 0.3, 0.5);
        let s = arm(5000, 0, spread(5000, 0.3, 0.5));
        // 2 % of 600 is above 1 %, but not certain: wait, then the end-of-step test.
        let c = arm(600, 12, lat());
        let j = judged(&plan(), 0, 1, &c, &s, None);
        assert_eq!(j.verdict, Verdict::Wait);
        assert_eq!(check(&j, Criterion::Errors).status, Status::Pending);
        let j = judged(&plan(), 0, 10, &c, &s, None);
        // P(Bin(600, 0.01) >= 12) = 0.0195 >= 0.01: passes at the end too.
        let e = check(&j, Criterion::Errors);
        assert_eq!(e.status, Status::Pass, "{e:?}");
        // 5 % of 600 is certain early: the likelihood ratio against 3 % passes 1e4.
        let c = arm(600, 30, lat());
        let j = judged(&plan(), 0, 1, &c, &s, None);
        assert_eq!(j.verdict, Verdict::Rollback);
        let e = check(&j, Criterion::Errors);
        assert_eq!(e.test, "sequential likelihood ratio");
        assert!(e.sequential.as_ref().unwrap().likelihood_ratio >= 1e4);
        assert!(j.reason(2).contains("error rate"), "{}", j.reason(2));
        assert!(j.reason(2).contains("before the interval ended"));
        // Every request failing is certain after nine (3^9 > 1e4).
        let c = arm(9, 9, Latency::default());
        assert_eq!(
            judged(&plan(), 0, 0, &c, &s, None).verdict,
            Verdict::Rollback
        );
        let c = arm(8, 8, Latency::default());
        assert_eq!(judged(&plan(), 0, 0, &c, &s, None).verdict, Verdict::Wait);
        // At the end: 3 % of 600 is a breach at alpha 0.01 (p = 5e-5), not yet certain.
        let c = arm(600, 18, lat());
        let j = judged(&plan(), 0, 10, &c, &s, None);
        let e = check(&j, Criterion::Errors);
        assert_eq!(
            (e.status, e.test.as_str()),
            (Status::Breach, "binomial tail")
        );
        assert_eq!(j.verdict, Verdict::Rollback);
        // Too few requests at the end: wait.
        let c = arm(50, 0, spread(50, 0.3, 0.5));
        let j = judged(&plan(), 0, 10, &c, &s, None);
        assert_eq!(check(&j, Criterion::Errors).status, Status::Wait);
        // A zero threshold: any failure is certain.
        let zero = RolloutPlan {
            max_error_rate: 0.0,
            ..plan()
        };
        let c = arm(600, 1, lat());
        assert_eq!(judged(&zero, 0, 0, &c, &s, None).verdict, Verdict::Rollback);
    }

    #[test]
    fn disagreement_and_mean_abs_diff() {
        let c = arm(600, 0, spread(600, 0.3, 0.5));
        let s = arm(5000, 0, spread(5000, 0.3, 0.5));
        // 20 % of 100 rows against 5 %: certain early.
        let cmp = Compared {
            rows: 100,
            disagreed_rows: 20,
            values: 300,
            abs_diff_sum: 0.3,
        };
        let j = judged(&plan(), 0, 1, &c, &s, Some(&cmp));
        assert_eq!(j.verdict, Verdict::Rollback);
        assert!(j.reason(2).contains("disagreement"), "{}", j.reason(2));
        // 6 of 100 is no evidence against 5 %.
        let cmp = Compared {
            disagreed_rows: 6,
            ..cmp
        };
        assert_eq!(
            judged(&plan(), 0, 10, &c, &s, Some(&cmp)).verdict,
            Verdict::Advance
        );
        // Too few compared rows at the end: wait.
        let few = Compared { rows: 40, ..cmp };
        let j = judged(&plan(), 0, 10, &c, &s, Some(&few));
        assert_eq!(j.verdict, Verdict::Wait);
        assert_eq!(check(&j, Criterion::Disagreement).status, Status::Wait);
        // Mean absolute difference: 0.001 per value against 0.0005.
        let strict = RolloutPlan {
            max_mean_abs_diff: Some(0.0005),
            ..plan()
        };
        let j = judged(&strict, 0, 10, &c, &s, Some(&cmp));
        assert_eq!(j.verdict, Verdict::Rollback);
        assert_eq!(check(&j, Criterion::MeanAbsDiff).status, Status::Breach);
        let j = judged(&strict, 0, 5, &c, &s, Some(&cmp));
        assert_eq!(j.verdict, Verdict::Wait);
    }

    #[test]
    fn a_full_step_compares_with_an_earlier_reference() {
        let c = arm(600, 0, spread(600, 0.3, 0.5));
        let none = Arm::default();
        let reference = spread(1000, 0.3, 0.5);
        let f = StepFigures {
            step: 1,
            elapsed: Duration::from_secs(10),
            canary: &c,
            stable: &none,
            reference: Some((&reference, 0)),
            compared: None,
            labelled: None,
        };
        let j = judge(&plan(), &f);
        assert_eq!(j.verdict, Verdict::Promote, "{}", j.reason(2));
        let l = check(&j, Criterion::Latency);
        assert_eq!(l.latency.as_ref().unwrap().reference_step, 1);
        // No reference at all (a plan starting at 100 %): latency is not judged.
        let j = judge(
            &plan(),
            &StepFigures {
                reference: None,
                ..f
            },
        );
        assert_eq!(check(&j, Criterion::Latency).status, Status::NotJudged);
        assert_eq!(j.verdict, Verdict::Promote);
    }

    fn quality_plan() -> RolloutPlan {
        RolloutPlan {
            max_accuracy_drop: Some(0.05),
            max_mae_increase: Some(0.1),
            min_labelled: 100,
            ..plan()
        }
    }

    fn judged_quality(
        plan: &RolloutPlan,
        secs: u64,
        canary: Labelled,
        stable: Labelled,
    ) -> Judgement {
        let (c, s) = (
            arm(600, 0, spread(600, 0.3, 0.5)),
            arm(600, 0, spread(600, 0.3, 0.5)),
        );
        judge(
            plan,
            &StepFigures {
                step: 0,
                elapsed: Duration::from_secs(secs),
                canary: &c,
                stable: &s,
                reference: Some((&s.latency, 0)),
                compared: None,
                labelled: Some((&canary, &stable)),
            },
        )
    }

    fn classes(rows: u64, correct: u64) -> Labelled {
        Labelled {
            class_rows: rows,
            correct,
            ..Labelled::default()
        }
    }

    #[test]
    fn accuracy_on_labelled_traffic() {
        let p = quality_plan();
        // Within the margin: 91 % against 95 %, margin 5 points.
        let j = judged_quality(&p, 10, classes(400, 364), classes(400, 380));
        let a = check(&j, Criterion::Accuracy);
        assert_eq!(a.status, Status::Pass, "{}", a.note);
        assert_eq!(j.verdict, Verdict::Advance, "{}", j.reason(2));
        // Clearly worse: 70 % against 95 %.
        let j = judged_quality(&p, 10, classes(400, 280), classes(400, 380));
        let a = check(&j, Criterion::Accuracy);
        assert_eq!(a.status, Status::Breach, "{}", a.note);
        assert!(a.p_value.unwrap() < 1e-6, "{a:?}");
        assert_eq!(j.verdict, Verdict::Rollback);
        assert!(
            j.reason(2).contains("accuracy on labelled traffic"),
            "{}",
            j.reason(2)
        );
        // A better canary passes however large the difference.
        let j = judged_quality(&p, 10, classes(400, 400), classes(400, 200));
        assert_eq!(check(&j, Criterion::Accuracy).status, Status::Pass);
        // Too few labels at the end of the step: it waits; before the end: pending.
        let j = judged_quality(&p, 10, classes(99, 0), classes(400, 400));
        assert_eq!(check(&j, Criterion::Accuracy).status, Status::Wait);
        assert_eq!(j.verdict, Verdict::Wait);
        let j = judged_quality(&p, 1, classes(400, 0), classes(400, 400));
        assert_eq!(check(&j, Criterion::Accuracy).status, Status::Pending);
        assert_eq!(j.verdict, Verdict::Wait);
        // Unset, or no feedback at all: not judged, and the step does not wait for it.
        let j = judged_quality(&plan(), 10, classes(400, 0), classes(400, 400));
        assert_eq!(check(&j, Criterion::Accuracy).status, Status::NotJudged);
        assert_eq!(j.verdict, Verdict::Advance);
        let (c, s) = (
            arm(600, 0, spread(600, 0.3, 0.5)),
            arm(600, 0, spread(600, 0.3, 0.5)),
        );
        let j = judge(
            &p,
            &StepFigures {
                step: 0,
                elapsed: Duration::from_secs(10),
                canary: &c,
                stable: &s,
                reference: Some((&s.latency, 0)),
                compared: None,
                labelled: None,
            },
        );
        assert_eq!(check(&j, Criterion::Accuracy).status, Status::NotJudged);
        assert_eq!(check(&j, Criterion::Mae).status, Status::NotJudged);
        assert_eq!(j.verdict, Verdict::Advance);
    }

    #[test]
    fn mean_absolute_error_on_labelled_traffic() {
        let p = quality_plan();
        let values = |rows: u64, mean: f64, sd: f64| Labelled {
            value_rows: rows,
            abs_sum: mean * rows as f64,
            sq_sum: (sd * sd + mean * mean) * rows as f64,
            ..Labelled::default()
        };
        // 0.55 against 0.5 with a margin of 0.1: passes.
        let j = judged_quality(&p, 10, values(500, 0.55, 0.2), values(500, 0.5, 0.2));
        assert_eq!(
            check(&j, Criterion::Mae).status,
            Status::Pass,
            "{}",
            check(&j, Criterion::Mae).note
        );
        // 0.9 against 0.5: rolls back.
        let j = judged_quality(&p, 10, values(500, 0.9, 0.2), values(500, 0.5, 0.2));
        assert_eq!(check(&j, Criterion::Mae).status, Status::Breach);
        assert_eq!(j.verdict, Verdict::Rollback);
        // Value feedback leaves accuracy unjudged (and the other way round), saying why.
        let a = check(&j, Criterion::Accuracy);
        assert_eq!(a.status, Status::NotJudged);
        assert!(a.note.contains("values, not classes"), "{}", a.note);
        let j = judged_quality(&p, 10, classes(400, 380), classes(400, 380));
        assert!(
            check(&j, Criterion::Mae)
                .note
                .contains("classes, not values")
        );
        assert_eq!(j.verdict, Verdict::Advance);
    }

    /// A canary exactly at the margin (its accuracy the plan's drop below stable's) is
    /// rolled back at most `alpha` of the time, at the smallest counts allowed and near
    /// an accuracy of 1 where the plain z-test is anti-conservative.
    #[test]
    fn accuracy_test_holds_its_level_at_the_margin() {
        let mut rng = fastrand::Rng::with_seed(7);
        for (n, stable_acc) in [(100u64, 0.97), (100, 0.85), (400, 0.99), (1000, 0.9)] {
            let p = RolloutPlan {
                max_accuracy_drop: Some(0.02),
                alpha: 0.05,
                ..quality_plan()
            };
            let trials = 4000;
            let mut rollbacks = 0;
            for _ in 0..trials {
                let draw = |rng: &mut fastrand::Rng, acc: f64| {
                    (0..n).filter(|_| rng.f64() < acc).count() as u64
                };
                let s = draw(&mut rng, stable_acc);
                let c = draw(&mut rng, stable_acc - 0.02);
                let j = judged_quality(&p, 10, classes(n, c), classes(n, s));
                rollbacks += u64::from(check(&j, Criterion::Accuracy).status == Status::Breach);
            }
            let rate = rollbacks as f64 / trials as f64;
            // alpha plus three standard errors of the simulated rate.
            assert!(
                rate <= 0.05 + 3.0 * (0.05f64 * 0.95 / trials as f64).sqrt(),
                "n {n}, accuracy {stable_acc}: {rate}"
            );
        }
    }
}

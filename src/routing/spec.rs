//! A model's routing state and its rules, as pure data: [`TrafficSpec`] (what
//! `routing.toml` and the admin API hold), the rollout plan, the model's `[traffic]`
//! settings, their validation, and the rules that answer "which version serves?": the
//! role of a version, whether a request goes to the canary (sticky by routing key), which
//! shadows it is mirrored to, the effective stable version, and the versions that must
//! stay loaded. The registry asks these rules; they know nothing of loaded versions.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use crate::metrics::Variant;

/// The routing file inside a model's folder.
pub const ROUTING_FILE: &str = "routing.toml";

/// A model's routing state, as `routing.toml` and the admin API hold it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrafficSpec {
    /// The version requests go to unless routed to the canary; unset = the newest ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<u64>,
    /// The canary version and its share of the traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    /// Versions that get mirrored copies of a share of the requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shadows: Vec<Shadow>,
    /// An automated rollout of the canary in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutState>,
    /// Versions that were rolled back: automatic entry does not pick them again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<u64>,
    /// Bumped by every change written through `control` (admin, CLI, any replica's
    /// controller): a change is written only over the generation it was computed from,
    /// so replicas that make the same decision at once write it (and audit it) once.
    /// Exported as `modelgate_routing_generation`, so replicas that lag show.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The canary: a version and the percentage of unpinned requests it gets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    pub version: u64,
    /// Percent of the traffic, 0 to 100 (fractions allowed).
    pub weight: f64,
}

/// A shadow: a version and the percentage of requests mirrored to it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Shadow {
    pub version: u64,
    /// Percent of the requests mirrored, 0 to 100.
    pub percent: f64,
}

/// A rollout in progress: the plan and where it stands.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RolloutState {
    /// The plan; when a change through the API leaves it out, the model's configured
    /// plan (config.toml `[traffic.rollout]`) is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<RolloutPlan>,
    /// Index of the current step in `plan.steps`.
    #[serde(default)]
    pub step: usize,
    /// When the current step began (Unix milliseconds).
    #[serde(default)]
    pub step_started_ms: u64,
    /// When the rollout of this canary began (Unix milliseconds): the quality criteria
    /// count the labelled rows from here, since feedback comes late and one step alone
    /// sees few (0 in a file written before it existed: from the current step).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub started_ms: u64,
    /// Looks at the current step that Prometheus could not answer (fleet analysis):
    /// neither advance nor rollback; at `traffic.analysis.max_inconclusive` the rollout
    /// pauses.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub inconclusive: u32,
    /// When the latest inconclusive look was (Unix milliseconds): the next waits
    /// `traffic.analysis.retry_secs`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub inconclusive_ms: u64,
    /// Paused after too many inconclusive looks: the canary keeps its weight and no
    /// replica judges the rollout until an operator sets the routing again.
    #[serde(default, skip_serializing_if = "is_false")]
    pub paused: bool,
    /// Where the window the previous step was judged on began (fleet analysis): a
    /// 100 % step's stable latency reference is stable's over that whole window, which
    /// had the samples its verdict needed (0: the interval before the step).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reference_start_ms: u64,
}

/// How a canary is rolled out: weights, how long each holds, and what rolls it back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutPlan {
    /// Canary weights (percent), in order; after the last one holds for an interval
    /// without a breach, the canary is promoted.
    pub steps: Vec<f64>,
    /// How long each step holds, in seconds.
    pub interval_secs: f64,
    /// Canary requests (and compared rows) a step needs before it passes; latency needs
    /// more, enough for a p99 at `alpha` (528 per arm at 0.01). A step short of data at
    /// the end of its interval waits.
    pub min_requests: u64,
    /// Largest share of canary requests that may fail (server-side errors).
    pub max_error_rate: f64,
    /// Largest canary p99 as a multiple of the stable p99 ...
    pub max_p99_ratio: f64,
    /// ... counted only beyond this many milliseconds, so that microsecond jitter of a
    /// fast model does not roll a canary back.
    pub p99_slack_ms: f64,
    /// Largest share of compared rows whose label or argmax differs from stable's.
    pub max_disagreement: f64,
    /// Largest mean absolute difference of float outputs from stable's; unset = unchecked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_mean_abs_diff: Option<f64>,
    /// Largest drop of the canary's accuracy below stable's on labelled traffic (joined
    /// feedback, classes), absolute; unset = unchecked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_accuracy_drop: Option<f64>,
    /// Largest rise of the canary's mean absolute error above stable's on labelled
    /// traffic (joined feedback, values), in the output's unit; unset = unchecked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_mae_increase: Option<f64>,
    /// Labelled rows each arm needs (since the rollout began) before quality is judged.
    pub min_labelled: u64,
    /// Significance level of the end-of-step tests: the largest chance, per criterion
    /// and step, that a canary meeting the thresholds is rolled back (see `judge`).
    pub alpha: f64,
    /// The same for the looks before the interval ends (every tick), all of them
    /// together: a breach acts early only when it is this certain.
    pub early_alpha: f64,
}

impl Default for RolloutPlan {
    fn default() -> Self {
        RolloutPlan {
            steps: vec![5.0, 25.0, 50.0, 100.0],
            interval_secs: 60.0,
            min_requests: 100,
            max_error_rate: 0.01,
            max_p99_ratio: 1.5,
            p99_slack_ms: 1.0,
            max_disagreement: 0.05,
            max_mean_abs_diff: None,
            max_accuracy_drop: None,
            max_mae_increase: None,
            min_labelled: 100,
            alpha: 0.01,
            early_alpha: 1e-4,
        }
    }
}

/// A rollout plan as a routing change names it (HTTP JSON, gRPC, `modelgate ctl`):
/// every field it leaves out is taken from the model's configured plan
/// (config.toml `[traffic.rollout]`), alike over every protocol.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_secs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_slack_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_disagreement: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_mean_abs_diff: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_accuracy_drop: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_mae_increase: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_labelled: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_alpha: Option<f64>,
}

impl PlanPatch {
    /// The plan this patch makes of `base` (the model's configured plan).
    pub fn over(self, base: &RolloutPlan) -> RolloutPlan {
        let b = base.clone();
        RolloutPlan {
            steps: self.steps.unwrap_or(b.steps),
            interval_secs: self.interval_secs.unwrap_or(b.interval_secs),
            min_requests: self.min_requests.unwrap_or(b.min_requests),
            max_error_rate: self.max_error_rate.unwrap_or(b.max_error_rate),
            max_p99_ratio: self.max_p99_ratio.unwrap_or(b.max_p99_ratio),
            p99_slack_ms: self.p99_slack_ms.unwrap_or(b.p99_slack_ms),
            max_disagreement: self.max_disagreement.unwrap_or(b.max_disagreement),
            max_mean_abs_diff: self.max_mean_abs_diff.or(b.max_mean_abs_diff),
            max_accuracy_drop: self.max_accuracy_drop.or(b.max_accuracy_drop),
            max_mae_increase: self.max_mae_increase.or(b.max_mae_increase),
            min_labelled: self.min_labelled.unwrap_or(b.min_labelled),
            alpha: self.alpha.unwrap_or(b.alpha),
            early_alpha: self.early_alpha.unwrap_or(b.early_alpha),
        }
    }
}

/// What happens when a new version is published (config.toml `[traffic]`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NewVersions {
    /// The newest version serves (unless routing.toml pins a stable version).
    #[default]
    Serve,
    /// It enters as the canary and follows the rollout plan.
    Canary,
    /// It enters as a shadow at `shadow_percent`.
    Shadow,
}

/// A model's traffic settings: the `[traffic]` table of its config.toml.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelTrafficConfig {
    /// What a newly published version gets.
    pub new_versions: NewVersions,
    /// Percent of requests mirrored to a version that enters as a shadow.
    pub shadow_percent: f64,
    /// Mirror requests answered by the canary to stable too, so that disagreement with
    /// stable is measured on canary traffic (on the shadow budget).
    pub compare_canary: bool,
    /// The rollout plan for canaries that enter automatically or without a plan.
    pub rollout: RolloutPlan,
}

impl Default for ModelTrafficConfig {
    fn default() -> Self {
        ModelTrafficConfig {
            new_versions: NewVersions::Serve,
            shadow_percent: 100.0,
            compare_canary: true,
            rollout: RolloutPlan::default(),
        }
    }
}

fn percent_ok(p: f64) -> bool {
    (0.0..=100.0).contains(&p)
}

impl RolloutPlan {
    /// Checks the plan; the message names the bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: &str| Err(Error::invalid(format!("rollout plan: {why}")));
        if self.steps.is_empty() || self.steps.len() > 100 {
            return bad("steps must list 1 to 100 weights");
        }
        if !self.steps.iter().all(|&w| percent_ok(w)) {
            return bad("each step weight must be between 0 and 100");
        }
        if !(self.interval_secs > 0.0 && self.interval_secs <= 7.0 * 86_400.0) {
            return bad("interval_secs must be positive and at most a week");
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            return bad("max_error_rate must be between 0 and 1");
        }
        if !(self.max_p99_ratio >= 1.0 && self.max_p99_ratio.is_finite()) {
            return bad("max_p99_ratio must be at least 1");
        }
        if !(self.p99_slack_ms >= 0.0 && self.p99_slack_ms.is_finite()) {
            return bad("p99_slack_ms must not be negative");
        }
        if !(0.0..=1.0).contains(&self.max_disagreement) {
            return bad("max_disagreement must be between 0 and 1");
        }
        if self
            .max_mean_abs_diff
            .is_some_and(|d| !(d >= 0.0 && d.is_finite()))
        {
            return bad("max_mean_abs_diff must not be negative");
        }
        if self
            .max_accuracy_drop
            .is_some_and(|d| !(0.0..=1.0).contains(&d))
        {
            return bad("max_accuracy_drop must be between 0 and 1");
        }
        if self
            .max_mae_increase
            .is_some_and(|d| !(d >= 0.0 && d.is_finite()))
        {
            return bad("max_mae_increase must not be negative");
        }
        if self.min_labelled == 0 {
            return bad("min_labelled must be at least 1");
        }
        if !(self.alpha > 0.0 && self.alpha <= 0.2) {
            return bad("alpha must be above 0 and at most 0.2");
        }
        if !(self.early_alpha > 0.0 && self.early_alpha <= self.alpha) {
            return bad("early_alpha must be above 0 and at most alpha");
        }
        Ok(())
    }
}

impl ModelTrafficConfig {
    /// Checks the settings; the message names the bad field.
    pub fn validate(&self) -> Result<()> {
        if !percent_ok(self.shadow_percent) {
            return Err(Error::Config(
                "traffic.shadow_percent: must be between 0 and 100".into(),
            ));
        }
        self.rollout
            .validate()
            .map_err(|e| Error::Config(format!("traffic.rollout: {e}")))
    }
}

impl TrafficSpec {
    /// The routing gauges of this spec, with `stable` the version serving as stable now.
    pub fn gauges(&self, stable: Option<u64>) -> crate::metrics::RoutingGauges {
        crate::metrics::RoutingGauges {
            stable,
            canary: self.canary.as_ref().map(|c| (c.version, c.weight)),
            step: self.rollout.as_ref().map(|r| r.step),
            shadows: self
                .shadows
                .iter()
                .map(|s| (s.version, s.percent))
                .collect(),
            generation: self.generation,
        }
    }

    /// Every version the spec names (these are kept loaded whatever the version policy).
    pub fn versions(&self) -> BTreeSet<u64> {
        let mut v: BTreeSet<u64> = self.stable.into_iter().collect();
        v.extend(self.canary.as_ref().map(|c| c.version));
        v.extend(self.shadows.iter().map(|s| s.version));
        v
    }

    /// The canary, when it gets any traffic.
    pub fn live_canary(&self) -> Option<&Canary> {
        self.canary.as_ref().filter(|c| c.weight > 0.0)
    }

    /// Checks what can be checked without the repository: ranges, duplicates, the
    /// canary differing from stable. The message says what is wrong.
    pub fn validate(&self) -> Result<()> {
        let named = self
            .stable
            .iter()
            .chain(self.canary.as_ref().map(|c| &c.version))
            .chain(self.shadows.iter().map(|s| &s.version));
        for &v in named {
            if v == 0 {
                return Err(Error::invalid("versions are positive integers"));
            }
        }
        if let Some(c) = &self.canary {
            if !percent_ok(c.weight) {
                return Err(Error::invalid(format!(
                    "canary weight {} is out of range (0 to 100)",
                    c.weight
                )));
            }
            if self.stable.is_none() {
                return Err(Error::invalid("a canary needs a stable version"));
            }
            if Some(c.version) == self.stable {
                return Err(Error::invalid(format!(
                    "the canary (version {}) is the stable version",
                    c.version
                )));
            }
        }
        if !self.shadows.is_empty() && self.stable.is_none() {
            return Err(Error::invalid("shadows need a stable version"));
        }
        let mut seen = BTreeSet::new();
        for s in &self.shadows {
            if !percent_ok(s.percent) {
                return Err(Error::invalid(format!(
                    "shadow {} percent {} is out of range (0 to 100)",
                    s.version, s.percent
                )));
            }
            if Some(s.version) == self.stable {
                return Err(Error::invalid(format!(
                    "shadow version {} is the stable version",
                    s.version
                )));
            }
            if !seen.insert(s.version) {
                return Err(Error::invalid(format!(
                    "shadow version {} is listed twice",
                    s.version
                )));
            }
        }
        if self.shadows.len() > 8 {
            return Err(Error::invalid("at most 8 shadows"));
        }
        if let Some(r) = &self.rollout {
            let Some(c) = &self.canary else {
                return Err(Error::invalid("a rollout needs a canary"));
            };
            if let Some(plan) = &r.plan {
                plan.validate()?;
                if r.step >= plan.steps.len() {
                    return Err(Error::invalid(format!(
                        "rollout step {} is past the plan's {} steps",
                        r.step,
                        plan.steps.len()
                    )));
                }
                if plan.steps[r.step] != c.weight {
                    return Err(Error::invalid(format!(
                        "the canary weight {} is not the rollout step's weight {}",
                        c.weight, plan.steps[r.step]
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The routing rules over a spec.
impl TrafficSpec {
    /// The role of a version a request named itself.
    pub fn variant_of(&self, version: u64) -> Variant {
        if Some(version) == self.stable {
            Variant::Stable
        } else if self.canary.as_ref().is_some_and(|c| c.version == version) {
            Variant::Canary
        } else {
            Variant::Direct
        }
    }

    /// The canary version a request without a version goes to, if it goes to the canary:
    /// by weight, sticky by `key` when one is given (see [`bucket`]). `model` names the
    /// model, so that the same key lands differently for different models.
    pub fn pick_canary(&self, model: &str, key: Option<&str>) -> Option<u64> {
        let c = self.live_canary()?;
        let point = match key {
            Some(k) => bucket(model, c.version, k),
            None => fastrand::f64() * 100.0,
        };
        (point < c.weight).then_some(c.version)
    }

    /// The shadow versions one request is mirrored to: each sampled by its percentage,
    /// never the version that answered it.
    pub fn sample_shadows(&self, answered: u64) -> impl Iterator<Item = u64> + '_ {
        self.shadows
            .iter()
            .filter(move |s| s.version != answered && s.percent > 0.0)
            .filter(|s| s.percent >= 100.0 || fastrand::f64() * 100.0 < s.percent)
            .map(|s| s.version)
    }

    /// The versions that must stay loaded whatever the version policy says: every
    /// version the spec names, and, while new versions enter as canary or shadow, the
    /// version that serves as stable now.
    pub fn pinned(&self, new_versions: NewVersions, stable_now: Option<u64>) -> BTreeSet<u64> {
        let mut v = self.versions();
        if new_versions != NewVersions::Serve {
            v.extend(stable_now);
        }
        v
    }
}

/// The version requests without a version go to (unless routed to the canary):
/// routing's stable version when it is ready; while new versions enter as canary or
/// shadow, the version that was stable before, when ready; else the newest ready one.
pub fn effective_stable(
    spec: &TrafficSpec,
    new_versions: NewVersions,
    previous: Option<u64>,
    ready: &BTreeSet<u64>,
) -> Option<u64> {
    if let Some(v) = spec.stable.filter(|v| ready.contains(v)) {
        return Some(v);
    }
    if new_versions != NewVersions::Serve
        && let Some(v) = previous.filter(|v| ready.contains(v))
    {
        return Some(v);
    }
    ready.iter().next_back().copied()
}

/// The sticky point of a routing key in [0, 100): the same model, canary and key give
/// the same point on every replica and every build (FNV-1a, then a SplitMix64 finaliser
/// so that similar keys spread out). A key is on the canary while its point is below
/// the weight, so raising the weight only moves keys from stable to canary.
pub fn bucket(model: &str, canary: u64, key: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(model.as_bytes());
    feed(&[0xff]);
    feed(&canary.to_le_bytes());
    feed(&[0xff]);
    feed(key.as_bytes());
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    // 53 bits fill an f64's mantissa exactly.
    (z >> 11) as f64 / (1u64 << 53) as f64 * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_deterministic_and_uniform() {
        assert_eq!(bucket("iris", 2, "user-1"), bucket("iris", 2, "user-1"));
        assert_ne!(bucket("iris", 2, "user-1"), bucket("iris", 3, "user-1"));
        // Recorded value: replicas and future builds must agree on it.
        assert_eq!(bucket("iris", 2, "user-1"), 34.17078944369008);
        let n = 100_000;
        let below = (0..n)
            .filter(|i| bucket("m", 1, &format!("key-{i}")) < 10.0)
            .count();
        let share = below as f64 / n as f64;
        assert!((share - 0.10).abs() < 0.005, "share {share}");
    }

    #[test]
    fn spec_validation() {
        let ok = TrafficSpec {
            stable: Some(1),
            canary: Some(Canary {
                version: 2,
                weight: 12.5,
            }),
            shadows: vec![Shadow {
                version: 3,
                percent: 100.0,
            }],
            ..TrafficSpec::default()
        };
        ok.validate().unwrap();
        let mut bad = ok.clone();
        bad.canary.as_mut().unwrap().weight = 100.5;
        assert!(bad.validate().is_err());
        let mut bad = ok.clone();
        bad.canary.as_mut().unwrap().version = 1;
        assert!(bad.validate().unwrap_err().to_string().contains("stable"));
        let mut bad = ok.clone();
        bad.stable = None;
        assert!(bad.validate().is_err());
        let mut bad = ok.clone();
        bad.shadows.push(bad.shadows[0].clone());
        assert!(bad.validate().is_err());
        let mut bad = ok.clone();
        bad.rollout = Some(RolloutState {
            plan: Some(RolloutPlan::default()),
            step: 0,
            step_started_ms: 0,
            ..RolloutState::default()
        });
        // 12.5 is not the first step's weight (5).
        assert!(bad.validate().is_err());
        bad.canary.as_mut().unwrap().weight = 5.0;
        bad.validate().unwrap();
        // Significance levels: positive, early at most the end-of-step one.
        for (alpha, early, ok) in [
            (0.01, 1e-4, true),
            (0.2, 0.2, true),
            (0.0, 0.0, false),
            (0.5, 1e-4, false),
            (0.01, 0.02, false),
            (0.01, 0.0, false),
            (f64::NAN, 1e-4, false),
        ] {
            let plan = RolloutPlan {
                alpha,
                early_alpha: early,
                ..RolloutPlan::default()
            };
            let err = plan.validate().err().map(|e| e.to_string());
            assert_eq!(err.is_none(), ok, "{alpha} {early}: {err:?}");
            if let Some(e) = err {
                assert!(e.contains("alpha"), "{e}");
            }
        }
    }

    #[test]
    fn spec_round_trips_through_toml() {
        let spec = TrafficSpec {
            stable: Some(1),
            canary: Some(Canary {
                version: 2,
                weight: 5.0,
            }),
            shadows: vec![],
            rollout: Some(RolloutState {
                plan: Some(RolloutPlan::default()),
                step: 0,
                step_started_ms: 1_700_000_000_000,
                ..RolloutState::default()
            }),
            rejected: vec![4],
            generation: 3,
        };
        let text = toml::to_string(&spec).unwrap();
        let back: TrafficSpec = toml::from_str(&text).unwrap();
        assert_eq!(back, spec);
        assert!(toml::from_str::<TrafficSpec>("stabel = 1").is_err());
    }

    #[test]
    fn which_version_serves() {
        let ready: BTreeSet<u64> = [1, 2, 3].into_iter().collect();
        let mut spec = TrafficSpec::default();
        // No routing: the newest ready version.
        assert_eq!(
            effective_stable(&spec, NewVersions::Serve, Some(1), &ready),
            Some(3)
        );
        // New versions enter as canary: the one that was stable stays.
        assert_eq!(
            effective_stable(&spec, NewVersions::Canary, Some(1), &ready),
            Some(1)
        );
        spec.stable = Some(2);
        assert_eq!(
            effective_stable(&spec, NewVersions::Serve, None, &ready),
            Some(2)
        );
        // Routing's stable not ready: the newest ready.
        spec.stable = Some(9);
        assert_eq!(
            effective_stable(&spec, NewVersions::Serve, None, &ready),
            Some(3)
        );
        spec.stable = Some(1);
        spec.canary = Some(Canary {
            version: 3,
            weight: 100.0,
        });
        assert_eq!(spec.variant_of(1), Variant::Stable);
        assert_eq!(spec.variant_of(3), Variant::Canary);
        assert_eq!(spec.variant_of(2), Variant::Direct);
        assert_eq!(spec.pick_canary("m", Some("k")), Some(3));
        spec.canary.as_mut().unwrap().weight = 0.0;
        assert_eq!(spec.pick_canary("m", None), None);
        spec.shadows = vec![
            Shadow {
                version: 2,
                percent: 100.0,
            },
            Shadow {
                version: 3,
                percent: 0.0,
            },
        ];
        assert_eq!(spec.sample_shadows(1).collect::<Vec<_>>(), vec![2]);
        assert!(spec.sample_shadows(2).next().is_none());
        assert_eq!(
            spec.pinned(NewVersions::Canary, Some(5)),
            [1, 2, 3, 5].into_iter().collect()
        );
    }
}

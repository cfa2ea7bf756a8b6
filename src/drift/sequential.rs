//! The sequential detector (the default `mode`), pure: every sampled row updates it.
//!
//! Each feature goes through its reference profile's quantiles: the mid-rank
//! probability integral transform (ties share the middle of their ranks, so discrete
//! features behave), then normal scores (the inverse normal CDF), standardized so that
//! the reference law of the score has mean 0 and variance 1. Four one-sided CUSUMs
//! watch the score `z`: mean up (`z - K_MEAN`), mean down (`-z - K_MEAN`), variance up
//! (`z² - 1 - K_VAR_UP`) and variance down (`1 - z² - K_VAR_DOWN`). Predicted classes
//! get two CUSUMs per class on the standardized class indicator (rare and unseen
//! classes share one `other` bucket).
//!
//! Thresholds are calibrated to the configured average run length (`arl_rows`, rows
//! between false alarms while nothing drifts) with a union bound over all statistics:
//! each one-sided CUSUM gets `arl_rows × statistics`, so the whole detector raises at
//! most one false alarm per `arl_rows` rows on independent rows. A statistic's
//! zero-start run length is computed exactly for its reference law (the Markov chain
//! of Brook and Evans, 1972, on [`CELLS`] states: deterministic, no simulation noise,
//! and fast enough to do when the detector first meets a profile); thresholds are
//! cached by law, so the usual case (continuous features: the same normal scores) is
//! calibrated once per process.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use super::findings::Evidence;
use super::profile::{Prediction, PredictionProfile, Profile};

/// Reference value of the mean CUSUMs: tuned for a shift of half a standard deviation.
pub const K_MEAN: f64 = 0.25;
/// Reference value of the variance-up CUSUM (near the likelihood ratio's for variance x2).
pub const K_VAR_UP: f64 = 0.4;
/// Reference value of the variance-down CUSUM (near the likelihood ratio's for variance /2).
pub const K_VAR_DOWN: f64 = 0.3;
/// Reference value of the class CUSUMs (a shift of 0.4 standard deviations of the
/// class indicator, e.g. 1/3 to 1/2 for three even classes).
pub const K_CLASS: f64 = 0.2;
/// A statistic past this share of its threshold puts the version in WARN.
pub const WARN_FRACTION: f64 = 0.75;
/// Statistics are capped at this multiple of their threshold: the first crossing (the
/// alarm) is unchanged, and once the drift is over a statistic is back under its
/// threshold within `(CAP - 1) × h / k` rows instead of as long as the drift lasted.
const CAP: f64 = 1.5;
/// Classes less common than this in the reference share the `other` bucket, and every
/// bucket counts as at least this common (conservative for rarer ones).
const RARE_CLASS: f64 = 0.01;
/// Most class buckets (the most common classes; the rest are `other`).
const MAX_CLASSES: usize = 32;
/// States of the Markov chain that computes a CUSUM's run length.
pub const CELLS: usize = 150;

/// The names of the statistics, as evidence and metrics show them.
pub const FEATURE_TESTS: [&str; 4] = [
    "cusum_mean_up",
    "cusum_mean_down",
    "cusum_var_up",
    "cusum_var_down",
];
const CLASS_TESTS: [&str; 2] = ["cusum_class_up", "cusum_class_down"];

/// The inverse of the standard normal CDF (Acklam's rational approximation, relative
/// error below 1.2e-9), for p in (0, 1); clamped at the ends.
pub fn inverse_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// One feature's normal-score transform, built from the profile's reference sample.
#[derive(Debug, Clone)]
pub struct Transform {
    /// The distinct reference values, ascending.
    nodes: Vec<f64>,
    /// The standardized normal score of each node.
    scores: Vec<f64>,
    /// The reference law of the score: (score, probability) per node.
    law: Vec<(f64, f64)>,
}

impl Transform {
    /// `None` when the sample cannot carry a score (fewer than two distinct values).
    pub fn new(sample: &[f64]) -> Option<Transform> {
        let mut s: Vec<f64> = sample.iter().copied().filter(|v| v.is_finite()).collect();
        s.sort_by(f64::total_cmp);
        let n = s.len() as f64;
        let mut nodes: Vec<f64> = Vec::new();
        let mut counts: Vec<f64> = Vec::new();
        for v in s {
            match nodes.last() {
                Some(&last) if last == v => {
                    if let Some(c) = counts.last_mut() {
                        *c += 1.0;
                    }
                }
                _ => {
                    nodes.push(v);
                    counts.push(1.0);
                }
            }
        }
        if nodes.len() < 2 {
            return None;
        }
        // Mid-ranks: a value's probability integral transform is the middle of its ranks.
        let mut below = 0.0;
        let raw: Vec<f64> = counts
            .iter()
            .map(|&c| {
                let u = (below + c / 2.0) / n;
                below += c;
                inverse_normal_cdf(u)
            })
            .collect();
        let mean: f64 = raw.iter().zip(&counts).map(|(z, c)| z * c / n).sum();
        let var: f64 = raw
            .iter()
            .zip(&counts)
            .map(|(z, c)| (z - mean).powi(2) * c / n)
            .sum();
        if var < 1e-12 {
            return None;
        }
        let sd = var.sqrt();
        let scores: Vec<f64> = raw.iter().map(|z| (z - mean) / sd).collect();
        let law = scores
            .iter()
            .zip(&counts)
            .map(|(&z, &c)| (z, c / n))
            .collect();
        Some(Transform { nodes, scores, law })
    }

    /// The score of a live value (linear between nodes, the end scores beyond them);
    /// `None` for NaN.
    pub fn score(&self, x: f64) -> Option<f64> {
        if x.is_nan() {
            return None;
        }
        let i = self.nodes.partition_point(|&v| v < x);
        if i >= self.nodes.len() {
            return self.scores.last().copied();
        }
        if self.nodes[i] == x || i == 0 {
            return Some(self.scores[i]);
        }
        let (a, b) = (self.nodes[i - 1], self.nodes[i]);
        let t = (x - a) / (b - a);
        Some(self.scores[i - 1] + t * (self.scores[i] - self.scores[i - 1]))
    }

    /// The reference law of the score.
    pub fn law(&self) -> &[(f64, f64)] {
        &self.law
    }
}

/// Zero-start average run length of `S = max(0, S + X)` until `S >= h`, where X takes
/// the values of `law` (increment, probability): Brook and Evans' Markov chain on
/// `cells` states (state i stands for S near `i w`, `w = 2h / (2 cells - 1)`).
///
/// The chain moves by the increment's range (a band around the diagonal) or resets to
/// 0 (one column). With `Q = B + r e0'` (B the band without column 0, r the reset
/// chances), `L = (I - Q)^-1 1` gives `L0 = u0 / (1 - v0)` for `u = (I - B)^-1 1` and
/// `v = (I - B)^-1 r`: two banded solves, not a dense one. `I - B` is diagonally
/// dominant (rows of Q sum to at most 1), so elimination needs no pivoting.
pub fn run_length(law: &[(f64, f64)], h: f64, cells: usize) -> f64 {
    let n = cells.max(2);
    let w = 2.0 * h / (2.0 * n as f64 - 1.0);
    let mut a = vec![0.0f64; n * n];
    let mut reset = vec![0.0f64; n];
    let (mut below, mut above) = (0usize, 0usize);
    for i in 0..n {
        a[i * n + i] += 1.0;
        let s = i as f64 * w;
        for &(x, p) in law {
            let next = (s + x).max(0.0);
            if next >= h {
                continue;
            }
            let j = ((next / w) + 0.5).floor() as usize;
            if j == 0 {
                reset[i] += p;
            } else if j < n {
                a[i * n + j] -= p;
                if j < i {
                    below = below.max(i - j);
                } else {
                    above = above.max(j - i);
                }
            }
        }
    }
    let mut u = vec![1.0f64; n];
    let mut v = reset;
    for col in 0..n {
        let d = a[col * n + col];
        if d.abs() < 1e-300 {
            return f64::INFINITY;
        }
        for r in col + 1..n.min(col + below + 1) {
            let f = a[r * n + col] / d;
            if f != 0.0 {
                for k in col..n.min(col + above + 1) {
                    a[r * n + k] -= f * a[col * n + k];
                }
                u[r] -= f * u[col];
                v[r] -= f * v[col];
            }
        }
    }
    for r in (0..n).rev() {
        let (mut au, mut av) = (u[r], v[r]);
        for k in r + 1..n.min(r + above + 1) {
            au -= a[r * n + k] * u[k];
            av -= a[r * n + k] * v[k];
        }
        u[r] = au / a[r * n + r];
        v[r] = av / a[r * n + r];
    }
    if v[0] >= 1.0 {
        return f64::INFINITY;
    }
    u[0] / (1.0 - v[0])
}

/// The threshold whose zero-start run length is `target` rows, for increments `law`
/// (which must drift downwards). Cached by law and target: deterministic.
pub fn threshold(law: &[(f64, f64)], target: f64) -> f64 {
    static CACHE: Mutex<Option<HashMap<u64, f64>>> = Mutex::new(None);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for (x, p) in law {
        x.to_bits().hash(&mut hasher);
        p.to_bits().hash(&mut hasher);
    }
    target.to_bits().hash(&mut hasher);
    let key = hasher.finish();
    if let Ok(c) = CACHE.lock()
        && let Some(h) = c.as_ref().and_then(|m| m.get(&key))
    {
        return *h;
    }
    let h = solve_threshold(law, target);
    if let Ok(mut c) = CACHE.lock() {
        let map = c.get_or_insert_with(HashMap::new);
        if map.len() > 4096 {
            map.clear();
        }
        map.insert(key, h);
    }
    h
}

fn solve_threshold(law: &[(f64, f64)], target: f64) -> f64 {
    let f = |h: f64| run_length(law, h, CELLS).ln() - target.ln();
    // Bracket, then regula falsi (Illinois) on ln ARL, which is nearly linear in h.
    // Thresholds of interest are 5 to 100: start the bracket at 8 (fewer solves).
    let (mut lo, mut hi) = (0.0f64, 8.0f64);
    let (mut flo, mut fhi) = (-target.ln(), f(8.0));
    while fhi < 0.0 && hi < 1e6 {
        lo = hi;
        flo = fhi;
        hi *= 2.0;
        fhi = f(hi);
    }
    if !fhi.is_finite() {
        // The law never drifts up to h: any threshold holds; take the bracket's top.
        return hi;
    }
    let mut side = 0;
    for _ in 0..60 {
        let mid = (lo * fhi - hi * flo) / (fhi - flo);
        let fm = f(mid);
        if !fm.is_finite() || fm.abs() < 1e-3 || hi - lo < 1e-4 {
            return mid;
        }
        if fm > 0.0 {
            hi = mid;
            fhi = fm;
            if side == -1 {
                flo /= 2.0;
            }
            side = -1;
        } else {
            lo = mid;
            flo = fm;
            if side == 1 {
                fhi /= 2.0;
            }
            side = 1;
        }
    }
    hi
}

/// A law shifted and mapped: the increments `g(z) - k` of a statistic.
fn increments(law: &[(f64, f64)], g: impl Fn(f64) -> f64, k: f64) -> Vec<(f64, f64)> {
    law.iter().map(|&(z, p)| (g(z) - k, p)).collect()
}

struct FeatureStat {
    name: String,
    column: usize,
    transform: Transform,
    s: [f64; 4],
    h: [f64; 4],
}

struct ClassStat {
    /// Reference classes, sorted, and the bucket each one counts in.
    classes: Vec<i64>,
    bucket_of: Vec<usize>,
    names: Vec<String>,
    /// The standardized indicator of each bucket: its value when the row is in the
    /// bucket, and when it is not.
    yes: Vec<f64>,
    no: Vec<f64>,
    other: usize,
    s: Vec<[f64; 2]>,
    h: Vec<[f64; 2]>,
}

/// The sequential statistics of one model version.
pub struct Sequential {
    features: Vec<FeatureStat>,
    classes: Option<ClassStat>,
    /// Configured rows between false alarms, and how many one-sided statistics share it.
    pub arl_rows: f64,
    pub statistics: usize,
    thin: u32,
    since_thin: u32,
    /// Rows that entered the statistics.
    pub rows: u64,
}

impl Sequential {
    /// Builds the statistics for `profile` and calibrates their thresholds to
    /// `arl_rows`; `thin` lets every n-th row in; `predictions` watches the predicted
    /// classes or scores too.
    pub fn new(profile: &Profile, arl_rows: f64, thin: u32, predictions: bool) -> Sequential {
        let mut features: Vec<FeatureStat> = profile
            .features
            .iter()
            .enumerate()
            .filter_map(|(c, f)| {
                Transform::new(&f.sample).map(|t| FeatureStat {
                    name: f.name.clone(),
                    column: c,
                    transform: t,
                    s: [0.0; 4],
                    h: [0.0; 4],
                })
            })
            .collect();
        let prediction = profile.prediction.as_ref().filter(|_| predictions);
        if let Some(PredictionProfile::Scores { output, profile: f }) = prediction
            && let Some(t) = Transform::new(&f.sample)
        {
            features.push(FeatureStat {
                name: format!("prediction:{output}"),
                column: usize::MAX,
                transform: t,
                s: [0.0; 4],
                h: [0.0; 4],
            });
        }
        let mut classes = match prediction {
            Some(PredictionProfile::Classes {
                output,
                classes,
                proportions,
            }) => Some(class_stat(output, classes, proportions)),
            _ => None,
        };
        let statistics = 4 * features.len() + classes.as_ref().map_or(0, |c| 2 * c.names.len());
        let target = arl_rows * statistics.max(1) as f64;
        for f in &mut features {
            let law = f.transform.law();
            f.h = [
                threshold(&increments(law, |z| z, K_MEAN), target),
                threshold(&increments(law, |z| -z, K_MEAN), target),
                threshold(&increments(law, |z| z * z - 1.0, K_VAR_UP), target),
                threshold(&increments(law, |z| 1.0 - z * z, K_VAR_DOWN), target),
            ];
        }
        if let Some(c) = classes.as_mut()
            && !c.names.is_empty()
        {
            c.h = (0..c.names.len())
                .map(|b| {
                    let p = c.prob(b);
                    let law = [(c.yes[b], p), (c.no[b], 1.0 - p)];
                    [
                        threshold(&increments(&law, |z| z, K_CLASS), target),
                        threshold(&increments(&law, |z| -z, K_CLASS), target),
                    ]
                })
                .collect();
        }
        Sequential {
            features,
            classes,
            arl_rows,
            statistics,
            thin: thin.max(1),
            since_thin: 0,
            rows: 0,
        }
    }

    /// Takes one row (its feature values and prediction). Returns true when some
    /// statistic is at or past its threshold.
    pub fn add(&mut self, values: &[f64], prediction: Option<Prediction>) -> bool {
        self.since_thin += 1;
        if self.since_thin < self.thin {
            return self.over();
        }
        self.since_thin = 0;
        self.rows += 1;
        let mut over = false;
        for f in &mut self.features {
            let x = if f.column == usize::MAX {
                match prediction {
                    Some(Prediction::Score(s)) => s,
                    Some(Prediction::Class(c)) => c as f64,
                    None => continue,
                }
            } else {
                match values.get(f.column) {
                    Some(&x) => x,
                    None => continue,
                }
            };
            let Some(z) = f.transform.score(x) else {
                continue;
            };
            let v = z * z - 1.0;
            let inc = [z - K_MEAN, -z - K_MEAN, v - K_VAR_UP, -v - K_VAR_DOWN];
            for ((s, h), d) in f.s.iter_mut().zip(&f.h).zip(inc) {
                *s = (*s + d).clamp(0.0, CAP * h);
                over |= *s >= *h;
            }
        }
        if let (Some(c), Some(Prediction::Class(class))) = (self.classes.as_mut(), prediction) {
            let hit = c
                .classes
                .binary_search(&class)
                .map_or(c.other, |i| c.bucket_of[i]);
            for b in 0..c.names.len() {
                let z = if b == hit { c.yes[b] } else { c.no[b] };
                let inc = [z - K_CLASS, -z - K_CLASS];
                for ((s, h), d) in c.s[b].iter_mut().zip(&c.h[b]).zip(inc) {
                    *s = (*s + d).clamp(0.0, CAP * h);
                    over |= *s >= *h;
                }
            }
        }
        over
    }

    /// Starts every statistic over from zero (after an alarm in tests; a new profile).
    pub fn reset(&mut self) {
        for f in &mut self.features {
            f.s = [0.0; 4];
        }
        if let Some(c) = self.classes.as_mut() {
            c.s.iter_mut().for_each(|s| *s = [0.0; 2]);
        }
    }

    /// Every statistic: (feature, test, value, threshold).
    pub fn statistics(&self) -> impl Iterator<Item = (&str, &'static str, f64, f64)> {
        let f = self
            .features
            .iter()
            .flat_map(|f| (0..4).map(move |i| (f.name.as_str(), FEATURE_TESTS[i], f.s[i], f.h[i])));
        let c = self.classes.iter().flat_map(|c| {
            (0..c.names.len()).flat_map(move |b| {
                (0..2).map(move |i| (c.names[b].as_str(), CLASS_TESTS[i], c.s[b][i], c.h[b][i]))
            })
        });
        f.chain(c)
    }

    /// Some statistic is at or past its threshold.
    pub fn over(&self) -> bool {
        self.statistics().any(|(_, _, s, h)| s >= h)
    }

    /// Some statistic is past [`WARN_FRACTION`] of its threshold.
    pub fn warning(&self) -> bool {
        self.statistics().any(|(_, _, s, h)| s >= WARN_FRACTION * h)
    }

    /// The statistics past [`WARN_FRACTION`] of their thresholds as evidence, furthest
    /// past first.
    pub fn evidence(&self) -> Vec<Evidence> {
        let mut e: Vec<Evidence> = self
            .statistics()
            .filter(|(_, _, s, h)| *s >= WARN_FRACTION * h)
            .map(|(name, test, s, h)| Evidence {
                feature: name.to_string(),
                test,
                statistic: s,
                p_value: None,
                threshold: h,
                level: if s >= h { "drift" } else { "warn" },
            })
            .collect();
        e.sort_by(|a, b| b.excess().total_cmp(&a.excess()));
        e
    }
}

impl ClassStat {
    fn prob(&self, b: usize) -> f64 {
        // yes - no = 1 / sd and no = -p / sd: p = -no / (yes - no).
        (-self.no[b] / (self.yes[b] - self.no[b])).clamp(0.0, 1.0)
    }
}

fn class_stat(output: &str, classes: &[i64], proportions: &[f64]) -> ClassStat {
    let mut order: Vec<usize> = (0..classes.len()).collect();
    order.sort_by(|&a, &b| proportions[b].total_cmp(&proportions[a]));
    let mut bucket_of = vec![usize::MAX; classes.len()];
    let mut names = Vec::new();
    let mut probs = Vec::new();
    for &i in order.iter().take(MAX_CLASSES) {
        if proportions[i] >= RARE_CLASS {
            bucket_of[i] = names.len();
            names.push(format!("prediction:{output}={}", classes[i]));
            probs.push(proportions[i]);
        }
    }
    let other = names.len();
    let rest: f64 = (0..classes.len())
        .filter(|&i| bucket_of[i] == usize::MAX)
        .map(|i| proportions[i])
        .sum();
    for b in bucket_of.iter_mut().filter(|b| **b == usize::MAX) {
        *b = other;
    }
    names.push(format!("prediction:{output}=other"));
    probs.push(rest);
    let (mut yes, mut no) = (Vec::new(), Vec::new());
    for p in &probs {
        // Every bucket counts as at least RARE_CLASS common: never a huge jump for a
        // class the reference barely saw (fewer false alarms, not more).
        let p = p.clamp(RARE_CLASS, 1.0 - RARE_CLASS);
        let sd = (p * (1.0 - p)).sqrt();
        yes.push((1.0 - p) / sd);
        no.push(-p / sd);
    }
    let n = names.len();
    ClassStat {
        classes: classes.to_vec(),
        bucket_of,
        names,
        yes,
        no,
        other,
        s: vec![[0.0; 2]; n],
        h: vec![[0.0; 2]; n],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drift::profile;

    /// Box-Muller: a standard normal draw.
    pub fn normal(rng: &mut fastrand::Rng) -> f64 {
        let (u, v) = (rng.f64().max(1e-300), rng.f64());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// The reference: 5,000 rows of 4 independent N(0,1) features.
    fn reference(seed: u64) -> Profile {
        let mut rng = fastrand::Rng::with_seed(seed);
        let rows = 5000;
        let values: Vec<f64> = (0..rows * 4).map(|_| normal(&mut rng)).collect();
        let names: Vec<String> = (0..4).map(|i| format!("x{i}")).collect();
        profile::build("m", 1, "test", "x", &names, rows, &values, "", &[], 10)
    }

    #[test]
    fn inverse_normal_matches_known_quantiles() {
        for (p, z) in [
            (0.5, 0.0),
            (0.975, 1.959_963_984_540_054),
            (0.001, -3.090_232_306_167_813_5),
            (1e-6, -4.753_424_308_822_899),
        ] {
            assert!((inverse_normal_cdf(p) - z).abs() < 1e-8, "{p}");
        }
    }

    #[test]
    fn mid_ranks_standardize_discrete_features() {
        // 70 % zeros, 30 % ones: two scores, mean 0, variance 1 under the reference.
        let sample: Vec<f64> = (0..1000).map(|i| f64::from(u8::from(i % 10 < 3))).collect();
        let t = Transform::new(&sample).unwrap();
        let mean: f64 = t.law().iter().map(|(z, p)| z * p).sum();
        let var: f64 = t.law().iter().map(|(z, p)| z * z * p).sum();
        assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-12);
        assert_eq!(t.law().len(), 2);
        assert!(t.score(1.0).unwrap() > 0.0 && t.score(0.0).unwrap() < 0.0);
        assert!(
            Transform::new(&[3.0; 10]).is_none(),
            "a constant carries no score"
        );
        assert_eq!(t.score(f64::NAN), None);
    }

    #[test]
    fn the_markov_chain_run_length_matches_simulation() {
        // N(0,1) increments (a 2,000-point normal-score law) with k = 0.25, threshold for
        // an ARL of 500 rows; 2,000 simulated runs have a mean within 6 % (the standard
        // error of the mean is about 2.2 %).
        let law: Vec<(f64, f64)> = (0..2000)
            .map(|i| {
                (
                    inverse_normal_cdf((f64::from(i) + 0.5) / 2000.0),
                    1.0 / 2000.0,
                )
            })
            .collect();
        let inc = increments(&law, |z| z, K_MEAN);
        let h = threshold(&inc, 500.0);
        let mut rng = fastrand::Rng::with_seed(1);
        let runs = 2000;
        let mut total = 0u64;
        for _ in 0..runs {
            let mut s = 0.0f64;
            let mut n = 0u64;
            while s < h {
                s = (s + normal(&mut rng) - K_MEAN).max(0.0);
                n += 1;
            }
            total += n;
        }
        let mean = total as f64 / f64::from(runs);
        assert!((mean / 500.0 - 1.0).abs() < 0.06, "h {h}: mean run {mean}");
    }

    /// Feeds `pre` in-distribution rows then `post` changed rows (feature 0 through
    /// `change`); returns the false alarms before the change and the delay after it.
    fn stream(
        seq: &mut Sequential,
        rng: &mut fastrand::Rng,
        pre: usize,
        post: usize,
        change: impl Fn(f64) -> f64,
    ) -> (usize, Option<usize>) {
        let mut false_alarms = 0;
        let mut row = [0.0f64; 4];
        for _ in 0..pre {
            row.iter_mut().for_each(|v| *v = normal(rng));
            if seq.add(&row, None) {
                false_alarms += 1;
                seq.reset();
            }
        }
        for i in 0..post {
            row.iter_mut().for_each(|v| *v = normal(rng));
            row[0] = change(row[0]);
            if seq.add(&row, None) {
                return (false_alarms, Some(i + 1));
            }
        }
        (false_alarms, None)
    }

    /// Delay median and max over 25 seeded streams of a change of feature 0, with the
    /// defaults (ARL 1e7 rows).
    fn delays(change: impl Fn(f64) -> f64 + Copy) -> (usize, usize, usize) {
        let p = reference(42);
        let mut got = Vec::new();
        let mut missed = 0;
        for seed in 0..25 {
            let mut seq = Sequential::new(&p, 1e7, 1, true);
            let mut rng = fastrand::Rng::with_seed(seed);
            let (fa, d) = stream(&mut seq, &mut rng, 2000, 2000, change);
            assert_eq!(fa, 0);
            match d {
                Some(d) => got.push(d),
                None => missed += 1,
            }
        }
        got.sort_unstable();
        eprintln!("delays: {got:?}");
        (got[got.len() / 2], got.last().copied().unwrap_or(0), missed)
    }

    // Tolerances: the goal's figures (issue 16) with the seeds fixed; the figures the
    // seeds give are in the messages and in BENCHMARKS.md ("Issue 16").
    #[test]
    fn mean_up_half_a_standard_deviation() {
        let (median, max, missed) = delays(|x| x + 0.5);
        assert_eq!(missed, 0);
        assert!(median <= 140 && max <= 300, "median {median}, max {max}");
    }

    #[test]
    fn mean_down_half_a_standard_deviation() {
        let (median, max, missed) = delays(|x| x - 0.5);
        assert_eq!(missed, 0);
        assert!(median <= 140 && max <= 300, "median {median}, max {max}");
    }

    #[test]
    fn variance_doubled() {
        let (median, max, missed) = delays(|x| x * 2f64.sqrt());
        assert_eq!(missed, 0);
        assert!(median <= 250 && max <= 500, "median {median}, max {max}");
    }

    #[test]
    fn variance_halved() {
        let (median, max, missed) = delays(|x| x * 0.5f64.sqrt());
        assert_eq!(missed, 0);
        assert!(median <= 300 && max <= 600, "median {median}, max {max}");
    }

    #[test]
    fn false_alarms_follow_the_configured_run_length() {
        // ARL 1e4 rows: 1,000,000 independent rows raise at most 100 alarms on average
        // (the union bound); the count is Poisson, so 130 is 3 standard deviations over.
        // Some alarms must come: the bound is not vacuous (more than a tenth of it).
        let p = reference(7);
        let mut seq = Sequential::new(&p, 1e4, 1, true);
        let mut rng = fastrand::Rng::with_seed(3);
        let (fa, _) = stream(&mut seq, &mut rng, 1_000_000, 0, |x| x);
        eprintln!("ARL 1e4: {fa} false alarms in 1e6 rows");
        assert!((10..=130).contains(&fa), "{fa} false alarms");
        // The defaults: none in 1,000,000 rows.
        let mut seq = Sequential::new(&p, 1e7, 1, true);
        let (fa, _) = stream(&mut seq, &mut rng, 1_000_000, 0, |x| x);
        assert_eq!(fa, 0);
    }

    #[test]
    fn autocorrelated_rows_and_thinning() {
        // AR(1) with rho 0.5 on every feature, ARL 1e4: the run length in rows shrinks
        // (docs/CONFIG.md states the figure); thinning to every 5th row (rho^5 = 0.03)
        // brings it back under the configured rate.
        let p = reference(7);
        let count = |thin: u32, seed: u64| {
            let mut seq = Sequential::new(&p, 1e4, thin, true);
            let mut rng = fastrand::Rng::with_seed(seed);
            let rho: f64 = 0.5;
            let mut row = [0.0f64; 4];
            let mut alarms = 0;
            for _ in 0..1_000_000 {
                for v in &mut row {
                    *v = rho * *v + (1.0 - rho * rho).sqrt() * normal(&mut rng);
                }
                if seq.add(&row, None) {
                    alarms += 1;
                    seq.reset();
                }
            }
            alarms
        };
        let raw = count(1, 11);
        let thin5 = count(5, 11);
        let thin10 = count(10, 11);
        eprintln!(
            "AR(1) rho 0.5, ARL 1e4, per 1e6 sampled rows: {raw}; thin 5: {thin5}; thin 10: {thin10}"
        );
        // Independent rows: about 100 (see above). AR(1) 0.5: measured 7,327, seventy
        // times the configured rate.
        assert!(raw > 3000, "{raw}");
        // Every 5th row (rho^5 = 0.03): 200,000 rows enter, 20 expected at the configured
        // rate; measured 28 (still a little over). Every 10th: 100,000 enter, 10
        // expected; measured 5. Poisson, 3 sd over the expectation: 34 and 20.
        assert!(thin5 <= 34, "{thin5}");
        assert!(thin10 <= 20, "{thin10}");
    }

    #[test]
    fn a_categorical_shift() {
        // Three even classes; class 0 rises to one half.
        let classes: Vec<Prediction> = (0..3000).map(|i| Prediction::Class(i % 3)).collect();
        let values: Vec<f64> = (0..3000).map(f64::from).collect();
        let p = profile::build(
            "m",
            1,
            "t",
            "x",
            &["a".into()],
            3000,
            &values,
            "label",
            &classes,
            10,
        );
        let mut got = Vec::new();
        for seed in 0..25 {
            let mut seq = Sequential::new(&p, 1e7, 1, true);
            let mut rng = fastrand::Rng::with_seed(seed);
            for _ in 0..20_000 {
                let c = rng.i64(0..3);
                assert!(!seq.add(&[rng.f64() * 3000.0], Some(Prediction::Class(c))));
            }
            let mut delay = None;
            for i in 0..5000 {
                let c = if rng.bool() { 0 } else { rng.i64(1..3) };
                if seq.add(&[rng.f64() * 3000.0], Some(Prediction::Class(c))) {
                    delay = Some(i + 1);
                    break;
                }
            }
            let d = delay.expect("detected");
            got.push(d);
            let top = &seq.evidence()[0];
            assert!(top.feature.starts_with("prediction:label="), "{top:?}");
        }
        got.sort_unstable();
        let (median, max) = (got[12], got[24]);
        assert!(median <= 600 && max <= 1500, "median {median}, max {max}");
        eprintln!("class 1/3 -> 1/2: median {median}, max {max}");
    }
}

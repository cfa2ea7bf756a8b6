//! The few distributions the rollout judge needs, computed exactly enough for
//! p-values far in the tail: binomial and hypergeometric tails, the order statistic
//! that bounds a quantile, the likelihood ratio of an anytime-valid test, and the
//! normal tail of the large-sample tests on labelled rows.
//!
//! Tails are sums of probabilities from the first term outward (each term from the
//! previous by the ratio of consecutive probabilities), stopped once the terms no longer
//! change the sum; the first term comes from `ln Γ`. A tail is always summed on the side
//! away from the mean (the small side), so tiny p-values keep their precision.

pub use crate::util::ln_gamma;

/// `ln C(n, k)`.
pub fn ln_choose(n: u64, k: u64) -> f64 {
    if k > n {
        return f64::NEG_INFINITY;
    }
    let (n, k) = (n as f64, k as f64);
    ln_gamma(n + 1.0) - ln_gamma(k + 1.0) - ln_gamma(n - k + 1.0)
}

/// Relative size below which a further term of a tail does not count.
const NEGLIGIBLE: f64 = 1e-17;

/// Sums a tail from its first term `start` while `next(term)` gives the following one,
/// until the terms stop mattering.
fn tail_sum(start: f64, mut next: impl FnMut(f64) -> Option<f64>) -> f64 {
    let mut term = start;
    let mut sum = start;
    // Zero, or NaN from an impossible first term.
    if start.is_nan() || start <= 0.0 {
        return 0.0;
    }
    while let Some(t) = next(term) {
        term = t;
        sum += term;
        if term <= sum * NEGLIGIBLE {
            break;
        }
    }
    sum
}

fn ln_binomial_pmf(j: u64, n: u64, p: f64) -> f64 {
    ln_choose(n, j) + j as f64 * p.ln() + (n - j) as f64 * (-p).ln_1p()
}

/// `P(X >= k)` for `k <= n` with `k` at or above the mode: summed upward.
fn binomial_upper(k: u64, n: u64, p: f64) -> f64 {
    let r = p / (1.0 - p);
    let mut j = k;
    tail_sum(ln_binomial_pmf(k, n, p).exp(), |t| {
        (j < n).then(|| {
            let v = t * (n - j) as f64 / (j + 1) as f64 * r;
            j += 1;
            v
        })
    })
}

/// `P(X <= k)` with `k` at or below the mode: summed downward.
fn binomial_lower(k: u64, n: u64, p: f64) -> f64 {
    let r = (1.0 - p) / p;
    let mut j = k;
    tail_sum(ln_binomial_pmf(k, n, p).exp(), |t| {
        (j > 0).then(|| {
            let v = t * j as f64 / (n - j + 1) as f64 * r;
            j -= 1;
            v
        })
    })
}

/// `P(X >= k)` for `X ~ Binomial(n, p)`.
pub fn binomial_sf(k: u64, n: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n || p <= 0.0 || p.is_nan() {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let v = if k as f64 > n as f64 * p {
        binomial_upper(k, n, p)
    } else {
        1.0 - binomial_lower(k - 1, n, p)
    };
    v.clamp(0.0, 1.0)
}

/// `P(X <= k)` for `X ~ Binomial(n, p)`.
pub fn binomial_cdf(k: u64, n: u64, p: f64) -> f64 {
    if k >= n || p <= 0.0 || p.is_nan() {
        return 1.0;
    }
    if p >= 1.0 {
        return 0.0;
    }
    let v = if (k as f64) < n as f64 * p {
        binomial_lower(k, n, p)
    } else {
        1.0 - binomial_upper(k + 1, n, p)
    };
    v.clamp(0.0, 1.0)
}

/// `P(X >= x)` for `X` the number of marked items among `draws` drawn without
/// replacement from `total` items of which `marked` are marked (hypergeometric): the
/// exact conditional (Fisher) test of two proportions.
pub fn hypergeometric_sf(x: u64, total: u64, marked: u64, draws: u64) -> f64 {
    if marked > total || draws > total {
        return 0.0;
    }
    let lo = draws.saturating_sub(total - marked);
    let hi = draws.min(marked);
    if x <= lo {
        return 1.0;
    }
    if x > hi {
        return 0.0;
    }
    let ln_pmf = |j: u64| {
        ln_choose(marked, j) + ln_choose(total - marked, draws - j) - ln_choose(total, draws)
    };
    let (k, n, nn) = (marked as f64, draws as f64, total as f64);
    let mean = n * k / nn;
    let v = if x as f64 > mean {
        let mut j = x;
        tail_sum(ln_pmf(x).exp(), |t| {
            (j < hi).then(|| {
                let jf = j as f64;
                let v = t * (k - jf) * (n - jf) / ((jf + 1.0) * (nn - k - n + jf + 1.0));
                j += 1;
                v
            })
        })
    } else {
        let mut j = x - 1;
        1.0 - tail_sum(ln_pmf(j).exp(), |t| {
            (j > lo).then(|| {
                let jf = j as f64;
                let v = t * jf * (nn - k - n + jf) / ((k - jf + 1.0) * (n - jf + 1.0));
                j -= 1;
                v
            })
        })
    };
    v.clamp(0.0, 1.0)
}

/// The fewest samples whose largest is an upper confidence bound of the `q`-quantile at
/// level `1 - alpha`: the smallest `n` with `q^n <= alpha`.
pub fn min_samples_for_quantile(q: f64, alpha: f64) -> u64 {
    if !(q > 0.0 && q < 1.0 && alpha > 0.0 && alpha < 1.0) {
        return u64::MAX;
    }
    let mut n = (alpha.ln() / q.ln()).ceil().max(1.0) as u64;
    // Floating point may land one off either way: settle it on q^n itself.
    while n > 1 && q.powf((n - 1) as f64) <= alpha {
        n -= 1;
    }
    while q.powf(n as f64) > alpha {
        n += 1;
    }
    n
}

/// The order statistic that bounds the `q`-quantile from above: the smallest rank `r`
/// (1-based, the r-th smallest of `n` samples) with `P(X_(r) < ξ_q) <= alpha`. For any
/// distribution, `X_(r) < ξ_q` needs at least `r` of the `n` samples below `ξ_q`, each
/// with probability at most `q`, so `P(X_(r) < ξ_q) <= P(Binomial(n, q) >= r)`. `None`
/// when even the largest sample is not enough (`q^n > alpha`).
pub fn quantile_upper_rank(n: u64, q: f64, alpha: f64) -> Option<u64> {
    if n == 0 || binomial_sf(n, n, q) > alpha {
        return None;
    }
    // The tail falls as r grows: the first r whose tail is within alpha.
    let (mut lo, mut hi) = (1u64, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if binomial_sf(mid, n, q) <= alpha {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(lo)
}

/// `ln` of the likelihood ratio of `k` failures in `n` trials under failure rate `p1`
/// against `p0` (Wald's sequential test). Under any rate `p <= p0 < p1` its exponential
/// is a non-negative supermartingale, so by Ville's inequality the chance that it ever
/// reaches `1 / a`, however often it is looked at, is at most `a`.
pub fn ln_likelihood_ratio(k: u64, n: u64, p0: f64, p1: f64) -> f64 {
    if k > n {
        return 0.0;
    }
    if p0 <= 0.0 {
        // Under a zero rate a failure is impossible: one failure settles it.
        return if k > 0 { f64::INFINITY } else { 0.0 };
    }
    if p1 <= p0 || p1.is_nan() || p0 >= 1.0 {
        return 0.0;
    }
    let fail = k as f64 * (p1 / p0).ln();
    let pass = (n - k) as f64 * ((1.0 - p1) / (1.0 - p0)).ln();
    fail + pass
}

/// P(Z > z) of a standard normal (erfc by Abramowitz-Stegun 7.1.26, error < 1.5e-7).
pub fn normal_sf(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erfc = poly * (-x * x).exp();
    let erfc = if x >= 0.0 { erfc } else { 2.0 - erfc };
    erfc / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: f64, want: f64, rel: f64) {
        assert!(
            (got - want).abs() <= rel * want.abs().max(1e-300),
            "got {got:e}, want {want:e}"
        );
    }

    #[test]
    fn ln_gamma_matches_factorials() {
        assert!(ln_gamma(1.0).abs() < 1e-13 && ln_gamma(2.0).abs() < 1e-13);
        close(ln_gamma(10.0), 362_880.0f64.ln(), 1e-13);
        close(ln_gamma(0.5), std::f64::consts::PI.sqrt().ln(), 1e-13);
        // ln 100! = 363.739375555563...
        close(ln_gamma(101.0), 363.739_375_555_563_5, 1e-13);
        close(ln_choose(10, 3), 120f64.ln(), 1e-13);
    }

    /// Exact values from rational arithmetic (Python's fractions and math.comb).
    #[test]
    fn binomial_tails_match_exact_values() {
        close(binomial_sf(5, 100, 0.01), 0.003_432_321_587_754_515, 1e-9);
        close(binomial_sf(4, 120, 0.01), 0.032_984_912_238_996_925, 1e-9);
        close(
            binomial_sf(70, 1000, 0.05),
            0.003_474_358_698_846_074_6,
            1e-9,
        );
        close(binomial_sf(30, 1000, 0.05), 0.999_280_802_719_784_8, 1e-12);
        close(binomial_cdf(3, 600, 0.01), 0.149_861_255_510_586_38, 1e-9);
        close(binomial_cdf(0, 527, 0.01), 0.99f64.powi(527), 1e-9);
        assert_eq!(binomial_sf(0, 10, 0.3), 1.0);
        assert_eq!(binomial_sf(11, 10, 0.3), 0.0);
        assert_eq!(binomial_sf(1, 10, 0.0), 0.0);
        assert_eq!(binomial_sf(10, 10, 1.0), 1.0);
        assert!(binomial_sf(612, 640, 0.01) < 1e-300);
        // Large n (sd 315): 16 sd out is tiny, 3.18 sd out is about 7.4e-4 (normal
        // tail 7.4e-4), the mean about a half.
        let n = 10_000_000;
        assert!(binomial_sf(105_000, n, 0.01) < 1e-40);
        close(binomial_sf(101_000, n, 0.01), 7.4e-4, 0.15);
        close(binomial_sf(100_000, n, 0.01), 0.5, 0.01);
        // sf and cdf are complements.
        for k in [0, 3, 10, 40] {
            close(
                binomial_sf(k + 1, 500, 0.02) + binomial_cdf(k, 500, 0.02),
                1.0,
                1e-12,
            );
        }
    }

    #[test]
    fn hypergeometric_tails_match_exact_values() {
        close(
            hypergeometric_sf(5, 50, 10, 10),
            0.018_129_475_654_571_375,
            1e-9,
        );
        close(
            hypergeometric_sf(8, 6000, 20, 600),
            0.000_403_643_410_638_222_67,
            1e-9,
        );
        close(
            hypergeometric_sf(1, 6000, 20, 600),
            0.878_851_340_844_964_6,
            1e-9,
        );
        assert_eq!(hypergeometric_sf(0, 10, 3, 4), 1.0);
        assert_eq!(hypergeometric_sf(4, 10, 3, 4), 0.0);
        // Every draw marked when everything is marked.
        assert_eq!(hypergeometric_sf(4, 10, 10, 4), 1.0);
    }

    #[test]
    fn order_statistic_bounds() {
        // q^n <= alpha: 0.99^527 = 0.005009 > 0.005, 0.99^528 < 0.005.
        assert_eq!(min_samples_for_quantile(0.99, 0.005), 528);
        assert_eq!(min_samples_for_quantile(0.99, 0.01), 459);
        assert_eq!(quantile_upper_rank(527, 0.99, 0.005), None);
        assert_eq!(quantile_upper_rank(528, 0.99, 0.005), Some(528));
        // Exact values (rational arithmetic): the 998th of 1000, the 4968th of 5000.
        assert_eq!(quantile_upper_rank(1000, 0.99, 0.005), Some(998));
        assert_eq!(quantile_upper_rank(5000, 0.99, 0.005), Some(4968));
        assert_eq!(quantile_upper_rank(0, 0.99, 0.005), None);
    }

    /// The bound covers the true p99 as often as it promises: uniform samples on
    /// [0, 1) (p99 = 0.99), seeded, so the test is deterministic.
    #[test]
    fn order_statistic_bound_covers() {
        let mut rng = fastrand::Rng::with_seed(7);
        let (n, alpha, trials) = (600u64, 0.05, 4000);
        let r = quantile_upper_rank(n, 0.99, alpha).unwrap() as usize;
        let mut missed = 0;
        let mut xs = vec![0.0f64; n as usize];
        for _ in 0..trials {
            xs.iter_mut().for_each(|x| *x = rng.f64());
            xs.sort_by(f64::total_cmp);
            if xs[r - 1] < 0.99 {
                missed += 1;
            }
        }
        let rate = missed as f64 / trials as f64;
        // At most alpha, up to sampling error (sd about 0.0034 at 4000 trials).
        assert!(rate <= alpha + 0.012, "missed {rate}");
    }

    #[test]
    fn likelihood_ratio() {
        // 9 failures in 9 trials, 1 % against 3 %: 3^9 x (0.97 / 0.99)^0.
        close(
            ln_likelihood_ratio(9, 9, 0.01, 0.03),
            9.0 * 3f64.ln(),
            1e-12,
        );
        close(
            ln_likelihood_ratio(2, 102, 0.01, 0.03),
            2.0 * 3f64.ln() + 100.0 * (0.97f64 / 0.99).ln(),
            1e-12,
        );
        assert_eq!(ln_likelihood_ratio(1, 5, 0.0, 0.0), f64::INFINITY);
        assert_eq!(ln_likelihood_ratio(0, 5, 0.0, 0.0), 0.0);
        assert_eq!(ln_likelihood_ratio(3, 5, 1.0, 1.0), 0.0);
    }

    /// Ville's inequality in practice: a rate exactly at the threshold, looked at after
    /// every trial, crosses 1 / a in at most a share a of the runs.
    #[test]
    fn likelihood_ratio_is_anytime_valid() {
        let mut rng = fastrand::Rng::with_seed(11);
        let (p0, p1, a): (f64, f64, f64) = (0.05, 0.15, 0.01);
        let (runs, trials) = (2000, 2000);
        let mut crossed = 0;
        for _ in 0..runs {
            let mut k = 0;
            for n in 1..=trials {
                k += u64::from(rng.f64() < p0);
                if ln_likelihood_ratio(k, n, p0, p1) >= (1.0 / a).ln() {
                    crossed += 1;
                    break;
                }
            }
        }
        let rate = crossed as f64 / runs as f64;
        assert!(rate <= a + 0.007, "crossed in {rate} of the runs");
    }
}

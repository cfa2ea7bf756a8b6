//! The statistics of drift detection, written out so that they can be checked against
//! scipy/numpy on fixed data (the reference numbers are in the tests below).
//!
//! - PSI (population stability index) over fixed bins: `sum((a - e) * ln(a / e))`, with
//!   empty bins floored at [`PSI_FLOOR`] so that one empty bin does not make it infinite.
//! - Two-sample Kolmogorov-Smirnov: the statistic `D = max |F1 - F2|` and the asymptotic
//!   p-value from Kolmogorov's limiting distribution (scipy's `kstwobign.sf(sqrt(en)*D)`,
//!   `en = n1*n2/(n1+n2)`).
//! - Pearson's chi-squared goodness of fit of observed class counts to reference
//!   proportions, with its p-value from the regularised upper incomplete gamma function.
//! - Jensen-Shannon divergence of two distributions (base 2, between 0 and 1).

/// The smallest proportion a PSI bin counts with (the usual 0.0001).
pub const PSI_FLOOR: f64 = 1e-4;

/// Proportions of each bin; an empty input gives all zeros.
pub fn proportions(counts: &[u64]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    counts
        .iter()
        .map(|&c| {
            if total == 0 {
                0.0
            } else {
                c as f64 / total as f64
            }
        })
        .collect()
}

/// Counts of `values` in the bins that the sorted inner `edges` cut: bin i holds the
/// values in `(edges[i-1], edges[i]]`; NaN goes to the last bin.
pub fn bin_counts(values: impl IntoIterator<Item = f64>, edges: &[f64]) -> Vec<u64> {
    let mut counts = vec![0u64; edges.len() + 1];
    for v in values {
        let i = if v.is_nan() {
            edges.len()
        } else {
            edges.partition_point(|&e| e < v)
        };
        counts[i] += 1;
    }
    counts
}

/// Population stability index of `actual` against `expected` (both proportions).
pub fn psi(expected: &[f64], actual: &[f64]) -> f64 {
    expected
        .iter()
        .zip(actual)
        .map(|(&e, &a)| {
            let (e, a) = (e.max(PSI_FLOOR), a.max(PSI_FLOOR));
            (a - e) * (a / e).ln()
        })
        .sum()
}

/// Two-sample Kolmogorov-Smirnov test: (statistic, asymptotic two-sided p-value).
/// Both samples are sorted in place.
pub fn ks_2samp(a: &mut [f64], b: &mut [f64]) -> (f64, f64) {
    if a.is_empty() || b.is_empty() {
        return (0.0, 1.0);
    }
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0usize, 0usize, 0.0f64);
    while i < a.len() && j < b.len() {
        // Step past every value equal to the smaller head in both samples at once, so
        // that ties are handled as the empirical distribution functions see them.
        let x = if a[i] <= b[j] { a[i] } else { b[j] };
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / n1 - j as f64 / n2).abs());
    }
    let en = n1 * n2 / (n1 + n2);
    (d, kolmogorov_sf(en.sqrt() * d))
}

/// Survival function of Kolmogorov's limiting distribution:
/// `2 * sum_{k>=1} (-1)^(k-1) exp(-2 k^2 x^2)`.
pub fn kolmogorov_sf(x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    if x < 0.3 {
        // The alternating series converges slowly here, and the value is 1 to 1e-9.
        return 1.0;
    }
    let mut sum = 0.0;
    for k in 1..=100 {
        let k = f64::from(k);
        let term = (-2.0 * k * k * x * x).exp();
        sum += if k as u32 % 2 == 1 { term } else { -term };
        if term < 1e-17 {
            break;
        }
    }
    (2.0 * sum).clamp(0.0, 1.0)
}

/// Pearson's chi-squared test of `observed` counts against `expected` proportions:
/// (statistic, p-value, degrees of freedom). Reference proportions are floored at
/// [`PSI_FLOOR`] (and renormalised) so that a class the reference never saw counts as
/// rare, not impossible.
pub fn chi_squared(observed: &[u64], expected: &[f64]) -> (f64, f64, usize) {
    let n: u64 = observed.iter().sum();
    if n == 0 || observed.len() < 2 {
        return (0.0, 1.0, 0);
    }
    let floored: Vec<f64> = expected.iter().map(|&e| e.max(PSI_FLOOR)).collect();
    let total: f64 = floored.iter().sum();
    let stat: f64 = observed
        .iter()
        .zip(&floored)
        .map(|(&o, &e)| {
            let e = e / total * n as f64;
            (o as f64 - e).powi(2) / e
        })
        .sum();
    let dof = observed.len() - 1;
    (stat, gamma_q(dof as f64 / 2.0, stat / 2.0), dof)
}

/// Jensen-Shannon divergence of two distributions (proportions), base 2: 0 for equal
/// distributions, 1 for disjoint ones.
pub fn jensen_shannon(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    if sp <= 0.0 || sq <= 0.0 {
        return 0.0;
    }
    let kl = |a: &[f64], sa: f64, m: &[f64]| -> f64 {
        a.iter()
            .zip(m)
            .filter(|(x, _)| **x > 0.0)
            .map(|(&x, &mm)| (x / sa) * ((x / sa) / mm).log2())
            .sum()
    };
    let m: Vec<f64> = p
        .iter()
        .zip(q)
        .map(|(&a, &b)| (a / sp + b / sq) / 2.0)
        .collect();
    ((kl(p, sp, &m) + kl(q, sq, &m)) / 2.0).clamp(0.0, 1.0)
}

pub use crate::util::ln_gamma;

/// Regularised upper incomplete gamma function Q(a, x) = Γ(a, x) / Γ(a): the series for
/// x < a + 1, Lentz's continued fraction otherwise (Numerical Recipes' gammq).
pub fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 || a <= 0.0 {
        return 1.0;
    }
    let front = (-x + a * x.ln() - ln_gamma(a)).exp();
    if x < a + 1.0 {
        let (mut sum, mut term, mut ap) = (1.0 / a, 1.0 / a, a);
        for _ in 0..1000 {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if term.abs() < sum.abs() * 1e-16 {
                break;
            }
        }
        (1.0 - sum * front).clamp(0.0, 1.0)
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..1000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        (front * h).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: f64, want: f64, tol: f64) {
        assert!(
            (got - want).abs() <= tol * want.abs().max(1e-300) || (got - want).abs() < 1e-15,
            "got {got}, want {want}"
        );
    }

    // Reference numbers computed by numpy/scipy: tests/fixtures/drift_reference.py.
    include!("../../tests/fixtures/drift_reference.rs");

    #[test]
    fn psi_matches_numpy() {
        close(psi(&PSI_EXPECTED, &PSI_ACTUAL), PSI_VALUE, 1e-12);
        assert_eq!(psi(&PSI_EXPECTED, &PSI_EXPECTED), 0.0);
    }

    #[test]
    fn ks_matches_scipy() {
        let (mut a, mut b) = (KS_A.to_vec(), KS_B.to_vec());
        let (d, p) = ks_2samp(&mut a, &mut b);
        close(d, KS_D, 1e-12);
        close(p, KS_P, 1e-9);
        // Identical samples: D = 0, p = 1.
        let (mut a, mut b) = (KS_A.to_vec(), KS_A.to_vec());
        assert_eq!(ks_2samp(&mut a, &mut b), (0.0, 1.0));
        close(kolmogorov_sf(1.0), KOLMOGOROV_SF_1, 1e-12);
    }

    #[test]
    fn chi_squared_matches_scipy() {
        let (stat, p, dof) = chi_squared(&CHI_OBSERVED, &CHI_EXPECTED);
        close(stat, CHI_STAT, 1e-12);
        close(p, CHI_P, 1e-9);
        assert_eq!(dof, CHI_OBSERVED.len() - 1);
        close(gamma_q(2.5, 7.0), GAMMA_Q_2_5_7, 1e-12);
        close(gamma_q(3.0, 1.0), GAMMA_Q_3_1, 1e-12);
    }

    #[test]
    fn jensen_shannon_matches_scipy() {
        close(jensen_shannon(&JS_P, &JS_Q), JS_VALUE, 1e-12);
        assert_eq!(jensen_shannon(&[1.0, 0.0], &[0.0, 1.0]), 1.0);
    }

    #[test]
    fn binning() {
        let counts = bin_counts([0.5, 1.0, 1.5, 2.0, 9.0, f64::NAN], &[1.0, 2.0]);
        assert_eq!(counts, vec![2, 2, 2]);
        assert_eq!(proportions(&[1, 3]), vec![0.25, 0.75]);
    }
}

//! The window tests, as a pure function: one full window of rows against the reference
//! profile, with the configured feature test (PSI or Kolmogorov-Smirnov) and prediction
//! test (chi-squared or Jensen-Shannon), Bonferroni-corrected. What it returns is the
//! evidence (warn and drift levels, strongest first) and every statistic computed.

use std::collections::VecDeque;

use serde::Serialize;

use super::profile::{FeatureProfile, Prediction, PredictionProfile, Profile};
use super::{Correction, FeatureTest, ModelDriftConfig, PredictionTest, stats};

/// The rows of a window: feature values and the prediction, oldest first.
pub type Rows = VecDeque<(Vec<f64>, Option<Prediction>)>;

/// One test's finding in a window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Evidence {
    /// A feature name, or `prediction:<output>`.
    pub feature: String,
    /// `psi`, `ks`, `chi2` or `js`.
    pub test: &'static str,
    pub statistic: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_value: Option<f64>,
    /// The threshold it was held to (PSI / JS level, or the corrected alpha).
    pub threshold: f64,
    /// `warn` or `drift`.
    pub level: &'static str,
}

impl Evidence {
    /// How far the finding is past its own threshold, comparable across tests: the
    /// statistic over its threshold, or for a p-value `ln p / ln alpha` (2 means p is
    /// alpha squared). Above 1 at the drift level.
    pub fn excess(&self) -> f64 {
        match self.p_value {
            Some(p) => {
                let (lp, la) = (p.max(1e-300).ln(), self.threshold.clamp(1e-300, 0.999).ln());
                lp / la
            }
            None if self.threshold > 0.0 => self.statistic / self.threshold,
            None => 0.0,
        }
    }
}

impl std::fmt::Display for Evidence {
    /// One readable finding for log lines: `a: psi 0.312 >= 0.25 (drift)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.p_value {
            Some(p) => write!(
                f,
                "{}: {} {:.4}, p {:.3e} < {:.3e} ({})",
                self.feature, self.test, self.statistic, p, self.threshold, self.level
            ),
            None => write!(
                f,
                "{}: {} {:.4} >= {} ({})",
                self.feature, self.test, self.statistic, self.threshold, self.level
            ),
        }
    }
}

/// The findings of a window as one log field.
pub fn summary(evidence: &[Evidence]) -> String {
    let parts: Vec<String> = evidence.iter().map(Evidence::to_string).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join("; ")
    }
}

/// What testing one window found.
pub struct Findings {
    /// Warn and drift findings, strongest first.
    pub evidence: Vec<Evidence>,
    /// Every statistic computed: (feature or `prediction:<output>`, test, value).
    pub scores: Vec<(String, &'static str, f64)>,
}

impl Findings {
    /// Some finding is at the drift level.
    pub fn drifting(&self) -> bool {
        self.evidence.iter().any(|e| e.level == "drift")
    }
}

/// Tests one full window against the profile.
pub fn test_window(profile: &Profile, rows: &Rows, settings: &ModelDriftConfig) -> Findings {
    let mut scores: Vec<(String, &'static str, f64)> = Vec::new();
    let mut findings: Vec<(Evidence, f64)> = Vec::new();
    // Bonferroni: the p-value tests of one window are one family.
    let p_tests = match settings.feature_test {
        FeatureTest::Ks => profile.features.len(),
        FeatureTest::Psi => 0,
    } + usize::from(
        settings.prediction_test == PredictionTest::Chi2
            && matches!(profile.prediction, Some(PredictionProfile::Classes { .. })),
    );
    // Overlapping windows: the `window / step` tests that share a window's rows count
    // as one family too, or testing often raises false alarms on its own (12 to 15 per
    // 6 M rows at step 10 to 20 before this).
    let overlap = (settings.window / settings.step.max(1)).max(1) as f64;
    let alpha = match settings.correction {
        Correction::Bonferroni => settings.alpha / (p_tests.max(1) as f64 * overlap),
        Correction::None => settings.alpha,
    };
    type Found = Vec<(Evidence, f64)>;
    type Scores = Vec<(String, &'static str, f64)>;
    let psi_finding =
        |name: &str, f: &FeatureProfile, values: &[f64], out: &mut Found, scores: &mut Scores| {
            let counts = stats::bin_counts(values.iter().copied(), &f.edges);
            let value = stats::psi(&f.proportions, &stats::proportions(&counts));
            scores.push((name.to_string(), "psi", value));
            let level = if value >= settings.psi_drift {
                Some(("drift", settings.psi_drift))
            } else if value >= settings.psi_warn {
                Some(("warn", settings.psi_warn))
            } else {
                None
            };
            if let Some((level, threshold)) = level {
                out.push((
                    Evidence {
                        feature: name.to_string(),
                        test: "psi",
                        statistic: value,
                        p_value: None,
                        threshold,
                        level,
                    },
                    value,
                ));
            }
        };
    for (c, f) in profile.features.iter().enumerate() {
        let column: Vec<f64> = rows.iter().map(|(row, _)| row[c]).collect();
        match settings.feature_test {
            FeatureTest::Psi => psi_finding(&f.name, f, &column, &mut findings, &mut scores),
            FeatureTest::Ks => {
                let (mut a, mut b) = (column, f.sample.clone());
                let (d, p) = stats::ks_2samp(&mut a, &mut b);
                scores.push((f.name.clone(), "ks", d));
                if p < alpha {
                    findings.push((
                        Evidence {
                            feature: f.name.clone(),
                            test: "ks",
                            statistic: d,
                            p_value: Some(p),
                            threshold: alpha,
                            level: "drift",
                        },
                        d,
                    ));
                }
            }
        }
    }
    match (&profile.prediction, settings.prediction_test) {
        (_, PredictionTest::Off) | (None, _) => {}
        (Some(PredictionProfile::Scores { output, profile: f }), _) => {
            let values: Vec<f64> = rows
                .iter()
                .filter_map(|(_, p)| match p {
                    Some(Prediction::Score(s)) => Some(*s),
                    Some(Prediction::Class(c)) => Some(*c as f64),
                    None => None,
                })
                .collect();
            psi_finding(
                &format!("prediction:{output}"),
                f,
                &values,
                &mut findings,
                &mut scores,
            );
        }
        (
            Some(PredictionProfile::Classes {
                output,
                classes,
                proportions,
            }),
            test,
        ) => {
            // Classes the reference never saw share one extra bucket.
            let mut observed = vec![0u64; classes.len() + 1];
            for (_, p) in rows {
                if let Some(Prediction::Class(c)) = p {
                    let i = classes.binary_search(c).unwrap_or(classes.len());
                    observed[i] += 1;
                }
            }
            let mut expected = proportions.clone();
            expected.push(0.0);
            let name = format!("prediction:{output}");
            match test {
                PredictionTest::Chi2 => {
                    let (stat, p, _) = stats::chi_squared(&observed, &expected);
                    scores.push((name.clone(), "chi2", stat));
                    if p < alpha {
                        findings.push((
                            Evidence {
                                feature: name,
                                test: "chi2",
                                statistic: stat,
                                p_value: Some(p),
                                threshold: alpha,
                                level: "drift",
                            },
                            stat,
                        ));
                    }
                }
                PredictionTest::Js => {
                    let js = stats::jensen_shannon(&expected, &stats::proportions(&observed));
                    scores.push((name.clone(), "js", js));
                    let level = if js >= settings.js_drift {
                        Some(("drift", settings.js_drift))
                    } else if js >= settings.js_drift / 2.0 {
                        Some(("warn", settings.js_drift / 2.0))
                    } else {
                        None
                    };
                    if let Some((level, threshold)) = level {
                        findings.push((
                            Evidence {
                                feature: name,
                                test: "js",
                                statistic: js,
                                p_value: None,
                                threshold,
                                level,
                            },
                            js,
                        ));
                    }
                }
                PredictionTest::Off => {}
            }
        }
    }
    // Furthest past its own threshold first: a chi-squared value (40 to 160) must not
    // outrank a PSI (at most about 1) only for being a bigger number.
    findings.sort_by(|a, b| b.0.excess().total_cmp(&a.0.excess()));
    Findings {
        evidence: findings.into_iter().map(|(e, _)| e).collect(),
        scores,
    }
}

//! Live model quality from joined feedback: per model version and variant, accuracy
//! and per-class recall (classes) or MAE and RMSE (values), over tumbling windows of
//! labelled rows and cumulatively; a one-sided test of each full window against the
//! reference quality, with hysteresis, raises one `model.quality` event per episode.
//!
//! The reference is the model's `[capture]` `reference_accuracy` / `reference_mae` when
//! set (a stated target: exact binomial test), else the version's own from its profile
//! (`modelgate profile --label-column`, compared as the sample it was measured on),
//! else, for a version that is not the stable one, the stable variant's last full
//! window (two-proportion z-test for accuracy, Welch's z-test for absolute errors). The
//! stable version without a configured reference has nothing to be compared with.
//! Everything here is pure: the writer thread feeds it and delivers its events.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::routing::stats::normal_sf;

/// Most classes whose recall is tracked (and exported).
pub const MAX_CLASSES: usize = 32;

/// The quality settings a tracker runs with (from the model's `[capture]` table).
#[derive(Debug, Clone, PartialEq)]
pub struct QualitySettings {
    pub window: usize,
    pub alpha: f64,
    pub bad_windows: u32,
    pub good_windows: u32,
    pub reference_accuracy: Option<f64>,
    pub reference_mae: Option<f64>,
    /// The version's own reference from its profile, when the config sets none.
    pub profile: Option<crate::drift::profile::ReferenceQuality>,
}

/// A profile's reference quality as the window it was measured on.
fn profile_window(q: crate::drift::profile::ReferenceQuality) -> Option<WindowStats> {
    if q.rows == 0 {
        return None;
    }
    Some(match (q.accuracy, q.mae) {
        (Some(a), _) => WindowStats {
            rows: q.rows,
            correct: (a * q.rows as f64).round() as u64,
            mean_abs: 0.0,
            var_abs: 0.0,
            classes: true,
        },
        (None, Some(m)) => WindowStats {
            rows: q.rows,
            correct: 0,
            mean_abs: m,
            var_abs: q.mae_var.unwrap_or(0.0),
            classes: false,
        },
        (None, None) => return None,
    })
}

/// One labelled row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Labelled {
    Class { label: i64, predicted: i64 },
    Value { value: f64, predicted: f64 },
}

/// The quality of one model version and variant, as shown and exported.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct QualityStatus {
    pub model: String,
    pub version: u64,
    pub variant: String,
    /// Labelled rows seen.
    pub rows: u64,
    /// Of them labelled with a class, and predicted right (what the rollout judge's
    /// accuracy test counts).
    #[serde(default)]
    pub class_rows: u64,
    #[serde(default)]
    pub correct: u64,
    /// Sums of the absolute and squared errors of the rows labelled with a value.
    #[serde(default)]
    pub abs_error_sum: f64,
    #[serde(default)]
    pub sq_error_sum: f64,
    /// Cumulative accuracy (classes), or null.
    pub accuracy: Option<f64>,
    /// Accuracy of the last full window.
    pub window_accuracy: Option<f64>,
    /// Cumulative MAE and RMSE (values).
    pub mae: Option<f64>,
    pub rmse: Option<f64>,
    pub window_mae: Option<f64>,
    /// Recall per true class (cumulative), for the first [`MAX_CLASSES`] classes.
    pub recall: BTreeMap<i64, f64>,
    /// What the windows are compared with, and the last test's p-value.
    pub reference: Option<f64>,
    pub reference_source: Option<String>,
    pub p_value: Option<f64>,
    /// `OK` or `DEGRADED`.
    pub state: String,
    pub windows_tested: u64,
}

/// The counters of one version and variant.
#[derive(Debug, Default)]
pub struct Tracker {
    pub status: QualityStatus,
    correct: u64,
    abs_sum: f64,
    sq_sum: f64,
    per_class: BTreeMap<i64, (u64, u64)>,
    window: VecDeque<Labelled>,
    /// The last full window: (rows, correct) or (rows, mean abs error, variance).
    pub last_window: Option<WindowStats>,
    bad: u32,
    good: u32,
    degraded: bool,
    /// First and last prediction time (Unix ms) of the current window's rows.
    pub window_span: (u64, u64),
    /// The span of the last full window.
    pub last_span: (u64, u64),
}

/// What a full window measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowStats {
    pub rows: u64,
    pub correct: u64,
    pub mean_abs: f64,
    pub var_abs: f64,
    pub classes: bool,
}

/// A window judged worse than the reference for `bad_windows` windows in a row.
#[derive(Debug, Clone, PartialEq)]
pub struct Alarm {
    pub metric: &'static str,
    pub live: f64,
    pub reference: f64,
    pub reference_source: String,
    pub p_value: f64,
    pub window_rows: u64,
    pub span: (u64, u64),
}

impl Tracker {
    /// Adds a labelled row predicted at `time_ms`; when it completes a window, tests it
    /// against `baseline` (the stable variant's last window, if any) and returns an
    /// alarm when an episode starts.
    pub fn add(
        &mut self,
        row: Labelled,
        time_ms: u64,
        settings: &QualitySettings,
        baseline: Option<WindowStats>,
    ) -> Option<Alarm> {
        self.status.rows += 1;
        match row {
            Labelled::Class { label, predicted } => {
                let hit = label == predicted;
                self.correct += u64::from(hit);
                self.status.class_rows += 1;
                self.status.correct = self.correct;
                if self.per_class.len() < MAX_CLASSES || self.per_class.contains_key(&label) {
                    let c = self.per_class.entry(label).or_default();
                    c.0 += 1;
                    c.1 += u64::from(hit);
                }
                self.status.accuracy = Some(self.correct as f64 / self.status.rows as f64);
                self.status.recall = self
                    .per_class
                    .iter()
                    .map(|(k, (n, h))| (*k, *h as f64 / (*n).max(1) as f64))
                    .collect();
            }
            Labelled::Value { value, predicted } => {
                let e = (value - predicted).abs();
                self.abs_sum += e;
                self.sq_sum += e * e;
                self.status.abs_error_sum = self.abs_sum;
                self.status.sq_error_sum = self.sq_sum;
                let n = self.status.rows as f64;
                self.status.mae = Some(self.abs_sum / n);
                self.status.rmse = Some((self.sq_sum / n).sqrt());
            }
        }
        if self.window.is_empty() {
            self.window_span = (time_ms, time_ms);
        }
        self.window_span.0 = self.window_span.0.min(time_ms);
        self.window_span.1 = self.window_span.1.max(time_ms);
        self.window.push_back(row);
        if self.window.len() < settings.window {
            return None;
        }
        let stats = window_stats(&self.window);
        self.window.clear();
        self.last_window = Some(stats);
        self.last_span = self.window_span;
        if stats.classes {
            self.status.window_accuracy = Some(stats.correct as f64 / stats.rows as f64);
        } else {
            self.status.window_mae = Some(stats.mean_abs);
        }
        self.judge(stats, settings, baseline)
    }

    fn judge(
        &mut self,
        w: WindowStats,
        settings: &QualitySettings,
        baseline: Option<WindowStats>,
    ) -> Option<Alarm> {
        // The profile's reference is itself measured on a finite sample (its rows):
        // it is compared as a sample, as the stable variant's window is, never as an
        // exact target (a validation accuracy of 1.0 on 47 rows must not make every
        // later miss significant). A configured reference is a stated target.
        let (sample, sample_source) = match settings.profile.and_then(profile_window) {
            Some(p) => (Some(p), "profile"),
            None => (baseline, "stable"),
        };
        let (metric, live, reference, source, p) = if w.classes {
            let live = w.correct as f64 / w.rows as f64;
            if let Some(p0) = settings.reference_accuracy {
                // Exact: the chance of this few correct rows if the accuracy were p0.
                let p = crate::routing::stats::binomial_cdf(w.correct, w.rows, p0);
                ("accuracy", live, p0, "config", p)
            } else if let Some(b) = sample.filter(|b| b.classes) {
                let p0 = b.correct as f64 / b.rows as f64;
                ("accuracy", live, p0, sample_source, two_proportion_p(w, b))
            } else {
                return None;
            }
        } else if let Some(m0) = settings.reference_mae {
            let se = (w.var_abs / w.rows as f64).sqrt().max(1e-12);
            (
                "mae",
                w.mean_abs,
                m0,
                "config",
                normal_sf((w.mean_abs - m0) / se),
            )
        } else if let Some(b) = sample.filter(|b| !b.classes) {
            let se = (w.var_abs / w.rows as f64 + b.var_abs / b.rows as f64)
                .sqrt()
                .max(1e-12);
            (
                "mae",
                w.mean_abs,
                b.mean_abs,
                sample_source,
                normal_sf((w.mean_abs - b.mean_abs) / se),
            )
        } else {
            return None;
        };
        self.status.windows_tested += 1;
        self.status.reference = Some(reference);
        self.status.reference_source = Some(source.to_string());
        self.status.p_value = Some(p);
        if p <= settings.alpha {
            self.bad += 1;
            self.good = 0;
        } else {
            self.good += 1;
            self.bad = 0;
        }
        let alarm = if !self.degraded && self.bad >= settings.bad_windows {
            self.degraded = true;
            Some(Alarm {
                metric,
                live,
                reference,
                reference_source: source.to_string(),
                p_value: p,
                window_rows: w.rows,
                span: self.last_span,
            })
        } else {
            if self.degraded && self.good >= settings.good_windows {
                self.degraded = false;
            }
            None
        };
        self.status.state = if self.degraded { "DEGRADED" } else { "OK" }.into();
        alarm
    }
}

fn window_stats(w: &VecDeque<Labelled>) -> WindowStats {
    let rows = w.len() as u64;
    let classes = matches!(w.front(), Some(Labelled::Class { .. }));
    let mut correct = 0;
    let mut errors = Vec::new();
    for r in w {
        match *r {
            Labelled::Class { label, predicted } => correct += u64::from(label == predicted),
            Labelled::Value { value, predicted } => errors.push((value - predicted).abs()),
        }
    }
    let n = errors.len().max(1) as f64;
    let mean_abs = errors.iter().sum::<f64>() / n;
    let var_abs = errors.iter().map(|e| (e - mean_abs).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    WindowStats {
        rows,
        correct,
        mean_abs,
        var_abs,
        classes,
    }
}

/// One-sided p-value that window `a`'s accuracy is below `b`'s (pooled z-test).
fn two_proportion_p(a: WindowStats, b: WindowStats) -> f64 {
    let (na, nb) = (a.rows as f64, b.rows as f64);
    let (pa, pb) = (a.correct as f64 / na, b.correct as f64 / nb);
    let pooled = (a.correct + b.correct) as f64 / (na + nb);
    let se = (pooled * (1.0 - pooled) * (1.0 / na + 1.0 / nb)).sqrt();
    if se <= 0.0 {
        return if pa < pb { 0.0 } else { 1.0 };
    }
    normal_sf((pb - pa) / se)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(reference: Option<f64>) -> QualitySettings {
        QualitySettings {
            window: 100,
            alpha: 0.001,
            bad_windows: 2,
            good_windows: 2,
            reference_accuracy: reference,
            reference_mae: None,
            profile: None,
        }
    }

    #[test]
    fn normal_tail_matches_known_values() {
        assert!((normal_sf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_sf(1.959_964) - 0.025).abs() < 1e-6);
        assert!((normal_sf(-1.959_964) - 0.975).abs() < 1e-6);
    }

    #[test]
    fn a_worse_window_pair_raises_one_alarm_and_good_windows_end_it() {
        let mut t = Tracker::default();
        let s = settings(Some(0.95));
        let mut alarms = 0;
        // 60 % right: far below 95 %.
        for i in 0..400 {
            let predicted = if i % 5 < 3 { 1 } else { 0 };
            if t.add(
                Labelled::Class {
                    label: 1,
                    predicted,
                },
                i,
                &s,
                None,
            )
            .is_some()
            {
                alarms += 1;
                assert_eq!(t.status.rows, 200, "the second bad window raises it");
            }
        }
        assert_eq!(alarms, 1);
        assert_eq!(t.status.state, "DEGRADED");
        for i in 0..200 {
            assert!(
                t.add(
                    Labelled::Class {
                        label: 1,
                        predicted: 1
                    },
                    i,
                    &s,
                    None
                )
                .is_none()
            );
        }
        assert_eq!(t.status.state, "OK");
        assert!((t.status.accuracy.unwrap() - (240.0 + 200.0) / 600.0).abs() < 1e-12);
        assert_eq!(t.status.recall.get(&1).copied(), t.status.accuracy);
    }

    #[test]
    fn without_a_reference_nothing_is_tested() {
        let mut t = Tracker::default();
        for i in 0..1000 {
            assert!(
                t.add(
                    Labelled::Class {
                        label: 1,
                        predicted: 0
                    },
                    i,
                    &settings(None),
                    None
                )
                .is_none()
            );
        }
        assert_eq!(t.status.windows_tested, 0);
    }

    fn reference(rows: u64, accuracy: Option<f64>, mae: Option<(f64, f64)>) -> QualitySettings {
        QualitySettings {
            profile: Some(crate::drift::profile::ReferenceQuality {
                rows,
                accuracy,
                mae: mae.map(|m| m.0),
                mae_var: mae.map(|m| m.1),
            }),
            ..settings(None)
        }
    }

    #[test]
    fn a_profile_reference_is_used_when_the_config_sets_none_and_the_config_wins() {
        let mut t = Tracker::default();
        let s = reference(1000, Some(0.95), None);
        let mut alarm = None;
        for i in 0..200 {
            let predicted = if i % 5 < 3 { 1 } else { 0 };
            alarm = alarm.or(t.add(
                Labelled::Class {
                    label: 1,
                    predicted,
                },
                i,
                &s,
                None,
            ));
        }
        let a = alarm.expect("60 % right against the profile's 95 %");
        assert_eq!(
            (a.reference, a.reference_source.as_str()),
            (0.95, "profile")
        );
        assert_eq!((t.status.class_rows, t.status.correct), (200, 120));
        // A reference measured on few rows is a sample, not a target: 1.0 on 47
        // validation rows against 97 % live is no evidence of worse quality.
        let mut t = Tracker::default();
        let s = QualitySettings {
            window: 500,
            ..reference(47, Some(1.0), None)
        };
        for i in 0..5000 {
            let predicted = if i % 100 < 3 { 0 } else { 1 };
            assert!(
                t.add(
                    Labelled::Class {
                        label: 1,
                        predicted
                    },
                    i,
                    &s,
                    None
                )
                .is_none()
            );
        }
        assert_eq!(
            (t.status.windows_tested, t.status.state.as_str()),
            (10, "OK")
        );
        // A configured reference overrides the profile's.
        let mut t = Tracker::default();
        let s = QualitySettings {
            reference_accuracy: Some(0.5),
            ..reference(1000, Some(0.95), None)
        };
        for i in 0..200 {
            let predicted = if i % 5 < 3 { 1 } else { 0 };
            assert!(
                t.add(
                    Labelled::Class {
                        label: 1,
                        predicted
                    },
                    i,
                    &s,
                    None
                )
                .is_none()
            );
        }
        assert_eq!(t.status.reference_source.as_deref(), Some("config"));
        // Values: tested against the profile's MAE and spread; the sums the rollout
        // judge reads.
        let mut t = Tracker::default();
        let s = reference(1000, None, Some((0.1, 0.01)));
        let mut alarm = None;
        for i in 0..200 {
            alarm = alarm.or(t.add(
                Labelled::Value {
                    value: 1.0,
                    predicted: 1.5,
                },
                i,
                &s,
                None,
            ));
        }
        assert_eq!(
            alarm.expect("MAE 0.5 against 0.1").reference_source,
            "profile"
        );
        assert!((t.status.abs_error_sum - 100.0).abs() < 1e-9);
        assert!((t.status.sq_error_sum - 50.0).abs() < 1e-9);
        assert_eq!(t.status.class_rows, 0);
    }
}

//! Reference profiles (`<version>/profile.json`): what a version's inputs and predictions
//! looked like on its training data (made by [`super::make`], or from live rows).
//!
//! Features are the columns of the model's first 2-D numeric input; the prediction is
//! the first output read as a class (an integer or bool output, or the argmax of a float
//! output with several columns) or as a score (a float output with one value per row).
//! Each feature keeps quantile bins (for PSI), moments, and a sample of at most
//! [`SAMPLE_MAX`] values (for Kolmogorov-Smirnov).

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use super::features::Prediction;
use super::stats;
use crate::error::{Error, Result};

/// The profile file inside a version folder.
pub const PROFILE_FILE: &str = "profile.json";
/// Most reference values kept per feature for the KS test.
pub const SAMPLE_MAX: usize = 1000;
/// Largest profile file read.
const MAX_PROFILE_BYTES: u64 = 16 << 20;
/// Most features profiled (and tested).
pub const MAX_FEATURES: usize = 1024;

/// A version's reference profile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Format version (1).
    pub format: u32,
    pub model: String,
    pub version: u64,
    pub created_at: String,
    /// Where it came from: a data file's name, or `live` (the first live requests).
    pub source: String,
    /// Rows it was computed from.
    pub rows: u64,
    /// The input whose columns are the features.
    pub input: String,
    pub features: Vec<FeatureProfile>,
    pub prediction: Option<PredictionProfile>,
    /// The version's quality on the profiled data when it was labelled
    /// (`modelgate profile --label-column`): the reference live quality is tested
    /// against when the model's config sets none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<ReferenceQuality>,
}

/// A version's quality on labelled reference data.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReferenceQuality {
    /// Labelled rows it was measured on.
    pub rows: u64,
    /// Share of rows whose predicted class is the label (classes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Mean absolute error of the predicted score (values), and the variance of the
    /// absolute errors (for the two-sample test of live windows against it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mae: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mae_var: Option<f64>,
}

/// One feature (or a score prediction): bins, moments and a sample.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeatureProfile {
    pub name: String,
    /// Inner bin edges (sorted, distinct): bin i is `(edges[i-1], edges[i]]`.
    pub edges: Vec<f64>,
    /// Share of the reference rows in each bin (edges.len() + 1 values).
    pub proportions: Vec<f64>,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    /// Up to SAMPLE_MAX reference values, evenly spaced through the data.
    pub sample: Vec<f64>,
}

/// The reference distribution of predictions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum PredictionProfile {
    /// Predicted classes and their shares.
    Classes {
        output: String,
        classes: Vec<i64>,
        proportions: Vec<f64>,
    },
    /// A score, profiled as a feature.
    Scores {
        output: String,
        profile: FeatureProfile,
    },
}

/// Reads and checks `<version dir>/profile.json`; `None` when there is none.
pub fn load(version_dir: &Path) -> Result<Option<Profile>> {
    let path = version_dir.join(PROFILE_FILE);
    let bad = |why: String| Error::Config(format!("{}: {why}", path.display()));
    match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
        Ok(m) if m.len() > MAX_PROFILE_BYTES => {
            return Err(bad(format!("larger than {MAX_PROFILE_BYTES} bytes")));
        }
        Ok(_) => {}
    }
    let text = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    let profile: Profile = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    profile.validate().map_err(|e| bad(e.to_string()))?;
    Ok(Some(profile))
}

impl Profile {
    /// Checks the invariants the detector relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::Config(why));
        if self.format != 1 {
            return bad(format!("format {} is not supported (1 is)", self.format));
        }
        if self.features.is_empty() || self.features.len() > MAX_FEATURES {
            return bad(format!("needs 1 to {MAX_FEATURES} features"));
        }
        for f in &self.features {
            f.validate()?;
        }
        if let Some(q) = &self.quality {
            if q.accuracy.is_some_and(|a| !(0.0..=1.0).contains(&a)) {
                return bad("quality.accuracy must be between 0 and 1".into());
            }
            if q.mae.is_some_and(|m| !(m >= 0.0 && m.is_finite())) {
                return bad("quality.mae must be a non-negative number".into());
            }
        }
        match &self.prediction {
            Some(PredictionProfile::Classes {
                classes,
                proportions,
                ..
            }) => {
                if classes.is_empty()
                    || classes.len() != proportions.len()
                    || classes.len() > 65_536
                {
                    return bad("prediction: classes and proportions must match".into());
                }
                check_proportions("prediction", proportions)?;
            }
            Some(PredictionProfile::Scores { profile, .. }) => profile.validate()?,
            None => {}
        }
        Ok(())
    }
}

fn check_proportions(what: &str, p: &[f64]) -> Result<()> {
    let sum: f64 = p.iter().sum();
    if p.iter().any(|x| !(0.0..=1.0).contains(x)) || (sum - 1.0).abs() > 1e-6 {
        return Err(Error::Config(format!(
            "{what}: proportions must be between 0 and 1 and sum to 1"
        )));
    }
    Ok(())
}

impl FeatureProfile {
    fn validate(&self) -> Result<()> {
        let what = format!("feature '{}'", self.name);
        let bad = |why: &str| Err(Error::Config(format!("{what}: {why}")));
        if self.edges.len() > 1000 || self.proportions.len() != self.edges.len() + 1 {
            return bad("needs at most 1000 edges and one proportion more than edges");
        }
        if self.edges.iter().any(|e| !e.is_finite()) || self.edges.windows(2).any(|w| w[0] >= w[1])
        {
            return bad("edges must be finite and strictly increasing");
        }
        if self.sample.len() > 100_000 || self.sample.iter().any(|v| !v.is_finite()) {
            return bad("sample must hold at most 100000 finite values");
        }
        if ![self.mean, self.std, self.min, self.max]
            .iter()
            .all(|v| v.is_finite())
        {
            return bad("moments must be finite");
        }
        check_proportions(&what, &self.proportions)
    }

    /// Profiles `values` into `bins` quantile bins.
    pub fn build(name: &str, values: &[f64], bins: usize) -> FeatureProfile {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let mut edges: Vec<f64> = (1..bins.max(1))
            .map(|k| quantile(&sorted, k as f64 / bins as f64))
            .collect();
        edges.dedup();
        let counts = stats::bin_counts(sorted.iter().copied(), &edges);
        let n = sorted.len().max(1) as f64;
        let mean = sorted.iter().sum::<f64>() / n;
        let var = sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let stride = sorted.len().div_ceil(SAMPLE_MAX).max(1);
        FeatureProfile {
            name: name.to_string(),
            proportions: stats::proportions(&counts),
            edges,
            mean,
            std: var.sqrt(),
            min: sorted.first().copied().unwrap_or(0.0),
            max: sorted.last().copied().unwrap_or(0.0),
            // Evenly spaced through the sorted values: a faithful picture of the ECDF.
            sample: sorted.iter().copied().step_by(stride).collect(),
        }
    }
}

/// The q-quantile of sorted values, linearly interpolated (numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Builds a profile from feature rows and predictions.
#[allow(clippy::too_many_arguments)]
pub fn build(
    model: &str,
    version: u64,
    source: &str,
    input: &str,
    names: &[String],
    rows: usize,
    features: &[f64],
    output: &str,
    predictions: &[Prediction],
    bins: usize,
) -> Profile {
    let width = names.len();
    let feature_profiles = names
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let column: Vec<f64> = (0..rows).map(|r| features[r * width + c]).collect();
            FeatureProfile::build(name, &column, bins)
        })
        .collect();
    let prediction = if predictions.is_empty() {
        None
    } else if predictions
        .iter()
        .all(|p| matches!(p, Prediction::Class(_)))
    {
        let mut counts: std::collections::BTreeMap<i64, u64> = Default::default();
        for p in predictions {
            if let Prediction::Class(c) = p {
                *counts.entry(*c).or_default() += 1;
            }
        }
        let total = predictions.len() as f64;
        Some(PredictionProfile::Classes {
            output: output.to_string(),
            classes: counts.keys().copied().collect(),
            proportions: counts.values().map(|&c| c as f64 / total).collect(),
        })
    } else {
        let scores: Vec<f64> = predictions
            .iter()
            .map(|p| match p {
                Prediction::Score(s) => *s,
                Prediction::Class(c) => *c as f64,
            })
            .collect();
        Some(PredictionProfile::Scores {
            output: output.to_string(),
            profile: FeatureProfile::build(output, &scores, bins),
        })
    };
    Profile {
        format: 1,
        model: model.to_string(),
        version,
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        source: source.to_string(),
        rows: rows as u64,
        input: input.to_string(),
        features: feature_profiles,
        prediction,
        quality: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_profile_bins_and_sample() {
        let values: Vec<f64> = (0..5000).map(|i| f64::from(i % 100)).collect();
        let f = FeatureProfile::build("x", &values, 10);
        assert_eq!(f.edges.len(), 9);
        assert_eq!(f.proportions.len(), 10);
        assert!(
            f.proportions.iter().all(|p| (p - 0.1).abs() < 0.011),
            "{:?}",
            f.proportions
        );
        assert!(f.sample.len() <= SAMPLE_MAX);
        assert!((f.mean - 49.5).abs() < 1e-9);
        f.validate().unwrap();
        // Few distinct values: duplicate edges collapse.
        let f = FeatureProfile::build("y", &[1.0, 1.0, 1.0, 2.0], 10);
        assert!(f.edges.windows(2).all(|w| w[0] < w[1]));
        f.validate().unwrap();
    }
}

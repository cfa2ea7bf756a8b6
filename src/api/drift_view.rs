//! The drift admin view, built once for both protocols: what the detector knows of each
//! model version (state, evidence, rows seen, windows tested, episodes, events), and for
//! one model also its `[drift]` settings and the reference profile of each loaded
//! version. `GET /admin/drift[/{model}]` serializes these values as they are; gRPC's
//! `GetDrift` converts the same values into its messages ([`super::admin_grpc`]), so the
//! two cannot show different things.
//!
//! For the operator's page, [`histograms`] (`GET /admin/drift/{model}/histograms`) adds
//! per loaded version and feature the reference profile's bins against the shares of the
//! last tested window in the same bins.

use serde::Serialize;

use crate::drift::ModelDriftConfig;
use crate::drift::detector::Status;
use crate::drift::profile::Profile;
use crate::error::Result;
use crate::service::AppState;

/// Every model version the detector has seen (`GET /admin/drift`).
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// One status per model version, by model and version.
    pub models: Vec<Status>,
}

/// One model's drift (`GET /admin/drift/{model}`).
#[derive(Debug, Clone, Serialize)]
pub struct ModelView {
    pub model: String,
    /// The `[drift]` settings of its config.toml in force.
    pub settings: ModelDriftConfig,
    /// Each loaded version, oldest first, with its reference profile.
    pub versions: Vec<VersionView>,
    /// The detector's status of each version it has seen (a version that received no
    /// sample yet has none).
    pub windows: Vec<Status>,
}

/// A loaded version and the reference its windows are tested against.
#[derive(Debug, Clone, Serialize)]
pub struct VersionView {
    pub version: u64,
    /// `None` when the version has no (valid) profile.json.
    pub profile: Option<ProfileSummary>,
}

/// What a profile says about itself; the bins and samples stay out of the view.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileSummary {
    /// A data file's name, or `live`.
    pub source: String,
    /// Rows it was computed from.
    pub rows: u64,
    pub created_at: String,
    /// The feature names, in column order.
    pub features: Vec<String>,
}

impl From<&Profile> for ProfileSummary {
    fn from(p: &Profile) -> Self {
        ProfileSummary {
            source: p.source.clone(),
            rows: p.rows,
            created_at: p.created_at.clone(),
            features: p.features.iter().map(|f| f.name.clone()).collect(),
        }
    }
}

/// The drift of every model version the detector has seen.
pub fn all(state: &AppState) -> Overview {
    Overview {
        models: state.drift.statuses(None),
    }
}

/// The drift of one model; an unknown model is [`crate::error::Error::NotFound`].
pub fn model(state: &AppState, name: &str) -> Result<ModelView> {
    let snapshot = state.registry.snapshot();
    let m = snapshot.model(name)?;
    Ok(ModelView {
        model: m.name.clone(),
        settings: (*m.drift).clone(),
        versions: m
            .versions
            .values()
            .map(|mv| VersionView {
                version: mv.version,
                profile: mv.drift.profile.as_deref().map(ProfileSummary::from),
            })
            .collect(),
        windows: state.drift.statuses(Some(name)),
    })
}

/// One model's reference and live distributions (`GET /admin/drift/{model}/histograms`).
#[derive(Debug, Clone, Serialize)]
pub struct Histograms {
    pub model: String,
    /// Each loaded version, oldest first.
    pub versions: Vec<VersionHistograms>,
}

/// A version's per-feature distributions and the detector's status of it.
#[derive(Debug, Clone, Serialize)]
pub struct VersionHistograms {
    pub version: u64,
    /// The detector's status (state, evidence, rows); `None` before its first sample.
    pub status: Option<Status>,
    /// `profile.json`, `live`, or `none` (no reference: nothing to draw).
    pub reference: String,
    pub features: Vec<FeatureHistogram>,
}

/// One feature: the reference's bins and the last tested window's shares in them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FeatureHistogram {
    pub name: String,
    /// Inner bin edges: bin i is `(edges[i-1], edges[i]]`, the first and last open.
    pub edges: Vec<f64>,
    /// The reference's lowest and highest value (the outer ends of the drawing).
    pub min: f64,
    pub max: f64,
    /// Share of the reference rows in each bin.
    pub reference: Vec<f64>,
    /// Share of the last tested window's rows in each bin; `None` before a window was
    /// tested.
    pub live: Option<Vec<f64>>,
}

/// The features of `profile` with the window shares of `status` (when it was tested
/// against this profile: same features, same bins).
fn feature_histograms(profile: &Profile, status: Option<&Status>) -> Vec<FeatureHistogram> {
    let bins = status
        .map(|s| s.window_bins.as_slice())
        .filter(|b| b.len() == profile.features.len());
    profile
        .features
        .iter()
        .enumerate()
        .map(|(i, f)| FeatureHistogram {
            name: f.name.clone(),
            edges: f.edges.clone(),
            min: f.min,
            max: f.max,
            reference: f.proportions.clone(),
            live: bins
                .and_then(|b| b.get(i))
                .filter(|b| b.len() == f.proportions.len())
                .cloned(),
        })
        .collect()
}

/// The distributions of one model's loaded versions; an unknown model is
/// [`crate::error::Error::NotFound`]. A version without a profile.json is drawn against
/// its live reference when the detector took one (its bins are not kept, so only the
/// status is shown).
pub fn histograms(state: &AppState, name: &str) -> Result<Histograms> {
    let snapshot = state.registry.snapshot();
    let m = snapshot.model(name)?;
    let statuses = state.drift.statuses(Some(name));
    let versions = m
        .versions
        .values()
        .map(|mv| {
            let status = statuses.iter().find(|s| s.version == mv.version).cloned();
            let (reference, features) = match mv.drift.profile.as_deref() {
                Some(p) => (
                    "profile.json".to_string(),
                    feature_histograms(p, status.as_ref()),
                ),
                None => (
                    status
                        .as_ref()
                        .map_or_else(|| "none".to_string(), |s| s.reference.clone()),
                    Vec::new(),
                ),
            };
            VersionHistograms {
                version: mv.version,
                status,
                reference,
                features,
            }
        })
        .collect();
    Ok(Histograms {
        model: m.name.clone(),
        versions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_shares_go_with_the_features_they_were_counted_for() {
        let values: Vec<f64> = (0..100)
            .flat_map(|i| [f64::from(i), f64::from(i % 10)])
            .collect();
        let p = crate::drift::profile::build(
            "m",
            1,
            "test",
            "x",
            &["a".into(), "b".into()],
            100,
            &values,
            "y",
            &[],
            4,
        );
        let mut st = Status {
            model: "m".into(),
            version: 1,
            state: crate::drift::detector::State::Ok,
            evidence: Vec::new(),
            episode_evidence: Vec::new(),
            reference: "profile.json".into(),
            rows_seen: 0,
            windows_tested: 0,
            window: 10,
            step: 10,
            episodes: 0,
            events: 0,
            last_event: None,
            window_bins: Vec::new(),
        };
        // Not tested yet: no live shares.
        let h = feature_histograms(&p, Some(&st));
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].name, "a");
        assert_eq!(h[0].reference, p.features[0].proportions);
        assert_eq!(h[0].edges, p.features[0].edges);
        assert!(h.iter().all(|f| f.live.is_none()));
        // Tested: each feature gets its own shares.
        st.window_bins = p
            .features
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let mut b = vec![0.0; f.proportions.len()];
                b[i] = 1.0;
                b
            })
            .collect();
        let h = feature_histograms(&p, Some(&st));
        assert_eq!(h[0].live.as_ref().unwrap()[0], 1.0);
        assert_eq!(h[1].live.as_ref().unwrap()[1], 1.0);
        // Shares of another profile (a different number of features) are not shown.
        st.window_bins.pop();
        assert!(
            feature_histograms(&p, Some(&st))
                .iter()
                .all(|f| f.live.is_none())
        );
    }
}

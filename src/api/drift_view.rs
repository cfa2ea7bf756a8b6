//! The drift admin view, built once for both protocols: what the detector knows of each
//! model version (state, evidence, rows seen, windows tested, episodes, events), and for
//! one model also its `[drift]` settings and the reference profile of each loaded
//! version. `GET /admin/drift[/{model}]` serializes these values as they are; gRPC's
//! `GetDrift` converts the same values into its messages ([`super::admin_grpc`]), so the
//! two cannot show different things.

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

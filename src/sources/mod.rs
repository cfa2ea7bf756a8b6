//! External model registries that publish into the local repository ([`mlflow`]). A
//! source only ever adds version folders by the atomic publish a hand-made version uses
//! (staging folder, checksum, rename) and asks for routing changes through the one
//! writer (`routing::control`, driven by `routing::sync`): the repository stays the one
//! source of what serves.

pub mod mlflow;

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// `[sources]` of the server config.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SourcesConfig {
    /// `[[sources.mlflow]]`: MLflow tracking servers whose Model Registry is served.
    pub mlflow: Vec<mlflow::MlflowConfig>,
}

impl SourcesConfig {
    /// Checks the values; the message names the field.
    pub fn validate(&self) -> Result<()> {
        for (i, m) in self.mlflow.iter().enumerate() {
            m.validate(i)?;
        }
        Ok(())
    }
}

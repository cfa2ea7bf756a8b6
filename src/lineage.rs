//! A version's lineage: `<model>/<version>/model.toml`, what the version is and where it
//! came from (source, run, training data, code commit, parent version, validation
//! metrics, creator, creation time, free tags).
//!
//! The registry reads it with the version (a malformed file fails the version's load,
//! like any other problem of its files); the API shows it in metadata and the index, the
//! audit log and webhook events carry it, and sources (MLflow) and the retraining
//! example write it. It lives at the bottom layer because every one of those reads it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The lineage file inside a version folder.
pub const LINEAGE_FILE: &str = "model.toml";

/// Largest model.toml read: a bigger one is refused, not parsed.
const MAX_LINEAGE_BYTES: u64 = 256 * 1024;

/// What `model.toml` says. Every field is optional; unknown keys are errors (a typo must
/// not silently drop lineage), except inside `[tags]`, which is free.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// Where the version was published from: `mlflow:<tracking uri>#<model>/<version>`,
    /// `retrain`, a URL; free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The training run (an MLflow run id, a CI job URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_run: Option<String>,
    /// A reference to the data it was trained on (a path, a URI, a dataset digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_data: Option<String>,
    /// The code commit it was trained with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_commit: Option<String>,
    /// The version it was derived from (a retrained version's predecessor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_version: Option<u64>,
    /// Who made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<String>,
    /// When it was made (RFC 3339 by convention; shown as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Validation metrics (name = number).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// Training parameters (name = value as text).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    /// Free tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

impl Lineage {
    /// Reads `<vdir>/model.toml`: `None` when there is none; an error naming the file
    /// and the problem when it cannot be read or does not parse.
    pub fn read(vdir: &Path) -> Result<Option<Lineage>> {
        let path = vdir.join(LINEAGE_FILE);
        let meta = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::Config(format!("{}: {e}", path.display()))),
            Ok(m) => m,
        };
        if meta.len() > MAX_LINEAGE_BYTES {
            return Err(Error::Config(format!(
                "{}: larger than {MAX_LINEAGE_BYTES} bytes",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Lineage::parse(&text)
            .map(Some)
            .map_err(|e| Error::Config(format!("{} invalid: {e}", path.display())))
    }

    /// Parses the text of a model.toml.
    pub fn parse(text: &str) -> std::result::Result<Lineage, String> {
        let l: Lineage = toml::from_str(text).map_err(|e| e.message().to_string())?;
        if let Some((k, v)) = l.metrics.iter().find(|(_, v)| !v.is_finite()) {
            return Err(format!("metrics.{k} is {v}, not a finite number"));
        }
        Ok(l)
    }

    /// The file's text (what [`Lineage::read`] reads back).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Internal(format!("model.toml: {e}")))
    }

    /// As JSON, for the index, the audit log and webhook events.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Flat `lineage.<field>` = text pairs, for the string parameters of OIP metadata and
    /// Triton's model configuration (both are maps of scalars): metrics become
    /// `lineage.metrics.<name>`, params `lineage.params.<name>`, tags `lineage.tags.<name>`.
    pub fn parameters(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                out.insert(format!("lineage.{k}"), v);
            }
        };
        put("source", self.source.clone());
        put("source_run", self.source_run.clone());
        put("training_data", self.training_data.clone());
        put("code_commit", self.code_commit.clone());
        put("parent_version", self.parent_version.map(|v| v.to_string()));
        put("creator", self.creator.clone());
        put("created_at", self.created_at.clone());
        for (k, v) in &self.metrics {
            out.insert(format!("lineage.metrics.{k}"), v.to_string());
        }
        for (k, v) in &self.params {
            out.insert(format!("lineage.params.{k}"), v.clone());
        }
        for (k, v) in &self.tags {
            out.insert(format!("lineage.tags.{k}"), v.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_writes_and_refuses_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Lineage::read(dir.path()).unwrap(), None);
        let text = r#"
            source_run = "abc123"
            training_data = "s3://bucket/iris-2026-11.parquet"
            code_commit = "0123abcd"
            parent_version = 1
            creator = "alice"
            created_at = "2026-12-01T10:00:00Z"
            [metrics]
            accuracy = 0.97
            [tags]
            team = "fraud"
            anything-goes = "yes"
        "#;
        std::fs::write(dir.path().join(LINEAGE_FILE), text).unwrap();
        let l = Lineage::read(dir.path()).unwrap().unwrap();
        assert_eq!(l.parent_version, Some(1));
        assert_eq!(l.metrics["accuracy"], 0.97);
        assert_eq!(l.tags["anything-goes"], "yes");
        assert_eq!(Lineage::parse(&l.to_toml().unwrap()).unwrap(), l);
        let p = l.parameters();
        assert_eq!(p["lineage.source_run"], "abc123");
        assert_eq!(p["lineage.metrics.accuracy"], "0.97");
        assert_eq!(p["lineage.tags.team"], "fraud");
        assert_eq!(l.to_json()["metrics"]["accuracy"], 0.97);

        // A typo is an error naming the key and the file.
        std::fs::write(dir.path().join(LINEAGE_FILE), "sorce_run = \"x\"").unwrap();
        let e = Lineage::read(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("model.toml invalid") && e.contains("sorce_run"),
            "{e}"
        );
        for bad in [
            "parent_version = -1",
            "parent_version = \"two\"",
            "[metrics]\nauc = \"high\"",
            "[metrics]\nauc = nan",
            "[tags]\nnested = { a = 1 }",
            "not toml at all",
        ] {
            assert!(Lineage::parse(bad).is_err(), "{bad}");
        }
    }
}

//! Durable routing state: `<model>/routing.toml`, written atomically, and the audit log
//! of every routing change (JSON lines).
//!
//! A routing file is written to a hidden temporary file in the same folder, flushed to
//! disk, then renamed over the old one: a reader (this replica's watcher, another
//! replica, an operator) sees the old file or the new one, never half of one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::judge::Analysis;
use super::{ROUTING_FILE, TrafficSpec};
use crate::error::{Error, Result};
use crate::lineage::Lineage;
use crate::util::{rfc3339_ms, unix_ms, write_atomic};

/// Longest routing file read: a bigger one is refused, not parsed.
const MAX_ROUTING_BYTES: u64 = 64 * 1024;

/// Reads `<model dir>/routing.toml`: `None` when there is none.
pub fn read(model_dir: &Path) -> Result<Option<TrafficSpec>> {
    let path = model_dir.join(ROUTING_FILE);
    let text = match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Config(format!("{}: {e}", path.display()))),
        Ok(m) if m.len() > MAX_ROUTING_BYTES => {
            return Err(Error::Config(format!(
                "{}: larger than {MAX_ROUTING_BYTES} bytes",
                path.display()
            )));
        }
        Ok(_) => std::fs::read_to_string(&path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?,
    };
    let spec: TrafficSpec = toml::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {}", path.display(), e.message())))?;
    spec.validate()
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    Ok(Some(spec))
}

/// Writes `<model dir>/routing.toml` atomically (temporary file, fsync, rename, fsync
/// of the folder).
pub fn write(model_dir: &Path, spec: &TrafficSpec) -> Result<()> {
    let text = format!(
        "# Written by modelgate (admin API, CLI or rollout controller); edits are picked up.\n{}",
        toml::to_string(spec).map_err(|e| Error::Internal(format!("routing.toml: {e}")))?
    );
    write_atomic(&model_dir.join(ROUTING_FILE), text.as_bytes())
}

/// One routing change, as the audit log records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry {
    /// RFC 3339 time, UTC.
    pub time: String,
    pub unix_ms: u64,
    /// Who changed it: the admin token's name, `localhost` (no token configured), or
    /// `auto` (the rollout controller and automatic entry of new versions).
    pub actor: String,
    pub model: String,
    /// `set`, `promote`, `rollback`, `advance`, `enter`.
    pub action: String,
    /// The replica that made the change (its host name and a random suffix): with
    /// several replicas on one registry, who decided.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub replica: String,
    pub before: TrafficSpec,
    pub after: TrafficSpec,
    pub reason: String,
    /// For the rollout controller's verdicts: the numbers the verdict stood on (counts
    /// and quantiles per arm, each criterion's test, limit, p-value or margin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<Analysis>,
    /// The lineage (model.toml) of each version the change names, before or after, by
    /// version: what an auditor needs to know what was put in front of traffic.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lineage: BTreeMap<String, Lineage>,
}

impl AuditEntry {
    /// An entry stamped now.
    pub fn now(
        actor: &str,
        model: &str,
        action: &str,
        before: &TrafficSpec,
        after: &TrafficSpec,
        reason: &str,
    ) -> AuditEntry {
        let now = SystemTime::now();
        AuditEntry {
            time: rfc3339_ms(now),
            unix_ms: unix_ms(now),
            actor: actor.to_string(),
            model: model.to_string(),
            action: action.to_string(),
            replica: crate::util::replica_name().to_string(),
            before: before.clone(),
            after: after.clone(),
            reason: reason.to_string(),
            analysis: None,
            lineage: BTreeMap::new(),
        }
    }

    /// The entry with the lineage of every version its routing names (before or after),
    /// read from `<model dir>/<version>/model.toml`; a version without one (or with one
    /// that does not parse) is left out.
    pub fn with_lineage(mut self, model_dir: &Path) -> AuditEntry {
        let versions = self
            .before
            .versions()
            .into_iter()
            .chain(self.after.versions());
        for v in versions {
            if let Ok(Some(l)) = Lineage::read(&model_dir.join(v.to_string())) {
                self.lineage.insert(v.to_string(), l);
            }
        }
        self
    }

    /// The entry with the analysis its verdict stood on.
    pub fn with_analysis(mut self, analysis: Option<Analysis>) -> AuditEntry {
        self.analysis = analysis;
        self
    }
}

/// The audit log: one JSON object per line, appended and flushed per change.
pub struct AuditLog {
    path: PathBuf,
    /// One writer at a time inside this process (lines never interleave).
    lock: Mutex<()>,
}

impl AuditLog {
    pub fn new(path: PathBuf) -> AuditLog {
        AuditLog {
            path,
            lock: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry and flushes it to disk before returning.
    pub fn append(&self, entry: &AuditEntry) -> Result<()> {
        let mut line =
            serde_json::to_vec(entry).map_err(|e| Error::Internal(format!("audit entry: {e}")))?;
        line.push(b'\n');
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let io = |e: std::io::Error| {
            Error::Unavailable(format!(
                "cannot write the audit log {}: {e}",
                self.path.display()
            ))
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        // A line torn by a crash must not swallow this one: start on a fresh line.
        let len = f.metadata().map_err(io)?.len();
        if len > 0 {
            use std::os::unix::fs::FileExt;
            let mut last = [0u8; 1];
            f.read_exact_at(&mut last, len - 1).map_err(io)?;
            if last[0] != b'\n' {
                line.insert(0, b'\n');
            }
        }
        // One write of the whole line: with O_APPEND it lands in one piece.
        f.write_all(&line).map_err(io)?;
        f.sync_data().map_err(io)
    }

    /// The newest `limit` entries (oldest first), optionally of one model. A line that
    /// does not parse (a torn write after a crash) is skipped.
    pub fn read(&self, model: Option<&str>, limit: usize) -> Result<Vec<AuditEntry>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(Error::Unavailable(format!(
                    "cannot read the audit log {}: {e}",
                    self.path.display()
                )));
            }
        };
        let mut entries: Vec<AuditEntry> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<AuditEntry>(l).ok())
            .filter(|e| model.is_none_or(|m| e.model == m))
            .collect();
        let skip = entries.len().saturating_sub(limit);
        entries.drain(..skip);
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Canary;

    #[test]
    fn routing_file_round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let spec = TrafficSpec {
            stable: Some(1),
            canary: Some(Canary {
                version: 2,
                weight: 10.0,
            }),
            ..TrafficSpec::default()
        };
        write(dir.path(), &spec).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(spec));
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(ROUTING_FILE)]);
        std::fs::write(dir.path().join(ROUTING_FILE), "stable = \"one\"").unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("routing.toml"), "{err}");
        std::fs::write(
            dir.path().join(ROUTING_FILE),
            "stable = 1\n[canary]\nversion = 1\nweight = 5.0\n",
        )
        .unwrap();
        assert!(read(dir.path()).is_err());
    }

    #[test]
    fn audit_log_appends_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path().join("audit.jsonl"));
        assert!(log.read(None, 10).unwrap().is_empty());
        let before = TrafficSpec::default();
        let after = TrafficSpec {
            stable: Some(3),
            ..TrafficSpec::default()
        };
        for (i, m) in ["a", "b", "a"].iter().enumerate() {
            log.append(&AuditEntry::now(
                "ops",
                m,
                "set",
                &before,
                &after,
                &format!("r{i}"),
            ))
            .unwrap();
        }
        // A torn last line is skipped, not fatal.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(log.path())
            .unwrap();
        f.write_all(b"{\"time\":").unwrap();
        let all = log.read(None, 10).unwrap();
        assert_eq!(all.len(), 3);
        log.append(&AuditEntry::now(
            "ops",
            "c",
            "set",
            &before,
            &after,
            "after a tear",
        ))
        .unwrap();
        assert_eq!(log.read(Some("c"), 10).unwrap().len(), 1);
        assert_eq!(all[2].reason, "r2");
        assert!(all[0].time.ends_with('Z'));
        let a = log.read(Some("a"), 1).unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].reason, "r2");
    }
}

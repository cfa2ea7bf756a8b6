//! Reading the repository's folders: which models and versions exist, model files where
//! none is looked for, and a fingerprint of each version's files that tells whether
//! they changed or are still being written.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{MODEL_FILE, parse_version, valid_model_name};
use crate::error::{Error, Result};

/// Most files a version folder may hold: a folder with more is refused, not scanned forever.
pub const MAX_FILES_PER_VERSION: usize = 10_000;

/// Model folders: valid names, not hidden, holding at least one version folder.
/// Anything else (tooling, notes, a folder being created) is not a model.
pub fn model_folders(root: &Path) -> Result<BTreeSet<String>> {
    let entries = std::fs::read_dir(root)
        .map_err(|e| Error::Config(format!("model repository {}: {e}", root.display())))?;
    let mut names = BTreeSet::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !valid_model_name(&name) {
            continue;
        }
        let path = entry.path();
        if path.is_dir() && !version_folders(&path).is_empty() {
            names.insert(name);
        }
    }
    Ok(names)
}

/// Version folders of a model: sub-folders named by a positive integer. A folder being
/// prepared under another name (`3.tmp`) is not a version until it is renamed into place.
pub fn version_folders(dir: &Path) -> BTreeSet<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let v = parse_version(&e.file_name().to_string_lossy())?;
            e.path().is_dir().then_some(v)
        })
        .collect()
}

/// Names, sizes and modification times of a version folder's files (two levels deep,
/// for ONNX external data). The model's config.toml is not part of it: a version is
/// reloaded when the settings it would get differ from the ones it runs with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Fingerprint {
    files: Vec<(String, u64, Option<SystemTime>)>,
    /// Set when the folder has more files than we scan.
    too_many: bool,
}

/// Fingerprints a version folder.
pub fn fingerprint(vdir: &Path) -> Fingerprint {
    let mut fp = Fingerprint::default();
    collect(vdir, "", 2, &mut fp);
    fp.files.sort();
    fp
}

/// A model file the repository holds where no model is looked for: it is not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misplaced {
    /// The file, or the folder holding it.
    pub path: PathBuf,
    /// Why it is not served, and what to do.
    pub why: String,
}

impl std::fmt::Display for Misplaced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.why)
    }
}

/// Model files that are not served because of where they are: directly in the
/// repository or in a model folder (no version folder), in a sub-folder whose name is
/// not a version number, or under a folder whose name is not a valid model name. Hidden
/// folders (`.incoming-3`, the documented way to publish) are not looked into.
pub fn misplaced(root: &Path) -> Vec<Misplaced> {
    let mut found = Vec::new();
    let at = |path: PathBuf, why: String| Misplaced { path, why };
    if root.join(MODEL_FILE).is_file() {
        found.push(at(
            root.join(MODEL_FILE),
            "a model file directly in the repository is not served; it belongs in <model>/<version>/model.onnx".into(),
        ));
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        if name.starts_with('.') || !dir.is_dir() {
            continue;
        }
        if dir.join(MODEL_FILE).is_file() {
            found.push(at(
                dir.join(MODEL_FILE),
                format!("not in a version folder, so not served; move it to {name}/1/model.onnx"),
            ));
        }
        let Ok(subs) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut has_versions = false;
        // Bounded: a big folder of something else must not make every pass slow.
        for sub in subs.flatten().take(MAX_FILES_PER_VERSION) {
            let sub_name = sub.file_name().to_string_lossy().into_owned();
            if sub_name.starts_with('.') || !sub.path().join(MODEL_FILE).is_file() {
                continue;
            }
            if parse_version(&sub_name).is_some() {
                has_versions = true;
            } else {
                found.push(at(
                    sub.path(),
                    format!(
                        "'{sub_name}' is not a version folder name (a positive integer without leading zeros, as {name}/1), so its model is not served"
                    ),
                ));
            }
        }
        if has_versions && !valid_model_name(&name) {
            found.push(at(
                dir,
                "not a valid model name (letters, digits, '-', '_' and '.', at most 128), so its versions are not served".into(),
            ));
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

fn collect(dir: &Path, prefix: &str, depth: usize, fp: &mut Fingerprint) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if fp.files.len() >= MAX_FILES_PER_VERSION {
            fp.too_many = true;
            return;
        }
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        let Ok(meta) = std::fs::metadata(entry.path()) else {
            // A dangling link or a file gone meanwhile: recorded, so a later fix is a change.
            fp.files.push((name, u64::MAX, None));
            continue;
        };
        if meta.is_dir() {
            if depth > 1 {
                collect(&entry.path(), &format!("{name}/"), depth - 1, fp);
            }
            continue;
        }
        fp.files.push((name, meta.len(), meta.modified().ok()));
    }
}

impl Fingerprint {
    /// True when the folder holds more files than a version may.
    pub fn too_many_files(&self) -> bool {
        self.too_many
    }

    /// Safe to load: unchanged since the previous scan, or every file older than
    /// `settle`. A file still being copied changes between scans, so it waits.
    pub fn settled(&self, previous: Option<&Fingerprint>, settle: Duration) -> bool {
        if settle.is_zero() || previous == Some(self) {
            return true;
        }
        let now = SystemTime::now();
        self.files.iter().all(|(_, _, mtime)| {
            mtime.is_some_and(|t| now.duration_since(t).is_ok_and(|age| age >= settle))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_see_changes_and_settle() {
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("m/1");
        std::fs::create_dir_all(&v).unwrap();
        std::fs::write(v.join("model.onnx"), b"abc").unwrap();
        let a = fingerprint(&v);
        assert_eq!(a, fingerprint(&v));
        // Just written: not settled on first sight, settled once seen unchanged.
        assert!(!a.settled(None, Duration::from_secs(60)));
        assert!(a.settled(Some(&a), Duration::from_secs(60)));
        assert!(a.settled(None, Duration::ZERO));
        std::fs::write(v.join("model.onnx"), b"abcd").unwrap();
        let b = fingerprint(&v);
        assert_ne!(a, b);
        assert!(!b.settled(Some(&a), Duration::from_secs(60)));
        // The model's settings are compared on their own, not through the files.
        std::fs::write(dir.path().join("m/config.toml"), "instances = 1").unwrap();
        assert_eq!(b, fingerprint(&v));
    }

    #[test]
    fn misplaced_model_files_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for f in [
            "model.onnx",
            "flat/model.onnx",
            "m/1/model.onnx",
            "m/v1/model.onnx",
            "m/01/model.onnx",
            "m/.incoming-2/model.onnx",
            "m/2/notes.txt",
            "bad name/1/model.onnx",
            ".hidden/1/model.onnx",
            "empty/v2/readme.md",
        ] {
            let path = p.join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"x").unwrap();
        }
        let found: Vec<(PathBuf, String)> = misplaced(p)
            .into_iter()
            .map(|m| (m.path.strip_prefix(p).unwrap().to_path_buf(), m.why))
            .collect();
        let paths: Vec<&str> = found.iter().map(|(f, _)| f.to_str().unwrap()).collect();
        assert_eq!(
            paths,
            ["bad name", "flat/model.onnx", "m/01", "m/v1", "model.onnx"],
            "{found:?}"
        );
        assert!(
            found[1].1.contains("move it to flat/1/model.onnx"),
            "{found:?}"
        );
        assert!(
            found[3].1.contains("'v1' is not a version folder name"),
            "{found:?}"
        );
    }

    #[test]
    fn only_version_folders_count() {
        let dir = tempfile::tempdir().unwrap();
        for d in [
            "m/1",
            "m/2",
            "m/03",
            "m/4.tmp",
            "notes",
            ".hidden/1",
            "bad name/1",
        ] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("m/5"), b"a file, not a folder").unwrap();
        assert_eq!(
            version_folders(&dir.path().join("m")),
            [1, 2].into_iter().collect()
        );
        assert_eq!(
            model_folders(dir.path()).unwrap(),
            ["m".to_string()].into_iter().collect()
        );
    }
}

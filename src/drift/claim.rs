//! One webhook per drift episode across replicas that share a registry: before a
//! `model.drift` event is sent, the replica claims the episode in the shared folder
//! (`<model_repository>/.fleet/drift` by default), by creating a file exclusively.
//! The file system is the only arbiter (no protocol of our own): `create_new` succeeds
//! for exactly one of the replicas that try the same name.
//!
//! An episode is keyed by model, version and the checksum of the profile it was
//! detected against (a new profile is a new reference, hence a new episode). Its claims
//! are numbered: `claim-<n>` holds who claimed it and when. A replica that detects the
//! episode finds the highest `n`; a claim younger than the model's drift cooldown means
//! another replica sent the event (this one's is suppressed); an older one, or none, is
//! taken over by creating `claim-<n+1>`, which only one replica can. Each replica also
//! leaves `seen-<replica>` with the time it last saw the episode, so the event says how
//! many replicas saw the drift when it was claimed.
//!
//! With a registry of its own per replica, every replica claims in its own folder and
//! sends its own event, as without claims. When the folder cannot be written, the
//! replica sends its own event (nothing is lost) and the failure is counted.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What claiming an episode came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// This replica claimed it and sends the event; `seen` replicas had seen the
    /// episode within the cooldown (this one included).
    Claimed { seen: usize, claim: u64 },
    /// Another replica claimed it within the cooldown: no event from this one.
    Suppressed { by: String },
    /// The folder could not be used: this replica sends its own event.
    Failed(String),
}

/// The content of a claim file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claim {
    replica: String,
    claimed_ms: u64,
}

/// Claims of one replica.
#[derive(Debug, Clone)]
pub struct Claims {
    dir: PathBuf,
    /// This replica's name.
    pub replica: String,
}

/// How many times a claim is retried when another replica takes the same number.
const ATTEMPTS: usize = 4;

impl Claims {
    /// Claims in `dir` for this process's replica ([`crate::util::replica_name`]).
    pub fn new(dir: PathBuf) -> Claims {
        Claims::named(dir, crate::util::replica_name().to_string())
    }

    /// Claims in `dir` for the replica `replica` (several in one process: tests).
    pub fn named(dir: PathBuf, replica: String) -> Claims {
        Claims { dir, replica }
    }

    /// The folder of one episode key.
    fn episode_dir(&self, model: &str, version: u64, checksum: &str) -> PathBuf {
        let safe: String = checksum
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(16)
            .collect();
        self.dir.join(model).join(format!(
            "{version}-{}",
            if safe.is_empty() { "none" } else { &safe }
        ))
    }

    /// Claims the episode of `model`/`version` against the profile `checksum` at
    /// `now_ms`; a claim younger than `cooldown_ms` suppresses this replica's event.
    pub fn claim(
        &self,
        model: &str,
        version: u64,
        checksum: &str,
        cooldown_ms: u64,
        now_ms: u64,
    ) -> Outcome {
        let dir = self.episode_dir(model, version, checksum);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return Outcome::Failed(format!("{}: {e}", dir.display()));
        }
        let seen = dir.join(format!("seen-{}", self.replica));
        if let Err(e) = crate::util::write_atomic(&seen, now_ms.to_string().as_bytes()) {
            return Outcome::Failed(format!("{}: {e}", seen.display()));
        }
        for _ in 0..ATTEMPTS {
            let (latest, n) = match latest_claim(&dir) {
                Ok(x) => x,
                Err(e) => return Outcome::Failed(format!("{}: {e}", dir.display())),
            };
            if let Some(c) = latest
                && now_ms.saturating_sub(c.claimed_ms) < cooldown_ms
            {
                return Outcome::Suppressed { by: c.replica };
            }
            let next = n + 1;
            let path = dir.join(format!("claim-{next}"));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let body = serde_json::to_vec(&Claim {
                        replica: self.replica.clone(),
                        claimed_ms: now_ms,
                    })
                    .unwrap_or_default();
                    if let Err(e) = f.write_all(&body).and_then(|()| f.sync_all()) {
                        return Outcome::Failed(format!("{}: {e}", path.display()));
                    }
                    forget_old_claims(&dir, next);
                    return Outcome::Claimed {
                        seen: seen_within(&dir, now_ms, cooldown_ms.max(60_000)),
                        claim: next,
                    };
                }
                // Another replica took this number first: look again.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Outcome::Failed(format!("{}: {e}", path.display())),
            }
        }
        Outcome::Failed(format!("{}: contended", dir.display()))
    }
}

/// The highest-numbered claim (its content, when readable) and its number (0: none).
fn latest_claim(dir: &Path) -> std::io::Result<(Option<Claim>, u64)> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)?.flatten() {
        if let Some(k) = e
            .file_name()
            .to_str()
            .and_then(|s| s.strip_prefix("claim-"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            n = n.max(k);
        }
    }
    if n == 0 {
        return Ok((None, 0));
    }
    let path = dir.join(format!("claim-{n}"));
    // A claim being written (created, not yet filled) counts as made when the file was
    // created: its maker sends the event, and one whose maker died before filling it
    // goes stale after the cooldown like any other.
    let claim = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|_| Claim {
            replica: "?".into(),
            claimed_ms: std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .map_or_else(|_| crate::util::now_ms(), crate::util::unix_ms),
        }),
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok((None, n)),
        Err(e) => return Err(e),
    };
    Ok((Some(claim), n))
}

/// Replicas whose `seen-` mark is at most `within_ms` old.
fn seen_within(dir: &Path, now_ms: u64, within_ms: u64) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|s| s.starts_with("seen-"))
                })
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter_map(|s| s.trim().parse::<u64>().ok())
                .filter(|&ms| now_ms.saturating_sub(ms) <= within_ms)
                .count()
        })
        .unwrap_or(1)
        .max(1)
}

/// Removes claims older than the one before `latest` (the history is not needed; the
/// two latest stay so that a replica reading the folder meanwhile finds one).
fn forget_old_claims(dir: &Path, latest: u64) {
    for k in 1..latest.saturating_sub(1) {
        let _ = std::fs::remove_file(dir.join(format!("claim-{k}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_claim_per_episode_within_the_cooldown_then_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let named = |n: &str| Claims::named(dir.path().to_path_buf(), n.into());
        let (a, b, c) = (named("a"), named("b"), named("c"));
        assert_ne!(a.replica, b.replica);
        assert_eq!(
            a.claim("iris", 2, "ab12", 60_000, 1_000_000),
            Outcome::Claimed { seen: 1, claim: 1 }
        );
        assert_eq!(
            b.claim("iris", 2, "ab12", 60_000, 1_010_000),
            Outcome::Suppressed {
                by: a.replica.clone()
            }
        );
        // Another version or another profile is another episode.
        assert!(matches!(
            c.claim("iris", 3, "ab12", 60_000, 1_010_000),
            Outcome::Claimed { .. }
        ));
        assert!(matches!(
            c.claim("iris", 2, "cd34", 60_000, 1_010_000),
            Outcome::Claimed { .. }
        ));
        // After the cooldown a replica claims the next episode (a's mark is older than
        // the cooldown: not counted).
        assert_eq!(
            b.claim("iris", 2, "ab12", 60_000, 1_070_000),
            Outcome::Claimed { seen: 1, claim: 2 }
        );
        assert!(matches!(
            a.claim("iris", 2, "ab12", 60_000, 1_080_000),
            Outcome::Suppressed { .. }
        ));
        // A zero cooldown suppresses nothing; the three marks of the last minute count.
        assert_eq!(
            c.claim("iris", 2, "ab12", 0, 1_080_000),
            Outcome::Claimed { seen: 3, claim: 3 }
        );
    }

    #[test]
    fn racing_replicas_claim_once() {
        let dir = tempfile::tempdir().unwrap();
        let outcomes: Vec<Outcome> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let claims = Claims::named(dir.path().to_path_buf(), format!("r{i}"));
                    s.spawn(move || claims.claim("m", 1, "ff", 300_000, 5_000))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let claimed = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Claimed { .. }))
            .count();
        assert_eq!(claimed, 1, "{outcomes:?}");
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Claimed { .. } | Outcome::Suppressed { .. }))
        );
    }

    #[test]
    fn an_empty_claim_left_by_a_dead_replica_goes_stale() {
        let dir = tempfile::tempdir().unwrap();
        let a = Claims::named(dir.path().to_path_buf(), "a".into());
        assert!(matches!(
            a.claim("m", 1, "ff", 60_000, 1_000),
            Outcome::Claimed { .. }
        ));
        // A replica died between creating claim-2 and filling it.
        let ep = std::fs::read_dir(dir.path().join("m"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::write(ep.join("claim-2"), b"").unwrap();
        let now = crate::util::now_ms();
        assert!(matches!(
            a.claim("m", 1, "ff", 60_000, now),
            Outcome::Suppressed { .. }
        ));
        // Once its file is older than the cooldown, the episode can be claimed again.
        assert!(matches!(
            a.claim("m", 1, "ff", 60_000, now + 61_000),
            Outcome::Claimed { claim: 3, .. }
        ));
    }

    #[test]
    fn an_unusable_folder_fails_so_the_replica_sends_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let claims = Claims::new(file.join("claims"));
        assert!(matches!(
            claims.claim("m", 1, "ff", 300_000, 5_000),
            Outcome::Failed(_)
        ));
    }
}

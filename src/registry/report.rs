//! Reporting the repository's problems once per change of its files.
//!
//! Every reconciliation pass sees every problem again (a broken config.toml stays broken
//! until someone edits it), and passes run on every change event and periodic rescan.
//! A problem is logged and counted when it first appears with this content and this
//! error; while it stays as it is, it is only reminded in the log every
//! [`REMIND_EVERY`], never counted again; it is forgotten when it goes away, so that
//! a later breakage counts anew.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How often a problem that stays as it is is repeated in the log.
pub const REMIND_EVERY: Duration = Duration::from_secs(600);

/// What a problem is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// A model's config.toml: invalid, or refused by the versions it would serve.
    Config(String),
    /// A model's routing.toml.
    Routing(String),
    /// The `[drift]` table of a model's config.toml, refused on its own.
    Drift(String),
    /// A model version that failed to load.
    Version(String, u64),
    /// A model file where no model is looked for.
    Misplaced(PathBuf),
}

impl Subject {
    /// The model the problem belongs to, if any.
    pub fn model(&self) -> Option<&str> {
        match self {
            Subject::Config(m)
            | Subject::Routing(m)
            | Subject::Drift(m)
            | Subject::Version(m, _) => Some(m),
            Subject::Misplaced(_) => None,
        }
    }
}

/// What to do about a problem seen in this pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// New, or changed (other content or another error): log it and count it.
    New,
    /// Unchanged, and not logged for [`REMIND_EVERY`]: log it again, do not count it.
    Reminder,
    /// Unchanged and logged recently: nothing.
    Quiet,
}

/// The problems open now, each with a digest of what it was seen with.
#[derive(Debug, Default)]
pub struct Reports {
    open: HashMap<Subject, (u64, Instant)>,
}

impl Reports {
    /// Records that `subject` has a problem, described by `what` (the file content or
    /// fingerprint it was seen with, and the error), and says whether to report it.
    pub fn note(&mut self, subject: Subject, what: &impl Hash, now: Instant) -> Notice {
        let mut h = DefaultHasher::new();
        what.hash(&mut h);
        let digest = h.finish();
        match self.open.get_mut(&subject) {
            Some((d, logged)) if *d == digest => {
                if now.saturating_duration_since(*logged) >= REMIND_EVERY {
                    *logged = now;
                    Notice::Reminder
                } else {
                    Notice::Quiet
                }
            }
            Some(entry) => {
                *entry = (digest, now);
                Notice::New
            }
            None => {
                self.open.insert(subject, (digest, now));
                Notice::New
            }
        }
    }

    /// The problem of `subject` is gone; true when there was one.
    pub fn resolve(&mut self, subject: &Subject) -> bool {
        self.open.remove(subject).is_some()
    }

    /// Keeps the problems `keep` accepts (forgets those of models or files gone).
    pub fn retain(&mut self, mut keep: impl FnMut(&Subject) -> bool) {
        self.open.retain(|s, _| keep(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_change_then_reminders() {
        let mut r = Reports::default();
        let t0 = Instant::now();
        let s = Subject::Config("m".into());
        assert_eq!(r.note(s.clone(), &("a = 1", "bad"), t0), Notice::New);
        for secs in [0, 1, 60, 599] {
            let t = t0 + Duration::from_secs(secs);
            assert_eq!(r.note(s.clone(), &("a = 1", "bad"), t), Notice::Quiet);
        }
        let t1 = t0 + REMIND_EVERY;
        assert_eq!(r.note(s.clone(), &("a = 1", "bad"), t1), Notice::Reminder);
        assert_eq!(r.note(s.clone(), &("a = 1", "bad"), t1), Notice::Quiet);
        // Other content, or another error: a new problem.
        assert_eq!(r.note(s.clone(), &("a = 2", "bad"), t1), Notice::New);
        assert_eq!(r.note(s.clone(), &("a = 2", "worse"), t1), Notice::New);
        // Fixed, then broken the same way again: counted again.
        assert!(r.resolve(&s));
        assert!(!r.resolve(&s));
        assert_eq!(r.note(s.clone(), &("a = 2", "worse"), t1), Notice::New);
        // Subjects are independent.
        let v = Subject::Version("m".into(), 1);
        assert_eq!(r.note(v.clone(), &("a = 2", "worse"), t1), Notice::New);
        r.retain(|s| matches!(s, Subject::Version(..)));
        assert_eq!(r.note(s, &("a = 2", "worse"), t1), Notice::New);
        assert_eq!(r.note(v, &("a = 2", "worse"), t1), Notice::Quiet);
    }
}

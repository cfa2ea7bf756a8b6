//! Small helpers every layer uses: replacing a file atomically, wall-clock time as the
//! files and events record it, and running blocking work off the async threads with one
//! error mapping.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

thread_local! {
    static IO_CORE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as an I/O core (`serve::IoCores`): it runs its connections and
/// nothing else, so a light model may run on it whenever a session is idle.
pub fn mark_io_core() {
    IO_CORE.with(|c| c.set(true));
}

/// True on an I/O core thread (see [`mark_io_core`]).
pub fn on_io_core() -> bool {
    IO_CORE.with(std::cell::Cell::get)
}

/// Replaces `path` with `bytes` so that readers (this process, another replica, an
/// operator) see the old content or the new, never half of it: a hidden temporary file
/// in the same folder, flushed, renamed over the old one, and the folder flushed so the
/// rename itself is durable. A failure leaves no temporary file behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Internal(format!("{} has no folder", path.display())))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    let io = |what: &str, e: std::io::Error| {
        Error::Unavailable(format!("{what} {}: {e}", path.display()))
    };
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("cannot write", e))?;
        f.write_all(bytes).map_err(|e| io("cannot write", e))?;
        f.sync_all().map_err(|e| io("cannot flush", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("cannot replace", e))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// True for the temporary files [`write_atomic`] makes: a crash can leave one behind.
pub fn is_atomic_temporary(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// Milliseconds since the Unix epoch (0 before it, saturating far after it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// A duration in nanoseconds, saturating (after 584 years).
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// RFC 3339 time in UTC with milliseconds (`2026-12-01T21:46:16.123Z`).
pub fn rfc3339_ms(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Runs blocking work (file IO, loading models, ONNX Runtime) on tokio's blocking pool
/// and waits for it; a task that panicked or was cancelled becomes `Error::Internal`
/// naming `what`.
pub async fn blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Internal(format!("{what} task failed: {e}")))?
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, 9 terms: about 15 significant digits).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection keeps the series in its accurate range.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    for (i, &c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// A name for this replica, for audit entries, drift claims and logs: the host name
/// (the pod's name under Kubernetes) with a random suffix, so that two processes on one
/// host are two replicas. Made once per process.
pub fn replica_name() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        let host: String = std::env::var("HOSTNAME")
            .unwrap_or_default()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
            .take(48)
            .collect();
        let suffix = format!("{:08x}", fastrand::u32(..));
        if host.is_empty() {
            suffix
        } else {
            format!("{host}-{suffix}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_leave_only_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.toml");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.toml")]);
        let missing = dir.path().join("no/such/dir/f");
        assert!(write_atomic(&missing, b"x").is_err());
        assert!(is_atomic_temporary(".f.toml.tmp-1-2") && !is_atomic_temporary("f.toml"));
    }

    #[test]
    fn times() {
        assert_eq!(unix_ms(UNIX_EPOCH), 0);
        assert_eq!(
            unix_ms(UNIX_EPOCH + std::time::Duration::from_millis(1234)),
            1234
        );
        assert!(rfc3339_ms(UNIX_EPOCH).ends_with('Z'));
        assert!(now_ms() > 1_700_000_000_000);
    }
}

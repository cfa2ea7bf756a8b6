//! Keeping what serves in line with the repository while the server runs: filesystem
//! events (the `notify` crate) trigger a reconciliation at once, a periodic full rescan
//! covers filesystems that send no events, and versions still being written are looked
//! at again once they had time to settle.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Registry;

/// Watches the repository until `shutdown`; returns when it is cancelled.
pub async fn run(
    registry: Arc<Registry>,
    poll: Duration,
    settle: Duration,
    shutdown: CancellationToken,
) {
    // Capacity 1 and try_send: a burst of events (thousands of files) becomes one wake-up.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.as_ref().is_ok_and(is_change) {
            let _ = tx.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, poll_secs = poll.as_secs(), "cannot watch the repository; relying on periodic rescans");
            None
        }
    };
    let mut watched = HashSet::new();
    if let Some(w) = watcher.as_mut() {
        sync_watches(w, registry.root(), &mut watched);
    }
    let mut retry_at: Option<tokio::time::Instant> = None;
    // The first tick is immediate: one pass right after the watches are in place picks
    // up what changed between the initial load and now, which no event will report.
    let mut tick = tokio::time::interval(poll);
    loop {
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            _ = retry => {}
            Some(()) = rx.recv() => {
                // Let a burst of changes (a copy in progress, a rename) land first.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while rx.try_recv().is_ok() {}
            }
        }
        if let Some(w) = watcher.as_mut() {
            sync_watches(w, registry.root(), &mut watched);
        }
        let r = Arc::clone(&registry);
        match crate::util::blocking("repository scan", move || r.reconcile()).await {
            Ok(outcome) => {
                if !outcome.loaded.is_empty()
                    || !outcome.unloaded.is_empty()
                    || !outcome.failed.is_empty()
                {
                    tracing::info!(loaded = ?outcome.loaded, unloaded = ?outcome.unloaded, failed = ?outcome.failed, "repository change applied");
                }
                retry_at = (outcome.pending > 0)
                    .then(|| tokio::time::Instant::now() + settle.max(Duration::from_millis(50)));
            }
            Err(e) => {
                tracing::error!(error = %e, "repository scan failed; serving what was loaded");
                retry_at = Some(tokio::time::Instant::now() + poll);
            }
        }
    }
}

/// True for an event that may mean the repository changed. inotify also reports opening
/// and reading (`Access`): every pass reads config.toml and lists the folders, so
/// reacting to those would start the next pass, forever. A file closed after writing is
/// a change (the end of a copy).
fn is_change(event: &notify::Event) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Watches exactly the folders that matter, each non-recursively: the root (models come
/// and go), each model folder (versions, config.toml) and each version folder (its
/// files). A recursive watch would also cover whatever else lives in the repository (a
/// Python virtualenv, say: thousands of folders) and can exhaust the inotify limit.
fn sync_watches(
    watcher: &mut notify::RecommendedWatcher,
    root: &Path,
    watched: &mut HashSet<PathBuf>,
) {
    let mut wanted = vec![root.to_path_buf()];
    if let Ok(models) = super::scan::model_folders(root) {
        for m in models {
            let dir = root.join(&m);
            for v in super::scan::version_folders(&dir) {
                wanted.push(dir.join(v.to_string()));
            }
            wanted.push(dir);
        }
    }
    // Folders that went away lose their watch with them; forget them here too.
    watched.retain(|p| p.exists());
    for dir in wanted {
        if !watched.contains(&dir) {
            match watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir);
                }
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "cannot watch folder; periodic rescans cover it")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
    use notify::{Event, EventKind};

    #[test]
    fn reading_is_not_a_change() {
        let reads = [
            AccessKind::Open(AccessMode::Any),
            AccessKind::Read,
            AccessKind::Close(AccessMode::Read),
            AccessKind::Any,
        ];
        for kind in reads {
            assert!(!is_change(&Event::new(EventKind::Access(kind))), "{kind:?}");
        }
        for kind in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::Folder),
            EventKind::Modify(ModifyKind::Any),
            EventKind::Remove(notify::event::RemoveKind::Any),
            EventKind::Any,
        ] {
            assert!(is_change(&Event::new(kind)), "{kind:?}");
        }
    }
}

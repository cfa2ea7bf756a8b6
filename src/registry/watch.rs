//! Keeping what serves in line with the repository while the server runs: filesystem
//! events (the `notify` crate) trigger a reconciliation at once, a periodic full rescan
//! covers filesystems that send no events, and versions still being written are looked
//! at again once they had time to settle.

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
        if res.is_ok() {
            let _ = tx.try_send(());
        }
    })
    .and_then(|mut w| {
        w.watch(registry.root(), notify::RecursiveMode::Recursive)
            .map(|()| w)
    });
    let _watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, poll_secs = poll.as_secs(), "cannot watch the repository; relying on periodic rescans");
            None
        }
    };
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(poll);
    tick.tick().await;
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
        let r = Arc::clone(&registry);
        match tokio::task::spawn_blocking(move || r.reconcile()).await {
            Ok(Ok(outcome)) => {
                if !outcome.loaded.is_empty()
                    || !outcome.unloaded.is_empty()
                    || !outcome.failed.is_empty()
                {
                    tracing::info!(loaded = ?outcome.loaded, unloaded = ?outcome.unloaded, failed = ?outcome.failed, "repository change applied");
                }
                retry_at = (outcome.pending > 0)
                    .then(|| tokio::time::Instant::now() + settle.max(Duration::from_millis(50)));
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "repository scan failed; serving what was loaded");
                retry_at = Some(tokio::time::Instant::now() + poll);
            }
            Err(e) => tracing::error!(error = %e, "repository scan task failed"),
        }
    }
}

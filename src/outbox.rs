//! Webhooks that are never lost: a durable outbox on disk and one delivery task per
//! target.
//!
//! An event is written to the outbox (one file per event and target, atomically) before
//! any delivery is tried; a file is removed only after the receiver answered 2xx. A
//! crash, a restart or a long receiver outage therefore loses nothing: at start the
//! delivery tasks resume from the files. Deliveries are signed per the Standard Webhooks
//! spec (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "id.timestamp.body">`); the id stays the same across retries so that receivers can
//! deduplicate. Failures are retried with exponential backoff and jitter, honouring
//! `Retry-After`; a 410 Gone disables the target (a `DISABLED` file in its folder, until
//! an operator removes it). Redirects are not followed.
//!
//! Each target also remembers its last [`RECENT_ATTEMPTS`] attempts in memory, and
//! [`Outbox::status`] reports them with the backlog (for the admin view and the page).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::metrics;
use crate::util::{is_atomic_temporary, unix_ms, write_atomic};

/// One webhook receiver.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookTarget {
    /// A short name (the metric label).
    pub name: String,
    /// `http://host:port/path`.
    pub url: String,
    /// Standard Webhooks secret, `whsec_<base64>`.
    pub secret: String,
}

/// An event for the webhook outbox: its id (the same on every retry, so receivers
/// deduplicate) and its JSON payload.
pub struct Event {
    pub id: String,
    pub payload: serde_json::Value,
}

/// Marker file of a target disabled by a 410 answer.
pub const DISABLED: &str = "DISABLED";

/// One event waiting for one target, as stored in the outbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pending {
    pub id: String,
    /// The exact body sent on every attempt.
    pub body: String,
    pub attempts: u32,
    /// Unix milliseconds of the next attempt.
    pub next_attempt_ms: u64,
    pub created_ms: u64,
    #[serde(default)]
    pub last_error: String,
}

/// The outbox: `<dir>/<target key>/<event id>.json` (ids start with their creation time
/// in fixed-width hex, so names sort oldest first).
pub struct Outbox {
    targets: Vec<Arc<TargetState>>,
}

/// A target and what wakes its delivery task.
pub struct TargetState {
    pub target: WebhookTarget,
    pub dir: PathBuf,
    pub wake: Notify,
    /// The last attempts, newest last (at most [`RECENT_ATTEMPTS`]).
    recent: Mutex<VecDeque<AttemptRecord>>,
}

/// Attempts each target remembers (in memory: a restart forgets them).
pub const RECENT_ATTEMPTS: usize = 20;

/// One delivery attempt, as [`Outbox::status`] reports it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AttemptRecord {
    /// Unix milliseconds when the attempt ended.
    pub unix_ms: u64,
    pub event: String,
    /// `delivered`, `failed` (to be retried) or `gone` (410: the target is disabled).
    pub outcome: &'static str,
    /// Attempts of this event so far, this one included.
    pub attempts: u32,
    /// Why it failed; empty when delivered.
    pub error: String,
}

/// One target's state: what waits and what happened lately. The URL is not shown (a
/// webhook URL may carry a secret in its path or query): its scheme and host are.
#[derive(Debug, Clone, Serialize)]
pub struct TargetStatus {
    pub name: String,
    /// `scheme://host[:port]` of the URL.
    pub endpoint: String,
    /// Disabled by a 410 answer (until the `DISABLED` file is removed).
    pub disabled: bool,
    /// Events waiting for delivery.
    pub backlog: usize,
    /// The oldest waiting event, when there is one.
    pub oldest: Option<PendingSummary>,
    /// The last attempts, newest first.
    pub recent: Vec<AttemptRecord>,
}

/// A waiting event without its body.
#[derive(Debug, Clone, Serialize)]
pub struct PendingSummary {
    pub id: String,
    pub attempts: u32,
    pub created_ms: u64,
    pub next_attempt_ms: u64,
    pub last_error: String,
}

/// `scheme://host[:port]` of a URL (`?` when it does not parse).
fn endpoint(url: &str) -> String {
    match url.parse::<hyper::Uri>() {
        Ok(u) => match (u.scheme_str(), u.authority()) {
            // The authority without any user:password@ part.
            (Some(s), Some(a)) => {
                let host = a.as_str().rsplit('@').next().unwrap_or_default();
                format!("{s}://{host}")
            }
            _ => "?".into(),
        },
        Err(_) => "?".into(),
    }
}

impl TargetState {
    fn remember(&self, event: &str, outcome: &'static str, attempts: u32, error: String) {
        let mut r = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.len() >= RECENT_ATTEMPTS {
            r.pop_front();
        }
        r.push_back(AttemptRecord {
            unix_ms: unix_ms(SystemTime::now()),
            event: event.to_string(),
            outcome,
            attempts,
            error,
        });
    }

    /// The target's backlog and last attempts (reads its folder).
    pub fn status(&self) -> TargetStatus {
        let files = backlog(&self.dir);
        let oldest = files
            .first()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<Pending>(&b).ok())
            .map(|p| PendingSummary {
                id: p.id,
                attempts: p.attempts,
                created_ms: p.created_ms,
                next_attempt_ms: p.next_attempt_ms,
                last_error: p.last_error,
            });
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .rev()
            .cloned()
            .collect();
        TargetStatus {
            name: self.target.name.clone(),
            endpoint: endpoint(&self.target.url),
            disabled: self.dir.join(DISABLED).exists(),
            backlog: files.len(),
            oldest,
            recent,
        }
    }
}

/// The folder name of a target: a hash of its URL, stable across restarts.
fn target_key(url: &str) -> String {
    let h = Sha256::digest(url.as_bytes());
    hex::encode(&h[..8])
}

impl Outbox {
    /// Opens (creates) the outbox folders for the targets.
    pub fn open(dir: &Path, targets: &[WebhookTarget]) -> Result<Outbox> {
        let mut states = Vec::new();
        for t in targets {
            let d = dir.join(target_key(&t.url));
            std::fs::create_dir_all(&d)
                .map_err(|e| Error::Config(format!("webhook outbox {}: {e}", d.display())))?;
            remove_stale_temporaries(&d);
            states.push(Arc::new(TargetState {
                target: t.clone(),
                dir: d,
                wake: Notify::new(),
                recent: Mutex::new(VecDeque::new()),
            }));
        }
        Ok(Outbox { targets: states })
    }

    pub fn targets(&self) -> &[Arc<TargetState>] {
        &self.targets
    }

    /// Every target's backlog and last attempts, in configuration order.
    pub fn status(&self) -> Vec<TargetStatus> {
        self.targets.iter().map(|t| t.status()).collect()
    }

    /// Writes the event for every target (durably) and wakes their delivery tasks.
    pub fn enqueue(&self, event: &Event) -> Result<()> {
        let body = serde_json::to_string(&event.payload)
            .map_err(|e| Error::Internal(format!("webhook payload: {e}")))?;
        let now = unix_ms(SystemTime::now());
        for t in &self.targets {
            let path = t.dir.join(format!("{}.json", event.id));
            // Written already (an earlier try failed for another target): not twice.
            if path.exists() {
                continue;
            }
            let p = Pending {
                id: event.id.clone(),
                body: body.clone(),
                attempts: 0,
                next_attempt_ms: now,
                created_ms: now,
                last_error: String::new(),
            };
            write_pending(&path, &p)?;
            metrics::set_webhook_backlog(&t.target.name, backlog(&t.dir).len());
            t.wake.notify_one();
        }
        Ok(())
    }
}

fn write_pending(path: &Path, p: &Pending) -> Result<()> {
    let bytes = serde_json::to_vec(p).map_err(|e| Error::Internal(format!("outbox entry: {e}")))?;
    write_atomic(path, &bytes)
}

/// Temporary files a crash left mid-write (never renamed into place): removed at start.
fn remove_stale_temporaries(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_atomic_temporary(&name) {
            tracing::info!(file = %e.path().display(), "removing a partial outbox write left by a crash");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The pending files of a target folder, oldest first.
pub fn backlog(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension().is_some_and(|x| x == "json")
                        && p.file_name()
                            .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The `webhook-signature` value for one attempt.
pub fn sign(secret: &str, id: &str, timestamp: u64, body: &str) -> Result<String> {
    let key = secret_key(secret)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key)
        .map_err(|e| Error::Config(format!("webhook secret: {e}")))?;
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    Ok(format!("v1,{sig}"))
}

/// The HMAC key of a `whsec_<base64>` secret.
pub fn secret_key(secret: &str) -> Result<Vec<u8>> {
    let b64 = secret
        .strip_prefix("whsec_")
        .ok_or_else(|| Error::Config("a webhook secret starts with whsec_".into()))?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| Error::Config(format!("webhook secret is not base64 after whsec_: {e}")))?;
    if key.len() < 16 {
        return Err(Error::Config(
            "a webhook secret needs at least 16 bytes".into(),
        ));
    }
    Ok(key)
}

/// How one attempt ended.
enum Attempt {
    Delivered,
    /// Retry; the receiver may have said when (Retry-After).
    Retry(String, Option<Duration>),
    Gone,
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector<PublicResolver>,
    Full<Bytes>,
>;

/// An IP address written in a URL's host (`[::1]` included).
pub fn literal_ip(host: &str) -> Option<std::net::IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Loopback, private, link-local, shared (CGNAT), unspecified or broadcast: an address
/// a webhook must not reach unless allowed.
pub fn is_private(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || o[0] == 0
        }
        std::net::IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(std::net::IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
        }
    }
}

/// Resolves webhook hosts and drops private addresses (unless allowed), so that the
/// check holds for the address actually connected to (no DNS rebinding in between).
#[derive(Clone)]
pub struct PublicResolver {
    allow_private: bool,
}

type Resolved = std::io::Result<std::vec::IntoIter<std::net::SocketAddr>>;

impl tower::Service<hyper_util::client::legacy::connect::dns::Name> for PublicResolver {
    type Response = std::vec::IntoIter<std::net::SocketAddr>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Resolved> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let allow = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let all: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let ok: Vec<std::net::SocketAddr> = all
                .into_iter()
                .filter(|a| allow || !is_private(a.ip()))
                .collect();
            if ok.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "{host} resolves only to loopback or private addresses \
                         (drift.allow_private_webhooks is off)"
                    ),
                ));
            }
            Ok(ok.into_iter())
        })
    }
}

/// Delivery settings.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Targets may resolve to loopback / private addresses.
    pub allow_private: bool,
    pub timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

/// Delivers a target's backlog, oldest first, until `shutdown`. Files stay on disk until
/// delivered: whatever is left at shutdown is delivered after the next start.
pub async fn deliver_loop(t: Arc<TargetState>, delivery: Delivery, shutdown: CancellationToken) {
    let mut connector =
        hyper_util::client::legacy::connect::HttpConnector::new_with_resolver(PublicResolver {
            allow_private: delivery.allow_private,
        });
    connector.set_connect_timeout(Some(delivery.timeout));
    let client: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector);
    let name = t.target.name.clone();
    loop {
        if t.dir.join(DISABLED).exists() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
            }
        }
        let files = backlog(&t.dir);
        metrics::set_webhook_backlog(&name, files.len());
        let Some(path) = files.first().cloned() else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = t.wake.notified() => continue,
                // Files written by another process (or found late) are picked up too.
                _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
            }
        };
        let mut p: Pending = match std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(p) => p,
            None => {
                // Unreadable (torn by a crash before the rename? then it would not be
                // here): set aside, never retried forever.
                tracing::error!(file = %path.display(), "unreadable webhook outbox entry; moved aside");
                let _ = std::fs::rename(&path, path.with_extension("bad"));
                continue;
            }
        };
        let now = unix_ms(SystemTime::now());
        if p.next_attempt_ms > now {
            let wait = Duration::from_millis(p.next_attempt_ms - now);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        let outcome = attempt(&client, &t.target, &p, &delivery).await;
        match outcome {
            Attempt::Delivered => {
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::error!(file = %path.display(), error = %e, "cannot remove a delivered webhook entry");
                }
                if let Ok(d) = std::fs::File::open(&t.dir) {
                    let _ = d.sync_all();
                }
                metrics::count_webhook(&name, "delivered");
                t.remember(&p.id, "delivered", p.attempts + 1, String::new());
                tracing::info!(target = %name, event = %p.id, attempts = p.attempts + 1, "webhook delivered");
            }
            Attempt::Gone => {
                metrics::count_webhook(&name, "gone");
                t.remember(
                    &p.id,
                    "gone",
                    p.attempts + 1,
                    "receiver answered 410 Gone".into(),
                );
                tracing::error!(target = %name, url = %t.target.url, "webhook target answered 410 Gone: disabled (remove {} to enable it again)", t.dir.join(DISABLED).display());
                let _ = write_atomic(&t.dir.join(DISABLED), b"410 Gone\n");
            }
            Attempt::Retry(why, after) => {
                p.attempts += 1;
                let backoff = backoff(&delivery, p.attempts);
                let wait = after.map_or(backoff, |a| a.max(delivery.initial_backoff));
                p.next_attempt_ms = unix_ms(SystemTime::now()) + wait.as_millis() as u64;
                p.last_error = why.clone();
                metrics::count_webhook(&name, "failed");
                t.remember(&p.id, "failed", p.attempts, why.clone());
                tracing::warn!(target = %name, event = %p.id, attempts = p.attempts, retry_in_ms = wait.as_millis() as u64, error = %why, "webhook delivery failed");
                if let Err(e) = write_pending(&path, &p) {
                    tracing::error!(file = %path.display(), error = %e, "cannot update a webhook outbox entry");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// Exponential backoff with jitter: initial x 2^(attempts-1), capped, times 0.5 to 1.5.
fn backoff(d: &Delivery, attempts: u32) -> Duration {
    let base = d
        .initial_backoff
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
        .min(d.max_backoff);
    base.mul_f64(0.5 + fastrand::f64())
}

async fn attempt(
    client: &Client,
    target: &WebhookTarget,
    p: &Pending,
    delivery: &Delivery,
) -> Attempt {
    let timeout = delivery.timeout;
    // An IP in the URL skips the resolver: check it here.
    if !delivery.allow_private
        && let Some(ip) = target
            .url
            .parse::<hyper::Uri>()
            .ok()
            .and_then(|u| u.host().and_then(literal_ip))
        && is_private(ip)
    {
        return Attempt::Retry(
            format!("{ip} is a loopback or private address (drift.allow_private_webhooks is off)"),
            None,
        );
    }
    let ts = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let signature = match sign(&target.secret, &p.id, ts, &p.body) {
        Ok(s) => s,
        Err(e) => return Attempt::Retry(e.to_string(), None),
    };
    let req = hyper::Request::post(&target.url)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("modelgate/", env!("CARGO_PKG_VERSION")),
        )
        .header("webhook-id", &p.id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(Full::new(Bytes::from(p.body.clone())));
    let req = match req {
        Ok(r) => r,
        Err(e) => return Attempt::Retry(format!("bad request: {e}"), None),
    };
    let resp = match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => return Attempt::Retry("timed out".into(), None),
        Ok(Err(e)) => return Attempt::Retry(format!("cannot reach the receiver: {e}"), None),
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(86_400)));
    // Drain the body (bounded by the timeout) so the connection can be reused.
    let _ = tokio::time::timeout(timeout, resp.into_body().collect()).await;
    if status.is_success() {
        Attempt::Delivered
    } else if status == hyper::StatusCode::GONE {
        Attempt::Gone
    } else {
        // Redirects included: a webhook is not followed elsewhere.
        Attempt::Retry(format!("receiver answered {status}"), retry_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_signature() {
        // The example of the Standard Webhooks specification's reference libraries.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let sig = sign(
            secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(sign("nope", "a", 1, "b").is_err());
    }

    #[test]
    fn private_addresses() {
        let private = [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ];
        for ip in private {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
        assert_eq!(literal_ip("[::1]"), Some("::1".parse().unwrap()));
        assert_eq!(literal_ip("example.com"), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let d = Delivery {
            allow_private: false,
            timeout: Duration::from_secs(1),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        };
        let b1 = backoff(&d, 1);
        assert!(b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(150));
        let b5 = backoff(&d, 5);
        assert!(b5 >= Duration::from_millis(800) && b5 <= Duration::from_millis(2400));
        assert!(backoff(&d, 40) <= Duration::from_secs(15));
    }

    #[test]
    fn outbox_entries_are_files_until_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let t = WebhookTarget {
            name: "t".into(),
            url: "http://127.0.0.1:9/hook".into(),
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        };
        let ob = Outbox::open(dir.path(), &[t]).unwrap();
        let e = Event {
            id: "evt_1".into(),
            payload: serde_json::json!({"type": "model.drift", "id": "evt_1"}),
        };
        ob.enqueue(&e).unwrap();
        let files = backlog(&ob.targets()[0].dir);
        assert_eq!(files.len(), 1);
        let p: Pending = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
        assert_eq!(p.id, "evt_1");
        assert_eq!(p.attempts, 0);
    }

    #[test]
    fn status_shows_the_backlog_and_recent_attempts_but_no_secret_of_the_url() {
        assert_eq!(
            endpoint("https://user:pw@hooks.example.com:8443/T0/B1/secret?token=x"),
            "https://hooks.example.com:8443"
        );
        assert_eq!(endpoint("not a url"), "?");
        let dir = tempfile::tempdir().unwrap();
        let t = WebhookTarget {
            name: "t".into(),
            url: "http://127.0.0.1:9/hook/s3cret".into(),
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        };
        let ob = Outbox::open(dir.path(), &[t]).unwrap();
        for id in ["evt_1", "evt_2"] {
            let e = Event {
                id: id.into(),
                payload: serde_json::json!({"id": id}),
            };
            ob.enqueue(&e).unwrap();
        }
        let ts = &ob.targets()[0];
        for i in 0..RECENT_ATTEMPTS + 3 {
            ts.remember(
                &format!("evt_{i}"),
                "failed",
                1,
                "receiver answered 503".into(),
            );
        }
        ts.remember("evt_x", "delivered", 2, String::new());
        let st = ob.status();
        assert_eq!(st.len(), 1);
        let st = &st[0];
        assert_eq!(st.backlog, 2);
        assert_eq!(st.oldest.as_ref().unwrap().id, "evt_1");
        assert_eq!(st.recent.len(), RECENT_ATTEMPTS);
        assert_eq!(st.recent[0].event, "evt_x", "newest first");
        assert_eq!(st.recent[0].outcome, "delivered");
        assert!(!st.disabled);
        let json = serde_json::to_string(st).unwrap();
        assert!(
            !json.contains("s3cret") && !json.contains("whsec"),
            "{json}"
        );
    }
}

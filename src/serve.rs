//! The accept loop every listener runs (HTTP, gRPC, metrics): hyper's HTTP/1 + HTTP/2
//! server with the connection limits a production gateway needs, which `axum::serve`
//! does not expose.
//!
//! - at most `max_connections` open connections per listener: beyond, a new connection
//!   is closed at once (counted);
//! - HTTP/2: at most `max_concurrent_streams` streams per connection;
//! - request heads larger than `max_header_bytes` are refused (431 over HTTP/1);
//! - a client must send its request head within `header_read_timeout` (a client that
//!   sends one byte a second is cut off, not waited for);
//! - a connection with no request in flight and no traffic for `idle_timeout` is closed;
//! - on shutdown every connection is closed gracefully (in-flight requests finish).
//!
//! The peer address is put in each request's extensions as axum's `ConnectInfo`, where
//! the admin API's this-host-only rule reads it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::error::{Error, Result};
use crate::metrics;

/// Connection and request limits (`[limits]` in the config).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open connections per listener at most.
    pub max_connections: usize,
    /// HTTP/2 streams per connection at most (gRPC calls in flight on one connection).
    pub max_concurrent_streams: u32,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
    /// Time a client has to send a request head, in milliseconds.
    pub header_read_timeout_ms: u64,
    /// A connection idle this long (no request in flight, no bytes) is closed, in ms.
    pub idle_timeout_ms: u64,
    /// Time a client has to send a whole request body, in milliseconds (408 after).
    pub body_read_timeout_ms: u64,
    /// Elements in one input tensor at most.
    pub max_tensor_elements: usize,
    /// Rows (first dimension) in one request at most.
    pub max_rows_per_request: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            max_concurrent_streams: 256,
            max_header_bytes: 64 * 1024,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            body_read_timeout_ms: 60_000,
            max_tensor_elements: 1 << 26,
            max_rows_per_request: 1 << 20,
        }
    }
}

impl Limits {
    /// Checks the values; the message names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: &str| Err(Error::Config(format!("limits.{f}: {why}")));
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1");
        }
        if self.max_concurrent_streams == 0 {
            return bad("max_concurrent_streams", "must be at least 1");
        }
        if !(4096..=16 << 20).contains(&self.max_header_bytes) {
            return bad("max_header_bytes", "must be between 4096 and 16 MiB");
        }
        if self.header_read_timeout_ms == 0
            || self.idle_timeout_ms == 0
            || self.body_read_timeout_ms == 0
        {
            return bad("header_read_timeout_ms", "timeouts must be positive");
        }
        if self.max_tensor_elements == 0 || self.max_rows_per_request == 0 {
            return bad("max_tensor_elements", "tensor limits must be at least 1");
        }
        Ok(())
    }
}

/// Reads and writes stamp the connection's last activity (milliseconds since `epoch`).
struct ActivityIo<T> {
    inner: T,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl<T> ActivityIo<T> {
    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves `app` on `listener` until `shutdown`; connection tasks join `tracker`, so
/// that shutdown waits (bounded by the caller) for in-flight requests.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    name: &'static str,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms))
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Dead peers are found by pings rather than kept forever.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let open = Arc::new(AtomicUsize::new(0));
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: back off rather than spin.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if open.load(Ordering::Relaxed) >= limits.max_connections {
            metrics::count_connection_refused(name);
            drop(stream);
            continue;
        }
        // Small request/response pairs: Nagle's delay would dominate latency.
        let _ = stream.set_nodelay(true);
        open.fetch_add(1, Ordering::Relaxed);
        metrics::set_connections_open(name, open.load(Ordering::Relaxed));
        let epoch = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let handshake_timeout = Duration::from_millis(limits.header_read_timeout_ms);
        let tls = tls.clone();
        let activity = Arc::clone(&last);
        let (app, builder, open, shutdown) = (
            app.clone(),
            Arc::clone(&builder),
            Arc::clone(&open),
            shutdown.clone(),
        );
        let flight = Arc::clone(&in_flight);
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                let guard = InFlight::new(Arc::clone(&flight));
                let app = app.clone();
                async move {
                    let resp = app.oneshot(req).await;
                    drop(guard);
                    resp
                }
            });
        tracker.spawn(async move {
            // The TLS handshake runs here, off the accept loop, bounded like a request head.
            let inner: Box<dyn Io> = match tls {
                None => Box::new(stream),
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(e)) => {
                            tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed");
                            metrics::count_tls_failure(name);
                            let now = open.fetch_sub(1, Ordering::Relaxed) - 1;
                            metrics::set_connections_open(name, now);
                            return;
                        }
                        Err(_) => {
                            metrics::count_tls_failure(name);
                            let now = open.fetch_sub(1, Ordering::Relaxed) - 1;
                            metrics::set_connections_open(name, now);
                            return;
                        }
                    }
                }
            };
            let io = TokioIo::new(ActivityIo {
                inner,
                last: activity,
                epoch,
            });
            let conn = builder.serve_connection_with_upgrades(io, service);
            let mut conn = std::pin::pin!(conn);
            let mut tick = tokio::time::interval(idle.min(Duration::from_secs(1)));
            let mut closing = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(listener = name, %peer, error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = shutdown.cancelled(), if !closing => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    _ = tick.tick(), if !closing => {
                        let quiet = (epoch.elapsed().as_millis() as u64).saturating_sub(last.load(Ordering::Relaxed));
                        if in_flight.load(Ordering::Relaxed) == 0 && quiet >= idle.as_millis() as u64 {
                            conn.as_mut().graceful_shutdown();
                            closing = true;
                        }
                    }
                }
            }
            let now = open.fetch_sub(1, Ordering::Relaxed) - 1;
            metrics::set_connections_open(name, now);
        });
    }
}

/// A connection's byte stream: plain TCP or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Counts a request in flight on a connection while it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(n: Arc<AtomicUsize>) -> InFlight {
        n.fetch_add(1, Ordering::Relaxed);
        InFlight(n)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

//! The accept loop every listener runs (HTTP, gRPC, metrics): hyper's HTTP/1 + HTTP/2
//! server with the connection limits a production gateway needs, which `axum::serve`
//! does not expose.
//!
//! - at most `max_connections` open connections per listener: beyond, a new connection
//!   is closed at once (counted);
//! - HTTP/2: at most `max_concurrent_streams` streams per connection;
//! - request heads larger than `max_header_bytes` are refused (431 over HTTP/1);
//! - a client must send its request head within `header_read_timeout` (a client that
//!   sends one byte a second is cut off, not waited for: the whole head is bounded, not
//!   the gap between reads). On plain HTTP/1 connections the connection's own tick
//!   checks it (`ConnState`), within a quarter of the timeout; hyper's timer would
//!   register and cancel a timer for every request. Over TLS hyper's timer does it;
//! - a request body must arrive within `body_read_timeout` of the end of its head, as a
//!   whole ([`Bounded`]): HTTP answers 408 (HTTP/1.1 also closes the connection), a gRPC
//!   call ends with DEADLINE_EXCEEDED and its stream is reset. On a client-streaming
//!   gRPC call each message is bounded from its first byte (a stream may stay quiet
//!   between messages); a gRPC message over `max_request_bytes` ends the call with
//!   RESOURCE_EXHAUSTED, read from the 5-byte message prefix before any of it is kept;
//! - a connection with no request in flight and no traffic for `idle_timeout` is closed;
//! - on shutdown every connection is closed gracefully (in-flight requests finish).
//!
//! The peer address is known to a request's service call through [`peer`], where the
//! admin API's this-host-only rule reads it (a request extension would allocate a map
//! for every request).
//!
//! Protocols: a plain connection that opens with HTTP/2's client preface (gRPC, h2c) is
//! served by hyper's HTTP/2 server, any other by its HTTP/1 server; the first bytes are
//! peeked at, so both read the socket directly. (hyper-util's detecting server reads
//! them itself and then puts every read of the connection through a rewinding wrapper.)
//! TLS connections keep that server, after the handshake.
//!
//! Threads: the accept loop runs on the server's multi-thread runtime, but each accepted
//! connection is handed to one of the [`IoCores`]: threads that each run a
//! single-threaded tokio runtime, so that a connection's reads, its HTTP/2 streams, the
//! handler (and a light model run inline by it) and its writes all stay on one thread.
//! On the multi-thread runtime hyper's per-stream tasks were woken and stolen across
//! workers: a futex wake and a cache miss per request, which for a tiny model cost as
//! much as the model. A connection goes to the core with the fewest open connections.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
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

/// What a connection's reads, writes and requests tell its loop. Counters, not time
/// stamps: the loop's tick (for the idle and the head timeouts) notices whether they
/// moved, and no read, write or request pays for a clock call. Only the connection's
/// own I/O writes `activity` and `reads`; requests (HTTP/2 streams are tasks of their
/// own) move `in_flight` and `head_mark`.
#[derive(Default)]
struct ConnState {
    /// Reads and writes that moved bytes.
    activity: AtomicU64,
    /// Reads that brought bytes.
    reads: AtomicU64,
    /// Requests being answered now.
    in_flight: AtomicUsize,
    /// `reads` when a request last began or ended: more reads since, with no request in
    /// flight, are a request head on its way.
    head_mark: AtomicU64,
}

impl ConnState {
    /// A request began or ended: the reads so far were its head (or its body).
    fn mark_head(&self) {
        self.head_mark
            .store(self.reads.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Whether bytes of a request head came in and no request began since.
    fn head_pending(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
            && self.reads.load(Ordering::Relaxed) != self.head_mark.load(Ordering::Relaxed)
    }
}

/// Counts a connection's reads and writes in its [`ConnState`].
struct ActivityIo<T> {
    inner: T,
    state: Arc<ConnState>,
}

impl<T> ActivityIo<T> {
    /// One writer (the connection's I/O), so a load and a store, not a locked add.
    fn touch(&self, read: bool) {
        let bump = |c: &AtomicU64| c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        bump(&self.state.activity);
        if read {
            bump(&self.state.reads);
        }
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
            self.touch(true);
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
            self.touch(false);
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

tokio::task_local! {
    /// The peer of the connection whose request is being served.
    static PEER: std::net::SocketAddr;
}

/// The address of the client whose request is being served: `None` outside a request
/// served by [`serve`].
pub fn peer() -> Option<std::net::SocketAddr> {
    PEER.try_with(|p| *p).ok()
}

/// What a listener enforces: the connection and timing limits, and the largest request
/// (gRPC messages are checked here; HTTP bodies by the router's body limit).
#[derive(Debug, Clone)]
pub struct Bounds {
    pub limits: Limits,
    pub max_request_bytes: usize,
}

/// A connection task, made on the core thread that runs it (its socket must be
/// registered with that thread's runtime).
type ConnectionJob = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Connections waiting for a core thread to take them, per core (the accept loop waits
/// when a core is this far behind).
const CORE_BACKLOG: usize = 256;

/// The connection threads: one single-threaded tokio runtime each (see the module docs).
/// Dropping the last handle lets each thread finish its connections and exit.
pub struct IoCores {
    cores: Vec<Core>,
}

struct Core {
    jobs: tokio::sync::mpsc::Sender<ConnectionJob>,
    /// Connections this core runs now.
    open: Arc<AtomicUsize>,
}

impl IoCores {
    /// Starts `n` connection threads (`n >= 1`).
    pub fn start(n: usize) -> Result<Arc<IoCores>> {
        let mut cores = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<ConnectionJob>(CORE_BACKLOG);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::Internal(format!("cannot start an I/O thread: {e}")))?;
            std::thread::Builder::new()
                .name(format!("modelgate-io-{i}"))
                .spawn(move || {
                    crate::util::mark_io_core();
                    rt.block_on(async move {
                        let running = TaskTracker::new();
                        while let Some(job) = rx.recv().await {
                            running.spawn(job());
                        }
                        running.close();
                        running.wait().await;
                    });
                })
                .map_err(|e| Error::Internal(format!("cannot start an I/O thread: {e}")))?;
            cores.push(Core {
                jobs: tx,
                open: Arc::new(AtomicUsize::new(0)),
            });
        }
        Ok(Arc::new(IoCores { cores }))
    }

    /// Runs `task` on the least busy core, on the socket registered there. If that core
    /// is gone (it cannot be while this handle lives, but no connection is dropped for
    /// it), the task runs on the caller's runtime.
    async fn run<F, Fut>(&self, std: std::net::TcpStream, tracker: &TaskTracker, task: F)
    where
        F: FnOnce(std::io::Result<TcpStream>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(core) = self
            .cores
            .iter()
            .min_by_key(|c| c.open.load(Ordering::Relaxed))
        else {
            tracker.spawn(task(TcpStream::from_std(std)));
            return;
        };
        core.open.fetch_add(1, Ordering::Relaxed);
        let open = Arc::clone(&core.open);
        let token = tracker.token();
        let job: ConnectionJob = Box::new(move || {
            Box::pin(async move {
                let _token = token;
                task(TcpStream::from_std(std)).await;
                open.fetch_sub(1, Ordering::Relaxed);
            })
        });
        if let Err(tokio::sync::mpsc::error::SendError(job)) = core.jobs.send(job).await {
            tracker.spawn(job());
        }
    }
}

/// Serves `app` (a router, or a front end's own service) on `listener` until `shutdown`;
/// connection tasks join `tracker`, so that shutdown waits (bounded by the caller) for
/// in-flight requests. With `cores`, connections run on those threads; without, on the
/// caller's runtime.
#[allow(clippy::too_many_arguments)]
pub async fn serve<S>(
    listener: TcpListener,
    app: S,
    bounds: Bounds,
    tls: Option<tokio_rustls::TlsAcceptor>,
    name: &'static str,
    cores: Option<Arc<IoCores>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) where
    S: tower::Service<
            hyper::Request<Bounded<hyper::body::Incoming>>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let Bounds {
        limits,
        max_request_bytes,
    } = bounds;
    let builders = Arc::new(Builders::new(&limits));
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
        let stream = match &cores {
            None => Accepted::Here(stream),
            Some(_) => match stream.into_std() {
                Ok(std) => Accepted::Moved(std),
                Err(e) => {
                    // Leaving this runtime's reactor failed: the socket is gone.
                    tracing::debug!(listener = name, %peer, error = %e, "cannot move a connection");
                    continue;
                }
            },
        };
        open.fetch_add(1, Ordering::Relaxed);
        metrics::set_connections_open(name, open.load(Ordering::Relaxed));
        let conn_state = Arc::new(ConnState::default());
        let head_timeout = Duration::from_millis(limits.header_read_timeout_ms);
        let tls = tls.clone();
        let (app, builders, open, shutdown) = (
            app.clone(),
            Arc::clone(&builders),
            Arc::clone(&open),
            shutdown.clone(),
        );
        let flight = Arc::clone(&conn_state);
        let body_timeout = Duration::from_millis(limits.body_read_timeout_ms);
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let guard = InFlight::new(Arc::clone(&flight));
                let app = app.clone();
                let http1 = req.version() < hyper::Version::HTTP_2;
                let expired = Arc::new(AtomicBool::new(false));
                let kind = BodyKind::of(&req, max_request_bytes);
                let req = req.map(|b| Bounded::new(b, body_timeout, kind, Arc::clone(&expired)));
                async move {
                    let mut resp = PEER.scope(peer, app.oneshot(req)).await;
                    // The rest of a body that came too slowly is not waited for: the
                    // connection cannot carry another request.
                    if let Ok(r) = &mut resp
                        && http1
                        && expired.load(Ordering::Relaxed)
                    {
                        r.headers_mut().insert(
                            hyper::header::CONNECTION,
                            hyper::header::HeaderValue::from_static("close"),
                        );
                    }
                    drop(guard);
                    resp
                }
            });
        let task = move |stream: std::io::Result<TcpStream>| async move {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    // Registering the socket with the I/O thread's runtime failed.
                    tracing::debug!(listener = name, %peer, error = %e, "cannot take a connection");
                    closed(&open, name);
                    return;
                }
            };
            let watch = Watch {
                state: Arc::clone(&conn_state),
                idle,
                head: None,
                shutdown,
                name,
                peer,
            };
            match tls {
                None => {
                    // Plain: the first bytes tell the protocol (peeked, so they stay for
                    // hyper). A connection may stay silent as long as an idle one; once
                    // bytes come, the rest of the preface is bounded like a head.
                    let first = async {
                        tokio::time::timeout(idle, stream.readable())
                            .await
                            .ok()?
                            .ok()?;
                        tokio::time::timeout(head_timeout, opens_with_h2_preface(&stream))
                            .await
                            .ok()?
                            .ok()
                    };
                    let Some(h2) = first.await else {
                        tracing::debug!(listener = name, %peer, "no request head: connection closed");
                        closed(&open, name);
                        return;
                    };
                    let io = TokioIo::new(ActivityIo {
                        inner: stream,
                        state: conn_state,
                    });
                    if h2 {
                        let conn = builders.h2.serve_connection(io, service);
                        drive(std::pin::pin!(conn), |c| c.graceful_shutdown(), watch).await;
                    } else {
                        let conn = builders.h1.serve_connection(io, service);
                        let watch = Watch {
                            head: Some(head_timeout),
                            ..watch
                        };
                        drive(std::pin::pin!(conn), |c| c.graceful_shutdown(), watch).await;
                    }
                }
                Some(acceptor) => {
                    // The TLS handshake runs here, off the accept loop, bounded like a
                    // request head.
                    let stream = match tokio::time::timeout(head_timeout, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed");
                            metrics::count_tls_failure(name);
                            closed(&open, name);
                            return;
                        }
                        Err(_) => {
                            metrics::count_tls_failure(name);
                            closed(&open, name);
                            return;
                        }
                    };
                    let io = TokioIo::new(ActivityIo {
                        inner: stream,
                        state: conn_state,
                    });
                    let conn = builders.auto.serve_connection_with_upgrades(io, service);
                    drive(std::pin::pin!(conn), |c| c.graceful_shutdown(), watch).await;
                }
            }
            closed(&open, name);
        };
        match (stream, &cores) {
            (Accepted::Moved(std), Some(cores)) => cores.run(std, &tracker, task).await,
            (Accepted::Moved(std), None) => {
                tracker.spawn(task(TcpStream::from_std(std)));
            }
            (Accepted::Here(stream), _) => {
                tracker.spawn(task(Ok(stream)));
            }
        }
    }
}

/// HTTP/2's limits, the same for plain and TLS connections.
macro_rules! h2_limits {
    ($b:expr, $limits:expr) => {
        $b.timer(TokioTimer::new())
            .max_concurrent_streams($limits.max_concurrent_streams)
            .max_header_list_size(u32::try_from($limits.max_header_bytes).unwrap_or(u32::MAX))
            // Dead peers are found by pings rather than kept forever.
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20))
    };
}

/// hyper's servers, configured once per listener.
struct Builders {
    /// Plain HTTP/1: no timer, the head timeout is [`drive`]'s.
    h1: hyper::server::conn::http1::Builder,
    /// Plain HTTP/2 (prior knowledge: gRPC, h2c).
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    /// TLS: either protocol, detected by hyper-util; hyper's timer bounds HTTP/1 heads.
    auto: hyper_util::server::conn::auto::Builder<TokioExecutor>,
}

impl Builders {
    fn new(limits: &Limits) -> Builders {
        let head_timeout = Duration::from_millis(limits.header_read_timeout_ms);
        let max_buf = limits.max_header_bytes.max(8192);
        let mut h1 = hyper::server::conn::http1::Builder::new();
        h1.header_read_timeout(None).max_buf_size(max_buf);
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2_limits!(h2, limits);
        let mut auto = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(head_timeout)
            .max_buf_size(max_buf);
        h2_limits!(auto.http2(), limits);
        Builders { h1, h2, auto }
    }
}

/// Whether a plain connection opens with HTTP/2's client preface (prior knowledge), read
/// with `peek` so that the bytes stay in the socket for the server that takes it. False
/// at the first byte that differs (an HTTP/1 request line) or at the end of the stream.
async fn opens_with_h2_preface(stream: &TcpStream) -> std::io::Result<bool> {
    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; 24];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 || buf[..n] != PREFACE[..n] {
            return Ok(false);
        }
        if n == PREFACE.len() {
            return Ok(true);
        }
        // Part of the preface: peek would return the same bytes at once, so wait for
        // the rest (clients send the preface in one write; the caller bounds this).
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A connection ended (served, or before it could be): it no longer counts as open.
fn closed(open: &AtomicUsize, name: &'static str) {
    let now = open.fetch_sub(1, Ordering::Relaxed) - 1;
    metrics::set_connections_open(name, now);
}

/// What [`drive`] watches on a connection.
struct Watch {
    state: Arc<ConnState>,
    /// No request in flight and no bytes for this long: closed gracefully.
    idle: Duration,
    /// A request head must arrive within this, from the tick that first sees its bytes
    /// (`None`: hyper bounds heads itself, or there are none, as on HTTP/2).
    head: Option<Duration>,
    shutdown: CancellationToken,
    name: &'static str,
    peer: std::net::SocketAddr,
}

/// Runs a connection to its end: closes it gracefully on shutdown or when idle, and
/// drops it when a request head takes longer than the head timeout.
async fn drive<C, E>(mut conn: Pin<&mut C>, mut graceful: impl FnMut(Pin<&mut C>), w: Watch)
where
    C: Future<Output = std::result::Result<(), E>>,
    E: std::fmt::Display,
{
    // A quarter of the head timeout (so a head is cut off within 1.25 of it), at most a
    // second and at least 10 ms.
    let mut period = w.idle.min(Duration::from_secs(1));
    if let Some(head) = w.head {
        period = period.min(head / 4);
    }
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
    let mut closing = false;
    // Quiet since the tick that last saw the activity counter move.
    let seen = &w.state.activity;
    let (mut last_seen, mut quiet_since) = (seen.load(Ordering::Relaxed), Instant::now());
    // Since the tick that first saw the bytes of the head now on its way.
    let mut head_since: Option<Instant> = None;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(listener = w.name, peer = %w.peer, error = %e, "connection ended with an error");
                }
                break;
            }
            _ = w.shutdown.cancelled(), if !closing => {
                graceful(conn.as_mut());
                closing = true;
            }
            _ = tick.tick() => {
                if let Some(limit) = w.head {
                    if !w.state.head_pending() {
                        head_since = None;
                    } else if head_since.get_or_insert_with(Instant::now).elapsed() >= limit {
                        // As hyper's own head timeout does: the connection is dropped,
                        // without an answer (the request never arrived).
                        tracing::debug!(listener = w.name, peer = %w.peer, "request head too slow: connection closed");
                        break;
                    }
                }
                if closing {
                    continue;
                }
                let now = seen.load(Ordering::Relaxed);
                if now != last_seen {
                    (last_seen, quiet_since) = (now, Instant::now());
                }
                if w.state.in_flight.load(Ordering::Relaxed) == 0 && quiet_since.elapsed() >= w.idle {
                    graceful(conn.as_mut());
                    closing = true;
                }
            }
        }
    }
}

/// An accepted socket: still on the accept loop's runtime, or taken off it for a core.
enum Accepted {
    Here(TcpStream),
    Moved(std::net::TcpStream),
}

/// Counts a request in flight on a connection while it lives.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn new(state: Arc<ConnState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.mark_head();
        InFlight(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.mark_head();
    }
}

/// Client-streaming gRPC methods: their messages are bounded one by one, from each
/// message's first byte, since a stream may rightly stay quiet between messages. Every
/// other gRPC method takes one request message and is bounded as a whole.
const STREAMING_METHODS: &[&str] = &["/inference.GRPCInferenceService/ModelStreamInfer"];

/// An HTTP request body did not arrive within `limits.body_read_timeout_ms` (gRPC calls
/// end with a [`tonic::Status`] instead). The HTTP API finds it in the body error's
/// source chain and answers 408.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {ms} ms (limits.body_read_timeout_ms)")]
pub struct BodyTimeout {
    pub ms: u64,
}

/// How a request body is bounded.
#[derive(Debug, Clone, Copy)]
enum BodyKind {
    /// Whole body from the end of the head.
    Whole,
    /// gRPC: each message checked against the size limit; `streaming` calls are bounded
    /// per message, the others as a whole.
    Grpc { limit: usize, streaming: bool },
}

impl BodyKind {
    fn of<B>(req: &hyper::Request<B>, limit: usize) -> BodyKind {
        let grpc = req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if grpc {
            let streaming = STREAMING_METHODS.contains(&req.uri().path());
            BodyKind::Grpc { limit, streaming }
        } else {
            BodyKind::Whole
        }
    }
}

/// Follows gRPC's length-prefixed message framing through the DATA frames.
#[derive(Debug)]
struct Framing {
    limit: usize,
    streaming: bool,
    prefix: [u8; 5],
    /// Bytes of the current message's prefix seen so far (0..5).
    have: usize,
    /// Bytes of the current message's payload still to come.
    left: u64,
}

impl Framing {
    /// Consumes one DATA chunk: whether a message started in it, or the announced length
    /// of a message over the limit.
    fn feed(&mut self, mut data: &[u8]) -> std::result::Result<bool, u64> {
        let mut started = false;
        while !data.is_empty() {
            if self.left > 0 {
                let n = usize::try_from(self.left).map_or(data.len(), |l| l.min(data.len()));
                self.left -= n as u64;
                data = &data[n..];
                continue;
            }
            started |= self.have == 0;
            let n = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                let [_, a, b, c, d] = self.prefix;
                let len = u64::from(u32::from_be_bytes([a, b, c, d]));
                if len > self.limit as u64 {
                    return Err(len);
                }
                self.left = len;
                self.have = 0;
            }
        }
        Ok(started)
    }

    fn in_message(&self) -> bool {
        self.have > 0 || self.left > 0
    }
}

/// A request body with an absolute deadline: the whole body (or, on a streaming gRPC
/// call, the message in progress) must arrive by then, however it is spread over reads.
/// A deadline on the gap between frames would let one byte a second hold a connection.
pub struct Bounded<B> {
    inner: B,
    timeout: Duration,
    deadline: Option<tokio::time::Instant>,
    /// Created on the first read that has to wait: most bodies never need a timer.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    grpc: Option<Framing>,
    /// Set when the deadline passed, so the connection can be closed after the answer.
    expired: Arc<AtomicBool>,
    failed: bool,
}

impl<B: http_body::Body> Bounded<B> {
    fn new(inner: B, timeout: Duration, kind: BodyKind, expired: Arc<AtomicBool>) -> Self {
        let grpc = match kind {
            BodyKind::Whole => None,
            BodyKind::Grpc { limit, streaming } => Some(Framing {
                limit,
                streaming,
                prefix: [0; 5],
                have: 0,
                left: 0,
            }),
        };
        let per_message = grpc.as_ref().is_some_and(|g| g.streaming);
        let deadline =
            (!per_message && !inner.is_end_stream()).then(|| tokio::time::Instant::now() + timeout);
        Bounded {
            inner,
            timeout,
            deadline,
            sleep: None,
            grpc,
            expired,
            failed: false,
        }
    }

    /// The error that ends the body: what each front end reports.
    fn fail(
        &mut self,
        err: BoxError,
    ) -> Poll<Option<std::result::Result<http_body::Frame<Bytes>, BoxError>>> {
        self.failed = true;
        self.deadline = None;
        Poll::Ready(Some(Err(err)))
    }

    fn timed_out(&mut self) -> BoxError {
        self.expired.store(true, Ordering::Relaxed);
        let ms = self.timeout.as_millis() as u64;
        if self.grpc.is_some() {
            Box::new(tonic::Status::from(Error::ClientTimeout(format!(
                "the request message did not arrive within {ms} ms (limits.body_read_timeout_ms)"
            ))))
        } else {
            Box::new(BodyTimeout { ms })
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> http_body::Body for Bounded<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(g), Some(data)) = (this.grpc.as_mut(), frame.data_ref()) {
                    match g.feed(data) {
                        Err(len) => {
                            let limit = g.limit;
                            let status = tonic::Status::new(
                                Error::PayloadTooLarge { limit }.grpc_code(),
                                format!(
                                    "request message of {len} bytes is over the limit of {limit} bytes (max_request_bytes)"
                                ),
                            );
                            return this.fail(Box::new(status));
                        }
                        Ok(started) if g.streaming => {
                            if !g.in_message() {
                                this.deadline = None;
                            } else if started {
                                // The message now in progress began in this chunk.
                                this.deadline = Some(tokio::time::Instant::now() + this.timeout);
                            }
                        }
                        Ok(_) => {}
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                this.deadline = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(deadline) = this.deadline else {
                    return Poll::Pending;
                };
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    let err = this.timed_out();
                    return this.fail(err);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(limit: usize) -> Framing {
        Framing {
            limit,
            streaming: true,
            prefix: [0; 5],
            have: 0,
            left: 0,
        }
    }

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&len.to_be_bytes());
        m.resize(5 + len as usize, 7);
        m
    }

    #[test]
    fn framing_follows_messages_across_chunks() {
        let mut f = framing(100);
        let mut wire = message(10);
        wire.extend(message(0));
        wire.extend(message(3));
        // Byte by byte: prefixes and payloads split everywhere.
        let mut starts = 0;
        for b in &wire {
            starts += usize::from(f.feed(std::slice::from_ref(b)).unwrap());
        }
        assert_eq!(starts, 3);
        assert!(!f.in_message());
        // All at once: the same boundaries.
        let mut f = framing(100);
        assert_eq!(f.feed(&wire), Ok(true));
        assert!(!f.in_message());
        // A message that has begun is in progress until its last byte.
        assert_eq!(f.feed(&wire[..7]), Ok(true));
        assert!(f.in_message());
        assert_eq!(f.feed(&wire[7..15]), Ok(false));
        assert!(!f.in_message());
    }

    #[test]
    fn framing_refuses_an_oversize_message_from_its_prefix() {
        let mut f = framing(100);
        assert_eq!(f.feed(&message(100)), Ok(true));
        let big = message(101);
        assert_eq!(f.feed(&big[..3]), Ok(true));
        assert_eq!(f.feed(&big[3..5]), Err(101));
        // The largest length a prefix can announce.
        let mut f = framing(usize::MAX);
        assert_eq!(f.feed(&[0, 255, 255, 255, 255, 1]), Ok(true));
        assert!(f.in_message());
    }
}

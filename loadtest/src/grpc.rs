//! gRPC unary calls over bare HTTP/2 connections (the `h2` crate): loadgen's gRPC path.
//!
//! Why not tonic: a tonic `Channel` passes every call through a tower buffer task and
//! hyper's HTTP/2 dispatcher (a channel hop plus a spawned task per request) and encodes
//! the prost message anew each time; with those costs loadgen, not the server, set the
//! pace (about a third of h2load's rate on the same server). Here a call clones the
//! connection's `h2::client::SendRequest`, opens a stream with prebuilt headers, sends
//! the message encoded once (a refcounted `Bytes` clone) and reads the response frames
//! and trailers on the calling task. Each connection has one task doing its socket I/O,
//! which writes the frames of all its streams in one go.
//!
//! Errors are classified as tonic classifies them, so reports stay comparable with
//! earlier runs: the `grpc-status` of a trailers-only response or of the trailers, with
//! the percent-decoded `grpc-message`; without one, the HTTP status mapped per gRPC's
//! http-grpc-status-mapping (200 without a status is UNKNOWN); a stream reset or GOAWAY
//! by its HTTP/2 reason (REFUSED_STREAM is UNAVAILABLE, CANCEL is CANCELLED, ...); a
//! connection that cannot be (re)opened is UNAVAILABLE; a truncated message or an
//! answer without one is INTERNAL with tonic's messages. The response message itself
//! is only framed, not decoded (except for metadata).
//!
//! A connection whose task ended (server closed it, I/O error) is reopened by the next
//! call that uses it, as a tonic channel reconnects.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, TE, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use tonic::Code;

use crate::client::Failure;
use crate::stats::ErrorKind;

/// Service paths of the KServe v2 gRPC API.
pub const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";
pub const MODEL_METADATA: &str = "/inference.GRPCInferenceService/ModelMetadata";

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// hyper's HTTP/2 client defaults (what tonic used): large windows, so responses of
/// big models are not throttled by flow control.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// A message as a gRPC length-prefixed frame: flag 0 (not compressed), u32 length, body.
pub fn frame(msg: &impl prost::Message) -> Result<Bytes> {
    let len = msg.encoded_len();
    let prefix = u32::try_from(len).context("a gRPC message is limited to 4 GiB")?;
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(prefix);
    msg.encode(&mut buf)
        .context("cannot encode the gRPC message")?;
    Ok(buf.freeze())
}

/// One HTTP/2 connection: the handle streams are opened on, and whether its task ended.
struct Conn {
    sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

/// `C` HTTP/2 connections; call `k` goes over connection `k mod C`.
pub struct GrpcPool {
    addr: String,
    /// content-type, te and user-agent, cloned into every request.
    headers: HeaderMap,
    /// A tokio mutex so that one caller reopens a closed connection while the others
    /// wait for it, instead of each opening its own.
    conns: Vec<tokio::sync::Mutex<Conn>>,
}

impl GrpcPool {
    /// Opens all connections up front, so connecting is neither measured nor hidden.
    pub async fn connect(addr: &str, connections: usize) -> Result<GrpcPool> {
        let mut conns = Vec::with_capacity(connections);
        for _ in 0..connections {
            let conn = open(addr)
                .await
                .map_err(|f| anyhow::anyhow!("cannot connect to {addr} (gRPC): {}", f.message))?;
            conns.push(tokio::sync::Mutex::new(conn));
        }
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        // gRPC requires it: the answer's status comes in trailers.
        headers.insert(TE, HeaderValue::from_static("trailers"));
        headers.insert(USER_AGENT, HeaderValue::from_static("modelgate-loadgen"));
        Ok(GrpcPool {
            addr: addr.to_string(),
            headers,
            conns,
        })
    }

    /// `http://host:port{path}`: h2 takes :scheme, :authority and :path from it.
    pub fn uri(&self, path: &str) -> Result<Uri> {
        format!("http://{}{path}", self.addr)
            .parse()
            .with_context(|| format!("bad --url {}", self.addr))
    }

    /// A handle on connection `k mod C`, reopening it if it closed.
    async fn sender(&self, k: usize) -> Result<SendRequest<Bytes>, Failure> {
        let mut conn = self.conns[k % self.conns.len()].lock().await;
        if conn.closed.load(Ordering::Acquire) {
            *conn = open(&self.addr).await?;
        }
        Ok(conn.sender.clone())
    }

    /// One unary call of `path` (from [`GrpcPool::uri`]) with `body`, a framed message.
    /// Ok with the response message if `keep`, else with empty bytes.
    pub async fn unary(
        &self,
        k: usize,
        uri: &Uri,
        body: Bytes,
        keep: bool,
    ) -> Result<Bytes, Failure> {
        let mut sender = self.sender(k).await?.ready().await.map_err(h2_failure)?;
        let mut req = Request::new(());
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri.clone();
        *req.headers_mut() = self.headers.clone();
        let (response, mut send) = sender.send_request(req, false).map_err(h2_failure)?;
        send.send_data(body, true).map_err(h2_failure)?;
        let response = response.await.map_err(h2_failure)?;
        read_response(response, keep).await
    }
}

/// Opens one connection and spawns its task, which flags the connection closed when it
/// ends.
async fn open(addr: &str) -> Result<Conn, Failure> {
    // tonic reports a failed connect as UNAVAILABLE.
    let unavailable = |e: String| {
        Failure::new(
            ErrorKind::Grpc(Code::Unavailable),
            format!("connect {addr}: {e}"),
        )
    };
    let stream = crate::client::connect_tcp(addr)
        .await
        .map_err(unavailable)?;
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .enable_push(false)
        .handshake::<_, Bytes>(stream)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let closed = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&closed);
    tokio::spawn(async move {
        // Errors also reach the streams, which report them.
        let _ = connection.await;
        flag.store(true, Ordering::Release);
    });
    Ok(Conn { sender, closed })
}

/// Reads a response to its end: Ok only with grpc-status 0 and one whole message.
async fn read_response(
    response: http::Response<h2::RecvStream>,
    keep: bool,
) -> Result<Bytes, Failure> {
    let (head, mut body) = response.into_parts();
    // Trailers-only: the status is in the headers and there is no body.
    if let Some(status) = grpc_status(&head.headers) {
        return Err(status.err().unwrap_or_else(missing_message));
    }
    let framed = head.status == StatusCode::OK;
    let mut frames = Frames::default();
    let mut kept = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = match chunk {
            Ok(c) => c,
            // hyper (under tonic) ends the body quietly on these resets.
            Err(e) if matches!(e.reason(), Some(h2::Reason::NO_ERROR | h2::Reason::CANCEL)) => {
                break;
            }
            Err(e) => return Err(h2_failure(e)),
        };
        // Hands the window back; without it the connection stalls once 5 MiB arrived.
        let _ = body.flow_control().release_capacity(chunk.len());
        if framed {
            frames.feed(&chunk)?;
            if keep {
                kept.extend_from_slice(&chunk);
            }
        }
    }
    if frames.partial() {
        return Err(Failure::new(
            ErrorKind::Grpc(Code::Internal),
            "Unexpected EOF decoding stream.",
        ));
    }
    let trailers = match body.trailers().await {
        Ok(t) => t,
        Err(e) if matches!(e.reason(), Some(h2::Reason::NO_ERROR | h2::Reason::CANCEL)) => None,
        Err(e) => return Err(h2_failure(e)),
    };
    match trailers.as_ref().and_then(grpc_status) {
        Some(Ok(())) => {}
        Some(Err(f)) => return Err(f),
        None => return Err(from_http_status(head.status)),
    }
    match frames.first_len {
        Some(len) if keep => Ok(kept.freeze().slice(5..5 + len)),
        Some(_) => Ok(Bytes::new()),
        None => Err(missing_message()),
    }
}

fn missing_message() -> Failure {
    Failure::new(ErrorKind::Grpc(Code::Internal), "Missing response message.")
}

/// Tracks the length-prefixed messages of a response body as its chunks arrive.
#[derive(Default)]
struct Frames {
    /// Bytes of the current frame's 5-byte prefix seen so far.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
    first_len: Option<usize>,
}

impl Frames {
    fn feed(&mut self, mut chunk: &[u8]) -> Result<(), Failure> {
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(chunk.len());
                self.remaining -= n;
                chunk = &chunk[n..];
                continue;
            }
            let n = (5 - self.prefix_len).min(chunk.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&chunk[..n]);
            self.prefix_len += n;
            chunk = &chunk[n..];
            if self.prefix_len < 5 {
                break;
            }
            self.prefix_len = 0;
            // loadgen never offers compression, so a compressed message is the server's
            // protocol error (tonic's wording).
            match self.prefix[0] {
                0 => {}
                1 => {
                    return Err(Failure::new(
                        ErrorKind::Grpc(Code::Internal),
                        "protocol error: received message with compressed-flag but no grpc-encoding was specified",
                    ));
                }
                f => {
                    return Err(Failure::new(
                        ErrorKind::Grpc(Code::Internal),
                        format!(
                            "protocol error: received message with invalid compression flag: {f} (valid flags are 0 and 1)"
                        ),
                    ));
                }
            }
            let len = u32::from_be_bytes([
                self.prefix[1],
                self.prefix[2],
                self.prefix[3],
                self.prefix[4],
            ]) as usize;
            self.first_len.get_or_insert(len);
            self.remaining = len;
        }
        Ok(())
    }

    /// A message or a prefix was cut off by the end of the body.
    fn partial(&self) -> bool {
        self.remaining > 0 || self.prefix_len > 0
    }
}

/// The `grpc-status` (and `grpc-message`) of `headers`, if it has one.
fn grpc_status(headers: &HeaderMap) -> Option<Result<(), Failure>> {
    let code = Code::from_bytes(headers.get(GRPC_STATUS)?.as_bytes());
    if code == Code::Ok {
        return Some(Ok(()));
    }
    let raw = headers
        .get(GRPC_MESSAGE)
        .map_or(&[][..], HeaderValue::as_bytes);
    Some(Err(match String::from_utf8(percent_decode(raw)) {
        Ok(message) => Failure::new(ErrorKind::Grpc(code), message),
        Err(e) => Failure::new(
            ErrorKind::Grpc(Code::Unknown),
            format!("Error deserializing status message header: {e}"),
        ),
    }))
}

/// `%XX` escapes decoded (gRPC percent-encodes grpc-message); a bad escape stays as is.
fn percent_decode(raw: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%'
            && i + 2 < raw.len()
            && let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    out
}

/// A response without grpc-status, by its HTTP status (gRPC's http-grpc-status-mapping).
fn from_http_status(status: StatusCode) -> Failure {
    let code = match status {
        StatusCode::OK => {
            return Failure::new(
                ErrorKind::Grpc(Code::Unknown),
                "protocol error: missing grpc-status trailer, stream was terminated without a final status",
            );
        }
        StatusCode::BAD_REQUEST => Code::Internal,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::Unimplemented,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    };
    Failure::new(
        ErrorKind::Grpc(code),
        format!(
            "grpc-status header missing, mapped from HTTP status code {}",
            status.as_u16()
        ),
    )
}

/// An HTTP/2 error by its reason, as tonic maps them (gRPC's PROTOCOL-HTTP2.md); I/O
/// errors and errors without a reason are UNKNOWN.
fn h2_failure(e: h2::Error) -> Failure {
    use h2::Reason as R;
    let code = match e.reason() {
        Some(
            R::NO_ERROR
            | R::PROTOCOL_ERROR
            | R::INTERNAL_ERROR
            | R::FLOW_CONTROL_ERROR
            | R::SETTINGS_TIMEOUT
            | R::FRAME_SIZE_ERROR
            | R::COMPRESSION_ERROR
            | R::CONNECT_ERROR,
        ) => Code::Internal,
        Some(R::REFUSED_STREAM) => Code::Unavailable,
        Some(R::CANCEL) => Code::Cancelled,
        Some(R::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
        Some(R::INADEQUATE_SECURITY) => Code::PermissionDenied,
        _ => Code::Unknown,
    };
    Failure::new(ErrorKind::Grpc(code), format!("h2 protocol error: {e}"))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::*;

    /// An empty framed message (a ModelInferRequest with defaults encodes to nothing).
    fn body() -> Bytes {
        frame(&modelgate::proto::ModelInferRequest::default()).unwrap()
    }

    async fn call(pool: &GrpcPool, path: &str) -> Result<Bytes, Failure> {
        pool.unary(0, &pool.uri(path).unwrap(), body(), true).await
    }

    fn code(r: Result<Bytes, Failure>) -> (Code, String) {
        match r {
            Ok(_) => (Code::Ok, String::new()),
            Err(Failure {
                kind: ErrorKind::Grpc(c),
                message,
            }) => (c, message),
            Err(f) => panic!("not a gRPC failure: {f:?}"),
        }
    }

    #[tokio::test]
    async fn success_returns_the_message() {
        let (addr, _) = test_server::spawn().await;
        let pool = GrpcPool::connect(&addr, 1).await.unwrap();
        assert_eq!(&call(&pool, "/t/ok").await.unwrap()[..], b"answer");
        // The message split over several DATA frames, its prefix too.
        assert_eq!(&call(&pool, "/t/split").await.unwrap()[..], b"answer");
    }

    /// Non-OK statuses, from a trailers-only answer or from the trailers after a
    /// message, carry the code and the percent-decoded message; answers without a
    /// status or with a cut message are classified as tonic does.
    #[tokio::test]
    async fn errors_are_classified_as_tonic_does() {
        let (addr, _) = test_server::spawn().await;
        let pool = GrpcPool::connect(&addr, 1).await.unwrap();
        assert_eq!(
            code(call(&pool, "/t/missing").await),
            (Code::NotFound, "unknown model 'x'".into())
        );
        assert_eq!(
            code(call(&pool, "/t/busy").await),
            (Code::ResourceExhausted, "queue full".into())
        );
        assert_eq!(code(call(&pool, "/t/nostatus").await).0, Code::Unknown);
        assert_eq!(code(call(&pool, "/t/http503").await).0, Code::Unavailable);
        assert_eq!(
            code(call(&pool, "/t/truncated").await),
            (Code::Internal, "Unexpected EOF decoding stream.".into())
        );
        assert_eq!(
            code(call(&pool, "/t/empty").await),
            (Code::Internal, "Missing response message.".into())
        );
        assert_eq!(code(call(&pool, "/t/reset").await).0, Code::Unavailable);
        // The connection survived all of them.
        assert!(call(&pool, "/t/ok").await.is_ok());
    }

    /// A connection the server closed is reopened by the next call.
    #[tokio::test]
    async fn a_closed_connection_is_reopened() {
        let (addr, accepted) = test_server::spawn().await;
        let pool = GrpcPool::connect(&addr, 1).await.unwrap();
        assert!(call(&pool, "/t/close").await.is_err());
        assert!(call(&pool, "/t/ok").await.is_ok());
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// Calls spread over the connections, which carry many streams at once.
    #[tokio::test]
    async fn calls_share_the_connections() {
        let (addr, accepted) = test_server::spawn().await;
        let pool = std::sync::Arc::new(GrpcPool::connect(&addr, 3).await.unwrap());
        let uri = pool.uri("/t/ok").unwrap();
        let mut tasks = Vec::new();
        for k in 0..30 {
            let (pool, uri) = (std::sync::Arc::clone(&pool), uri.clone());
            tasks.push(tokio::spawn(async move {
                pool.unary(k, &uri, body(), false).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// Timed-out calls count as "timeout" and leave the connection usable (the dropped
    /// stream is reset, not the connection).
    #[tokio::test]
    async fn timeouts_are_errors_and_keep_the_connection() {
        use std::sync::atomic::AtomicBool;

        use crate::client::Target;
        use crate::run::{Plan, closed_loop};

        let (addr, accepted) = test_server::spawn().await;
        let pool = GrpcPool::connect(&addr, 1).await.unwrap();
        let slow = std::sync::Arc::new(Target::Grpc {
            uri: pool.uri("/t/slow").unwrap(),
            body: body(),
            pool,
        });
        let plan = Plan {
            warmup: Duration::ZERO,
            duration: Some(Duration::from_secs(30)),
            requests: Some(3),
            timeout: Duration::from_millis(30),
        };
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let m = closed_loop(std::sync::Arc::clone(&slow), 1, &plan, stop)
            .await
            .unwrap();
        assert_eq!(m.stats.ok, 0);
        assert_eq!(m.stats.errors.get(&ErrorKind::Timeout), Some(&3));
        let Target::Grpc { pool, .. } = &*slow else {
            unreachable!()
        };
        assert!(call(pool, "/t/ok").await.is_ok());
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn frames_are_tracked_across_chunks() {
        let mut f = Frames::default();
        f.feed(&[0, 0, 0]).unwrap();
        assert!(f.partial());
        f.feed(&[0, 2, b'a']).unwrap();
        assert!(f.partial());
        f.feed(&[b'b', 0, 0, 0, 0, 0]).unwrap();
        assert!(!f.partial());
        assert_eq!(f.first_len, Some(2));
        assert!(Frames::default().feed(&[1, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(percent_decode(b"no%20model%3A x"), b"no model: x");
        assert_eq!(percent_decode(b"100%"), b"100%");
        assert_eq!(percent_decode(b"%zz%4"), b"%zz%4");
    }

    #[test]
    fn frames_carry_the_length_prefix() {
        let req = modelgate::proto::ModelMetadataRequest {
            name: "mlp".into(),
            version: String::new(),
        };
        let f = frame(&req).unwrap();
        assert_eq!(&f[..5], &[0, 0, 0, 0, 5]);
        assert_eq!(f.len(), 10);
    }
}

/// A tiny gRPC server for tests (raw h2): the path picks the answer, e.g. `/t/ok` is a
/// message `answer` with status 0, `/t/slow` the same after 300 ms, `/t/close` closes
/// the connection. Counts the connections it accepts.
#[cfg(test)]
pub(crate) mod test_server {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderMap, HeaderValue, Response, StatusCode};

    pub async fn spawn() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let acc = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                acc.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(connection(s));
            }
        });
        (addr, accepted)
    }

    async fn connection(s: tokio::net::TcpStream) {
        let Ok(mut conn) = h2::server::handshake(s).await else {
            return;
        };
        while let Some(Ok((req, respond))) = conn.accept().await {
            if req.uri().path() == "/t/close" {
                // Dropping the connection closes the socket under the open stream.
                return;
            }
            tokio::spawn(answer(req, respond));
        }
    }

    fn status(code: &str, message: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_str(code).unwrap());
        if !message.is_empty() {
            h.insert("grpc-message", HeaderValue::from_str(message).unwrap());
        }
        h
    }

    async fn answer(
        req: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
    ) {
        let path = req.uri().path().to_string();
        let mut body = req.into_body();
        while let Some(Ok(chunk)) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let message = Bytes::from_static(b"\0\0\0\0\x06answer");
        let ok = || {
            Response::builder()
                .header("content-type", "application/grpc")
                .body(())
                .unwrap()
        };
        match path.as_str() {
            "/t/missing" => {
                let mut resp = ok();
                resp.headers_mut()
                    .extend(status("5", "unknown model %27x%27"));
                respond.send_response(resp, true).unwrap();
            }
            "/t/http503" => {
                let resp = Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(())
                    .unwrap();
                respond.send_response(resp, true).unwrap();
            }
            "/t/reset" => respond.send_reset(h2::Reason::REFUSED_STREAM),
            _ => {
                if path == "/t/slow" {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let Ok(mut send) = respond.send_response(ok(), false) else {
                    return;
                };
                let _ = match path.as_str() {
                    "/t/split" => {
                        let _ = send.send_data(message.slice(..3), false);
                        let _ = send.send_data(message.slice(3..7), false);
                        send.send_data(message.slice(7..), false)
                    }
                    "/t/truncated" => send.send_data(message.slice(..8), false),
                    "/t/empty" => Ok(()),
                    _ => send.send_data(message, path == "/t/nostatus"),
                };
                let _ = match path.as_str() {
                    "/t/nostatus" => Ok(()),
                    "/t/busy" => send.send_trailers(status("8", "queue full")),
                    _ => send.send_trailers(status("0", "")),
                };
            }
        }
    }
}

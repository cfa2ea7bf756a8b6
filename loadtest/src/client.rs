//! Protocol clients: gRPC over `C` bare HTTP/2 connections (see `grpc`), and HTTP/1.1
//! over a pool of `C` keep-alive hyper connections.
//!
//! HTTP connection handling: HTTP/1.1 carries one request at a time per connection (no
//! pipelining), so the pool owns exactly `C` connections, each a bare
//! `hyper::client::conn::http1::SendRequest` with its connection task. A FIFO
//! semaphore with `C` permits hands out idle connections: a request takes a permit,
//! pops an idle connection, sends, reads the whole body, and pushes the connection
//! back. This caps the connections at exactly `C` (hyper-util's legacy `Client` only
//! caps *idle* connections and opens more under load), waiters queue fairly, any idle
//! connection serves the next waiter (no head-of-line blocking behind a slow request,
//! which a fixed client-to-connection mapping would have), and the hot path costs one
//! uncontended mutex and no allocation beyond the request itself. A connection that
//! broke, or whose request was abandoned by a timeout, is replaced by a fresh one on
//! its next use.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use modelgate::proto as pb;
use prost::Message as _;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::grpc::{self, GrpcPool};
use crate::payload::{self, ModelInfo, Payload};
use crate::stats::ErrorKind;

/// Wire protocol of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// ModelInfer with `raw_input_contents`.
    Grpc,
    /// POST .../infer with JSON `data`.
    HttpJson,
    /// POST .../infer with Triton's binary tensor extension.
    HttpBinary,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpJson => "http-json",
            Protocol::HttpBinary => "http-binary",
        }
    }
}

/// A failed request: the code it is counted under and a message for the probe.
#[derive(Debug)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connected transport, before the payload is known.
pub enum Transport {
    Grpc(GrpcPool),
    Http(HttpPool),
}

impl Transport {
    /// Opens `connections` connections to `url` (host:port).
    pub async fn connect(protocol: Protocol, url: &str, connections: usize) -> Result<Transport> {
        if protocol == Protocol::Grpc {
            Ok(Transport::Grpc(GrpcPool::connect(url, connections).await?))
        } else {
            Ok(Transport::Http(HttpPool::connect(url, connections).await?))
        }
    }

    /// The model's metadata: gRPC ModelMetadata or GET /v2/models/{m}[/versions/{v}].
    pub async fn metadata(&self, model: &str, version: Option<&str>) -> Result<ModelInfo> {
        match self {
            Transport::Grpc(pool) => {
                let body = grpc::frame(&pb::ModelMetadataRequest {
                    name: model.to_string(),
                    version: version.unwrap_or_default().to_string(),
                })?;
                let message = pool
                    .unary(0, &pool.uri(grpc::MODEL_METADATA)?, body, true)
                    .await
                    .map_err(|f| {
                        anyhow::anyhow!("ModelMetadata failed: {}: {}", f.kind, f.message)
                    })?;
                let resp = pb::ModelMetadataResponse::decode(message)
                    .context("ModelMetadata: not a ModelMetadataResponse")?;
                Ok(ModelInfo::from(resp))
            }
            Transport::Http(pool) => {
                let path = model_path(model, version, "");
                let mut req = Request::new(Full::new(Bytes::new()));
                *req.uri_mut() = path.parse().context("model name makes a bad URI")?;
                req.headers_mut().insert(HOST, pool.host.clone());
                let (status, body) = pool
                    .request(req)
                    .await
                    .map_err(|f| anyhow::anyhow!("GET {path}: {}", f.message))?;
                if status != StatusCode::OK {
                    bail!(
                        "GET {path}: HTTP {status}: {}",
                        String::from_utf8_lossy(&body)
                    );
                }
                serde_json::from_slice(&body)
                    .with_context(|| format!("GET {path}: not model metadata"))
            }
        }
    }
}

/// `/v2/models/{m}[/versions/{v}]{suffix}`.
pub fn model_path(model: &str, version: Option<&str>, suffix: &str) -> String {
    match version {
        Some(v) => format!("/v2/models/{model}/versions/{v}{suffix}"),
        None => format!("/v2/models/{model}{suffix}"),
    }
}

/// A connected transport with its pre-built request: what the load loops call.
pub enum Target {
    Grpc {
        pool: GrpcPool,
        uri: Uri,
        /// The framed ModelInferRequest, encoded once; each send clones the `Bytes`.
        body: Bytes,
    },
    Http {
        pool: HttpPool,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    },
}

/// Triton's header giving the JSON part's length in a binary-extension body.
const INFERENCE_HEADER_CONTENT_LENGTH: HeaderName =
    HeaderName::from_static("inference-header-content-length");

impl Target {
    /// Builds the request for `protocol` once.
    pub fn new(
        transport: Transport,
        protocol: Protocol,
        payload: &Payload,
        model: &str,
        version: Option<&str>,
    ) -> Result<Target> {
        match transport {
            Transport::Grpc(pool) => Ok(Target::Grpc {
                uri: pool.uri(grpc::MODEL_INFER)?,
                body: grpc::frame(&payload::grpc_request(payload, model, version))?,
                pool,
            }),
            Transport::Http(pool) => {
                let uri: Uri = model_path(model, version, "/infer")
                    .parse()
                    .context("model name makes a bad URI")?;
                let mut headers = HeaderMap::new();
                headers.insert(HOST, pool.host.clone());
                let body = if protocol == Protocol::HttpBinary {
                    let (body, header_len) = payload::binary_body(payload)?;
                    headers.insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    headers.insert(INFERENCE_HEADER_CONTENT_LENGTH, header_len.into());
                    body
                } else {
                    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    payload::json_body(payload)?
                };
                Ok(Target::Http {
                    pool,
                    uri,
                    headers,
                    body,
                })
            }
        }
    }

    /// Sends one inference request; `k` spreads gRPC requests over the connections.
    /// Ok only on gRPC OK / HTTP 200 (with the whole body read).
    pub async fn infer(&self, k: usize) -> Result<(), Failure> {
        match self {
            Target::Grpc { pool, uri, body } => {
                pool.unary(k, uri, body.clone(), false).await.map(|_| ())
            }
            Target::Http {
                pool,
                uri,
                headers,
                body,
            } => {
                let mut req = Request::new(Full::new(body.clone()));
                *req.method_mut() = Method::POST;
                *req.uri_mut() = uri.clone();
                *req.headers_mut() = headers.clone();
                let (status, body) = pool.request(req).await?;
                if status == StatusCode::OK {
                    Ok(())
                } else {
                    Err(Failure::new(
                        ErrorKind::Http(status.as_u16()),
                        String::from_utf8_lossy(&body),
                    ))
                }
            }
        }
    }
}

type Sender = SendRequest<Full<Bytes>>;

/// `C` HTTP/1.1 keep-alive connections, each carrying one request at a time.
pub struct HttpPool {
    addr: String,
    host: HeaderValue,
    /// Idle connections; `None` is a slot whose connection must be (re)opened.
    idle: Mutex<Vec<Option<Sender>>>,
    /// One permit per connection: holding one guarantees an entry in `idle`.
    permits: Semaphore,
}

impl HttpPool {
    /// Opens all connections up front, so connecting is neither measured nor hidden.
    pub async fn connect(addr: &str, connections: usize) -> Result<HttpPool> {
        let mut idle = Vec::with_capacity(connections);
        for _ in 0..connections {
            idle.push(Some(
                open(addr).await.map_err(|f| anyhow::anyhow!(f.message))?,
            ));
        }
        Ok(HttpPool {
            addr: addr.to_string(),
            host: HeaderValue::from_str(addr).context("bad --url")?,
            idle: Mutex::new(idle),
            permits: Semaphore::new(connections),
        })
    }

    /// Sends `req` on an idle connection and reads the whole response body.
    pub async fn request(&self, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), Failure> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Failure::new(ErrorKind::Transport, "connection pool closed"))?;
        let slot = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .flatten();
        // From here on the lease returns the slot whatever happens (error, timeout).
        let mut lease = Lease {
            pool: self,
            sender: None,
            _permit: permit,
        };
        let mut sender = match slot {
            Some(s) if !s.is_closed() => s,
            _ => open(&self.addr).await?,
        };
        let transport = |e: hyper::Error| Failure::new(ErrorKind::Transport, e.to_string());
        sender.ready().await.map_err(transport)?;
        let resp = sender.send_request(req).await.map_err(transport)?;
        let status = resp.status();
        // Reading the body to its end is what frees the connection for the next request.
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(transport)?
            .to_bytes();
        lease.sender = Some(sender);
        Ok((status, body))
    }
}

/// A connection taken from the pool; dropping it puts the connection (or an empty
/// slot, if the request did not finish cleanly) back before releasing the permit.
struct Lease<'a> {
    pool: &'a HttpPool,
    sender: Option<Sender>,
    _permit: SemaphorePermit<'a>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.pool
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(self.sender.take());
    }
}

/// A TCP connection to `addr` within [`CONNECT_TIMEOUT`], with Nagle's algorithm off
/// (small requests: its delay would add to every one); the error says why not.
pub(crate) async fn connect_tcp(addr: &str) -> Result<TcpStream, String> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Opens one HTTP/1.1 connection and spawns its connection task.
async fn open(addr: &str) -> Result<Sender, Failure> {
    let connect_err = |e: String| Failure::new(ErrorKind::Connect, format!("connect {addr}: {e}"));
    let stream = connect_tcp(addr).await.map_err(connect_err)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    tokio::spawn(async move {
        // Ends when the server closes or the sender is dropped; errors show up on the sender.
        let _ = conn.await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_paths() {
        assert_eq!(model_path("mlp", None, "/infer"), "/v2/models/mlp/infer");
        assert_eq!(
            model_path("iris", Some("2"), "/infer"),
            "/v2/models/iris/versions/2/infer"
        );
        assert_eq!(model_path("iris", None, ""), "/v2/models/iris");
    }

    /// The pool never holds more than `C` connections open, and a connection is reused
    /// for the next request (keep-alive).
    #[tokio::test]
    async fn pool_reuses_its_connections() {
        use std::sync::Arc;
        use std::sync::atomic::Ordering;

        let (addr, accepted) = test_server::spawn(Duration::ZERO).await;
        let pool = Arc::new(HttpPool::connect(&addr, 2).await.unwrap());
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let pool = Arc::clone(&pool);
            let host = pool.host.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    let mut req = Request::new(Full::new(Bytes::from_static(b"body")));
                    *req.method_mut() = Method::POST;
                    *req.uri_mut() = Uri::from_static("/x");
                    req.headers_mut().insert(HOST, host.clone());
                    let (status, body) = pool.request(req).await.unwrap();
                    assert_eq!(status, StatusCode::OK);
                    assert_eq!(&body[..], b"ok");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}

/// A tiny HTTP/1.1 server for tests: answers every request with `200 ok` after a
/// delay, one request at a time per connection, and counts the connections it accepts.
#[cfg(test)]
pub(crate) mod test_server {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub async fn spawn(delay: Duration) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let acc = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                acc.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(connection(s, delay));
            }
        });
        (addr, accepted)
    }

    async fn connection(mut s: tokio::net::TcpStream, delay: Duration) {
        let mut pending = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            // One request: headers up to the blank line, then content-length bytes.
            let body_len = loop {
                if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&pending[..i]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    pending.drain(..i + 4);
                    break len;
                }
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
            };
            while pending.len() < body_len {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
            }
            pending.drain(..body_len);
            tokio::time::sleep(delay).await;
            if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

//! Limits over a real server, each with its clear error, and the server serving after:
//! tensor elements, rows per request, a shape claiming 2^60 elements, header size,
//! open connections, HTTP/2 streams, slow clients (head and body, over HTTP/1.1 and
//! HTTP/2, gRPC calls and streams included) and idle connections.

use crate::common;

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn body(rows: usize) -> serde_json::Value {
    json!({"inputs": [{"name": "X", "shape": [rows, 4], "datatype": "FP32", "data": vec![1.0f32; rows * 4]}]})
}

async fn post(s: &common::TestServer, v: &serde_json::Value) -> (u16, String) {
    post_to(&s.http, v).await
}

async fn post_to(http: &str, v: &serde_json::Value) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{http}/v2/models/iris/infer"))
        .json(v)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// Reads until the peer closes (or `within` passes): true if it closed.
async fn closes_within(stream: &mut TcpStream, within: Duration) -> (bool, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let until = Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return (false, got),
            Ok(Ok(0)) | Ok(Err(_)) => return (true, got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The resident memory of process `pid`.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_elements_and_rows_are_limited() {
    let s = common::start_tweaked(|c| {
        c.limits.max_tensor_elements = 1000;
        c.limits.max_rows_per_request = 200;
    })
    .await;
    let (st, text) = post(&s, &body(201)).await;
    assert_eq!(st, 400);
    assert!(
        text.contains("201 rows, more than the limit of 200"),
        "{text}"
    );
    let (st, text) = post(&s, &body(250)).await; // 1000 elements: rows first
    assert_eq!(st, 400, "{text}");
    let s2 = common::start_tweaked(|c| c.limits.max_tensor_elements = 100).await;
    let (st, text) = post(&s2, &body(26)).await;
    assert_eq!(st, 400);
    assert!(
        text.contains("104 elements, more than the limit of 100"),
        "{text}"
    );
    assert_eq!(post(&s, &body(2)).await.0, 200);
    assert_eq!(post(&s2, &body(2)).await.0, 200);
}

/// The server runs in a process of its own: the RSS of this one is every test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shape_claiming_2_pow_60_elements_allocates_nothing() {
    let s = common::spawn().await;
    let pid = s.child.id();
    let before = rss_kib(pid);
    let huge = 1i64 << 60;
    // JSON: the shape claims 2^60 elements, the data holds one.
    let v =
        json!({"inputs": [{"name": "X", "shape": [huge, 4], "datatype": "FP32", "data": [1.0]}]});
    let (st, text) = post_to(&s.http, &v).await;
    assert_eq!(st, 400, "{text}");
    // Binary extension: 16 bytes claimed for 2^60 x 4 elements.
    let head = json!({"inputs": [{"name": "X", "shape": [huge, 4], "datatype": "FP32",
        "parameters": {"binary_data_size": 16}}]})
    .to_string();
    let mut b = head.clone().into_bytes();
    b.extend_from_slice(&[0u8; 16]);
    let r = reqwest::Client::new()
        .post(format!("{}/v2/models/iris/infer", s.http))
        .header("inference-header-content-length", head.len())
        .body(b)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // gRPC raw contents.
    let mut c =
        modelgate::proto::grpc_inference_service_client::GrpcInferenceServiceClient::connect(
            s.grpc.clone(),
        )
        .await
        .unwrap();
    let e = c
        .model_infer(modelgate::proto::ModelInferRequest {
            model_name: "iris".into(),
            inputs: vec![modelgate::proto::model_infer_request::InferInputTensor {
                name: "X".into(),
                datatype: "FP32".into(),
                shape: vec![huge, 4],
                ..Default::default()
            }],
            raw_input_contents: vec![vec![0u8; 16].into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    // Nothing near 2^60 elements (or even 1 GiB) was allocated.
    assert!(
        rss_kib(pid) < before + 256 * 1024,
        "RSS grew from {before} KiB to {} KiB",
        rss_kib(pid)
    );
    assert_eq!(post_to(&s.http, &body(1)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused() {
    let s = common::start_tweaked(|c| c.limits.max_header_bytes = 8192).await;
    let r = reqwest::Client::new()
        .get(format!("{}/v2/health/live", s.http))
        .header("x-padding", "a".repeat(20_000))
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status().as_u16(), 431),
        Err(e) => assert!(e.is_request() || e.is_connect() || e.is_body(), "{e}"),
    }
    assert_eq!(post(&s, &body(1)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let s = common::start_tweaked(|c| c.limits.max_connections = 2).await;
    let a = TcpStream::connect(addr(&s.http)).await.unwrap();
    let b = TcpStream::connect(addr(&s.http)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = TcpStream::connect(addr(&s.http)).await.unwrap();
    let (closed, _) = closes_within(&mut third, Duration::from_secs(5)).await;
    assert!(closed, "the third connection was kept");
    assert!(
        s.metrics_text()
            .await
            .contains("modelgate_connections_refused_total{listener=\"http\"}")
    );
    drop((a, b));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(post(&s, &body(1)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_per_connection_are_limited() {
    let s = common::start_tweaked(|c| c.limits.max_concurrent_streams = 3).await;
    let tcp = TcpStream::connect(addr(&s.grpc)).await.unwrap();
    let (_client, conn) = h2::client::handshake(tcp).await.unwrap();
    let mut conn = Box::pin(conn);
    // Drive the connection until the server's SETTINGS arrived.
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let _ = tokio::time::timeout(Duration::from_millis(50), &mut conn).await;
        if conn.max_concurrent_send_streams() == 3 {
            break;
        }
        assert!(
            Instant::now() < until,
            "server advertised {}",
            conn.max_concurrent_send_streams()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_and_idle_connections_are_cut_off() {
    let s = common::start_tweaked(|c| {
        c.limits.header_read_timeout_ms = 500;
        c.limits.body_read_timeout_ms = 500;
        c.limits.idle_timeout_ms = 500;
    })
    .await;
    // One byte a second of request head: cut off, not waited for.
    let mut slow = TcpStream::connect(addr(&s.http)).await.unwrap();
    let started = Instant::now();
    let trickle = async {
        for b in b"POST /v2/models/iris/infer HTTP/1.1\r\n".iter() {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), trickle).await;
    let (closed, _) = closes_within(&mut slow, Duration::from_secs(3)).await;
    assert!(closed, "a trickling head kept its connection");
    assert!(started.elapsed() < Duration::from_secs(8));
    // A body that stops coming: 408.
    let mut stalled = TcpStream::connect(addr(&s.http)).await.unwrap();
    stalled
        .write_all(b"POST /v2/models/iris/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"inputs\":")
        .await
        .unwrap();
    let (_, got) = closes_within(&mut stalled, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    // An idle keep-alive connection is closed after the idle timeout.
    let mut idle = TcpStream::connect(addr(&s.http)).await.unwrap();
    idle.write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (closed, got) = closes_within(&mut idle, Duration::from_secs(4)).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    assert!(closed, "an idle connection stayed open");
    // The server serves.
    assert_eq!(post(&s, &body(1)).await.0, 200);
}

/// Sends `head`, then one byte of body every 100 ms until the peer stops taking them;
/// returns what came back and whether the peer closed, once it did (or after `within`).
async fn trickle_body(addr: &str, head: &[u8], within: Duration) -> (bool, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    wr.write_all(head).await.unwrap();
    // Gaps of 100 ms: far under any timeout, so only a bound on the whole body stops it.
    let trickle = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if wr.write_all(b"0").await.is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let until = Instant::now() + within;
    let closed = loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rd.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    };
    trickle.abort();
    (closed, String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_body_gets_408_and_close_over_http1() {
    let s = common::start_tweaked(|c| c.limits.body_read_timeout_ms = 1500).await;
    let started = Instant::now();
    let (closed, text) = trickle_body(
        &addr(&s.http),
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n",
        Duration::from_secs(30),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(text.contains("did not arrive within 1500 ms"), "{text}");
    assert!(closed, "the connection stayed open after the 408");
    // 100 000 bytes at 10 a second would take hours: the whole body was bounded.
    assert!(started.elapsed() < Duration::from_secs(30));
    // HTTP/2 (prior knowledge) to the same listener: 408, and the stream is reset.
    let mut client = h2_client(&s.http).await;
    let head = axum::http::Request::builder()
        .method("POST")
        .uri(format!("{}/v2/models/mlp/infer", s.http))
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let (resp, send) = client.send_request(head, false).unwrap();
    let trickle = trickle_message(send);
    let resp = tokio::time::timeout(Duration::from_secs(30), resp)
        .await
        .expect("an answer while the body still trickles")
        .unwrap();
    assert_eq!(resp.status().as_u16(), 408);
    tokio::time::timeout(Duration::from_secs(20), trickle)
        .await
        .expect("the stream was not reset")
        .unwrap();
    assert_eq!(post(&s, &body(1)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_head_is_cut_off_as_a_whole() {
    let s = common::start_tweaked(|c| c.limits.header_read_timeout_ms = 1500).await;
    let mut head = b"POST /v2/models/iris/infer HTTP/1.1\r\nhost: x\r\n".to_vec();
    head.extend_from_slice(format!("x-pad: {}\r\n\r\n", "a".repeat(400)).as_bytes());
    let stream = TcpStream::connect(addr(&s.http)).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let started = Instant::now();
    // One byte every 100 ms: the whole head would take 45 s, each gap is far below
    // the timeout.
    let trickle = tokio::spawn(async move {
        for b in head {
            if wr.write_all(&[b]).await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    });
    let mut buf = [0u8; 1024];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(40), rd.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => {}
        }
    };
    assert!(closed, "a trickling head kept its connection");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "cut off only after {:?}",
        started.elapsed()
    );
    trickle.abort();
    assert_eq!(post(&s, &body(1)).await.0, 200);
}

/// An HTTP/2 connection for raw gRPC calls.
async fn h2_client(url: &str) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = TcpStream::connect(addr(url)).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client.ready().await.unwrap()
}

fn grpc_head(url: &str, method: &str) -> axum::http::Request<()> {
    axum::http::Request::builder()
        .method("POST")
        .uri(format!("{url}/inference.GRPCInferenceService/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// One gRPC message: the 5-byte prefix, then the encoded request.
fn grpc_frame(msg: &impl prost::Message) -> bytes::Bytes {
    let body = msg.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}

fn iris_request(id: &str) -> modelgate::proto::ModelInferRequest {
    modelgate::proto::ModelInferRequest {
        model_name: "iris".into(),
        id: id.into(),
        inputs: vec![modelgate::proto::model_infer_request::InferInputTensor {
            name: "X".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            ..Default::default()
        }],
        raw_input_contents: vec![common::f32_bytes(&[5.1, 3.5, 1.4, 0.2]).into()],
        ..Default::default()
    }
}

/// Starts a message claiming 100 000 bytes and sends one byte of it every 100 ms until
/// the stream is reset; the task ends when the server reset the stream.
fn trickle_message(mut send: h2::SendStream<bytes::Bytes>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&100_000u32.to_be_bytes());
        if send.send_data(prefix.into(), false).is_err() {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if send
                .send_data(bytes::Bytes::from_static(&[0]), false)
                .is_err()
            {
                return;
            }
        }
    })
}

/// Reads the next whole gRPC message of a response body (None at its end).
async fn next_message(body: &mut h2::RecvStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() >= 5 + len {
                let msg = buf[5..5 + len].to_vec();
                buf.drain(..5 + len);
                return Some(msg);
            }
        }
        let chunk = body.data().await?.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
    }
}

/// The call's grpc-status and grpc-message: from the head (trailers-only answer) or
/// the trailers.
async fn grpc_status(resp: axum::http::Response<h2::RecvStream>) -> (String, String) {
    let pick = |h: &axum::http::HeaderMap| {
        h.get("grpc-status").map(|code| {
            (
                code.to_str().unwrap().to_string(),
                h.get("grpc-message")
                    .map(|m| percent_decode(m.to_str().unwrap()))
                    .unwrap_or_default(),
            )
        })
    };
    if let Some(s) = pick(resp.headers()) {
        return s;
    }
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    while next_message(&mut body, &mut buf).await.is_some() {}
    let trailers = body.trailers().await.unwrap().expect("trailers");
    pick(&trailers).expect("grpc-status in the trailers")
}

const DEADLINE_EXCEEDED: &str = "4";

/// grpc-message is percent-encoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_grpc_message_gets_deadline_exceeded_and_a_reset() {
    let s = common::start_tweaked(|c| c.limits.body_read_timeout_ms = 1500).await;
    let mut client = h2_client(&s.grpc).await;
    let (resp, send) = client
        .send_request(grpc_head(&s.grpc, "ModelInfer"), false)
        .unwrap();
    let trickle = trickle_message(send);
    let resp = tokio::time::timeout(Duration::from_secs(30), resp)
        .await
        .expect("an answer while the message still trickles")
        .unwrap();
    let (code, message) = grpc_status(resp).await;
    assert_eq!(code, DEADLINE_EXCEEDED, "{message}");
    assert!(message.contains("1500 ms"), "{message}");
    // The stream is reset: the trickling sender is refused.
    tokio::time::timeout(Duration::from_secs(20), trickle)
        .await
        .expect("the stream was not reset")
        .unwrap();
    // The connection still serves.
    let (resp, mut send) = client
        .send_request(grpc_head(&s.grpc, "ModelInfer"), false)
        .unwrap();
    send.send_data(grpc_frame(&iris_request("ok")), true)
        .unwrap();
    let resp = resp.await.unwrap();
    let mut body = resp.into_body();
    let msg = next_message(&mut body, &mut Vec::new())
        .await
        .expect("a response");
    let r: modelgate::proto::ModelInferResponse = prost::Message::decode(&msg[..]).unwrap();
    assert_eq!(r.id, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_may_idle_but_each_message_must_arrive_in_time() {
    use modelgate::proto::ModelStreamInferResponse;
    let s = common::start_tweaked(|c| c.limits.body_read_timeout_ms = 1500).await;
    let mut client = h2_client(&s.grpc).await;
    let (resp, mut send) = client
        .send_request(grpc_head(&s.grpc, "ModelStreamInfer"), false)
        .unwrap();
    send.send_data(grpc_frame(&iris_request("first")), false)
        .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.headers().get("grpc-status"), None);
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let read =
        |msg: Vec<u8>| -> ModelStreamInferResponse { prost::Message::decode(&msg[..]).unwrap() };
    let first = read(
        next_message(&mut body, &mut buf)
            .await
            .expect("first answer"),
    );
    assert_eq!(first.error_message, "");
    assert_eq!(first.infer_response.unwrap().id, "first");
    // A quiet stream, twice the timeout without a byte, is fine.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    send.send_data(grpc_frame(&iris_request("second")), false)
        .unwrap();
    let second = read(
        next_message(&mut body, &mut buf)
            .await
            .expect("second answer"),
    );
    assert_eq!(second.error_message, "");
    assert_eq!(second.infer_response.unwrap().id, "second");
    // A message that starts and then trickles ends the stream with DEADLINE_EXCEEDED.
    let trickle = trickle_message(send);
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while next_message(&mut body, &mut buf).await.is_some() {}
        body.trailers().await
    })
    .await
    .expect("the stream ended while its message trickled")
    .unwrap()
    .expect("trailers");
    assert_eq!(
        ended.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some(DEADLINE_EXCEEDED),
        "{ended:?}"
    );
    let message = percent_decode(ended.get("grpc-message").unwrap().to_str().unwrap());
    assert!(message.contains("1500 ms"), "{message}");
    tokio::time::timeout(Duration::from_secs(20), trickle)
        .await
        .expect("the stream was not reset")
        .unwrap();
}

/// Plain connections are told apart by their first bytes: HTTP/2 with prior knowledge
/// (here on the HTTP port, and with its preface trickled in) and HTTP/1.1 both serve, and
/// on a kept-alive HTTP/1.1 connection each later head is bounded like the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_plain_connection_gets_its_protocol_and_every_head_is_bounded() {
    let s = common::start_tweaked(|c| c.limits.header_read_timeout_ms = 800).await;
    // h2c with prior knowledge on the HTTP port.
    let mut h2 = h2_client(&s.http).await;
    let get = axum::http::Request::builder()
        .uri(format!("{}/v2/health/ready", s.http))
        .body(())
        .unwrap();
    let (resp, _) = h2.send_request(get, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), axum::http::Version::HTTP_2);
    // The client's preface reaches the server a few bytes at a time: still HTTP/2.
    let tcp = TcpStream::connect(addr(&s.http)).await.unwrap();
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    tokio::spawn(async move {
        let (mut from_client, mut to_client) = tokio::io::split(theirs);
        let (mut from_server, mut to_server) = tcp.into_split();
        let mut preface = [0u8; 24];
        from_client.read_exact(&mut preface).await.unwrap();
        for part in preface.chunks(8) {
            to_server.write_all(part).await.unwrap();
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        let up = tokio::io::copy(&mut from_client, &mut to_server);
        let down = tokio::io::copy(&mut from_server, &mut to_client);
        let _ = tokio::join!(up, down);
    });
    let (mut client, conn) = h2::client::handshake(ours).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let get = axum::http::Request::builder()
        .uri(format!("{}/v2/health/live", s.http))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(get, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    // HTTP/1.1: a first request answered, then a second head trickled on the same
    // connection, one byte every 100 ms: cut off within the timeout and a quarter.
    let mut kept = TcpStream::connect(addr(&s.http)).await.unwrap();
    kept.write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let (mut rd, mut wr) = kept.into_split();
    let trickle = tokio::spawn(async move {
        for b in b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nx-pad: aaaaaaaaaaaaaaaaaaaaaa\r\n\r\n"
        {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => {}
        }
    };
    let took = started.elapsed();
    trickle.abort();
    assert!(closed, "a trickled second head kept its connection");
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_millis(2500),
        "cut off after {took:?}"
    );
    // A head sent at once on a kept-alive connection is served, however long the
    // connection lived before it.
    let mut kept = TcpStream::connect(addr(&s.http)).await.unwrap();
    for _ in 0..3 {
        kept.write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let n = kept.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert_eq!(post(&s, &body(1)).await.0, 200);
}

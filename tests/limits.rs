//! Limits over a real server, each with its clear error, and the server serving after:
//! tensor elements, rows per request, a shape claiming 2^60 elements, header size,
//! open connections, HTTP/2 streams, slow clients (head and body) and idle connections.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn body(rows: usize) -> serde_json::Value {
    json!({"inputs": [{"name": "X", "shape": [rows, 4], "datatype": "FP32", "data": vec![1.0f32; rows * 4]}]})
}

async fn post(s: &common::TestServer, v: &serde_json::Value) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{}/v2/models/iris/infer", s.http))
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

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shape_claiming_2_pow_60_elements_allocates_nothing() {
    let s = common::start().await;
    let before = rss_kib();
    let huge = 1i64 << 60;
    // JSON: the shape claims 2^60 elements, the data holds one.
    let v =
        json!({"inputs": [{"name": "X", "shape": [huge, 4], "datatype": "FP32", "data": [1.0]}]});
    let (st, text) = post(&s, &v).await;
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
        rss_kib() < before + 256 * 1024,
        "RSS grew from {before} KiB to {} KiB",
        rss_kib()
    );
    assert_eq!(post(&s, &body(1)).await.0, 200);
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

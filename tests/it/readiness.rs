//! Server readiness (`/v2/health/ready`, gRPC ServerReady, grpc.health.v1) means "can
//! serve what it serves": one model that never became ready (a broken upload) is
//! reported but does not take the replica out of its load balancer; a model that served
//! and lost every version does. `strict_readiness = true` is Triton's rule: every model
//! must be ready.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;
use modelgate::proto as pb;
use serde_json::{Value, json};
use tonic_health::pb::health_check_response::ServingStatus;

/// Every way a client can ask whether the server is ready, and what it says: the HTTP
/// endpoint, gRPC ServerReady, and grpc.health.v1 for both service names.
async fn readiness(s: &TestServer) -> (u16, bool, Vec<i32>) {
    let http = reqwest::get(format!("{}/v2/health/ready", s.http))
        .await
        .unwrap()
        .status()
        .as_u16();
    let channel = tonic::transport::Channel::from_shared(s.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = pb::grpc_inference_service_client::GrpcInferenceServiceClient::new(channel.clone());
    let ready = c
        .server_ready(pb::ServerReadyRequest {})
        .await
        .unwrap()
        .into_inner()
        .ready;
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut health = Vec::new();
    for service in ["", "inference.GRPCInferenceService"] {
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        health.push(r.status);
    }
    (http, ready, health)
}

const SERVING: i32 = ServingStatus::Serving as i32;
const NOT_SERVING: i32 = ServingStatus::NotServing as i32;

/// Waits until every readiness signal says `ready` (grpc.health.v1 follows readiness
/// twice a second), then checks they all agree.
async fn expect_ready(s: &TestServer, ready: bool, what: &str) {
    let want = if ready {
        (200, true, vec![SERVING, SERVING])
    } else {
        (503, false, vec![NOT_SERVING, NOT_SERVING])
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = readiness(s).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: readiness is {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn status(url: String) -> u16 {
    reqwest::get(url).await.unwrap().status().as_u16()
}

async fn index(s: &TestServer) -> Vec<Value> {
    let r = reqwest::Client::new()
        .post(format!("{}/v2/repository/index", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap().as_array().unwrap().clone()
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A repository with the bundled mlp and iris, and `broken`: one version of garbage.
fn repo_with_a_broken_model(broken: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for m in ["mlp", "iris"] {
        std::os::unix::fs::symlink(root().join("models").join(m), dir.path().join(m)).unwrap();
    }
    write_garbage(&dir.path().join(broken), 1);
    dir
}

/// Publishes a version whose model.onnx is not a model (write aside, then rename).
fn write_garbage(model_dir: &Path, version: u64) {
    let tmp = model_dir.join(format!(".incoming-{version}"));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("model.onnx"), b"\x08\x07 not a model").unwrap();
    std::fs::rename(&tmp, model_dir.join(version.to_string())).unwrap();
}

fn publish_mlp(model_dir: &Path, version: u64) {
    let tmp = model_dir.join(format!(".incoming-{version}"));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(
        root().join("models/mlp/1/model.onnx"),
        tmp.join("model.onnx"),
    )
    .unwrap();
    std::fs::rename(&tmp, model_dir.join(version.to_string())).unwrap();
}

fn watching(strict: bool) -> impl FnOnce(&mut modelgate::config::Config) {
    move |c| {
        c.strict_readiness = strict;
        c.repository_poll_secs = 1;
        c.settle_ms = 150;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_beside_a_broken_model_is_ready_and_reports_it() {
    // Its own name: its gauges are read, and the strict test below fixes its `broken`.
    let repo = repo_with_a_broken_model("never_ready");
    let s = start_with(repo.path(), watching(false)).await;
    expect_ready(&s, true, "started with one broken model").await;
    // The broken model is reported everywhere, and only it is unready.
    assert_eq!(
        status(format!("{}/v2/models/never_ready/ready", s.http)).await,
        503
    );
    assert_eq!(status(format!("{}/v2/models/mlp/ready", s.http)).await, 200);
    let rows = index(&s).await;
    let broken = rows
        .iter()
        .find(|r| r["name"] == "never_ready" && r["version"] == "1")
        .unwrap();
    assert_eq!(broken["state"], "UNAVAILABLE", "{broken}");
    let text = s.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "modelgate_model_versions_ready{model=\"never_ready\"}"
        ),
        Some(0.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "modelgate_model_load_failures_total{model=\"never_ready\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_readiness_wants_every_model_ready() {
    let repo = repo_with_a_broken_model("broken");
    let s = start_with(repo.path(), watching(true)).await;
    expect_ready(&s, false, "strict, started with one broken model").await;
    // The rest serves all the same.
    assert_eq!(status(format!("{}/v2/models/mlp/ready", s.http)).await, 200);
    // The broken model fixed: ready.
    std::fs::remove_dir_all(repo.path().join("broken/1")).unwrap();
    publish_mlp(&repo.path().join("broken"), 2);
    expect_ready(&s, true, "strict, broken model fixed").await;
    // A broken upload while serving: unready again.
    write_garbage(&repo.path().join("upload"), 1);
    expect_ready(&s, false, "strict, a broken upload").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_upload_keeps_a_replica_ready_but_a_model_that_lost_its_versions_does_not() {
    let repo = copied_repo();
    let p = repo.path();
    let s = start_with(p, watching(false)).await;
    expect_ready(&s, true, "at start").await;
    // One bad upload in a new model folder: reported, the replica stays ready.
    write_garbage(&p.join("upload"), 1);
    wait_for("the upload reported", || async {
        index(&s)
            .await
            .iter()
            .any(|r| r["name"] == "upload" && r["version"] == "1" && r["state"] == "UNAVAILABLE")
    })
    .await;
    expect_ready(&s, true, "after a broken upload").await;
    assert_eq!(
        status(format!("{}/v2/models/upload/ready", s.http)).await,
        503
    );
    // mlp served; its only version is replaced by a broken one: nothing of it serves, and
    // a replica that cannot serve what it served is not ready.
    std::fs::rename(p.join("mlp/1"), p.join(".old-mlp-1")).unwrap();
    write_garbage(&p.join("mlp"), 2);
    wait_for("mlp without a ready version", || async {
        status(format!("{}/v2/models/mlp/ready", s.http)).await == 503
    })
    .await;
    expect_ready(&s, false, "a serving model lost every version").await;
    // A good version again: ready.
    publish_mlp(&p.join("mlp"), 3);
    expect_ready(&s, true, "mlp serves again").await;
    let r = reqwest::Client::new()
        .post(format!("{}/v2/models/mlp/infer", s.http))
        .json(&json!({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": vec![0.5f32; 16]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_but_none_ready_is_unready_and_an_empty_repository_is_ready() {
    for strict in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_garbage(&dir.path().join("only"), 1);
        let s = start_with(dir.path(), watching(strict)).await;
        expect_ready(&s, false, &format!("strict={strict}, no model ready")).await;
        drop(s);
        let empty = tempfile::tempdir().unwrap();
        let s = start_with(empty.path(), watching(strict)).await;
        expect_ready(&s, true, &format!("strict={strict}, empty repository")).await;
    }
}

//! Drift detection and webhooks over a real server: replaying the reference
//! distribution fires nothing (100,000 one-row requests, and 1,000,000 rows in
//! 1,000-row requests); a one-standard-deviation shift of one feature fires exactly one
//! signed webhook naming it and the sequential detector that raised it; an invalid
//! `[drift]` table keeps the model serving; a receiver that is down, then answers 503 with
//! Retry-After, then comes up gets every event once; a receiver answering 410 disables
//! its target; a gateway killed with a backlog delivers it after a restart;
//! `modelgate profile` makes the profiles from CSV and .npy; and the drift admin view is
//! the same over HTTP and gRPC.
//!
//! The receiver is a real HTTP server on 127.0.0.1 that checks every signature.

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use modelgate::outbox::WebhookTarget;
use modelgate::proto as pb;
use serde_json::Value;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The iris training data (models/iris/reference.csv).
pub(crate) fn iris_rows() -> Vec<[f32; 4]> {
    let text = std::fs::read_to_string(common::root().join("models/iris/reference.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let v: Vec<f32> = l.split(',').map(|x| x.parse().unwrap()).collect();
            [v[0], v[1], v[2], v[3]]
        })
        .collect()
}

/// A repository with iris version 2 (and its profile.json) and a `[drift]` table.
pub(crate) fn iris_repo(name: &str, drift: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join(name).join("2");
    std::fs::create_dir_all(&v).unwrap();
    // With its model.toml: events carry the version's lineage.
    for f in ["model.onnx", "profile.json", "model.toml"] {
        std::fs::copy(common::root().join("models/iris/2").join(f), v.join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join(name).join("config.toml"),
        format!("[drift]\n{drift}"),
    )
    .unwrap();
    dir
}

/// One delivery the receiver got.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    id: String,
    pub(crate) body: Value,
}

/// A webhook receiver that verifies signatures (Standard Webhooks) and records deliveries.
#[derive(Clone, Default)]
pub(crate) struct Receiver {
    got: Arc<Mutex<Vec<Delivery>>>,
    bad_signatures: Arc<AtomicUsize>,
    /// Answer 503 + Retry-After: 1 to this many requests first.
    unavailable: Arc<AtomicUsize>,
    gone: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
}

fn verify(headers: &axum::http::HeaderMap, body: &str) -> Option<String> {
    let h = |k: &str| headers.get(k)?.to_str().ok().map(str::to_string);
    let (id, ts, sig) = (
        h("webhook-id")?,
        h("webhook-timestamp")?,
        h("webhook-signature")?,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ts_n: u64 = ts.parse().ok()?;
    if now.abs_diff(ts_n) > 300 {
        return None;
    }
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.strip_prefix("whsec_")?)
        .ok()?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).ok()?;
    mac.update(format!("{id}.{ts}.{body}").as_bytes());
    let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    sig.split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(want.as_str()))
        .then_some(id)
}

impl Receiver {
    /// Serves on `addr` (port 0 for any) until the returned token is cancelled.
    pub(crate) async fn serve(
        &self,
        addr: SocketAddr,
    ) -> (SocketAddr, tokio_util::sync::CancellationToken) {
        let r = self.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let r = r.clone();
                async move {
                    use axum::http::StatusCode;
                    r.requests.fetch_add(1, Ordering::SeqCst);
                    let Some(id) = verify(&headers, &body) else {
                        r.bad_signatures.fetch_add(1, Ordering::SeqCst);
                        return (StatusCode::UNAUTHORIZED, [("retry-after", "0")]).into_response();
                    };
                    if r.gone.load(Ordering::SeqCst) {
                        return StatusCode::GONE.into_response();
                    }
                    if r.unavailable
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        return (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "1")])
                            .into_response();
                    }
                    r.got.lock().unwrap().push(Delivery {
                        id,
                        body: serde_json::from_str(&body).unwrap(),
                    });
                    StatusCode::NO_CONTENT.into_response()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let local = listener.local_addr().unwrap();
        let token = tokio_util::sync::CancellationToken::new();
        let t = token.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(t.cancelled_owned())
                .await
                .unwrap();
        });
        (local, token)
    }

    pub(crate) fn deliveries(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }
}

use axum::response::IntoResponse;

/// A port nobody listens on (for a receiver that is down).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub(crate) fn target(name: &str, port: u16) -> WebhookTarget {
    WebhookTarget {
        name: name.into(),
        url: format!("http://127.0.0.1:{port}/hook"),
        secret: SECRET.into(),
    }
}

/// Sends `rows` over gRPC with `conc` concurrent clients, one row per request; `shift`
/// is added to petal_length (column 2).
pub(crate) async fn send(
    grpc: &str,
    model: &str,
    rows: &[[f32; 4]],
    n: usize,
    conc: usize,
    shift: f32,
) {
    let rows = Arc::new(rows.to_vec());
    let mut tasks = Vec::new();
    for w in 0..conc {
        let (grpc, model, rows) = (grpc.to_string(), model.to_string(), Arc::clone(&rows));
        tasks.push(tokio::spawn(async move {
            let mut c =
                pb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(grpc)
                    .await
                    .unwrap();
            let mut rng = fastrand::Rng::with_seed(w as u64 + n as u64);
            let mut i = w;
            while i < n {
                let mut r = rows[rng.usize(..rows.len())];
                r[2] += shift;
                let req = pb::ModelInferRequest {
                    model_name: model.clone(),
                    inputs: vec![pb::model_infer_request::InferInputTensor {
                        name: "X".into(),
                        datatype: "FP32".into(),
                        shape: vec![1, 4],
                        ..Default::default()
                    }],
                    raw_input_contents: vec![common::f32_bytes(&r).into()],
                    ..Default::default()
                };
                c.model_infer(req).await.unwrap();
                i += conc;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// `GET <path>` on the HTTP API, with the token if given: status and JSON body.
async fn http_get(s: &common::TestServer, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut r = reqwest::Client::new().get(format!("{}{path}", s.http));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn drift_status(s: &common::TestServer, model: &str) -> Value {
    http_get(s, &format!("/admin/drift/{model}"), None).await.1
}

/// Waits until the detector has taken every sample sent so far (rows_seen stops moving).
async fn settled(s: &common::TestServer, model: &str) -> Value {
    settled_as(s, model, None).await
}

/// [`settled`], asking with a token.
async fn settled_as(s: &common::TestServer, model: &str, token: Option<&str>) -> Value {
    let mut last = None;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_, v) = http_get(s, &format!("/admin/drift/{model}"), token).await;
        let seen = v["windows"][0]["rows_seen"].as_u64();
        if seen.is_some() && seen == last {
            return v;
        }
        last = seen;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_replay_fires_nothing_and_a_shift_fires_one_webhook_naming_the_feature() {
    // 100,000 requests from sixteen clients, as fast as they are answered.
    let _cpu = common::cpu_heavy().await;
    let repo = iris_repo("driftiris", "cooldown_secs = 0\n");
    let receiver = Receiver::default();
    let (addr, _stop) = receiver.serve("127.0.0.1:0".parse().unwrap()).await;
    let s = common::start_with(repo.path(), |c| {
        c.drift.webhooks = vec![target("replay", addr.port())];
        c.drift.webhook_initial_backoff_ms = 100;
        c.drift.allow_private_webhooks = true;
    })
    .await;
    let rows = iris_rows();
    let std = {
        let col: Vec<f64> = rows.iter().map(|r| f64::from(r[2])).collect();
        let mean = col.iter().sum::<f64>() / col.len() as f64;
        (col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / col.len() as f64).sqrt()
    };
    // 100,000 requests drawn from the reference distribution: no webhook.
    send(&s.grpc, "driftiris", &rows, 100_000, 16, 0.0).await;
    let v = settled(&s, "driftiris").await;
    let w = &v["windows"][0];
    assert_eq!(w["reference"], "profile.json");
    assert_eq!(w["state"], "OK", "{v}");
    assert_eq!(w["episodes"], 0, "{v}");
    let seen = w["rows_seen"].as_u64().unwrap();
    let text = s.metrics_text().await;
    let dropped = text
        .lines()
        .find(|l| l.starts_with("modelgate_drift_samples_dropped_total{model=\"driftiris\"}"))
        .map_or(0, |l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap());
    assert_eq!(
        seen + dropped,
        100_000,
        "every sample is taken or counted as dropped"
    );
    // Sequential mode: every row is tested.
    assert_eq!(w["windows_tested"].as_u64().unwrap(), seen);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.deliveries().is_empty());

    // Petal length shifts by one standard deviation: one webhook, naming it, within a
    // few hundred rows.
    let mut sent = 0;
    while receiver.deliveries().is_empty() {
        assert!(sent < 1000, "no webhook after {sent} shifted requests");
        send(&s.grpc, "driftiris", &rows, 100, 8, std as f32).await;
        sent += 100;
        settled(&s, "driftiris").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // More of the same drift: still one episode, one webhook.
    send(&s.grpc, "driftiris", &rows, 3000, 8, std as f32).await;
    let v = settled(&s, "driftiris").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = receiver.deliveries();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(receiver.bad_signatures.load(Ordering::SeqCst), 0);
    let e = &got[0].body;
    assert_eq!(e["type"], "model.drift");
    assert_eq!(e["id"].as_str(), Some(got[0].id.as_str()));
    assert_eq!(e["data"]["model"], "driftiris");
    assert_eq!(e["data"]["version"], 2);
    assert_eq!(e["data"]["state"], "DRIFT");
    // The version's lineage, so that a retrainer sees what drifted (issue 19).
    let lineage = &e["data"]["lineage"];
    assert_eq!(lineage["source"], "models/generate.py", "{e}");
    assert_eq!(lineage["metrics"]["training_accuracy"], 0.987, "{e}");
    assert_eq!(lineage["params"]["model"], "RandomForestClassifier", "{e}");
    // Which detector, at which configured rate, and which statistic raised it.
    let d = &e["data"]["detector"];
    assert_eq!(d["mode"], "sequential", "{d}");
    assert_eq!(d["arl_rows"], 1e7, "{d}");
    assert_eq!(d["feature"], "petal_length", "{d}");
    assert!(d["test"].as_str().unwrap().starts_with("cusum_"), "{d}");
    assert_eq!(e["data"]["evidence"][0]["level"], "drift");
    // The window tests' effect sizes ride along, for every feature.
    let effects = e["data"]["effects"].as_array().unwrap();
    let psi = |f: &str| {
        effects
            .iter()
            .find(|x| x["feature"] == f && x["test"] == "psi")
            .and_then(|x| x["statistic"].as_f64())
            .unwrap()
    };
    assert!(psi("petal_length") > psi("sepal_width"), "{effects:?}");
    let named: Vec<&str> = e["data"]["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["feature"].as_str().unwrap())
        .collect();
    assert!(named.contains(&"petal_length"), "{named:?}");
    for other in ["sepal_length", "sepal_width", "petal_width"] {
        assert!(!named.contains(&other), "{other} did not drift: {named:?}");
    }
    assert_eq!(v["windows"][0]["state"], "DRIFT");
    assert_eq!(v["windows"][0]["episodes"], 1);
    // Visible as metrics.
    let text = s.metrics_text().await;
    for needle in [
        "modelgate_drift_state{model=\"driftiris\"} 2",
        "modelgate_drift_score{model=\"driftiris\",feature=\"petal_length\",test=\"cusum_mean_up\"}",
        "modelgate_webhook_deliveries_total{target=\"replay\",outcome=\"delivered\"} 1",
        "modelgate_webhook_backlog{target=\"replay\"} 0",
    ] {
        assert!(text.contains(needle), "missing {needle}");
    }
}

/// A fast-moving detector: episodes end after 100 clean rows, small windows, no cooldown.
pub(crate) const QUICK: &str = "clean_rows = 100\nwindow = 200\nstep = 100\ndrift_windows = 1\nclean_windows = 1\ncooldown_secs = 0\nprediction_test = \"off\"\n";

/// Drives `episodes` drift episodes (shift, then back to normal).
async fn episodes(s: &common::TestServer, model: &str, n: usize) {
    let rows = iris_rows();
    for _ in 0..n {
        send(&s.grpc, model, &rows, 600, 8, 3.0).await;
        settled(s, model).await;
        send(&s.grpc, model, &rows, 600, 8, 0.0).await;
        settled(s, model).await;
    }
}

/// Failed outbox writes are counted under `target=""` (the event has no target yet), by
/// every server of the process: the tests that count them take turns, and count from
/// what was there when they began.
static OUTBOX_ERRORS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn outbox_errors(text: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(
                "modelgate_webhook_deliveries_total{target=\"\",outcome=\"outbox_error\"} ",
            )
        })
        .map_or(0, |n| n.parse().unwrap())
}

fn outbox_files(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for t in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        all.extend(modelgate::outbox::backlog(&t.path()));
    }
    all
}

/// Sends `total` rows drawn (seeded) from `rows` over one gRPC connection, `per` rows per
/// request, one request after the other (the detector sees them in a fixed order).
async fn send_large(
    grpc: &str,
    model: &str,
    rows: &[[f32; 4]],
    total: usize,
    per: usize,
    seed: u64,
) {
    let mut c =
        pb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(grpc.to_string())
            .await
            .unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut sent = 0;
    while sent < total {
        let n = per.min(total - sent);
        let flat: Vec<f32> = (0..n).flat_map(|_| rows[rng.usize(..rows.len())]).collect();
        let req = pb::ModelInferRequest {
            model_name: model.into(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "X".into(),
                datatype: "FP32".into(),
                shape: vec![n as i64, 4],
                ..Default::default()
            }],
            raw_input_contents: vec![common::f32_bytes(&flat).into()],
            ..Default::default()
        };
        c.model_infer(req).await.unwrap();
        sent += n;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_in_distribution_rows_raise_nothing() {
    // The defaults (sequential, arl_rows 1e7), 1,000 rows taken per request.
    let repo = iris_repo("driftmillion", "max_rows_per_request = 1000\n");
    let receiver = Receiver::default();
    let (addr, _stop) = receiver.serve("127.0.0.1:0".parse().unwrap()).await;
    let s = common::start_with(repo.path(), |c| {
        c.drift.webhooks = vec![target("million", addr.port())];
        c.drift.allow_private_webhooks = true;
    })
    .await;
    let started = Instant::now();
    send_large(&s.grpc, "driftmillion", &iris_rows(), 1_000_000, 1000, 16).await;
    // The detector drains its backlog at its own pace (a lowered priority, a debug
    // build): wait for every row, not for a pause.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut v = settled(&s, "driftmillion").await;
    while v["windows"][0]["rows_seen"].as_u64() < Some(1_000_000) && Instant::now() < deadline {
        v = settled(&s, "driftmillion").await;
    }
    let w = &v["windows"][0];
    assert_eq!(w["rows_seen"], 1_000_000, "{v}");
    assert_eq!(w["windows_tested"], 1_000_000, "every row tested: {v}");
    assert_eq!(w["episodes"], 0, "{v}");
    assert_eq!(w["events"], 0, "{v}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.deliveries().is_empty());
    eprintln!("1,000,000 rows in {:?}", started.elapsed());
    // Then 2,000 rows with petal_length shifted by one standard deviation: one event.
    let shifted: Vec<[f32; 4]> = iris_rows()
        .into_iter()
        .map(|mut r| {
            r[2] += 1.76;
            r
        })
        .collect();
    send_large(&s.grpc, "driftmillion", &shifted, 2000, 100, 17).await;
    settled(&s, "driftmillion").await;
    let until = Instant::now() + Duration::from_secs(10);
    while receiver.deliveries().is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = receiver.deliveries();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].body["data"]["detector"]["feature"], "petal_length");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_drift_table_keeps_the_model_serving_and_says_what_to_set() {
    // psi_drift alone below the default psi_warn: refused with a message about the
    // default that clashes; the model loads and serves under the default drift settings.
    let repo = iris_repo("driftbad", "psi_drift = 0.08\n");
    let s = common::start_with(repo.path(), |c| c.admin_token = Some(ADMIN.into())).await;
    send(&s.grpc, "driftbad", &iris_rows(), 10, 1, 0.0).await;
    let (st, v) = http_get(&s, "/admin/drift/driftbad", Some(ADMIN)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["settings"]["psi_drift"], 0.25,
        "the defaults are in force: {v}"
    );
    let index = s.repository_index(Some(ADMIN)).await;
    let text = index.to_string();
    assert!(
        text.contains("psi_warn = 0.1 (the default)")
            && text.contains("set psi_warn to at most 0.08"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_was_down_gets_every_event_once() {
    let repo = iris_repo("driftdown", QUICK);
    let outbox = repo.path().join(".outbox");
    let port = closed_port();
    let s = common::start_with(repo.path(), |c| {
        c.drift.webhooks = vec![target("down", port)];
        c.drift.webhook_initial_backoff_ms = 100;
        c.drift.allow_private_webhooks = true;
        c.drift.webhook_max_backoff_ms = 1000;
    })
    .await;
    episodes(&s, "driftdown", 3).await;
    let v = settled(&s, "driftdown").await;
    let events = v["windows"][0]["events"].as_u64().unwrap();
    assert_eq!(events, 3, "{v}");
    // Nobody listens: every event waits in the outbox, retried.
    let files = outbox_files(&outbox);
    assert_eq!(files.len(), 3, "{files:?}");
    let text = s.metrics_text().await;
    assert!(
        text.contains("modelgate_webhook_deliveries_total{target=\"down\",outcome=\"failed\"}")
    );
    // The receiver comes up, answering 503 + Retry-After at first.
    let receiver = Receiver::default();
    receiver.unavailable.store(2, Ordering::SeqCst);
    let (_addr, _stop) = receiver
        .serve(format!("127.0.0.1:{port}").parse().unwrap())
        .await;
    let until = Instant::now() + Duration::from_secs(30);
    while receiver.deliveries().len() < 3 {
        assert!(
            Instant::now() < until,
            "delivered {:?}",
            receiver.deliveries()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = receiver.deliveries();
    let mut ids: Vec<&str> = got.iter().map(|d| d.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "three events, each under its own id: {got:?}");
    assert_eq!(got.len(), 3, "none delivered twice");
    assert_eq!(receiver.bad_signatures.load(Ordering::SeqCst), 0);
    assert!(outbox_files(&outbox).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_disables_the_target() {
    let repo = iris_repo("driftgone", QUICK);
    let receiver = Receiver::default();
    receiver.gone.store(true, Ordering::SeqCst);
    let (addr, _stop) = receiver.serve("127.0.0.1:0".parse().unwrap()).await;
    let s = common::start_with(repo.path(), |c| {
        c.drift.webhooks = vec![target("gone", addr.port())];
        c.drift.webhook_initial_backoff_ms = 100;
        c.drift.allow_private_webhooks = true;
    })
    .await;
    episodes(&s, "driftgone", 1).await;
    let until = Instant::now() + Duration::from_secs(20);
    let disabled = || {
        std::fs::read_dir(repo.path().join(".outbox"))
            .unwrap()
            .flatten()
            .any(|t| t.path().join(modelgate::outbox::DISABLED).exists())
    };
    while !disabled() {
        assert!(Instant::now() < until, "the target was not disabled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let asked = receiver.requests.load(Ordering::SeqCst);
    // A second episode is kept in the outbox, not sent.
    episodes(&s, "driftgone", 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.requests.load(Ordering::SeqCst), asked);
    assert_eq!(outbox_files(&repo.path().join(".outbox")).len(), 2);
    assert!(
        s.metrics_text()
            .await
            .contains("modelgate_webhook_deliveries_total{target=\"gone\",outcome=\"gone\"} 1")
    );
}

/// A free port for the real binary's listeners.
fn free_port() -> u16 {
    closed_port()
}

fn spawn_gateway(config: &Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_ready(http: u16) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{http}/v2/health/ready")).await
            && r.status() == 200
        {
            return;
        }
        assert!(Instant::now() < until, "the gateway did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_survives_kill_9_and_is_delivered_after_a_restart() {
    let repo = iris_repo("driftkill", QUICK);
    let receiver_port = closed_port();
    let (http, grpc, metrics) = (free_port(), free_port(), free_port());
    let config = repo.path().join("modelgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"model_repository = "{repo}"
host = "127.0.0.1"
http_port = {http}
grpc_port = {grpc}
metrics_port = {metrics}
[drift]
webhook_initial_backoff_ms = 200
webhook_max_backoff_ms = 1000
allow_private_webhooks = true
[[drift.webhooks]]
name = "retrain"
url = "http://127.0.0.1:{receiver_port}/hook"
secret = "{SECRET}"
"#,
            repo = repo.path().display()
        ),
    )
    .unwrap();
    let mut gw = spawn_gateway(&config);
    wait_ready(http).await;
    let rows = iris_rows();
    let grpc_url = format!("http://127.0.0.1:{grpc}");
    let outbox = repo.path().join(".outbox");
    let until = Instant::now() + Duration::from_secs(60);
    while outbox_files(&outbox).is_empty() {
        assert!(Instant::now() < until, "no event in the outbox");
        send(&grpc_url, "driftkill", &rows, 300, 8, 3.0).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let files = outbox_files(&outbox);
    let pending: Value = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    let id = pending["id"].as_str().unwrap().to_string();
    // kill -9: no shutdown, no flush.
    gw.kill().unwrap();
    gw.wait().unwrap();
    let receiver = Receiver::default();
    let (_addr, _stop) = receiver
        .serve(format!("127.0.0.1:{receiver_port}").parse().unwrap())
        .await;
    let mut gw = spawn_gateway(&config);
    wait_ready(http).await;
    let until = Instant::now() + Duration::from_secs(30);
    while !receiver.deliveries().iter().any(|d| d.id == id) {
        assert!(
            Instant::now() < until,
            "the backlog was not delivered after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(receiver.bad_signatures.load(Ordering::SeqCst), 0);
    gw.kill().unwrap();
    gw.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_command_reads_csv_and_npy_and_refuses_bad_data() {
    let repo = iris_repo("prof", "");
    std::fs::remove_file(repo.path().join("prof/2/profile.json")).unwrap();
    let run = |data: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
            .args(["profile", "--model-repository"])
            .arg(repo.path())
            .args(["--model", "prof", "--version", "2", "--data"])
            .arg(data)
            .output()
            .unwrap()
    };
    let out = run(&common::root().join("models/iris/reference.csv"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p: Value =
        serde_json::from_slice(&std::fs::read(repo.path().join("prof/2/profile.json")).unwrap())
            .unwrap();
    assert_eq!(p["rows"], 150);
    assert_eq!(p["features"][2]["name"], "petal_length");
    assert_eq!(p["prediction"]["kind"], "classes");
    assert_eq!(p["prediction"]["classes"], serde_json::json!([0, 1, 2]));
    // The same data as .npy (float32, C order): the same bins.
    let rows = iris_rows();
    let header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, 4), }}",
        rows.len()
    );
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let padded = format!("{header:<117}\n");
    npy.extend_from_slice(&(padded.len() as u16).to_le_bytes());
    npy.extend_from_slice(padded.as_bytes());
    for r in &rows {
        npy.extend_from_slice(&common::f32_bytes(r));
    }
    let npy_path = repo.path().join("train.npy");
    std::fs::write(&npy_path, npy).unwrap();
    let out = run(&npy_path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q: Value =
        serde_json::from_slice(&std::fs::read(repo.path().join("prof/2/profile.json")).unwrap())
            .unwrap();
    assert_eq!(q["features"][2]["edges"], p["features"][2]["edges"]);
    // Wrong width: a clear error, nothing written over.
    let bad = repo.path().join("bad.csv");
    std::fs::write(&bad, "a,b,c\n1,2,3\n").unwrap();
    let out = run(&bad);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has 3 columns"));
    // The server loads the profile with the version.
    let s = common::start_with(repo.path(), |_| {}).await;
    let v = drift_status(&s, "prof").await;
    assert_eq!(v["versions"][0]["profile"]["rows"], 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_targets_are_refused_unless_allowed() {
    // A literal loopback address: refused when the config is checked.
    let mut config = modelgate::config::Config::default();
    config.drift.webhooks = vec![target("literal", 9)];
    let err = config.drift.validate().unwrap_err().to_string();
    assert!(err.contains("allow_private_webhooks"), "{err}");
    config.drift.allow_private_webhooks = true;
    config.drift.validate().unwrap();
    // A name that resolves to loopback (localhost): refused at delivery, event kept.
    let receiver = Receiver::default();
    let (addr, _stop) = receiver.serve("127.0.0.1:0".parse().unwrap()).await;
    let repo = iris_repo("driftssrf", QUICK);
    let s = common::start_with(repo.path(), |c| {
        c.drift.webhooks = vec![WebhookTarget {
            name: "ssrf".into(),
            url: format!("http://localhost:{}/hook", addr.port()),
            secret: SECRET.into(),
        }];
        c.drift.webhook_initial_backoff_ms = 100;
    })
    .await;
    episodes(&s, "driftssrf", 1).await;
    let until = Instant::now() + Duration::from_secs(20);
    while !s
        .metrics_text()
        .await
        .contains("modelgate_webhook_deliveries_total{target=\"ssrf\",outcome=\"failed\"}")
    {
        assert!(Instant::now() < until, "no failed delivery recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(receiver.requests.load(Ordering::SeqCst), 0);
    assert_eq!(outbox_files(&repo.path().join(".outbox")).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_that_cannot_be_written_keeps_the_event_until_it_can() {
    let _turn = OUTBOX_ERRORS.lock().await;
    let receiver = Receiver::default();
    let (addr, _stop) = receiver.serve("127.0.0.1:0".parse().unwrap()).await;
    let repo = iris_repo("driftdisk", QUICK);
    let outbox = repo.path().join(".outbox");
    // A partial write left by a crash (a temporary never renamed into place).
    let key_dir = |outbox: &Path| {
        std::fs::read_dir(outbox)
            .unwrap()
            .flatten()
            .next()
            .unwrap()
            .path()
    };
    let cfg = |c: &mut modelgate::config::Config| {
        c.drift.webhooks = vec![target("disk", addr.port())];
        c.drift.webhook_initial_backoff_ms = 100;
        c.drift.allow_private_webhooks = true;
    };
    let first = common::start_with(repo.path(), cfg).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dir = key_dir(&outbox);
    std::fs::write(dir.join(".evt_0.json.tmp-1-2"), b"{\"id\":").unwrap();
    let s = common::start_with(repo.path(), cfg).await;
    assert!(
        !dir.join(".evt_0.json.tmp-1-2").exists(),
        "the partial write was not cleaned up"
    );
    let before = outbox_errors(&s.metrics_text().await);
    // The outbox folder becomes unwritable (here: a file where the folder was).
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"not a folder").unwrap();
    episodes(&s, "driftdisk", 1).await;
    let until = Instant::now() + Duration::from_secs(20);
    while outbox_errors(&s.metrics_text().await) == before {
        assert!(
            Instant::now() < until,
            "the failed outbox write was not counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(receiver.deliveries().is_empty());
    // Writable again: the event is written and delivered, once.
    std::fs::remove_file(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while receiver.deliveries().is_empty() {
        assert!(Instant::now() < until, "the kept event was never delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.deliveries().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed() {
    // The real receiver, and a target that redirects to it.
    let receiver = Receiver::default();
    let (real, _stop) = receiver.serve("127.0.0.1:0".parse().unwrap()).await;
    let hits = Arc::new(AtomicUsize::new(0));
    let h = Arc::clone(&hits);
    let redirect = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let h = Arc::clone(&h);
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                (
                    axum::http::StatusCode::TEMPORARY_REDIRECT,
                    [("location", format!("http://127.0.0.1:{}/hook", real.port()))],
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, redirect).await.unwrap() });
    let repo = iris_repo("driftredirect", QUICK);
    let s = common::start_with(repo.path(), |c| {
        c.drift.webhooks = vec![target("redirect", port)];
        c.drift.webhook_initial_backoff_ms = 100;
        c.drift.allow_private_webhooks = true;
    })
    .await;
    episodes(&s, "driftredirect", 1).await;
    let until = Instant::now() + Duration::from_secs(20);
    while hits.load(Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < until,
            "the redirecting target was not retried"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Retried at the target, never followed to the other address; still pending.
    assert_eq!(receiver.requests.load(Ordering::SeqCst), 0);
    assert_eq!(outbox_files(&repo.path().join(".outbox")).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_outbox_loses_no_event() {
    let _turn = OUTBOX_ERRORS.lock().await;
    let receiver = Receiver::default();
    let (addr, _stop) = receiver.serve("127.0.0.1:0".parse().unwrap()).await;
    let repo = iris_repo("driftfull", QUICK);
    // The outbox on a 64 KiB disk, full when the event comes.
    let disk = common::Tmpfs::mount(64);
    let s = common::start_with(repo.path(), |c| {
        c.drift.outbox = Some(disk.0.clone());
        c.drift.webhooks = vec![target("full", addr.port())];
        c.drift.webhook_initial_backoff_ms = 100;
        c.drift.allow_private_webhooks = true;
    })
    .await;
    let before = outbox_errors(&s.metrics_text().await);
    let filler = common::fill(&disk.0);
    episodes(&s, "driftfull", 1).await;
    let until = Instant::now() + Duration::from_secs(20);
    while outbox_errors(&s.metrics_text().await) == before {
        assert!(
            Instant::now() < until,
            "the failed outbox write was not counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(receiver.deliveries().is_empty());
    // Space again: the kept event is written, delivered once, and its file removed.
    std::fs::remove_file(filler).unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while receiver.deliveries().is_empty() {
        assert!(Instant::now() < until, "the kept event was never delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.deliveries().len(), 1);
    assert!(outbox_files(&disk.0).is_empty());
    drop(s);
}

const ADMIN: &str = "drift-admin-token-0123456789";
/// A token that may infer but not read the admin API.
const CLIENT: &str = "drift-client-token-0123456789";

/// A gRPC request with `authorization: Bearer <token>` metadata, if given.
fn grpc_req<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

/// `v` written out and read back as a client reads the HTTP body: serde_json's default
/// parser may land one ulp off for tiny figures (p-values near 1e-29), so both sides go
/// through the same text.
fn as_read(v: Value) -> Value {
    serde_json::from_str(&v.to_string()).unwrap()
}

/// A gRPC drift window written as the HTTP view writes a window.
fn window_json(w: &modelgate::admin_proto::DriftWindow) -> Value {
    use modelgate::admin_proto::DriftState;
    let evidence = |e: &[modelgate::admin_proto::DriftEvidence]| -> Vec<Value> {
        e.iter()
            .map(|e| {
                let mut v = serde_json::json!({
                    "feature": e.feature, "test": e.test, "statistic": e.statistic,
                    "threshold": e.threshold, "level": e.level,
                });
                if let Some(p) = e.p_value {
                    v["p_value"] = p.into();
                }
                v
            })
            .collect()
    };
    let state = DriftState::try_from(w.state).unwrap().as_str_name();
    serde_json::json!({
        "model": w.model, "version": w.version,
        "state": state.strip_prefix("DRIFT_STATE_").unwrap(),
        "evidence": evidence(&w.evidence), "episode_evidence": evidence(&w.episode_evidence),
        "reference": w.reference, "rows_seen": w.rows_seen, "windows_tested": w.windows_tested,
        "window": w.window, "step": w.step, "episodes": w.episodes, "events": w.events,
        "last_event": w.last_event,
    })
}

/// One model's gRPC drift view written as the HTTP view writes it.
fn model_json(g: &modelgate::admin_proto::GetDriftResponse) -> Value {
    let d = g.settings.as_ref().unwrap();
    serde_json::json!({
        "model": g.model,
        "settings": {
            "enabled": d.enabled, "sample_rate": d.sample_rate,
            "max_rows_per_request": d.max_rows_per_request, "window": d.window, "step": d.step,
            "feature_test": d.feature_test, "prediction_test": d.prediction_test,
            "psi_warn": d.psi_warn, "psi_drift": d.psi_drift, "alpha": d.alpha,
            "correction": d.correction, "js_drift": d.js_drift,
            "drift_windows": d.drift_windows, "clean_windows": d.clean_windows,
            "cooldown_secs": d.cooldown_secs, "live_reference_rows": d.live_reference_rows,
            "bins": d.bins, "mode": d.mode, "arl_rows": d.arl_rows, "thin": d.thin,
            "clean_rows": d.clean_rows,
        },
        "versions": g.versions.iter().map(|v| serde_json::json!({
            "version": v.version,
            "profile": v.profile.as_ref().map(|p| serde_json::json!({
                "source": p.source, "rows": p.rows, "created_at": p.created_at,
                "features": p.features,
            })),
        })).collect::<Vec<_>>(),
        "windows": g.windows.iter().map(window_json).collect::<Vec<_>>(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drift_view_is_the_same_over_http_and_grpc_and_needs_the_same_token() {
    use modelgate::admin_proto::GetDriftRequest;
    use modelgate::admin_proto::traffic_admin_client::TrafficAdminClient;
    use modelgate::api::auth::{NamedToken, Permission};
    // Version 1 without a profile, version 2 (serving) with one; KS, so that the
    // evidence has p-values.
    let repo = iris_repo("viewiris", "");
    let model = repo.path().join("viewiris");
    std::fs::create_dir_all(model.join("1")).unwrap();
    std::fs::copy(
        common::root().join("models/iris/1/model.onnx"),
        model.join("1/model.onnx"),
    )
    .unwrap();
    std::fs::write(
        model.join("config.toml"),
        format!(
            "version_policy = \"all\"\n[drift]\n{QUICK}mode = \"window\"\nfeature_test = \"ks\"\n"
        ),
    )
    .unwrap();
    let s = common::start_with(repo.path(), |c| {
        c.admin_token = Some(ADMIN.into());
        c.auth.tokens = vec![NamedToken {
            name: "client".into(),
            sha256: hex::encode(modelgate::api::auth::token_hash(CLIENT)),
            permissions: vec![Permission::Infer],
        }];
    })
    .await;
    // Shifted rows: the window drifts, with evidence.
    send(&s.grpc, "viewiris", &iris_rows(), 600, 8, 3.0).await;
    let http = settled_as(&s, "viewiris", Some(ADMIN)).await;
    let mut admin = TrafficAdminClient::connect(s.grpc.clone()).await.unwrap();
    let ask = |model: &str, token: Option<&str>| {
        grpc_req(
            GetDriftRequest {
                model: model.into(),
            },
            token,
        )
    };
    let grpc = admin
        .get_drift(ask("viewiris", Some(ADMIN)))
        .await
        .unwrap()
        .into_inner();
    // Both carry the sequential settings too.
    for (k, want) in [
        ("mode", serde_json::json!("window")),
        ("arl_rows", serde_json::json!(1e7)),
        ("thin", serde_json::json!(1)),
        ("clean_rows", serde_json::json!(100)),
    ] {
        assert_eq!(http["settings"][k], want, "{k}");
    }
    assert_eq!(as_read(model_json(&grpc)), http);
    // What they agree on is not empty: state, versions, profile, evidence figures.
    let w = &grpc.windows[0];
    assert_eq!((w.version, w.reference.as_str()), (2, "profile.json"));
    assert_eq!(w.state(), modelgate::admin_proto::DriftState::Drift);
    assert!(
        w.rows_seen >= 200 && w.windows_tested >= 1 && w.episodes == 1,
        "{w:?}"
    );
    assert!(w.evidence.iter().any(|e| e.feature == "petal_length"
        && e.test == "ks"
        && e.p_value.is_some_and(|p| p < e.threshold)));
    assert_eq!(grpc.versions.len(), 2);
    assert!(grpc.versions[0].profile.is_none());
    let p = grpc.versions[1].profile.as_ref().unwrap();
    assert!(p.rows > 0);
    assert_eq!(
        p.features,
        ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    );
    let settings = grpc.settings.as_ref().unwrap();
    assert_eq!(
        (
            settings.feature_test.as_str(),
            settings.prediction_test.as_str()
        ),
        ("ks", "off")
    );
    assert_eq!((settings.window, settings.step), (200, 100));

    // Every model: the windows alone, the same over both.
    let (st, all) = http_get(&s, "/admin/drift", Some(ADMIN)).await;
    assert_eq!(st, 200);
    let grpc_all = admin
        .get_drift(ask("", Some(ADMIN)))
        .await
        .unwrap()
        .into_inner();
    assert!(grpc_all.model.is_empty() && grpc_all.settings.is_none());
    assert!(grpc_all.versions.is_empty());
    let windows: Vec<Value> = grpc_all.windows.iter().map(window_json).collect();
    assert_eq!(as_read(serde_json::json!({ "models": windows })), all);
    assert_eq!(windows.len(), 1);

    // An unknown model: 404 and NOT_FOUND, with the same message.
    let (st, v) = http_get(&s, "/admin/drift/nosuch", Some(ADMIN)).await;
    assert_eq!(st, 404);
    let err = admin
        .get_drift(ask("nosuch", Some(ADMIN)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(v["error"].as_str(), Some(err.message()));

    // No token, a wrong one: 401 and UNAUTHENTICATED; a token without `read`: 403 and
    // PERMISSION_DENIED. For one model and for all.
    for (token, status, code) in [
        (None, 401, tonic::Code::Unauthenticated),
        (
            Some("wrong-token-0123456789"),
            401,
            tonic::Code::Unauthenticated,
        ),
        (Some(CLIENT), 403, tonic::Code::PermissionDenied),
    ] {
        for m in ["viewiris", ""] {
            let path = if m.is_empty() {
                "/admin/drift".to_string()
            } else {
                format!("/admin/drift/{m}")
            };
            let (st, v) = http_get(&s, &path, token).await;
            assert_eq!(st, status, "{path} {token:?}: {v}");
            let err = admin.get_drift(ask(m, token)).await.unwrap_err();
            assert_eq!(err.code(), code, "'{m}' {token:?}: {err}");
        }
    }
}

/// Sends petal-length-shifted traffic to every replica until each has seen the drift
/// episode; returns the webhook deliveries a second later.
async fn drift_on_every_replica(
    replicas: &[common::TestServer],
    model: &str,
    receiver: &Receiver,
) -> Vec<Delivery> {
    let rows = iris_rows();
    let col: Vec<f64> = rows.iter().map(|r| f64::from(r[2])).collect();
    let mean = col.iter().sum::<f64>() / col.len() as f64;
    let std = (col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / col.len() as f64).sqrt();
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let mut detected = 0;
        for r in replicas {
            send(&r.grpc, model, &rows, 200, 4, std as f32).await;
            let v = settled(r, model).await;
            if v["windows"][0]["episodes"].as_u64().unwrap_or(0) >= 1 {
                detected += 1;
            }
        }
        if detected == replicas.len() {
            break;
        }
        assert!(Instant::now() < until, "not every replica saw the drift");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    receiver.deliveries()
}

fn counter_value(text: &str, name: &str, labels: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Three replicas on one registry (each with its own outbox) all see the same drift
/// episode: exactly one webhook event reaches the receiver, claimed in the shared
/// folder, saying how many replicas had seen it; the other two count theirs as
/// suppressed by the fleet. With the claim folder unusable, each replica sends its own
/// (counted), and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_registry_send_one_webhook_per_drift_episode() {
    let _cpu = common::cpu_heavy().await;
    for (model, unusable) in [("fleetdrift", false), ("fleetnoclaim", true)] {
        let repo = iris_repo(model, "cooldown_secs = 300\n");
        let receiver = Receiver::default();
        let (addr, _stop) = receiver.serve("127.0.0.1:0".parse().unwrap()).await;
        let blocked = tempfile::NamedTempFile::new().unwrap();
        let outboxes: Vec<tempfile::TempDir> =
            (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut replicas = Vec::new();
        for o in &outboxes {
            replicas.push(
                common::start_with(repo.path(), |c| {
                    c.drift.webhooks = vec![target("fleet", addr.port())];
                    c.drift.webhook_initial_backoff_ms = 100;
                    c.drift.allow_private_webhooks = true;
                    c.drift.outbox = Some(o.path().to_path_buf());
                    if unusable {
                        // Under a file: no folder can be made there (even as root).
                        c.drift.claim_dir = Some(blocked.path().join("claims"));
                    }
                })
                .await,
            );
        }
        let got = drift_on_every_replica(&replicas, model, &receiver).await;
        let text = replicas[0].metrics_text().await;
        let m = format!("model=\"{model}\"");
        let suppressed = counter_value(
            &text,
            "modelgate_drift_events_suppressed_total",
            &format!("{m},reason=\"fleet\""),
        );
        let errors = counter_value(&text, "modelgate_drift_claim_errors_total", &m);
        // (The three servers share this process's metrics: the sums are the fleet's.)
        if unusable {
            assert_eq!(got.len(), 3, "{got:?}");
            assert_eq!((suppressed, errors), (0, 3));
            for d in &got {
                assert!(
                    d.body["data"]["fleet"]["claim_error"].is_string(),
                    "{}",
                    d.body
                );
            }
        } else {
            assert_eq!(got.len(), 1, "{got:?}");
            assert_eq!((suppressed, errors), (2, 0));
            let fleet = &got[0].body["data"]["fleet"];
            assert!(fleet["claimed_by"].is_string(), "{fleet}");
            let seen = fleet["replicas_seen"].as_u64().unwrap();
            assert!((1..=3).contains(&seen), "{fleet}");
            assert_eq!(got[0].body["data"]["cooldown_secs"], 300.0);
            assert_eq!(
                got[0].body["data"]["profile_checksum"]
                    .as_str()
                    .map(str::len),
                Some(64)
            );
            // The claim is in the shared registry's folder.
            let claims = repo.path().join(".fleet/drift").join(model);
            assert!(claims.is_dir(), "{}", claims.display());
        }
    }
}

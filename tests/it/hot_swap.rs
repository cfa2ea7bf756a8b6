//! Hot swap over a real server: the repository is watched; new versions go live with
//! zero failed requests; broken, half-written and incompatible versions are reported
//! and never served; the repository API (index, load, unload) and explicit mode.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{Value, json};

const TOKEN: &str = "test-admin-token-0123456789";

fn mlp_file() -> PathBuf {
    root().join("models/mlp/1/model.onnx")
}

/// Publishes a version the documented way: write elsewhere, then rename into place.
fn publish(model_dir: &Path, version: u64, file: &Path) {
    let tmp = model_dir.join(format!(".incoming-{version}"));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(file, tmp.join("model.onnx")).unwrap();
    std::fs::rename(&tmp, model_dir.join(version.to_string())).unwrap();
}

async fn index(s: &TestServer) -> Vec<Value> {
    let index = s.repository_index(Some(TOKEN)).await;
    index.as_array().unwrap().clone()
}

fn row<'a>(rows: &'a [Value], model: &str, version: &str) -> Option<&'a Value> {
    rows.iter()
        .find(|r| r["name"] == model && r["version"] == version)
}

async fn versions(s: &TestServer, model: &str) -> Value {
    let r = reqwest::get(format!("{}/v2/models/{model}", s.http))
        .await
        .unwrap();
    if r.status() != 200 {
        return Value::Null;
    }
    r.json::<Value>().await.unwrap()["versions"].clone()
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

/// Sends requests to `model` in a loop until stopped; counts failures and the versions seen.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    seen: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(s: &TestServer, model: &str, clients: usize) -> Load {
        let load = Load {
            stop: Arc::new(AtomicBool::new(false)),
            ok: Arc::new(AtomicU64::new(0)),
            failed: Arc::default(),
            seen: Arc::default(),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        for i in 0..clients {
            let (stop, ok, failed, seen) = (
                load.stop.clone(),
                load.ok.clone(),
                load.failed.clone(),
                load.seen.clone(),
            );
            let url = format!("{}/v2/models/{model}/infer", s.http);
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                let body = json!({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": rand_f32(16, i as u64)}]});
                while !stop.load(Ordering::Relaxed) {
                    match client.post(&url).json(&body).send().await {
                        Ok(r) if r.status() == 200 => {
                            let v: Value = r.json().await.unwrap();
                            seen.lock().unwrap().insert(v["model_version"].as_str().unwrap().to_string());
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            let st = r.status();
                            let text = r.text().await.unwrap_or_default();
                            failed.lock().unwrap().push(format!("{st}: {text}"));
                        }
                        Err(e) => failed.lock().unwrap().push(e.to_string()),
                    }
                }
            }));
        }
        Load { tasks, ..load }
    }

    async fn stop(self) -> (u64, Vec<String>, std::collections::BTreeSet<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        let seen = self.seen.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failed, seen)
    }
}

async fn start_watching(repo: &Path) -> TestServer {
    start_with(repo, |c| {
        c.repository_poll_secs = 1;
        c.settle_ms = 150;
        c.admin_token = Some(TOKEN.into());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_versions_go_live_with_zero_failed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("swap");
    std::fs::create_dir_all(&m).unwrap();
    publish(&m, 1, &mlp_file());
    let s = start_watching(dir.path()).await;
    assert_eq!(versions(&s, "swap").await, json!(["1"]));
    let load = Load::start(&s, "swap", 4);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Publish versions 2 and 3 while requests run; latest-1 policy: 3 ends up alone.
    publish(&m, 2, &mlp_file());
    wait_for("version 2", || async {
        versions(&s, "swap").await == json!(["2"])
    })
    .await;
    publish(&m, 3, &mlp_file());
    wait_for("version 3", || async {
        versions(&s, "swap").await == json!(["3"])
    })
    .await;
    // Remove the serving version: the previous one on disk serves again.
    std::fs::remove_dir_all(m.join("3")).unwrap();
    wait_for("back to version 2", || async {
        versions(&s, "swap").await == json!(["2"])
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (ok, failed, seen) = load.stop().await;
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 20, "only {ok} requests");
    assert!(
        seen.iter().all(|v| ["1", "2", "3"].contains(&v.as_str())),
        "{seen:?}"
    );
    assert!(seen.contains("1") && seen.contains("2"), "{seen:?}");
    let text = s.metrics_text().await;
    assert!(
        text.contains("modelgate_model_loads_total{model=\"swap\"}"),
        "{text}"
    );
    assert!(
        text.contains("modelgate_model_unloads_total{model=\"swap\"}"),
        "{text}"
    );
    assert!(text.contains("modelgate_model_warmup_duration_seconds_count{model=\"swap\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_versions_are_reported_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("faulty");
    std::fs::create_dir_all(&m).unwrap();
    publish(&m, 1, &mlp_file());
    // The declared interface: a new version that does not match it is refused.
    std::fs::write(
        m.join("config.toml"),
        "[[input]]\nname = \"input\"\ndatatype = \"FP32\"\nshape = [-1, 16]\n[[output]]\nname = \"output\"\ndatatype = \"FP32\"\nshape = [-1, 4]\n",
    )
    .unwrap();
    let s = start_watching(dir.path()).await;
    let load = Load::start(&s, "faulty", 2);
    let bytes = std::fs::read(mlp_file()).unwrap();

    // Garbage .onnx.
    let v2 = m.join(".new2");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::write(v2.join("model.onnx"), b"\x08\x07 not a model").unwrap();
    std::fs::rename(&v2, m.join("2")).unwrap();
    wait_for("version 2 reported", || async {
        row(&index(&s).await, "faulty", "2").is_some_and(|r| r["state"] == "UNAVAILABLE")
    })
    .await;
    assert_eq!(versions(&s, "faulty").await, json!(["1"]));

    // A half-written file, then completed: served only once complete.
    std::fs::remove_dir_all(m.join("2")).unwrap();
    std::fs::create_dir_all(m.join("3")).unwrap();
    std::fs::write(m.join("3/model.onnx"), &bytes[..bytes.len() / 2]).unwrap();
    wait_for("half-written version 3 refused", || async {
        row(&index(&s).await, "faulty", "3").is_some_and(|r| r["state"] != "READY")
    })
    .await;
    assert_eq!(versions(&s, "faulty").await, json!(["1"]));
    std::fs::write(m.join("3/model.onnx"), &bytes).unwrap();
    wait_for("completed version 3 served", || async {
        versions(&s, "faulty").await == json!(["3"])
    })
    .await;

    // An incompatible interface (iris), a checksum mismatch, an unreadable file.
    publish(&m, 4, &root().join("models/iris/1/model.onnx"));
    wait_for("incompatible version 4 reported", || async {
        row(&index(&s).await, "faulty", "4").is_some_and(|r| {
            r["reason"]
                .as_str()
                .unwrap()
                .contains("does not match the declared interface")
        })
    })
    .await;
    std::fs::remove_dir_all(m.join("4")).unwrap();
    let v5 = m.join(".new5");
    std::fs::create_dir_all(&v5).unwrap();
    std::fs::copy(mlp_file(), v5.join("model.onnx")).unwrap();
    std::fs::write(
        v5.join("model.onnx.sha256"),
        format!("{}  model.onnx\n", "0".repeat(64)),
    )
    .unwrap();
    std::fs::rename(&v5, m.join("5")).unwrap();
    wait_for("checksum mismatch reported", || async {
        row(&index(&s).await, "faulty", "5")
            .is_some_and(|r| r["reason"].as_str().unwrap().contains("does not match"))
    })
    .await;
    std::fs::remove_dir_all(m.join("5")).unwrap();
    std::fs::create_dir_all(m.join("6")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/model.onnx", m.join("6/model.onnx")).unwrap();
    wait_for("unreadable version 6 reported", || async {
        row(&index(&s).await, "faulty", "6").is_some_and(|r| r["state"] == "UNAVAILABLE")
    })
    .await;
    std::fs::remove_dir_all(m.join("6")).unwrap();

    // A config.toml typo: reported, and what serves keeps serving.
    std::fs::write(m.join("config.toml"), "instancez = 2\n").unwrap();
    wait_for("config typo reported", || async {
        row(&index(&s).await, "faulty", "3")
            .is_some_and(|r| r["reason"].as_str().unwrap().contains("instancez"))
    })
    .await;
    assert_eq!(versions(&s, "faulty").await, json!(["3"]));

    // Thousands of files at once: nothing breaks.
    let junk = dir.path().join("junk");
    std::fs::create_dir_all(&junk).unwrap();
    for i in 0..3000 {
        std::fs::write(junk.join(format!("f{i}")), b"x").unwrap();
    }
    for i in 0..1000 {
        std::fs::write(m.join(format!("note{i}.txt")), b"x").unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(versions(&s, "faulty").await, json!(["3"]));

    let (ok, failed, _) = load.stop().await;
    assert!(failed.is_empty(), "{:?}", &failed[..failed.len().min(5)]);
    assert!(ok > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_model_finishes_in_flight_then_404() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("gone");
    std::fs::create_dir_all(&m).unwrap();
    publish(&m, 1, &mlp_file());
    let s = start_watching(dir.path()).await;
    let load = Load::start(&s, "gone", 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::remove_dir_all(&m).unwrap();
    wait_for("model removed", || async {
        versions(&s, "gone").await.is_null()
    })
    .await;
    let (ok, failed, _) = load.stop().await;
    assert!(ok > 0);
    // Requests after the removal are 404s; nothing else fails.
    assert!(
        failed.iter().all(|f| f.starts_with("404")),
        "{:?}",
        &failed[..failed.len().min(5)]
    );
    assert_eq!(
        reqwest::get(format!("{}/v2/health/ready", s.http))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_mode_load_unload_and_token() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["alpha", "beta"] {
        let m = dir.path().join(name);
        std::fs::create_dir_all(&m).unwrap();
        publish(&m, 1, &mlp_file());
    }
    let s = start_with(dir.path(), |c| {
        c.model_control_mode = modelgate::registry::settings::ControlMode::Explicit;
        c.load_models = vec!["alpha".into()];
        c.admin_token = Some(TOKEN.into());
    })
    .await;
    let client = reqwest::Client::new();
    assert_eq!(versions(&s, "alpha").await, json!(["1"]));
    assert!(versions(&s, "beta").await.is_null());
    let rows = index(&s).await;
    assert_eq!(row(&rows, "alpha", "1").unwrap()["state"], "READY");
    let beta = rows.iter().find(|r| r["name"] == "beta").unwrap();
    assert_eq!(
        (beta["state"].as_str(), beta["reason"].as_str()),
        (Some("UNAVAILABLE"), Some("unloaded"))
    );
    // No token, or a wrong one: 401, and nothing changes.
    for auth in [None, Some("Bearer wrong-token-000000000000")] {
        let mut req = client.post(format!("{}/v2/repository/models/beta/load", s.http));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        assert_eq!(req.send().await.unwrap().status(), 401);
    }
    let r = client
        .post(format!("{}/v2/repository/models/beta/load", s.http))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(versions(&s, "beta").await, json!(["1"]));
    // A new folder is not picked up by itself in explicit mode; a load picks it up.
    publish(&dir.path().join("beta"), 2, &mlp_file());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(versions(&s, "beta").await, json!(["1"]));
    let r = client
        .post(format!("{}/v2/repository/models/beta/load", s.http))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(versions(&s, "beta").await, json!(["2"]));
    let r = client
        .post(format!("{}/v2/repository/models/alpha/unload", s.http))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(versions(&s, "alpha").await.is_null());
    let r = client
        .post(format!("{}/v2/repository/models/nope/load", s.http))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // The same over gRPC.
    let mut c =
        modelgate::proto::grpc_inference_service_client::GrpcInferenceServiceClient::connect(
            s.grpc.clone(),
        )
        .await
        .unwrap();
    let e = c
        .repository_index(modelgate::proto::RepositoryIndexRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(modelgate::proto::RepositoryModelLoadRequest {
        model_name: "alpha".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    c.repository_model_load(req).await.unwrap();
    let mut req = tonic::Request::new(modelgate::proto::RepositoryIndexRequest {
        ready: true,
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let idx = c.repository_index(req).await.unwrap().into_inner();
    let names: Vec<(String, String, String)> = idx
        .models
        .into_iter()
        .map(|m| (m.name, m.version, m.state))
        .collect();
    assert_eq!(
        names,
        vec![
            ("alpha".into(), "1".into(), "READY".into()),
            ("beta".into(), "2".into(), "READY".into())
        ]
    );
    let mut req = tonic::Request::new(modelgate::proto::RepositoryModelUnloadRequest {
        model_name: "beta".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    c.repository_model_unload(req).await.unwrap();
    assert!(versions(&s, "beta").await.is_null());
}

/// A free port for the real binary's listeners.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_swap_then_restart_serves_a_whole_version() {
    let repo = tempfile::tempdir().unwrap();
    let m = repo.path().join("killswap");
    publish(&m, 1, &mlp_file());
    let ports = (free_port(), free_port(), free_port());
    let start = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
            .args(["serve", "--host", "127.0.0.1", "--model-repository"])
            .arg(repo.path())
            .args([
                "--http-port",
                &ports.0.to_string(),
                "--grpc-port",
                &ports.1.to_string(),
            ])
            .args([
                "--metrics-port",
                &ports.2.to_string(),
                "--repository-poll-secs",
                "1",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let ready = |v: u64| async move {
        reqwest::get(format!(
            "http://127.0.0.1:{}/v2/models/killswap/versions/{v}/ready",
            ports.0
        ))
        .await
        .is_ok_and(|r| r.status() == 200)
    };
    let mut gw = start();
    wait_for("version 1 served", || ready(1)).await;
    // Publish version 2, and kill -9 while the server loads it (or just after).
    publish(&m, 2, &mlp_file());
    tokio::time::sleep(Duration::from_millis(600)).await;
    gw.kill().unwrap();
    gw.wait().unwrap();
    // A version being written when the crash came: half a file, in its own folder.
    let half = m.join("3");
    std::fs::create_dir_all(&half).unwrap();
    let bytes = std::fs::read(mlp_file()).unwrap();
    std::fs::write(half.join("model.onnx"), &bytes[..bytes.len() / 2]).unwrap();
    let mut gw = start();
    // After the restart: version 2 serves (whole); the half-written 3 never does, and the
    // server keeps serving what is whole.
    wait_for("version 2 served after the restart", || ready(2)).await;
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/v2/models/killswap/versions/2/infer", ports.0))
        .json(&json!({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": vec![0.5f32; 16]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!ready(3).await);
    gw.kill().unwrap();
    gw.wait().unwrap();
}

/// The sum of the samples of a metric whose line starts with `prefix` (0 when absent).
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn load_failures(s: &TestServer, model: &str) -> f64 {
    metric(
        &s.metrics_text().await,
        &format!("modelgate_model_load_failures_total{{model=\"{model}\"}}"),
    )
}

fn scans(s: &TestServer) -> u64 {
    s.server.as_ref().unwrap().state.registry.scans()
}

async fn model_config(s: &TestServer, model: &str) -> Value {
    let r = reqwest::get(format!("{}/v2/models/{model}/config", s.http))
        .await
        .unwrap();
    if r.status() != 200 {
        return Value::Null;
    }
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_repository_is_not_rescanned_in_a_loop() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("idle");
    publish(&m, 1, &mlp_file());
    std::fs::write(m.join("config.toml"), "max_batch_size = 16\n").unwrap();
    // Periodic rescans far apart: every pass seen here comes from change events.
    let s = start_with(dir.path(), |c| {
        c.repository_poll_secs = 3600;
        c.settle_ms = 150;
    })
    .await;
    // Serve some requests too: they must not look like changes either.
    let load = Load::start(&s, "idle", 1);
    // A change starts a pass; the pass must not start the next one.
    publish(&m, 2, &mlp_file());
    wait_for("version 2", || async {
        versions(&s, "idle").await == json!(["2"])
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = scans(&s);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = scans(&s);
    // Reading config.toml and the version folders must not trigger the next pass
    // (it did about 10 times a second).
    assert!(
        after - before <= 1,
        "{} passes in 3 s with no change",
        after - before
    );
    // A real change is still seen at once.
    publish(&m, 3, &mlp_file());
    wait_for("version 3", || async {
        versions(&s, "idle").await == json!(["3"])
    })
    .await;
    assert!(scans(&s) > after);
    let (_, failed, _) = load.stop().await;
    assert!(failed.is_empty(), "{:?}", &failed[..failed.len().min(5)]);
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_is_reported_once_and_its_fix_serves() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("typo");
    publish(&m, 1, &mlp_file());
    // Rescans every second: a problem must not be counted again at each one either.
    let s = start_watching(dir.path()).await;
    assert_eq!(model_config(&s, "typo").await["max_batch_size"], 64);
    let before = load_failures(&s, "typo").await;
    std::fs::write(m.join("config.toml"), "max_batch_sise = 32\n").unwrap();
    wait_for("the typo reported", || async {
        row(&index(&s).await, "typo", "1")
            .is_some_and(|r| r["reason"].as_str().unwrap().contains("max_batch_sise"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(load_failures(&s, "typo").await, before + 1.0);
    assert_eq!(versions(&s, "typo").await, json!(["1"]));
    // Fixed: the new config serves, and nothing more is counted.
    std::fs::write(m.join("config.toml"), "max_batch_size = 32\n").unwrap();
    wait_for("the fixed config served", || async {
        model_config(&s, "typo").await["max_batch_size"] == 32
    })
    .await;
    let r = row(&index(&s).await, "typo", "1").cloned().unwrap();
    assert_eq!(
        (r["state"].as_str(), r["reason"].as_str()),
        (Some("READY"), Some(""))
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(load_failures(&s, "typo").await, before + 1.0);
}

fn iris_file(version: u64) -> PathBuf {
    root().join(format!("models/iris/{version}/model.onnx"))
}

/// Status of an iris inference (one row), optionally to one version.
async fn iris_status(s: &TestServer, model: &str, version: Option<&str>) -> u16 {
    let path = match version {
        Some(v) => format!("{}/v2/models/{model}/versions/{v}/infer", s.http),
        None => format!("{}/v2/models/{model}/infer", s.http),
    };
    let body = json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]});
    reqwest::Client::new()
        .post(path)
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn ready_status(s: &TestServer) -> u16 {
    reqwest::get(format!("{}/v2/health/ready", s.http))
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_the_serving_versions_do_not_match_is_refused_as_a_whole() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("iface");
    publish(&m, 1, &iris_file(1));
    publish(&m, 2, &iris_file(2));
    let base = "version_policy = \"all\"\n";
    std::fs::write(m.join("config.toml"), base).unwrap();
    let s = start_watching(dir.path()).await;
    assert_eq!(versions(&s, "iface").await, json!(["1", "2"]));
    let before = load_failures(&s, "iface").await;

    // An interface neither version has (and another batch size): refused as a whole.
    let wrong = format!(
        "{base}max_batch_size = 8\n[[input]]\nname = \"X\"\ndatatype = \"FP64\"\nshape = [-1, 4]\n"
    );
    std::fs::write(m.join("config.toml"), &wrong).unwrap();
    wait_for("the config refused", || async {
        row(&index(&s).await, "iface", "1").is_some_and(|r| {
            r["reason"]
                .as_str()
                .unwrap()
                .starts_with("config.toml refused: ")
        })
    })
    .await;
    let rows = index(&s).await;
    for v in ["1", "2"] {
        let r = row(&rows, "iface", v).unwrap();
        assert_eq!(r["state"], "READY", "{r}");
        assert!(
            r["reason"]
                .as_str()
                .unwrap()
                .contains("input 'X' is FP32 [-1, 4] in the model, declared FP64 [-1, 4]"),
            "{r}"
        );
    }
    // Everything keeps serving, under the previous config.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(versions(&s, "iface").await, json!(["1", "2"]));
    for v in [None, Some("1"), Some("2")] {
        assert_eq!(iris_status(&s, "iface", v).await, 200, "{v:?}");
    }
    assert_eq!(ready_status(&s).await, 200);
    assert_eq!(model_config(&s, "iface").await["max_batch_size"], 64);
    assert_eq!(load_failures(&s, "iface").await, before + 1.0);

    // A policy that selects none of the versions present would take the model offline.
    std::fs::write(
        m.join("config.toml"),
        "version_policy = { specific = [7] }\n",
    )
    .unwrap();
    wait_for("the empty policy refused", || async {
        row(&index(&s).await, "iface", "2").is_some_and(|r| {
            r["reason"]
                .as_str()
                .unwrap()
                .contains("selects none of the versions present (1, 2)")
        })
    })
    .await;
    assert_eq!(versions(&s, "iface").await, json!(["1", "2"]));
    assert_eq!(iris_status(&s, "iface", None).await, 200);

    // Fixed, declaring one output only (outputs are "at least these"): in force.
    std::fs::write(
        m.join("config.toml"),
        format!(
            "{base}max_batch_size = 8\n[[input]]\nname = \"X\"\ndatatype = \"FP32\"\nshape = [-1, 4]\n[[output]]\nname = \"label\"\ndatatype = \"INT64\"\nshape = [-1]\n"
        ),
    )
    .unwrap();
    wait_for("the fixed config in force", || async {
        model_config(&s, "iface").await["max_batch_size"] == 8
            && versions(&s, "iface").await == json!(["1", "2"])
    })
    .await;
    wait_for("both versions reloaded under it", || async {
        let rows = index(&s).await;
        ["1", "2"].iter().all(|v| {
            row(&rows, "iface", v).is_some_and(|r| r["state"] == "READY" && r["reason"] == "")
        })
    })
    .await;
    let c = reqwest::get(format!("{}/v2/models/iface/versions/1/config", s.http))
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(c["max_batch_size"], 8, "{c}");

    // A config for other versions (mlp's interface): refused while iris serves; it takes
    // effect once the versions it would serve match it.
    let mlp_config = format!(
        "{base}max_batch_size = 4\n[[input]]\nname = \"input\"\ndatatype = \"FP32\"\nshape = [-1, 16]\n[[output]]\nname = \"output\"\ndatatype = \"FP32\"\nshape = [-1, 4]\n"
    );
    std::fs::write(m.join("config.toml"), &mlp_config).unwrap();
    wait_for("the mlp config refused", || async {
        row(&index(&s).await, "iface", "1").is_some_and(|r| {
            r["reason"]
                .as_str()
                .unwrap()
                .contains("input 'input' is declared but the model has no such input")
        })
    })
    .await;
    // A version that matches it arrives: the config in force (iris's interface) refuses
    // it, and the iris versions still make the new config refused.
    publish(&m, 3, &mlp_file());
    wait_for("version 3 refused by the config in force", || async {
        row(&index(&s).await, "iface", "3").is_some_and(|r| {
            r["state"] == "UNAVAILABLE"
                && r["reason"]
                    .as_str()
                    .unwrap()
                    .contains("input 'input' (FP32 [-1, 16]) of the model is not declared")
        })
    })
    .await;
    assert_eq!(versions(&s, "iface").await, json!(["1", "2"]));
    assert_eq!(model_config(&s, "iface").await["max_batch_size"], 8);
    // The iris versions go: the config and the versions agree, and it takes effect.
    std::fs::remove_dir_all(m.join("1")).unwrap();
    std::fs::remove_dir_all(m.join("2")).unwrap();
    wait_for("the mlp config in force", || async {
        versions(&s, "iface").await == json!(["3"])
            && model_config(&s, "iface").await["max_batch_size"] == 4
    })
    .await;
    let r = row(&index(&s).await, "iface", "3").cloned().unwrap();
    assert_eq!(
        (r["state"].as_str(), r["reason"].as_str()),
        (Some("READY"), Some(""))
    );
    assert_eq!(ready_status(&s).await, 200);
}

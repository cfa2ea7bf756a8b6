//! Serving from a real MLflow tracking server (`mlflow server`, SQLite backend, local
//! artifact root, on loopback; from the venv `.venv-mlflow` that scripts/test.sh makes):
//! an ONNX version registered with a run (metrics, params, commit, data) and aliased
//! `champion` serves with its lineage in metadata, config, the index and the audit log;
//! a second version aliased `challenger` is rolled out and promoted, and MLflow then
//! shows it as champion with the `modelgate.state` tag; a broken artifact is never
//! served and its version is tagged with the reason; with MLflow stopped serving goes
//! on, and the next alias change is picked up once it is back. A rollback is written
//! back (the challenger alias removed, the version tagged `rolled_back`), and versions
//! deleted in MLflow are retired: a canary is taken out of routing first, and neither is
//! served again, while the stable version keeps answering; a write-back that fails while
//! MLflow is down is retried once it is back. A download that stalls halfway (MLflow
//! frozen with SIGSTOP) times out, leaves nothing, and is downloaded whole once MLflow
//! answers again. Against MLflow's own
//! `basic-auth` app, refused credentials stop the start and fail `--validate` with a clear
//! message, and the right ones serve.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// `mlflow server` in a process group of its own (it forks uvicorn workers).
struct MlflowServer {
    child: Child,
    url: String,
}

impl MlflowServer {
    fn start(dir: &Path, port: u16) -> MlflowServer {
        MlflowServer::start_with(dir, port, None)
    }

    /// With `admin_password`, MLflow's own `basic-auth` app (user `admin`): every call
    /// needs HTTP Basic credentials.
    fn start_with(dir: &Path, port: u16, admin_password: Option<&str>) -> MlflowServer {
        let bin = common::root().join(".venv-mlflow/bin/mlflow");
        assert!(
            bin.is_file(),
            "{} is missing: scripts/test.sh creates the MLflow venv (python3 -m venv .venv-mlflow, then pip install -r tests/mlflow-requirements.txt) before cargo test",
            bin.display()
        );
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(dir.join("mlflow.log")).unwrap();
        let mut cmd = Command::new(bin);
        if let Some(pw) = admin_password {
            let ini = dir.join("auth.ini");
            std::fs::write(
                &ini,
                format!(
                    "[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{}\nadmin_username = admin\nadmin_password = {pw}\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
                    dir.join("auth.db").display()
                ),
            )
            .unwrap();
            cmd.args(["server", "--app-name", "basic-auth"])
                .env("MLFLOW_AUTH_CONFIG_PATH", &ini)
                .env("MLFLOW_FLASK_SERVER_SECRET_KEY", "modelgate-test-secret");
        } else {
            cmd.arg("server");
        }
        let child = cmd
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
            .arg("--artifacts-destination")
            .arg(dir.join("artifacts"))
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--workers",
                "1",
            ])
            .env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start mlflow server");
        MlflowServer {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn wait_up(&self, dir: &Path) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = reqwest::get(format!("{}/health", self.url)).await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mlflow server did not come up: {}",
                std::fs::read_to_string(dir.join("mlflow.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Freezes (`STOP`) or thaws (`CONT`) the whole process group: a server that accepts
    /// and then answers nothing, as a stalled one does.
    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, "--", &format!("-{}", self.child.id())])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig}");
    }

    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // The whole group: `mlflow server` forks uvicorn workers.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn api(c: &reqwest::Client, base: &str, method: &str, path: &str, body: Value) -> Value {
    let url = format!("{base}/api/2.0/mlflow/{path}");
    let r = match method {
        "GET" => c.get(&url).query(
            &body
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect::<Vec<_>>(),
        ),
        "POST" => c.post(&url).json(&body),
        "DELETE" => c.delete(&url).json(&body),
        _ => unreachable!(),
    };
    let r = r.send().await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{method} {path}: {status} {v}");
    v
}

/// Logs a run with `onnx` as its `model/model.onnx` artifact, and registers it as a new
/// version of `iris`. Returns (version, run id).
async fn register(c: &reqwest::Client, base: &str, onnx: &[u8], accuracy: f64) -> (u64, String) {
    register_as(c, base, "iris", onnx, accuracy).await
}

/// [`register`] as registered model `name`.
async fn register_as(
    c: &reqwest::Client,
    base: &str,
    name: &str,
    onnx: &[u8],
    accuracy: f64,
) -> (u64, String) {
    let run = api(
        c,
        base,
        "POST",
        "runs/create",
        json!({"experiment_id": "0", "user_id": "alice"}),
    )
    .await;
    let run_id = run["run"]["info"]["run_id"].as_str().unwrap().to_string();
    api(
        c,
        base,
        "POST",
        "runs/log-metric",
        json!({"run_id": run_id, "key": "accuracy", "value": accuracy, "timestamp": 0}),
    )
    .await;
    api(
        c,
        base,
        "POST",
        "runs/log-parameter",
        json!({"run_id": run_id, "key": "C", "value": "1.0"}),
    )
    .await;
    for (k, v) in [
        ("mlflow.source.git.commit", "0123abcd"),
        ("training_data", "data/iris-2026-11.csv"),
    ] {
        api(
            c,
            base,
            "POST",
            "runs/set-tag",
            json!({"run_id": run_id, "key": k, "value": v}),
        )
        .await;
    }
    let put = c
        .put(format!(
            "{base}/api/2.0/mlflow-artifacts/artifacts/0/{run_id}/artifacts/model/model.onnx"
        ))
        .body(onnx.to_vec())
        .send()
        .await
        .unwrap();
    assert!(
        put.status().is_success(),
        "artifact upload: {}",
        put.status()
    );
    let _ = c
        .post(format!("{base}/api/2.0/mlflow/registered-models/create"))
        .json(&json!({"name": name}))
        .send()
        .await
        .unwrap();
    let mv = api(
        c,
        base,
        "POST",
        "model-versions/create",
        json!({"name": name, "source": format!("mlflow-artifacts:/0/{run_id}/artifacts/model"), "run_id": run_id}),
    )
    .await;
    let v = mv["model_version"]["version"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    (v, run_id)
}

async fn alias(c: &reqwest::Client, base: &str, alias: &str, version: u64) {
    alias_of(c, base, "iris", alias, version).await;
}

async fn alias_of(c: &reqwest::Client, base: &str, name: &str, alias: &str, version: u64) {
    api(
        c,
        base,
        "POST",
        "registered-models/alias",
        json!({"name": name, "alias": alias, "version": version.to_string()}),
    )
    .await;
}

/// Waits for `f` to give a value (checked every 200 ms), or fails saying `what`.
async fn until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    secs: u64,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get_json(c: &reqwest::Client, url: impl reqwest::IntoUrl) -> Option<Value> {
    let r = c.get(url).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

async fn index(c: &reqwest::Client, http: &str) -> Vec<Value> {
    let v: Value = c
        .post(format!("{http}/v2/repository/index"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v.as_array().unwrap().clone()
}

fn infer_body() -> Value {
    json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]})
}

async fn version_tag(c: &reqwest::Client, base: &str, v: u64) -> Option<String> {
    let mv = api(
        c,
        base,
        "GET",
        "model-versions/get",
        json!({"name": "iris", "version": v.to_string()}),
    )
    .await;
    mv["model_version"]["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == "modelgate.state")
        .and_then(|t| t["value"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serves_from_mlflow_with_lineage_and_writes_back() {
    let work = tempfile::tempdir().unwrap();
    let mlflow_dir = work.path().join("mlflow");
    std::fs::create_dir_all(&mlflow_dir).unwrap();
    let port = free_port();
    let mut mlflow = MlflowServer::start(&mlflow_dir, port);
    mlflow.wait_up(&mlflow_dir).await;
    let base = mlflow.url.clone();
    let c = reqwest::Client::new();
    let onnx: Vec<u8> = std::fs::read(common::root().join("models/iris/1/model.onnx")).unwrap();

    let (v1, run1) = register(&c, &base, &onnx, 0.96).await;
    assert_eq!(v1, 1);
    alias(&c, &base, "champion", 1).await;

    // The repository holds only the model's settings: everything else comes from MLflow.
    let repo: PathBuf = work.path().join("repo");
    std::fs::create_dir_all(repo.join("iris")).unwrap();
    std::fs::write(
        repo.join("iris/config.toml"),
        "version_policy = \"all\"\n[traffic.rollout]\nsteps = [50.0, 100.0]\ninterval_secs = 1.0\nmin_requests = 30\np99_slack_ms = 1000.0\n",
    )
    .unwrap();
    let uri = base.clone();
    let s = common::start_with(&repo, move |cfg| {
        cfg.settle_ms = 100;
        cfg.traffic.controller_tick_ms = 100;
        cfg.sources.mlflow = vec![modelgate::sources::mlflow::MlflowConfig {
            tracking_uri: uri,
            models: vec!["iris".into()],
            poll_secs: 1,
            ..Default::default()
        }];
    })
    .await;
    let http = s.http.clone();

    // Champion serves, with its lineage in OIP metadata and Triton's config.
    let md = until("version 1 metadata", 60, || {
        get_json(&c, format!("{http}/v2/models/iris/versions/1"))
    })
    .await;
    let p = &md["parameters"];
    assert_eq!(p["lineage.source_run"], run1.as_str(), "{md}");
    assert_eq!(p["lineage.metrics.accuracy"], "0.96", "{md}");
    assert_eq!(p["lineage.params.C"], "1.0", "{md}");
    assert_eq!(p["lineage.code_commit"], "0123abcd", "{md}");
    assert_eq!(p["lineage.training_data"], "data/iris-2026-11.csv", "{md}");
    assert_eq!(p["lineage.creator"], "alice", "{md}");
    assert!(
        p["lineage.source"]
            .as_str()
            .unwrap()
            .starts_with(&format!("mlflow:{base}#iris/1")),
        "{md}"
    );
    let cfg = get_json(&c, &format!("{http}/v2/models/iris/config"))
        .await
        .unwrap();
    assert_eq!(
        cfg["parameters"]["lineage.source_run"]["string_value"],
        run1.as_str(),
        "{cfg}"
    );
    // Published atomically: checksum beside the model, no staging folder left.
    assert!(repo.join("iris/1/model.onnx.sha256").is_file());
    assert!(
        std::fs::read_dir(repo.join("iris"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with(".mlflow-"))
    );
    // Routing follows the alias; the index shows the lineage.
    let routing = until("stable = 1", 30, || async {
        let v = get_json(&c, &format!("{http}/admin/models/iris/traffic")).await?;
        (v["routing"]["stable"] == 1).then_some(v)
    })
    .await;
    assert_eq!(routing["effective_stable"], 1);
    let rows = index(&c, &http).await;
    let row = rows.iter().find(|r| r["version"] == "1").unwrap();
    assert_eq!(row["lineage"]["source_run"], run1.as_str(), "{rows:?}");
    assert_eq!(row["lineage"]["metrics"]["accuracy"], 0.96);

    // A hand-published version with a malformed model.toml: a clear load error for that
    // version alone, in the index; version 1 keeps serving.
    let staging = repo.join("iris/.incoming-9");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("model.onnx"), &onnx).unwrap();
    std::fs::write(staging.join("model.toml"), "source_runn = \"typo\"\n").unwrap();
    std::fs::rename(&staging, repo.join("iris/9")).unwrap();
    let row = until("version 9 reported", 30, || async {
        let rows = index(&c, &http).await;
        rows.into_iter()
            .find(|r| r["version"] == "9" && r["state"] == "UNAVAILABLE")
    })
    .await;
    let reason = row["reason"].as_str().unwrap();
    assert!(
        reason.contains("model.toml invalid") && reason.contains("source_runn"),
        "{row}"
    );
    let r = c
        .post(format!("{http}/v2/models/iris/infer"))
        .json(&infer_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    std::fs::remove_dir_all(repo.join("iris/9")).unwrap();

    // Load while the rollout runs: it judges real requests.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, c, url) = (
            Arc::clone(&stop),
            c.clone(),
            format!("{http}/v2/models/iris/infer"),
        );
        tokio::spawn(async move {
            let mut ok = 0u64;
            let mut failed = 0u64;
            let deadline = Instant::now() + Duration::from_secs(300);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match c.post(&url).json(&infer_body()).send().await {
                    Ok(r) if r.status().is_success() => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        })
    };

    // A challenger: the rollout starts and promotes it; MLflow then shows it as champion.
    let (v2, run2) = register(&c, &base, &onnx, 0.98).await;
    alias(&c, &base, "challenger", v2).await;
    until("version 2 promoted to stable", 120, || async {
        let v = get_json(&c, &format!("{http}/admin/models/iris/traffic")).await?;
        (v["routing"]["stable"] == v2).then_some(())
    })
    .await;
    until(
        "MLflow champion = 2, no challenger, tag written",
        60,
        || async {
            let m = api(
                &c,
                &base,
                "GET",
                "registered-models/get",
                json!({"name": "iris"}),
            )
            .await;
            let aliases = m["registered_model"]["aliases"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let champion = aliases
                .iter()
                .any(|a| a["alias"] == "champion" && a["version"] == "2");
            let challenger = aliases.iter().any(|a| a["alias"] == "challenger");
            let tag = version_tag(&c, &base, v2).await?;
            let tag: Value = serde_json::from_str(&tag).ok()?;
            (champion
                && !challenger
                && tag["state"] == "stable"
                && tag["reason"].as_str()?.contains("promote"))
            .then_some(())
        },
    )
    .await;
    // The audit log names the versions with their lineage.
    let audit: Value = c
        .get(format!("{http}/admin/audit?model=iris"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let promote = audit
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|e| e["action"] == "promote")
        .expect("a promote entry");
    assert_eq!(
        promote["lineage"]["2"]["source_run"],
        run2.as_str(),
        "{promote}"
    );
    assert_eq!(
        promote["lineage"]["1"]["source_run"],
        run1.as_str(),
        "{promote}"
    );
    let entered = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["actor"] == "mlflow" && e["after"]["canary"]["version"] == 2);
    assert!(entered.is_some(), "{audit}");

    // A broken artifact: never served, reported in the index, tagged in MLflow.
    let (v3, _) = register(&c, &base, b"this is not an onnx model", 0.99).await;
    alias(&c, &base, "challenger", v3).await;
    let tag = until("failure tag on version 3", 60, || {
        version_tag(&c, &base, v3)
    })
    .await;
    let tag: Value = serde_json::from_str(&tag).unwrap();
    assert_eq!(tag["state"], "failed", "{tag}");
    assert!(!tag["reason"].as_str().unwrap().is_empty());
    let rows = index(&c, &http).await;
    let row = rows
        .iter()
        .find(|r| r["version"] == "3")
        .expect("version 3 in the index");
    assert_eq!(row["state"], "UNAVAILABLE", "{row}");
    assert_eq!(row["lineage"]["metrics"]["accuracy"], 0.99, "{row}");
    let routing = get_json(&c, &format!("{http}/admin/models/iris/traffic"))
        .await
        .unwrap();
    assert_eq!(routing["routing"]["stable"], 2);
    assert!(routing["routing"]["canary"].is_null(), "{routing}");

    // MLflow stops: serving goes on.
    mlflow.stop();
    for _ in 0..20 {
        let r = c
            .post(format!("{http}/v2/models/iris/infer"))
            .json(&infer_body())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["model_version"], "2");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = s.metrics_text().await;
    assert!(
        metrics.contains("modelgate_source_errors_total{source=\"mlflow\",kind=\"unreachable\"}"),
        "{metrics}"
    );
    // It comes back: the next change is picked up.
    let mut mlflow = MlflowServer::start(&mlflow_dir, port);
    mlflow.wait_up(&mlflow_dir).await;
    let (v4, _) = register(&c, &base, &onnx, 0.97).await;
    alias(&c, &base, "challenger", v4).await;
    until(
        "version 4 enters as canary (or is promoted)",
        120,
        || async {
            let v = get_json(&c, &format!("{http}/admin/models/iris/traffic")).await?;
            (v["routing"]["canary"]["version"] == v4 || v["routing"]["stable"] == v4).then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 0);
    assert_eq!(
        failed, 0,
        "requests failed while MLflow changed or was down"
    );
    drop(s);
    mlflow.stop();
}

/// MLflow's aliases of `iris`: alias -> version.
async fn aliases(c: &reqwest::Client, base: &str) -> Vec<(String, String)> {
    let m = api(
        c,
        base,
        "GET",
        "registered-models/get",
        json!({"name": "iris"}),
    )
    .await;
    m["registered_model"]["aliases"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|a| {
            (
                a["alias"].as_str().unwrap_or_default().to_string(),
                a["version"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollback_is_written_back_and_deleted_versions_are_retired() {
    let work = tempfile::tempdir().unwrap();
    let mlflow_dir = work.path().join("mlflow");
    std::fs::create_dir_all(&mlflow_dir).unwrap();
    let port = free_port();
    let mut mlflow = MlflowServer::start(&mlflow_dir, port);
    mlflow.wait_up(&mlflow_dir).await;
    let base = mlflow.url.clone();
    let c = reqwest::Client::new();
    let onnx: Vec<u8> = std::fs::read(common::root().join("models/iris/1/model.onnx")).unwrap();
    let (v1, _) = register(&c, &base, &onnx, 0.96).await;
    alias(&c, &base, "champion", v1).await;
    // A rollout that stays at its first step: only the operator decides here.
    let repo: PathBuf = work.path().join("repo");
    std::fs::create_dir_all(repo.join("iris")).unwrap();
    std::fs::write(
        repo.join("iris/config.toml"),
        "version_policy = \"all\"\n[traffic.rollout]\nsteps = [10.0, 100.0]\ninterval_secs = 3600.0\n",
    )
    .unwrap();
    let uri = base.clone();
    let s = common::start_with(&repo, move |cfg| {
        cfg.settle_ms = 100;
        cfg.traffic.controller_tick_ms = 100;
        cfg.sources.mlflow = vec![modelgate::sources::mlflow::MlflowConfig {
            tracking_uri: uri,
            models: vec!["iris".into()],
            poll_secs: 1,
            ..Default::default()
        }];
    })
    .await;
    let http = s.http.clone();
    let traffic = || get_json(&c, format!("{http}/admin/models/iris/traffic"));
    until("stable = 1", 60, || async {
        (traffic().await?["routing"]["stable"] == v1).then_some(())
    })
    .await;
    // Requests keep coming throughout; none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, c, url) = (
            Arc::clone(&stop),
            c.clone(),
            format!("{http}/v2/models/iris/infer"),
        );
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            let deadline = Instant::now() + Duration::from_secs(300);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match c.post(&url).json(&infer_body()).send().await {
                    Ok(r) if r.status().is_success() => ok += 1,
                    _ => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed)
        })
    };

    // Version 2 as challenger becomes the canary; the operator rolls it back.
    let (v2, _) = register(&c, &base, &onnx, 0.90).await;
    alias(&c, &base, "challenger", v2).await;
    until("canary = 2", 60, || async {
        (traffic().await?["routing"]["canary"]["version"] == v2).then_some(())
    })
    .await;
    // MLflow is down when the operator rolls back: the rollback takes effect at once,
    // and the write-back waits.
    mlflow.stop();
    let r = c
        .post(format!(
            "{http}/admin/models/iris/rollback?reason=worse%20on%20fraud%20cases"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    until("the failed write-back reported", 30, || async {
        let text = s.metrics_text().await;
        text.contains("modelgate_source_errors_total{source=\"mlflow\",kind=\"write_back\"}")
            .then_some(())
    })
    .await;
    assert!(traffic().await.unwrap()["routing"]["canary"]["weight"] == 0.0);
    // Back up: the owed write-back is retried. MLflow shows the rollback: no challenger
    // alias, the version tagged with the reason, the champion unchanged.
    let mut mlflow = MlflowServer::start(&mlflow_dir, port);
    mlflow.wait_up(&mlflow_dir).await;
    until("MLflow shows the rollback", 60, || async {
        let a = aliases(&c, &base).await;
        let tag: Value = serde_json::from_str(&version_tag(&c, &base, v2).await?).ok()?;
        (!a.iter().any(|(k, _)| k == "challenger")
            && a.contains(&("champion".into(), "1".into()))
            && tag["state"] == "rolled_back"
            && tag["reason"].as_str()?.contains("worse on fraud cases"))
        .then_some(())
    })
    .await;
    let routing = traffic().await.unwrap();
    assert_eq!(routing["routing"]["stable"], v1, "{routing}");
    assert_eq!(routing["routing"]["rejected"], json!([v2]), "{routing}");

    // Deleted in MLflow: the rolled-back version (in no routing any more) is retired.
    api(
        &c,
        &base,
        "DELETE",
        "model-versions/delete",
        json!({"name": "iris", "version": v2.to_string()}),
    )
    .await;
    until("version 2 retired", 60, || async {
        let gone = !repo.join("iris/2").exists();
        let rows = index(&c, &http).await;
        (gone && !rows.iter().any(|r| r["version"] == "2")).then_some(())
    })
    .await;

    // A live canary deleted in MLflow: taken out of routing first, then retired.
    let (v3, _) = register(&c, &base, &onnx, 0.97).await;
    alias(&c, &base, "challenger", v3).await;
    until("canary = 3", 60, || async {
        (traffic().await?["routing"]["canary"]["version"] == v3).then_some(())
    })
    .await;
    api(
        &c,
        &base,
        "DELETE",
        "model-versions/delete",
        json!({"name": "iris", "version": v3.to_string()}),
    )
    .await;
    until("version 3 out of routing and retired", 60, || async {
        let t = traffic().await?;
        (t["routing"]["canary"].is_null()
            && t["routing"]["stable"] == v1
            && !repo.join("iris/3").exists())
        .then_some(())
    })
    .await;
    // Only version 1 answers now.
    for _ in 0..20 {
        let v: Value = c
            .post(format!("{http}/v2/models/iris/infer"))
            .json(&infer_body())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["model_version"], "1", "{v}");
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 0);
    assert_eq!(
        failed, 0,
        "requests failed while versions were rolled back or retired"
    );
    let audit: Value = c
        .get(format!("{http}/admin/audit?model=iris"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == "mlflow"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("version 3 was deleted in MLflow"))),
        "{audit}"
    );
    drop(s);
    mlflow.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_that_stalls_halfway_is_never_served_and_is_retried() {
    let work = tempfile::tempdir().unwrap();
    let mlflow_dir = work.path().join("mlflow");
    std::fs::create_dir_all(&mlflow_dir).unwrap();
    let mut mlflow = MlflowServer::start(&mlflow_dir, free_port());
    mlflow.wait_up(&mlflow_dir).await;
    let base = mlflow.url.clone();
    let c = reqwest::Client::new();
    let onnx: Vec<u8> = std::fs::read(common::root().join("models/iris/1/model.onnx")).unwrap();
    let (v1, _) = register(&c, &base, &onnx, 0.96).await;
    alias(&c, &base, "champion", v1).await;
    let repo: PathBuf = work.path().join("repo");
    std::fs::create_dir_all(repo.join("iris")).unwrap();
    let uri = base.clone();
    let s = common::start_with(&repo, move |cfg| {
        cfg.settle_ms = 100;
        cfg.sources.mlflow = vec![modelgate::sources::mlflow::MlflowConfig {
            tracking_uri: uri,
            models: vec!["iris".into()],
            poll_secs: 1,
            timeout_secs: 2,
            ..Default::default()
        }];
    })
    .await;
    let http = s.http.clone();
    until("version 1 serves", 60, || {
        get_json(&c, format!("{http}/v2/models/iris/versions/1"))
    })
    .await;
    // A 128 MiB artifact (not a model: what matters is its bytes arriving whole).
    let big: Vec<u8> = (0..128u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (v2, _) = register(&c, &base, &big, 0.5).await;
    alias(&c, &base, "challenger", v2).await;
    // Freeze MLflow once part of the file is in the staging folder.
    let partial = || {
        std::fs::read_dir(repo.join("iris"))
            .ok()?
            .flatten()
            .find_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let f = e.path().join("model.onnx");
                let len = std::fs::metadata(&f).ok()?.len();
                (name.starts_with(&format!(".mlflow-{v2}-")) && len > 0 && len < big.len() as u64)
                    .then_some(len)
            })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        if let Some(n) = partial() {
            mlflow.signal("-STOP");
            break n;
        }
        assert!(
            !repo.join(format!("iris/{v2}")).exists(),
            "the download finished before it could be stalled"
        );
        assert!(Instant::now() < deadline, "no download of version 2 began");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert!(got < big.len() as u64);
    // Stalled: the read times out (timeout_secs), the half file is dropped, and no
    // version 2 ever appears; version 1 answers throughout.
    let until_clean = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            !repo.join(format!("iris/{v2}")).exists(),
            "a partial download was published"
        );
        let r = c
            .post(format!("{http}/v2/models/iris/infer"))
            .json(&infer_body())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let staged = std::fs::read_dir(repo.join("iris"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".mlflow-"));
        if !staged {
            break;
        }
        assert!(Instant::now() < until_clean, "the staging folder stayed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = s.metrics_text().await;
    assert!(
        text.contains("modelgate_source_errors_total{source=\"mlflow\",kind=\"download\"}"),
        "{text}"
    );
    // Thawed: the next poll downloads it whole (checksum beside it); it is no model, so it
    // is reported and never serves.
    mlflow.signal("-CONT");
    let v2s = v2.to_string();
    let row = until("version 2 published whole and reported", 120, || async {
        let rows = index(&c, &http).await;
        rows.into_iter()
            .find(|r| r["version"] == v2s.as_str() && r["state"] == "UNAVAILABLE")
    })
    .await;
    assert!(!row["reason"].as_str().unwrap().is_empty(), "{row}");
    let file = repo.join(format!("iris/{v2}/model.onnx"));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), big.len() as u64);
    assert!(repo.join(format!("iris/{v2}/model.onnx.sha256")).is_file());
    let v: Value = c
        .post(format!("{http}/v2/models/iris/infer"))
        .json(&infer_body())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["model_version"], "1", "{v}");
    drop(s);
    mlflow.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_stop_the_start_and_fail_validate() {
    const PASSWORD: &str = "Adm1n-password-2026";
    let work = tempfile::tempdir().unwrap();
    let mlflow_dir = work.path().join("mlflow");
    std::fs::create_dir_all(&mlflow_dir).unwrap();
    let mut mlflow = MlflowServer::start_with(&mlflow_dir, free_port(), Some(PASSWORD));
    mlflow.wait_up(&mlflow_dir).await;
    let base = mlflow.url.clone();
    // The test itself registers as the admin.
    let mut headers = reqwest::header::HeaderMap::new();
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("admin:{PASSWORD}"));
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Basic {basic}").parse().unwrap(),
    );
    let admin = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    let onnx: Vec<u8> = std::fs::read(common::root().join("models/iris/1/model.onnx")).unwrap();
    let (v1, run1) = register(&admin, &base, &onnx, 0.96).await;
    alias(&admin, &base, "champion", v1).await;
    let repo: PathBuf = work.path().join("repo");
    std::fs::create_dir_all(repo.join("iris")).unwrap();
    let source = |password: Option<&str>| modelgate::sources::mlflow::MlflowConfig {
        tracking_uri: base.clone(),
        models: vec!["iris".into()],
        poll_secs: 1,
        username: password.map(|_| "admin".into()),
        password: password.map(str::to_string),
        ..Default::default()
    };
    for wrong in [Some("not-the-password"), None] {
        // At start: a clear error, and nothing serves.
        let config = modelgate::config::Config {
            model_repository: repo.clone(),
            host: "127.0.0.1".into(),
            http_port: 0,
            grpc_port: 0,
            metrics_port: 0,
            sources: modelgate::sources::SourcesConfig {
                mlflow: vec![source(wrong)],
            },
            ..Default::default()
        };
        let listeners = modelgate::Listeners::bind(&config).await.unwrap();
        let e = match modelgate::Server::start(
            listeners,
            config,
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        {
            Ok(_) => panic!("started with refused credentials ({wrong:?})"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("refused the credentials") && e.contains("HTTP 401"),
            "{e}"
        );
        // And `--validate` fails saying so.
        let cfg = work.path().join("modelgate.toml");
        let creds = match wrong {
            Some(pw) => format!("username = \"admin\"\npassword = \"{pw}\"\n"),
            None => String::new(),
        };
        std::fs::write(
            &cfg,
            format!(
                "model_repository = \"{}\"\n[[sources.mlflow]]\ntracking_uri = \"{base}\"\nmodels = [\"iris\"]\n{creds}",
                repo.display()
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
            .args(["serve", "--validate", "--config"])
            .arg(&cfg)
            .env_remove("MLFLOW_TRACKING_TOKEN")
            .env_remove("MLFLOW_TRACKING_USERNAME")
            .env_remove("MLFLOW_TRACKING_PASSWORD")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(
            text.lines()
                .any(|l| l.contains("FAIL") && l.contains("refused the credentials")),
            "{text}"
        );
    }
    // The right ones: version 1 serves, with its lineage.
    let uri_source = source(Some(PASSWORD));
    let s = common::start_with(&repo, move |cfg| {
        cfg.settle_ms = 100;
        cfg.sources.mlflow = vec![uri_source];
    })
    .await;
    let c = reqwest::Client::new();
    let md = until("version 1 metadata", 60, || {
        get_json(&c, format!("{}/v2/models/iris/versions/1", s.http))
    })
    .await;
    assert_eq!(
        md["parameters"]["lineage.source_run"],
        run1.as_str(),
        "{md}"
    );
    drop(s);
    mlflow.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_mlflow_does_not_stop_the_start() {
    // Nothing listens on this port: the server starts, serves its repository, reports.
    let repo = common::test_repo();
    let port = free_port();
    let s = common::start_with(repo.path(), move |cfg| {
        cfg.sources.mlflow = vec![modelgate::sources::mlflow::MlflowConfig {
            tracking_uri: format!("http://127.0.0.1:{port}"),
            models: vec!["iris".into()],
            poll_secs: 1,
            ..Default::default()
        }];
    })
    .await;
    let c = reqwest::Client::new();
    let r = c
        .post(format!("{}/v2/models/iris/infer", s.http))
        .json(&infer_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// `model_filter` instead of names: the registered models MLflow's search finds are
/// served under their names (one registered after the gateway started included), the
/// others are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_filter_serves_what_it_finds() {
    let work = tempfile::tempdir().unwrap();
    let mlflow_dir = work.path().join("mlflow");
    std::fs::create_dir_all(&mlflow_dir).unwrap();
    let port = free_port();
    let mlflow = MlflowServer::start(&mlflow_dir, port);
    mlflow.wait_up(&mlflow_dir).await;
    let base = mlflow.url.clone();
    let c = reqwest::Client::new();
    let onnx: Vec<u8> = std::fs::read(common::root().join("models/iris/1/model.onnx")).unwrap();
    for name in ["fraud-eu", "churn"] {
        let (v, _) = register_as(&c, &base, name, &onnx, 0.9).await;
        alias_of(&c, &base, name, "champion", v).await;
    }
    let repo: PathBuf = work.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let uri = base.clone();
    let s = common::start_with(&repo, move |cfg| {
        cfg.settle_ms = 100;
        cfg.sources.mlflow = vec![modelgate::sources::mlflow::MlflowConfig {
            tracking_uri: uri,
            model_filter: Some("name LIKE 'fraud-%'".into()),
            poll_secs: 1,
            ..Default::default()
        }];
    })
    .await;
    let http = s.http.clone();
    let ready = |m: &'static str| {
        let (c, http) = (c.clone(), http.clone());
        async move {
            c.get(format!("{http}/v2/models/{m}/ready"))
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 200)
                .map(drop)
        }
    };
    until("fraud-eu ready", 60, || ready("fraud-eu")).await;
    // A model registered later that the filter matches is picked up at a next poll.
    let (v, _) = register_as(&c, &base, "fraud-us", &onnx, 0.9).await;
    alias_of(&c, &base, "fraud-us", "champion", v).await;
    until("fraud-us ready", 60, || ready("fraud-us")).await;
    let r = c
        .post(format!("{http}/v2/models/fraud-us/infer"))
        .json(&infer_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The one it does not match is not served (nor in the repository).
    assert_eq!(
        c.get(format!("{http}/v2/models/churn/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert!(!repo.join("churn").exists());
    // Neither names nor a filter: a clear configuration error.
    let e = modelgate::sources::mlflow::MlflowConfig {
        tracking_uri: base.clone(),
        ..Default::default()
    }
    .validate(0)
    .unwrap_err()
    .to_string();
    assert!(e.contains("model_filter"), "{e}");
}

//! The real `modelgate` binary: start-up errors (missing or wrong ONNX Runtime library,
//! bad config), `serve --validate`, and a real serve that stops cleanly on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_modelgate"));
    c.env_remove("ORT_DYLIB_PATH").env("RUST_LOG", "warn");
    c
}

fn run(c: &mut Command) -> (i32, String, String) {
    let out = c.output().expect("run modelgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_onnxruntime_library_is_a_one_line_error() {
    let models = root().join("models");
    for args in [
        vec![
            "serve",
            "--validate",
            "--onnxruntime-lib",
            "/nonexistent/libonnxruntime.so",
        ],
        vec![
            "serve",
            "--onnxruntime-lib",
            "/nonexistent/libonnxruntime.so",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
        ],
    ] {
        let (code, _, err) = run(bin().args(&args).arg("--model-repository").arg(&models));
        assert_eq!(code, 1, "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains("fetch-onnxruntime.sh") && err.contains("ORT_DYLIB_PATH"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // The same through the environment variable.
    let (code, _, err) = run(bin()
        .args(["serve", "--validate", "--model-repository"])
        .arg(&models)
        .env("ORT_DYLIB_PATH", "/nonexistent/lib.so"));
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/lib.so"), "{err}");
}

#[test]
fn wrong_library_file_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libonnxruntime.so");
    std::fs::write(&fake, b"this is not a shared library").unwrap();
    let (code, _, err) = run(bin()
        .args(["serve", "--validate", "--model-repository"])
        .arg(root().join("models"))
        .arg("--onnxruntime-lib")
        .arg(&fake));
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot load ONNX Runtime") && err.contains("onnxruntime==1.31.1"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn validate_accepts_the_bundled_repository() {
    let (code, out, err) = run(bin()
        .args(["serve", "--validate", "--model-repository"])
        .arg(root().join("models")));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok   iris version 1"), "{out}");
    assert!(out.contains("ok   iris version 2"), "{out}");
    assert!(
        out.contains("ok   mlp version 1: inputs input FP32 [-1, 16]"),
        "{out}"
    );
    assert!(out.contains("config and repository are valid"), "{out}");
}

#[test]
fn validate_reports_broken_models() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(root().join("models/iris"), dir.path().join("iris")).unwrap();
    std::fs::create_dir_all(dir.path().join("broken/1")).unwrap();
    std::fs::write(dir.path().join("broken/1/model.onnx"), b"\x08\x07garbage").unwrap();
    std::fs::create_dir_all(dir.path().join("halfcopied/3")).unwrap();
    std::fs::create_dir_all(dir.path().join("badconfig/1")).unwrap();
    std::fs::copy(
        root().join("models/mlp/1/model.onnx"),
        dir.path().join("badconfig/1/model.onnx"),
    )
    .unwrap();
    std::fs::write(dir.path().join("badconfig/config.toml"), "instancez = 2\n").unwrap();
    let (code, out, err) = run(bin()
        .args(["serve", "--validate", "--model-repository"])
        .arg(dir.path()));
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("ok   iris version 1"), "{out}");
    assert!(out.contains("FAIL model 'broken' version 1"), "{out}");
    assert!(
        out.contains("FAIL model 'halfcopied' version 3") && out.contains("model.onnx is missing"),
        "{out}"
    );
    assert!(
        out.contains("FAIL model 'badconfig'") && out.contains("instancez"),
        "{out}"
    );
    assert!(err.contains("3 problem(s) found"), "{err}");
}

#[test]
fn config_file_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("modelgate.toml");
    std::fs::write(&cfg, "http_prot = 9000\n").unwrap();
    let (code, _, err) = run(bin().args(["serve", "--validate", "--config"]).arg(&cfg));
    assert_eq!(code, 1);
    assert!(err.contains("http_prot"), "{err}");
    std::fs::write(&cfg, "[model_defaults]\nmax_queue_size = 0\n").unwrap();
    let (code, _, err) = run(bin()
        .args(["serve", "--validate", "--model-repository"])
        .arg(root().join("models"))
        .arg("--config")
        .arg(&cfg));
    assert_eq!(code, 1);
    assert!(err.contains("model_defaults.max_queue_size"), "{err}");
    let (code, _, err) = run(bin().args([
        "serve",
        "--validate",
        "--model-repository",
        "/nonexistent/repo",
    ]));
    assert_eq!(code, 1);
    assert!(err.contains("model_repository"), "{err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn serves_and_stops_cleanly_on_sigterm() {
    let (h, g, m) = (free_port(), free_port(), free_port());
    let mut child = bin()
        .current_dir(root())
        .args(["serve", "--host", "127.0.0.1"])
        .args([
            "--http-port",
            &h.to_string(),
            "--grpc-port",
            &g.to_string(),
            "--metrics-port",
            &m.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The default repository is ./models: run from the checkout, as the README does.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = rt.block_on(async {
        while Instant::now() < deadline {
            if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{h}/v2/health/ready")).await
                && r.status() == 200
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    assert!(ready, "server did not become ready");
    let body = serde_json::json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]});
    let st = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("http://127.0.0.1:{h}/v2/models/iris/infer"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(st, 200);
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn json_logs_carry_the_request_id() {
    let repo = test_repo();
    let (h, g, m) = (free_port(), free_port(), free_port());
    let child = bin()
        .current_dir(root())
        .args([
            "--log-format",
            "json",
            "serve",
            "--host",
            "127.0.0.1",
            "--model-repository",
        ])
        .arg(repo.path())
        .args(["--http-port", &h.to_string(), "--grpc-port", &g.to_string()])
        .args(["--metrics-port", &m.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    rt.block_on(async {
        while reqwest::get(format!("http://127.0.0.1:{h}/v2/health/ready"))
            .await
            .map_or(true, |r| r.status() != 200)
        {
            assert!(Instant::now() < deadline, "server did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The reshape fixture fails inside ONNX Runtime for 3 rows: a 500, logged.
        let body = serde_json::json!({"id": "req-42", "inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": vec![1.0f32; 12]}]});
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{h}/v2/models/reshape/infer"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 500);
    });
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let failed = lines
        .iter()
        .find(|l| l["fields"]["message"] == "inference request failed")
        .unwrap_or_else(|| panic!("no failure logged in {stderr}"));
    assert_eq!(failed["fields"]["request_id"], "req-42");
    assert_eq!(failed["fields"]["model"], "reshape");
    assert_eq!(failed["level"], "WARN");
}

#[test]
fn truncated_library_is_a_one_line_error_not_a_bus_error() {
    let lib = root().join(".onnxruntime/libonnxruntime.so.1.31.1");
    let bytes = std::fs::read(&lib).expect("the library from scripts/fetch-onnxruntime.sh");
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("libonnxruntime.so");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let (code, _, err) = run(bin()
        .args(["serve", "--validate", "--model-repository"])
        .arg(root().join("models"))
        .arg("--onnxruntime-lib")
        .arg(&cut));
    assert_eq!(code, 1, "exit code (135 would be SIGBUS): {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn text_logs_are_plain_and_name_every_request_at_debug_level() {
    let repo = copied_repo();
    let (h, g, m) = (free_port(), free_port(), free_port());
    let child = bin()
        .env("RUST_LOG", "info,modelgate=debug")
        .args(["serve", "--host", "127.0.0.1", "--model-repository"])
        .arg(repo.path())
        .args(["--http-port", &h.to_string(), "--grpc-port", &g.to_string()])
        .args(["--metrics-port", &m.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    rt.block_on(async {
        while reqwest::get(format!("http://127.0.0.1:{h}/v2/health/ready"))
            .await
            .map_or(true, |r| r.status() != 200)
        {
            assert!(Instant::now() < deadline, "server did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let c = reqwest::Client::new();
        let post = |model: &str, body: String| {
            c.post(format!("http://127.0.0.1:{h}/v2/models/{model}/infer"))
                .body(body)
                .send()
        };
        let good = r#"{"inputs":[{"name":"X","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}"#;
        assert_eq!(post("iris", good.into()).await.unwrap().status(), 200);
        assert_eq!(post("iris", "{".into()).await.unwrap().status(), 400);
        let wrong = r#"{"id":"req-7","inputs":[{"name":"X","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}"#;
        assert_eq!(post("iris", wrong.into()).await.unwrap().status(), 400);
        assert_eq!(post("nosuch", good.into()).await.unwrap().status(), 404);
        // Removing a version folder used to log notify's WatchNotFound warning.
        std::fs::remove_dir_all(repo.path().join("iris/1")).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a pipe: {stderr}"
    );
    assert!(!stderr.contains("WatchNotFound"), "{stderr}");
    let lines = |what: &str| stderr.lines().filter(|l| l.contains(what)).count();
    assert_eq!(lines("inference request served"), 1, "{stderr}");
    assert_eq!(lines("inference request refused"), 3, "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("served") && l.contains("request_id=gen-")),
        "{stderr}"
    );
    assert!(stderr.contains("request_id=req-7"), "{stderr}");
}

/// A repository with mlp, and model files where none is looked for.
fn repo_with_misplaced_models() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::os::unix::fs::symlink(root().join("models/mlp"), p.join("mlp")).unwrap();
    let model = root().join("models/mlp/1/model.onnx");
    for f in ["flat/model.onnx", "m/v1/model.onnx"] {
        std::fs::create_dir_all(p.join(f).parent().unwrap()).unwrap();
        std::fs::copy(&model, p.join(f)).unwrap();
    }
    dir
}

#[test]
fn validate_warns_about_misplaced_models() {
    let repo = repo_with_misplaced_models();
    let (code, out, err) = run(bin()
        .args(["serve", "--validate", "--model-repository"])
        .arg(repo.path()));
    // Warnings, not failures: the rest of the repository is valid.
    assert_eq!(code, 0, "{out}{err}");
    let warns: Vec<&str> = out.lines().filter(|l| l.starts_with("WARN ")).collect();
    assert_eq!(warns.len(), 2, "{out}");
    assert!(
        warns[0].contains("flat/model.onnx") && warns[0].contains("move it to flat/1/model.onnx"),
        "{out}"
    );
    assert!(
        warns[1].contains("m/v1") && warns[1].contains("'v1' is not a version folder name"),
        "{out}"
    );
    assert!(out.contains("ok   mlp version 1"), "{out}");
    assert!(out.contains("config and repository are valid"), "{out}");
    // And in the log.
    assert!(err.contains("move it to flat/1/model.onnx"), "{err}");
}

#[test]
fn problems_are_logged_once_while_serving() {
    let repo = repo_with_misplaced_models();
    let typo = repo.path().join("typo/1");
    std::fs::create_dir_all(&typo).unwrap();
    std::fs::copy(
        root().join("models/mlp/1/model.onnx"),
        typo.join("model.onnx"),
    )
    .unwrap();
    std::fs::write(
        repo.path().join("typo/config.toml"),
        "max_batch_sise = 32\n",
    )
    .unwrap();
    let (h, g, m) = (free_port(), free_port(), free_port());
    let child = bin()
        .args(["--log-format", "json", "serve", "--host", "127.0.0.1"])
        .arg("--model-repository")
        .arg(repo.path())
        .args(["--http-port", &h.to_string(), "--grpc-port", &g.to_string()])
        .args([
            "--metrics-port",
            &m.to_string(),
            "--repository-poll-secs",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    rt.block_on(async {
        // Ready: mlp serves; typo never did.
        while reqwest::get(format!("http://127.0.0.1:{h}/v2/health/ready"))
            .await
            .map_or(true, |r| r.status() != 200)
        {
            assert!(Instant::now() < deadline, "server did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Several periodic rescans, and a change event.
        tokio::time::sleep(Duration::from_secs(3)).await;
        std::fs::write(repo.path().join("notes.txt"), "a change").unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let count = |f: &dyn Fn(&serde_json::Value) -> bool| lines.iter().filter(|l| f(l)).count();
    let config = count(&|l| {
        l["fields"]["model"] == "typo"
            && l["fields"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("max_batch_sise"))
    });
    assert_eq!(config, 1, "{stderr}");
    for path in ["flat/model.onnx", "m/v1"] {
        let n = count(&|l| {
            l["level"] == "WARN"
                && l["fields"]["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with(path))
        });
        assert_eq!(n, 1, "{path}: {stderr}");
    }
}

//! Shared test harness: a real modelgate server in-process on 127.0.0.1 ephemeral ports,
//! real ONNX Runtime, and the models from models/ plus tests/fixtures/repo.
//!
//! Every test of the binary runs in this one process, so what a process has once, its
//! tests share:
//! - the metrics recorder. A test that reads a model's series serves that model under a
//!   name no other test uses ([`named_repo`]). A test whose assertions are about the
//!   whole process (series without a model label, promtool over all of /metrics, the
//!   RSS) runs the real binary in a process of its own ([`spawn_with`]).
//! - the CPU. Tests that keep it busy for long, or whose verdicts need it to spare,
//!   take turns ([`cpu_heavy`]).
#![allow(dead_code)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use modelgate::config::Config;
use tokio_util::sync::CancellationToken;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A temporary repository holding (symlinks to) the bundled models and the fixtures.
pub fn test_repo() -> tempfile::TempDir {
    named_repo(&[
        ("iris", "models/iris"),
        ("mlp", "models/mlp"),
        ("types", "tests/fixtures/repo/types"),
        ("typed", "tests/fixtures/repo/typed"),
        ("reshape", "tests/fixtures/repo/reshape"),
    ])
}

/// A temporary repository of symlinks: each `(name, folder)` serves the model folder
/// `folder` (relative to the checkout) as model `name`. A test that reads a model's
/// metric series names the model so that no other test of the process serves it.
pub fn named_repo(models: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, folder) in models {
        std::os::unix::fs::symlink(root().join(folder), dir.path().join(name)).expect("symlink");
    }
    dir
}

/// A temporary repository holding copies of the bundled models, for tests that write
/// into the repository (routing.toml, audit log): never into the source tree.
pub fn copied_repo() -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                copy(&p, &to.join(e.file_name()));
            } else {
                std::fs::copy(&p, to.join(e.file_name())).expect("copy");
            }
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for m in ["iris", "mlp"] {
        copy(&root().join("models").join(m), &dir.path().join(m));
    }
    dir
}

pub struct TestServer {
    pub http: String,
    pub grpc: String,
    pub metrics: String,
    pub token: CancellationToken,
    pub server: Option<modelgate::Server>,
    _repo: Option<tempfile::TempDir>,
}

impl TestServer {
    /// The Prometheus text the metrics endpoint serves now.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(&self.metrics)
            .await
            .expect("metrics endpoint")
            .text()
            .await
            .expect("metrics body")
    }

    /// `POST /v2/repository/index` (with `token` as bearer, when given): must answer 200.
    pub async fn repository_index(&self, token: Option<&str>) -> serde_json::Value {
        let mut r = reqwest::Client::new().post(format!("{}/v2/repository/index", self.http));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await.expect("repository index request");
        assert_eq!(resp.status(), 200, "repository index");
        resp.json().await.expect("repository index body")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// The config of a test server: `repo`, 127.0.0.1, ports the kernel picks, then `tweak`.
fn test_config(repo: &Path, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut config = Config {
        model_repository: repo.to_path_buf(),
        host: "127.0.0.1".into(),
        http_port: 0,
        grpc_port: 0,
        metrics_port: 0,
        ..Config::default()
    };
    config.model_defaults.instances = 2;
    tweak(&mut config);
    config
}

pub async fn start_with(repo: &Path, tweak: impl FnOnce(&mut Config)) -> TestServer {
    let config = test_config(repo, tweak);
    let listeners = modelgate::Listeners::bind(&config).await.expect("bind");
    let token = CancellationToken::new();
    let server = modelgate::Server::start(listeners, config, token.clone())
        .await
        .expect("server starts");
    TestServer {
        http: format!("http://{}", server.http_addr),
        grpc: format!("http://{}", server.grpc_addr),
        metrics: format!("http://{}/metrics", server.metrics_addr),
        token,
        server: Some(server),
        _repo: None,
    }
}

/// A server on the standard test repository.
pub async fn start() -> TestServer {
    start_tweaked(|_| {}).await
}

pub async fn start_tweaked(tweak: impl FnOnce(&mut Config)) -> TestServer {
    let repo = test_repo();
    let mut s = start_with(repo.path(), tweak).await;
    s._repo = Some(repo);
    s
}

/// The real binary serving in a process of its own: for tests whose assertions are about
/// a whole process (every series of /metrics, counters without a model label, the RSS),
/// which a server in this process shares with every other test. Killed on drop.
pub struct Spawned {
    pub http: String,
    pub grpc: String,
    pub metrics: String,
    /// The replica name it logs and puts in audit entries.
    pub replica: String,
    pub child: Child,
    _config: tempfile::TempDir,
    _repo: Option<tempfile::TempDir>,
}

impl Spawned {
    /// The Prometheus text the metrics endpoint serves now.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(&self.metrics)
            .await
            .expect("metrics endpoint")
            .text()
            .await
            .expect("metrics body")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// [`start_with`] in a process of its own: `modelgate serve` with the same config
/// (written to a file); the ports the kernel picked are read from its JSON log.
pub async fn spawn_with(repo: &Path, tweak: impl FnOnce(&mut Config)) -> Spawned {
    let config = test_config(repo, tweak);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("modelgate.toml");
    std::fs::write(&file, toml::to_string(&config).expect("config as TOML")).expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&file)
        // The line naming the addresses is at info.
        .env("RUST_LOG", "info,ort=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn modelgate");
    let stderr = child.stderr.take().expect("piped stderr");
    let mut spawned = Spawned {
        http: String::new(),
        grpc: String::new(),
        metrics: String::new(),
        replica: String::new(),
        child,
        _config: dir,
        _repo: None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<Result<[String; 4], String>>();
    // Reads the log up to the line with the addresses, then drains it: a full pipe
    // would block the server.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        let mut before = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.is_none() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let f = &v["fields"];
            if f["message"] == "modelgate serving" {
                let addr = |k: &str| f[k].as_str().unwrap_or_default().to_string();
                let addrs = [
                    addr("http_addr"),
                    addr("grpc_addr"),
                    addr("metrics_addr"),
                    addr("replica"),
                ];
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Ok(addrs));
                }
            } else {
                before.push_str(&line);
                before.push('\n');
            }
        }
        if let Some(tx) = tx {
            let _ = tx.send(Err(before));
        }
    });
    let [http, grpc, metrics, replica] = tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .expect("modelgate serving within 60 s")
        .expect("the log reader answers")
        .unwrap_or_else(|log| panic!("modelgate exited before serving:\n{log}"));
    spawned.http = format!("http://{http}");
    spawned.grpc = format!("http://{grpc}");
    spawned.metrics = format!("http://{metrics}/metrics");
    spawned.replica = replica;
    spawned
}

/// [`spawn_with`] on the standard test repository.
pub async fn spawn() -> Spawned {
    let repo = test_repo();
    let mut s = spawn_with(repo.path(), |_| {}).await;
    s._repo = Some(repo);
    s
}

/// Taken by the tests that keep the CPU busy for long on purpose (a busy process, or
/// clients sending as fast as they are answered for thousands of requests) and by
/// those whose verdicts need CPU to spare (shadows on idle-priority workers, latencies
/// compared between versions): one of them at a time in the process. Beside each
/// other, one's numbers would be the other's load.
pub async fn cpu_heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static CPU: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    CPU.lock().await
}

pub fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

pub fn i64s(data: &[u8]) -> Vec<i64> {
    data.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// Deterministic pseudo-random floats in [-2, 2) (no external RNG needed).
pub fn rand_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// Reference outputs: the same model run directly through ONNX Runtime in this process.
pub fn reference(
    model_path: &Path,
    inputs: &[modelgate::tensor::Tensor],
) -> Vec<modelgate::tensor::Tensor> {
    let env = modelgate::runtime::init(None).expect("ort");
    let mut session = modelgate::runtime::create_session(env, model_path, 1).expect("session");
    let (_, outputs) = modelgate::runtime::interface(&session).expect("interface");
    modelgate::runtime::run(&mut session, inputs, &outputs).expect("run")
}

pub fn fp32_tensor(name: &str, shape: &[usize], data: &[f32]) -> modelgate::tensor::Tensor {
    modelgate::tensor::Tensor {
        name: name.into(),
        dtype: modelgate::tensor::DataType::Fp32,
        shape: shape.to_vec(),
        data: bytes::Bytes::from(f32_bytes(data)),
    }
}

pub fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 + 1e-5 * w.abs(),
            "element {i}: got {g}, want {w}"
        );
    }
}

/// A tiny tmpfs mounted for one test (root only, as CI runs), unmounted on drop.
pub struct Tmpfs(pub std::path::PathBuf);

impl Tmpfs {
    pub fn mount(kib: u32) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap().keep();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs needs root (CI runs as root)");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Fills a filesystem: writes until ENOSPC; returns the filler to delete later.
pub fn fill(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

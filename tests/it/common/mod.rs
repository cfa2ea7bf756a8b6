//! Shared test harness: a real modelgate server in-process on 127.0.0.1 ephemeral ports,
//! real ONNX Runtime, and the models from models/ plus tests/fixtures/repo.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use modelgate::config::Config;
use tokio_util::sync::CancellationToken;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A temporary repository holding (symlinks to) the bundled models and the fixtures.
pub fn test_repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, src) in [
        ("iris", root().join("models/iris")),
        ("mlp", root().join("models/mlp")),
        ("types", root().join("tests/fixtures/repo/types")),
        ("typed", root().join("tests/fixtures/repo/typed")),
        ("reshape", root().join("tests/fixtures/repo/reshape")),
    ] {
        std::os::unix::fs::symlink(src, dir.path().join(name)).expect("symlink");
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
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

pub async fn start_with(repo: &Path, tweak: impl FnOnce(&mut Config)) -> TestServer {
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

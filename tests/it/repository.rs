//! A repository with broken parts: corrupt model files, half-copied versions and bad
//! configs are reported, and everything else serves.

use crate::common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_versions_are_reported_and_the_rest_serves() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::os::unix::fs::symlink(root().join("models/mlp"), p.join("mlp")).unwrap();
    // iris: version 1 good, version 2 corrupt (truncated copy), version 3 half-copied (no file yet).
    std::fs::create_dir_all(p.join("iris/1")).unwrap();
    std::fs::copy(
        root().join("models/iris/1/model.onnx"),
        p.join("iris/1/model.onnx"),
    )
    .unwrap();
    let full = std::fs::read(root().join("models/iris/2/model.onnx")).unwrap();
    std::fs::create_dir_all(p.join("iris/2")).unwrap();
    std::fs::write(p.join("iris/2/model.onnx"), &full[..full.len() / 2]).unwrap();
    std::fs::create_dir_all(p.join("iris/3")).unwrap();
    std::fs::write(p.join("iris/config.toml"), "version_policy = \"all\"\n").unwrap();
    // A folder being written under a temporary name is not a version at all.
    std::fs::create_dir_all(p.join("iris/4.tmp")).unwrap();
    // A model whose every version is garbage (its load failures are counted below, under
    // a name no other test of the process uses).
    std::fs::create_dir_all(p.join("garbage_only/1")).unwrap();
    std::fs::write(p.join("garbage_only/1/model.onnx"), b"not onnx").unwrap();

    let s = start_with(p, |_| {}).await;
    let client = reqwest::Client::new();
    // iris serves from version 1, the only good one, and says so.
    let body = json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]});
    let r = client
        .post(format!("{}/v2/models/iris/infer", s.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["model_version"], "1");
    let (st, v) = {
        let r = reqwest::get(format!("{}/v2/models/iris", s.http))
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.json::<serde_json::Value>().await.unwrap(),
        )
    };
    assert_eq!(st, 200);
    assert_eq!(v["versions"], json!(["1"]));
    // The broken versions answer 503 with the reason.
    for (version, needle) in [
        ("2", "version 2 is not ready"),
        ("3", "model.onnx is missing"),
    ] {
        let r = client
            .post(format!(
                "{}/v2/models/iris/versions/{version}/infer",
                s.http
            ))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "version {version}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains(needle), "{v}");
    }
    let r = client
        .post(format!("{}/v2/models/garbage_only/infer", s.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("has no ready version"),
        "{v}"
    );
    // One model never became ready: it is reported (above, and below in the metrics)
    // and does not make the server unready (tests/it/readiness.rs has the rules).
    assert_eq!(
        reqwest::get(format!("{}/v2/health/ready", s.http))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(format!("{}/v2/health/live", s.http))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(format!("{}/v2/models/mlp/ready", s.http))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(format!("{}/v2/models/garbage_only/ready", s.http))
            .await
            .unwrap()
            .status(),
        503
    );
    // Load failures are counted.
    let text = s.metrics_text().await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("modelgate_model_load_failures_total{model=\"garbage_only\"}")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_turns_readiness_off_and_drains() {
    let s = start().await;
    let url = format!("{}/v2/health/ready", s.http);
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 200);
    let mut s = s;
    let server = s.server.take().unwrap();
    assert!(server.state.is_ready());
    s.token.cancel();
    assert!(!server.state.is_ready());
    tokio::time::timeout(std::time::Duration::from_secs(20), server.wait())
        .await
        .expect("shutdown completes");
    assert!(
        reqwest::get(&url).await.is_err(),
        "listener closed after shutdown"
    );
}

/// A model folder holding copies of mlp as `versions`, with this config.toml.
fn mlp_model(dir: &std::path::Path, name: &str, versions: &[u64], config: &str) {
    for v in versions {
        let d = dir.join(name).join(v.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(root().join("models/mlp/1/model.onnx"), d.join("model.onnx")).unwrap();
    }
    std::fs::write(dir.join(name).join("config.toml"), config).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_policies_unloaded_versions_and_the_stable_version_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    // Names of their own: metric series are shared by every server of this test binary.
    std::os::unix::fs::symlink(root().join("models/iris"), p.join("pol-all")).unwrap();
    mlp_model(p, "pol-latest", &[1, 2], "");
    mlp_model(
        p,
        "pol-latest2",
        &[1, 2, 3],
        "version_policy = { latest = 2 }\n",
    );
    mlp_model(
        p,
        "pol-specific",
        &[1, 2, 3],
        "version_policy = { specific = [1, 3] }\n",
    );
    let s = start_with(p, |_| {}).await;
    let mut grpc =
        modelgate::proto::grpc_inference_service_client::GrpcInferenceServiceClient::connect(
            s.grpc.clone(),
        )
        .await
        .unwrap();
    for (model, want) in [
        ("pol-all", json!({"all": {}})),
        ("pol-latest", json!({"latest": {"num_versions": 1}})),
        ("pol-latest2", json!({"latest": {"num_versions": 2}})),
        ("pol-specific", json!({"specific": {"versions": [1, 3]}})),
    ] {
        let c: serde_json::Value = reqwest::get(format!("{}/v2/models/{model}/config", s.http))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(c["version_policy"], want, "{model}: {c}");
        let c = grpc
            .model_config(modelgate::proto::ModelConfigRequest {
                name: model.into(),
                version: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .config
            .unwrap();
        use modelgate::proto::model_version_policy::PolicyChoice;
        let got = match c.version_policy.unwrap().policy_choice.unwrap() {
            PolicyChoice::All(_) => json!({"all": {}}),
            PolicyChoice::Latest(l) => json!({"latest": {"num_versions": l.num_versions}}),
            PolicyChoice::Specific(v) => json!({"specific": {"versions": v.versions}}),
        };
        assert_eq!(got, want, "{model} over gRPC");
    }
    // Version folders the policy does not serve are listed, as unloaded.
    let rows: Vec<serde_json::Value> = reqwest::Client::new()
        .post(format!("{}/v2/repository/index", s.http))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let state = |m: &str, v: &str| {
        rows.iter()
            .find(|r| r["name"] == m && r["version"] == v)
            .map(|r| (r["state"].as_str().unwrap(), r["reason"].as_str().unwrap()))
    };
    let unloaded = Some(("UNAVAILABLE", "unloaded"));
    let ready = Some(("READY", ""));
    assert_eq!(state("pol-all", "1"), ready);
    assert_eq!(state("pol-all", "2"), ready);
    assert_eq!(state("pol-latest", "1"), unloaded);
    assert_eq!(state("pol-latest", "2"), ready);
    assert_eq!(state("pol-latest2", "1"), unloaded);
    assert_eq!(state("pol-latest2", "3"), ready);
    assert_eq!(state("pol-specific", "1"), ready);
    assert_eq!(state("pol-specific", "2"), unloaded);
    assert_eq!(state("pol-specific", "3"), ready);
    // The stable version gauge says which version answers requests without a version
    // (there is no routing.toml: the newest ready one).
    let text = s.metrics_text().await;
    for (model, stable) in [
        ("pol-all", 2),
        ("pol-latest", 2),
        ("pol-latest2", 3),
        ("pol-specific", 3),
    ] {
        let line = format!("modelgate_traffic_stable_version{{model=\"{model}\"}} {stable}");
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
}

#[test]
fn a_routing_change_in_progress_holds_the_routing_in_force_and_its_versions() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    mlp_model(p, "held", &[1, 2, 3], "");
    let config = modelgate::config::Config {
        model_repository: p.to_path_buf(),
        settle_ms: 0,
        ..Default::default()
    };
    let registry = modelgate::load_registry(&config).unwrap();
    let versions = |r: &modelgate::registry::Registry| -> Vec<u64> {
        r.snapshot().models["held"]
            .versions
            .keys()
            .copied()
            .collect()
    };
    assert_eq!(versions(&registry), vec![3]);
    // A version the repository lacks is refused before anything changes.
    let e = registry
        .hold("held", [1, 9].into_iter().collect())
        .err()
        .expect("refused");
    assert!(e.to_string().contains("no version 9"), "{e}");
    assert_eq!(versions(&registry), vec![3]);

    let hold = registry.hold("held", [1, 3].into_iter().collect()).unwrap();
    assert_eq!(
        versions(&registry),
        vec![1, 3],
        "the named version is loaded"
    );
    // routing.toml written during the change is not in force while the hold lasts,
    // whatever reconciles (the watcher does so at any moment).
    std::fs::write(
        p.join("held/routing.toml"),
        "stable = 3\n[canary]\nversion = 1\nweight = 10.0\n",
    )
    .unwrap();
    registry.reconcile().unwrap();
    let routing = &registry.snapshot().models["held"].routing;
    assert_eq!(routing.canary, None, "{routing:?}");
    assert_eq!(versions(&registry), vec![1, 3]);
    // Undone (the change failed): the routing in force stays and version 1 is unloaded.
    std::fs::remove_file(p.join("held/routing.toml")).unwrap();
    hold.release().unwrap();
    assert_eq!(registry.snapshot().models["held"].routing.canary, None);
    assert_eq!(versions(&registry), vec![3]);

    // Committed: released, the new routing.toml is in force at once.
    let hold = registry.hold("held", [1, 3].into_iter().collect()).unwrap();
    std::fs::write(
        p.join("held/routing.toml"),
        "stable = 3\n[canary]\nversion = 1\nweight = 10.0\n",
    )
    .unwrap();
    hold.release().unwrap();
    let snap = registry.snapshot();
    let canary = snap.models["held"].routing.canary.as_ref().expect("canary");
    assert_eq!(canary.version, 1);
    assert_eq!(versions(&registry), vec![1, 3]);
}

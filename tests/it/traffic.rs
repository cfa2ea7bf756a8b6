//! Traffic routing over a real server: canary shares and sticky keys, the admin API
//! (token, refusals, persistence across a restart, hand edits), the gRPC admin service,
//! the `modelgate ctl` CLI, shadows (never returned, compared, shed under load) and
//! automated rollouts (promotion, rollback on errors and on disagreement).
//!
//! The model is `tests/fixtures/route`: version 1 the baseline, 2 a good candidate,
//! 3 one that disagrees on every label, 4 one that fails on real inputs, 5 a slow one.
//! Each test copies the versions it needs into its own repository, under its own model
//! name (metrics are process-wide).

use crate::common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TOKEN: &str = "test-admin-token-0123456789";

/// Routing as the API shows it, without the file's generation (which every change
/// bumps; the tests compare what routes).
fn unversioned(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("generation");
    }
    v
}

/// A repository holding model `name` with the given route versions and config.toml.
fn route_repo(name: &str, versions: &[u64], config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for &v in versions {
        publish(dir.path(), name, v, v);
    }
    std::fs::write(dir.path().join(name).join("config.toml"), config).expect("config");
    dir
}

/// Publishes fixture version `fixture` as `version` of `name`: copied aside, renamed in.
fn publish(repo: &Path, name: &str, version: u64, fixture: u64) {
    let model = repo.join(name);
    let tmp = model.join(format!(".{version}.tmp"));
    std::fs::create_dir_all(&tmp).expect("mkdir");
    std::fs::copy(
        common::root().join(format!("tests/fixtures/route/{fixture}/model.onnx")),
        tmp.join("model.onnx"),
    )
    .expect("copy");
    std::fs::rename(&tmp, model.join(version.to_string())).expect("rename into place");
}

/// Row `i` of a deterministic, iris-like input (positive features).
fn row(i: usize) -> [f32; 4] {
    let r = common::rand_f32(4, i as u64 + 1);
    [
        5.0 + r[0],
        3.0 + r[1] / 2.0,
        3.5 + r[2] * 1.5,
        1.2 + r[3] / 2.0,
    ]
}

struct Answer {
    status: u16,
    version: String,
    variant: String,
    body: Value,
}

async fn infer(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    i: usize,
    key: Option<&str>,
) -> Answer {
    let mut body = json!({
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": row(i)}]
    });
    if let Some(k) = key {
        body["parameters"] = json!({ "routing_key": k });
    }
    let resp = client
        .post(format!("{base}/v2/models/{model}/infer"))
        .json(&body)
        .send()
        .await
        .expect("infer request");
    let header = |h: &str| {
        resp.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (version, variant) = (header("x-model-version"), header("x-variant"));
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("json body");
    Answer {
        status,
        version,
        variant,
        body,
    }
}

/// An admin call over HTTP: (status, JSON body).
async fn admin(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client.request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("admin request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn put_traffic(
    s: &common::TestServer,
    model: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let c = reqwest::Client::new();
    let url = format!("{}/admin/models/{model}/traffic", s.http);
    admin(&c, reqwest::Method::PUT, url, token, Some(body)).await
}

async fn get_traffic(s: &common::TestServer, model: &str, token: Option<&str>) -> (u16, Value) {
    let c = reqwest::Client::new();
    let url = format!("{}/admin/models/{model}/traffic", s.http);
    admin(&c, reqwest::Method::GET, url, token, None).await
}

/// Sends `n` requests (row i, optional key per i) with `conc` concurrent clients and
/// returns the answers in order.
async fn burst(
    base: &str,
    model: &str,
    n: usize,
    conc: usize,
    key: impl Fn(usize) -> Option<String> + Send + Sync + 'static,
) -> Vec<Answer> {
    let key = std::sync::Arc::new(key);
    let mut tasks = Vec::new();
    for w in 0..conc {
        let (base, model, key) = (base.to_string(), model.to_string(), key.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut out = Vec::new();
            let mut i = w;
            while i < n {
                let k = key(i);
                out.push((i, infer(&client, &base, &model, i, k.as_deref()).await));
                i += conc;
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, a)| a).collect()
}

/// The value of the first sample of `metric` whose labels contain all of `labels`.
fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls `f` every 100 ms until it returns Some, or panics after `secs`.
async fn eventually<T>(secs: u64, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_share_is_its_weight_and_keys_are_sticky() {
    // Thousands of requests from eight clients, as fast as they are answered.
    let _cpu = common::cpu_heavy().await;
    let repo = route_repo("share", &[1, 2], "");
    let s = common::start_with(repo.path(), |_| {}).await;
    // Only version 2 loads under the default policy (latest 1); naming 1 as stable
    // loads it.
    let (st, v) = put_traffic(
        &s,
        "share",
        None,
        json!({"stable": 1, "canary": {"version": 2, "weight": 12.5}}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["ready_versions"], json!([1, 2]));

    // Without a key: random, and the share is the weight.
    let answers = burst(&s.http, "share", 10_000, 8, |_| None).await;
    let mut canary = 0;
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["model_version"].as_str(), Some(a.version.as_str()));
        match a.variant.as_str() {
            "canary" => {
                assert_eq!(a.version, "2");
                canary += 1;
            }
            "stable" => assert_eq!(a.version, "1"),
            other => panic!("unexpected variant {other}"),
        }
    }
    let share = canary as f64 / answers.len() as f64 * 100.0;
    assert!(
        (share - 12.5).abs() <= 2.0,
        "canary share {share}% at weight 12.5%"
    );

    // With keys: the same key always gets the same variant while the weight stays.
    let keyed = |i: usize| Some(format!("user-{}", i % 1000));
    let first = burst(&s.http, "share", 2000, 8, keyed).await;
    let mut assigned: HashMap<usize, String> = HashMap::new();
    for (i, a) in first.iter().enumerate() {
        let prev = assigned.insert(i % 1000, a.variant.clone());
        assert!(
            prev.is_none_or(|p| p == a.variant),
            "key user-{} flipped",
            i % 1000
        );
    }
    // The header form of the key means the same.
    let client = reqwest::Client::new();
    for k in 0..50 {
        let resp = client
            .post(format!("{}/v2/models/share/infer", s.http))
            .header("x-routing-key", format!("user-{k}"))
            .json(&json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": row(k)}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-variant"].to_str().unwrap(), assigned[&k]);
    }

    // Raising the weight only moves keys from stable to canary.
    let (st, v) = put_traffic(
        &s,
        "share",
        None,
        json!({"stable": 1, "canary": {"version": 2, "weight": 40}}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let second = burst(&s.http, "share", 1000, 8, |i| Some(format!("user-{i}"))).await;
    let mut moved = 0;
    for (k, a) in second.iter().enumerate() {
        if assigned[&k] == "canary" {
            assert_eq!(a.variant, "canary", "key user-{k} left the canary");
        } else if a.variant == "canary" {
            moved += 1;
        }
    }
    let now_canary = second.iter().filter(|a| a.variant == "canary").count();
    assert!(moved > 0);
    assert!(
        (now_canary as f64 / 10.0 - 40.0).abs() < 6.0,
        "{now_canary} of 1000 keys"
    );

    // Metrics: requests by variant, the weight as a gauge.
    let text = s.metrics_text().await;
    let by = |variant: &str, version: &str| {
        sample(
            &text,
            "modelgate_requests_total",
            &[
                ("model", "share"),
                ("version", version),
                ("variant", variant),
                ("code", "ok"),
            ],
        )
        .unwrap_or(0.0)
    };
    assert!(by("canary", "2") >= canary as f64);
    assert!(by("stable", "1") > 0.0);
    assert_eq!(
        sample(
            &text,
            "modelgate_traffic_canary_weight_percent",
            &[("model", "share")]
        ),
        Some(40.0)
    );
    assert_eq!(
        sample(
            &text,
            "modelgate_traffic_stable_version",
            &[("model", "share")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_need_the_token_bad_ones_change_nothing_and_good_ones_persist() {
    // Version 2 serves; 1 loads when routing names it; 7 cannot load, so a change
    // naming it is refused.
    let repo = route_repo("adm", &[1, 2], "version_policy = { specific = [2] }\n");
    let bad = repo.path().join("adm/7");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("model.onnx"), b"not an onnx file").unwrap();
    let mut s = common::start_with(repo.path(), |c| c.admin_token = Some(TOKEN.into())).await;
    let routing_file = repo.path().join("adm/routing.toml");
    let good = json!({"stable": 1, "canary": {"version": 2, "weight": 30.0}});

    // No token, or a wrong one: refused, nothing written.
    assert_eq!(get_traffic(&s, "adm", None).await.0, 401);
    assert_eq!(put_traffic(&s, "adm", None, good.clone()).await.0, 401);
    assert_eq!(
        put_traffic(&s, "adm", Some("wrong-token-0123456789"), good.clone())
            .await
            .0,
        401
    );
    assert!(!routing_file.exists());

    // Bad changes: refused with a clear error, nothing changes.
    let refused = [
        (
            json!({"stable": 1, "canary": {"version": 9, "weight": 10}}),
            "no version 9",
        ),
        (
            json!({"stable": 1, "canary": {"version": 2, "weight": 150}}),
            "out of range",
        ),
        (
            json!({"stable": 2, "canary": {"version": 2, "weight": 10}}),
            "is the stable version",
        ),
        (
            json!({"stable": 1, "canary": {"version": 7, "weight": 10}}),
            "version 7 is not ready",
        ),
        (
            json!({"stable": 1, "canary": {"version": 2, "weight": -1}}),
            "out of range",
        ),
        (
            json!({"stable": 1, "shadows": [{"version": 2, "percent": 101}]}),
            "out of range",
        ),
        (json!({"stabel": 1}), "unknown field"),
        (
            json!({"stable": 1, "canary": {"version": 2, "weight": 10}, "rollout": {"plan": {"steps": []}}}),
            "steps",
        ),
        // Without a stable version, the one serving now (2) is stable: so not the canary.
        (
            json!({"canary": {"version": 2, "weight": 10}}),
            "is the stable version",
        ),
    ];
    for (body, why) in refused {
        let (st, v) = put_traffic(&s, "adm", Some(TOKEN), body.clone()).await;
        assert_eq!(st, 400, "{body} -> {v}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.contains(why), "{body}: '{msg}' should say '{why}'");
        assert!(!routing_file.exists(), "{body} wrote routing.toml");
    }
    let (st, v) = get_traffic(&s, "adm", Some(TOKEN)).await;
    assert_eq!(st, 200);
    assert_eq!(v["routing"], json!({}));
    assert_eq!(v["ready_versions"], json!([2]));
    // An unknown model is 404.
    assert_eq!(
        put_traffic(&s, "nope", Some(TOKEN), good.clone()).await.0,
        404
    );

    // A good change: written, audited, in force.
    let (st, v) = put_traffic(&s, "adm", Some(TOKEN), good.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(unversioned(&v["routing"]), good);
    let text = std::fs::read_to_string(&routing_file).unwrap();
    assert!(
        text.contains("stable = 1") && text.contains("weight = 30"),
        "{text}"
    );
    let c = reqwest::Client::new();
    let (st, audit) = admin(
        &c,
        reqwest::Method::GET,
        format!("{}/admin/audit?model=adm", s.http),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let entries = audit.as_array().unwrap();
    assert_eq!(entries.len(), 1, "only the good change is audited: {audit}");
    assert_eq!(entries[0]["actor"], "admin");
    assert_eq!(entries[0]["action"], "set");
    assert_eq!(entries[0]["before"], json!({}));
    assert_eq!(unversioned(&entries[0]["after"]), good);
    // Without a token the audit log is closed too.
    let (st, _) = admin(
        &c,
        reqwest::Method::GET,
        format!("{}/admin/audit", s.http),
        None,
        None,
    )
    .await;
    assert_eq!(st, 401);

    // Restart on the same repository: the routing survives.
    let server = s.server.take().unwrap();
    s.token.cancel();
    server.wait().await;
    let s = common::start_with(repo.path(), |c| c.admin_token = Some(TOKEN.into())).await;
    let (st, v) = get_traffic(&s, "adm", Some(TOKEN)).await;
    assert_eq!(st, 200);
    assert_eq!(unversioned(&v["routing"]), good);
    assert_eq!(v["ready_versions"], json!([1, 2]));
    let answers = burst(&s.http, "adm", 400, 4, |_| None).await;
    let canary = answers.iter().filter(|a| a.version == "2").count();
    assert!(answers.iter().all(|a| a.status == 200));
    assert!(
        (60..=180).contains(&canary),
        "{canary} of 400 on the canary at 30%"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_only_this_host_may_call_the_admin_api() {
    let repo = route_repo("local", &[1, 2], "");
    let s = common::start_with(repo.path(), |c| c.host = "0.0.0.0".into()).await;
    let port = s.http.rsplit(':').next().unwrap().to_string();
    // From this host (loopback): admitted, and audited as `localhost`.
    let (st, v) = put_traffic(&s, "local", None, json!({"stable": 1})).await;
    assert_eq!(st, 200, "{v}");
    let c = reqwest::Client::new();
    let (_, audit) = admin(
        &c,
        reqwest::Method::GET,
        format!("{}/admin/audit", s.http),
        None,
        None,
    )
    .await;
    assert_eq!(audit[0]["actor"], "localhost");
    // From another address of this machine (not loopback): refused.
    let Some(ip) = non_loopback_ip() else {
        panic!("this machine has no non-loopback address to test from");
    };
    let url = format!("http://{ip}:{port}/admin/models/local/traffic");
    let (st, v) = admin(&c, reqwest::Method::GET, url.clone(), None, None).await;
    assert_eq!(st, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("this host only"));
    let (st, _) = admin(
        &c,
        reqwest::Method::GET,
        format!("http://{ip}:{port}/admin/drift"),
        None,
        None,
    )
    .await;
    assert_eq!(st, 403);
    // The gRPC admin service keeps the same rule, for routing and for drift.
    use modelgate::admin_proto as apb;
    use modelgate::admin_proto::traffic_admin_client::TrafficAdminClient;
    let grpc_port = s.grpc.rsplit(':').next().unwrap();
    let traffic = || apb::GetTrafficRequest {
        model: "local".into(),
    };
    let drift = || apb::GetDriftRequest {
        model: "local".into(),
    };
    let mut here = TrafficAdminClient::connect(format!("http://127.0.0.1:{grpc_port}"))
        .await
        .unwrap();
    here.get_traffic(traffic()).await.unwrap();
    here.get_drift(drift()).await.unwrap();
    let mut away = TrafficAdminClient::connect(format!("http://{ip}:{grpc_port}"))
        .await
        .unwrap();
    for err in [
        away.get_traffic(traffic()).await.unwrap_err(),
        away.get_drift(drift()).await.unwrap_err(),
    ] {
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        assert!(err.message().contains("this host only"), "{err}");
    }
    // Inference is not admin: it answers on every address.
    let a = infer(&c, &format!("http://{ip}:{port}"), "local", 0, None).await;
    assert_eq!(a.status, 200);
}

/// An address of this machine that is not loopback (the source address of a route out).
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    for probe in ["10.255.255.255:1", "192.0.2.1:1", "172.31.255.255:1"] {
        if sock.connect(probe).is_ok()
            && let Ok(a) = sock.local_addr()
            && !a.ip().is_loopback()
            && !a.ip().is_unspecified()
        {
            return Some(a.ip());
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_edits_of_routing_toml_are_picked_up_and_bad_ones_reported() {
    let repo = route_repo("hand", &[1, 2], "version_policy = \"all\"\n");
    let s = common::start_with(repo.path(), |c| c.repository_poll_secs = 1).await;
    let c = reqwest::Client::new();
    assert_eq!(infer(&c, &s.http, "hand", 0, None).await.version, "2");
    // An operator writes routing.toml by hand (atomically): stable 1.
    let model = repo.path().join("hand");
    std::fs::write(model.join(".r.tmp"), "stable = 1\n").unwrap();
    std::fs::rename(model.join(".r.tmp"), model.join("routing.toml")).unwrap();
    eventually(15, "the hand edit", async || {
        (infer(&c, &s.http, "hand", 0, None).await.version == "1").then_some(())
    })
    .await;
    // A broken edit: reported, and the routing in force stays.
    std::fs::write(model.join("routing.toml"), "stable = \"one\"\n").unwrap();
    let v = eventually(15, "the routing error", async || {
        let (_, v) = get_traffic(&s, "hand", None).await;
        v["routing_error"].is_string().then_some(v)
    })
    .await;
    assert!(
        v["routing_error"]
            .as_str()
            .unwrap()
            .contains("routing.toml"),
        "{v}"
    );
    assert_eq!(v["routing"], json!({"stable": 1}));
    for i in 0..20 {
        assert_eq!(infer(&c, &s.http, "hand", i, None).await.version, "1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_admin_service_and_response_metadata() {
    use modelgate::admin_proto as apb;
    use modelgate::admin_proto::traffic_admin_client::TrafficAdminClient;
    use modelgate::proto as pb;
    let repo = route_repo("grpcadm", &[1, 2], "");
    let s = common::start_with(repo.path(), |c| {
        c.admin_token = Some(TOKEN.into());
        c.grpc_answer_metadata = true;
    })
    .await;
    let mut admin = TrafficAdminClient::connect(s.grpc.clone()).await.unwrap();
    // No token: UNAUTHENTICATED.
    let err = admin
        .get_traffic(apb::GetTrafficRequest {
            model: "grpcadm".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // A bad change: INVALID_ARGUMENT, nothing changes.
    let bad = apb::SetTrafficRequest {
        model: "grpcadm".into(),
        spec: Some(apb::TrafficSpec {
            stable: Some(2),
            canary: Some(apb::Canary {
                version: 2,
                weight: 5.0,
            }),
            ..Default::default()
        }),
        reason: "test".into(),
    };
    let err = admin.set_traffic(with_token(bad)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    // Stable 1, canary 2 at 100%: every request goes to 2 as the canary.
    let set = apb::SetTrafficRequest {
        model: "grpcadm".into(),
        spec: Some(apb::TrafficSpec {
            stable: Some(1),
            canary: Some(apb::Canary {
                version: 2,
                weight: 100.0,
            }),
            ..Default::default()
        }),
        reason: "grpc test".into(),
    };
    let state = admin
        .set_traffic(with_token(set))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.spec.as_ref().unwrap().stable, Some(1));
    assert_eq!(state.ready_versions, vec![1, 2]);
    let mut infer =
        pb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(s.grpc.clone())
            .await
            .unwrap();
    let req = || pb::ModelInferRequest {
        model_name: "grpcadm".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            ..Default::default()
        }],
        raw_input_contents: vec![common::f32_bytes(&row(0)).into()],
        ..Default::default()
    };
    let resp = infer.model_infer(req()).await.unwrap();
    assert_eq!(resp.metadata().get("x-model-version").unwrap(), "2");
    assert_eq!(resp.metadata().get("x-variant").unwrap(), "canary");
    assert_eq!(resp.get_ref().model_version, "2");
    // An explicit version wins over routing.
    let mut explicit = req();
    explicit.model_version = "1".into();
    let resp = infer.model_infer(explicit).await.unwrap();
    assert_eq!(resp.metadata().get("x-variant").unwrap(), "stable");
    assert_eq!(resp.get_ref().model_version, "1");
    // Promote over gRPC: 2 becomes stable.
    let state = admin
        .promote(with_token(apb::ChangeRequest {
            model: "grpcadm".into(),
            reason: "looks good".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.spec.as_ref().unwrap().stable, Some(2));
    assert!(state.spec.as_ref().unwrap().canary.is_none());
    let resp = infer.model_infer(req()).await.unwrap();
    assert_eq!(resp.metadata().get("x-variant").unwrap(), "stable");
    assert_eq!(resp.get_ref().model_version, "2");
    let audit = admin
        .get_audit(with_token(apb::GetAuditRequest {
            model: "grpcadm".into(),
            limit: 10,
        }))
        .await
        .unwrap()
        .into_inner();
    let actions: Vec<Value> = audit
        .entries_json
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(actions.len(), 2);
    assert_eq!(actions[1]["action"], "promote");
    assert_eq!(actions[1]["reason"], "looks good");
}

/// A gRPC admin request carrying the admin token.
fn with_token<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

/// Runs the real binary's `ctl` against the server.
async fn ctl(s: &common::TestServer, token: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"));
    cmd.arg("ctl")
        .arg("--url")
        .arg(&s.http)
        .env_remove("MODELGATE_ADMIN_TOKEN");
    if let Some(t) = token {
        cmd.env("MODELGATE_ADMIN_TOKEN", t);
    }
    cmd.args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_cli_drives_a_running_server() {
    let repo = route_repo("cli", &[1, 2, 3], "version_policy = \"all\"\n");
    let s = common::start_with(repo.path(), |c| c.admin_token = Some(TOKEN.into())).await;
    let t = Some(TOKEN);
    // No token: refused, exit status non-zero, the server's message on stderr.
    let (ok, _, err) = ctl(&s, None, &["traffic", "get", "cli"]).await;
    assert!(!ok);
    assert!(err.contains("admin bearer token"), "{err}");
    // Set stable and a canary.
    let (ok, out, err) = ctl(
        &s,
        t,
        &[
            "traffic", "set", "cli", "--stable", "1", "--canary", "2", "--weight", "20",
            "--reason", "try 2",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        unversioned(&v["routing"]),
        json!({"stable": 1, "canary": {"version": 2, "weight": 20.0}})
    );
    // Only the weight; then a shadow.
    let (ok, _, err) = ctl(
        &s,
        t,
        &[
            "traffic", "set", "cli", "--weight", "35.5", "--shadow", "3:50",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let (ok, out, _) = ctl(&s, t, &["traffic", "get", "cli"]).await;
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["routing"]["canary"]["weight"], 35.5);
    assert_eq!(
        v["routing"]["shadows"],
        json!([{"version": 3, "percent": 50.0}])
    );
    // A bad change: refused with the server's reason, nothing changes.
    let (ok, _, err) = ctl(
        &s,
        t,
        &["traffic", "set", "cli", "--canary", "1", "--weight", "5"],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("is the stable version"), "{err}");
    // Roll back, then promote fails (no live canary is fine: rollback keeps it at 0).
    let (ok, out, err) = ctl(
        &s,
        t,
        &["traffic", "rollback", "cli", "--reason", "bad numbers"],
    )
    .await;
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["routing"]["canary"]["weight"], 0.0);
    assert_eq!(v["routing"]["rejected"], json!([2]));
    let (ok, out, err) = ctl(&s, t, &["traffic", "promote", "cli"]).await;
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["routing"]["stable"], 2);
    let (ok, out, _) = ctl(&s, t, &["audit", "--model", "cli"]).await;
    assert!(ok);
    let entries: Vec<Value> = serde_json::from_str(&out).unwrap();
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["set", "set", "rollback", "promote"]);
    assert_eq!(entries[0]["reason"], "try 2");
    assert_eq!(entries[2]["reason"], "bad numbers");
    // The drift view: of one model (its versions, none with a profile here), of all.
    let (ok, out, err) = ctl(&s, t, &["drift", "cli"]).await;
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["model"], "cli");
    assert_eq!(
        v["versions"],
        json!([{"version": 1, "profile": null}, {"version": 2, "profile": null}, {"version": 3, "profile": null}])
    );
    let (ok, out, err) = ctl(&s, t, &["drift"]).await;
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap(),
        json!({"models": []})
    );
    let (ok, _, err) = ctl(&s, t, &["drift", "nosuch"]).await;
    assert!(!ok);
    assert!(err.contains("unknown model 'nosuch'"), "{err}");
    // A server that is not there: a clear error.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"));
    cmd.args([
        "ctl",
        "--url",
        "http://127.0.0.1:1",
        "traffic",
        "get",
        "cli",
    ]);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_answers_are_compared_and_never_returned() {
    // Its shadows must get idle CPU (their workers run at idle priority).
    let _cpu = common::cpu_heavy().await;
    let repo = route_repo("shadowcmp", &[1, 2, 3], "version_policy = \"all\"\n");
    let s = common::start_with(repo.path(), |c| c.traffic.mirror_max_inflight = 4).await;
    let (st, v) = put_traffic(
        &s,
        "shadowcmp",
        None,
        json!({"stable": 1, "shadows": [{"version": 2, "percent": 100}, {"version": 3, "percent": 100}]}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    // The answers are version 1's: labels as version 1 computes them.
    let n = 300;
    let inputs: Vec<f32> = (0..n).flat_map(row).collect();
    let x = common::fp32_tensor("x", &[n, 4], &inputs);
    let want_v1 = common::reference(
        &common::root().join("tests/fixtures/route/1/model.onnx"),
        std::slice::from_ref(&x),
    );
    let want_v3 = common::reference(
        &common::root().join("tests/fixtures/route/3/model.onnx"),
        &[x],
    );
    let labels_v1 = common::i64s(&want_v1[0].data);
    let labels_v3 = common::i64s(&want_v3[0].data);
    let expected_disagreement = labels_v1
        .iter()
        .zip(&labels_v3)
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        expected_disagreement > n / 2,
        "the fixture disagrees on most rows"
    );
    let c = reqwest::Client::new();
    for (i, &want) in labels_v1.iter().enumerate() {
        let a = infer(&c, &s.http, "shadowcmp", i, None).await;
        // Shadows run on idle CPU only: leave them some.
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(a.status, 200);
        assert_eq!((a.version.as_str(), a.variant.as_str()), ("1", "stable"));
        let label = a.body["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == "label")
            .unwrap()["data"][0]
            .as_i64()
            .unwrap();
        assert_eq!(label, want, "row {i}: a shadow's answer was returned");
    }
    // Every mirrored copy is either compared or shed (the shadows' single idle-priority
    // worker sheds copies while it is busy): nothing is lost or counted twice.
    let (text, compared) = eventually(20, "every mirror accounted for", async || {
        let text = s.metrics_text().await;
        let rows = |v: &str| {
            sample(
                &text,
                "modelgate_compare_rows_total",
                &[("model", "shadowcmp"), ("version", v), ("source", "shadow")],
            )
            .unwrap_or(0.0)
        };
        let shed: f64 = ["budget", "load", "queue", "deadline", "shutdown"]
            .iter()
            .filter_map(|r| {
                sample(
                    &text,
                    "modelgate_mirror_shed_total",
                    &[("model", "shadowcmp"), ("source", "shadow"), ("reason", r)],
                )
            })
            .sum();
        let compared = (rows("2"), rows("3"));
        (compared.0 + compared.1 + shed == 2.0 * n as f64).then_some((text, compared))
    })
    .await;
    // Copies are shed whenever the shadows' worker is busy: how many were compared
    // depends on the machine, but some were.
    assert!(compared.0 >= 1.0 && compared.1 >= 1.0, "{compared:?}");
    eprintln!("compared {compared:?} of {n} requests per shadow");
    let disagreed = |v: &str| {
        sample(
            &text,
            "modelgate_compare_disagreed_rows_total",
            &[("model", "shadowcmp"), ("version", v)],
        )
    };
    // Version 3 disagrees with version 1 on every row (checked on the reference above).
    assert_eq!(expected_disagreement, n);
    assert_eq!(disagreed("3"), Some(compared.1));
    assert_eq!(disagreed("2"), Some(0.0));
    // Version 2 adds 0.001 to every score: its mean absolute difference says so.
    let mad = |v: &str| {
        let sum = sample(
            &text,
            "modelgate_compare_mean_abs_diff_sum",
            &[("model", "shadowcmp"), ("version", v)],
        )
        .unwrap();
        let count = sample(
            &text,
            "modelgate_compare_mean_abs_diff_count",
            &[("model", "shadowcmp"), ("version", v)],
        )
        .unwrap();
        sum / count
    };
    // Scores differ by 0.001, labels (int64) are not float values: mean 0.001.
    assert!(
        (mad("2") - 0.001).abs() < 1e-4,
        "mean abs diff {}",
        mad("2")
    );
    assert!(mad("3") > 0.1);
    // Shadow runs are counted as such.
    let shadow_ok = sample(
        &text,
        "modelgate_requests_total",
        &[
            ("model", "shadowcmp"),
            ("version", "3"),
            ("variant", "shadow"),
            ("code", "ok"),
        ],
    );
    assert_eq!(shadow_ok, Some(compared.1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_shadow_does_not_slow_the_primary_and_is_shed() {
    // Its latencies are compared, and its shadow must get idle CPU.
    let _cpu = common::cpu_heavy().await;
    let repo = route_repo(
        "shadowslow",
        &[1, 5],
        "version_policy = \"all\"\ninstances = 1\nintra_op_threads = 1\n",
    );
    let s = common::start_with(repo.path(), |c| c.traffic.mirror_max_inflight = 1).await;
    let c = reqwest::Client::new();
    let p50 = async |n: usize| {
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            assert_eq!(infer(&c, &s.http, "shadowslow", i, None).await.version, "1");
            lat.push(t.elapsed());
        }
        lat.sort();
        lat[n / 2]
    };
    assert_eq!(
        put_traffic(&s, "shadowslow", None, json!({"stable": 1}))
            .await
            .0,
        200
    );
    p50(100).await; // warm
    let base = p50(400).await;
    let (st, v) = put_traffic(
        &s,
        "shadowslow",
        None,
        json!({"stable": 1, "shadows": [{"version": 5, "percent": 100}]}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let with_shadow = p50(400).await;
    // Within noise: a shadow costing ~13 ms a request (100x the primary) would add
    // milliseconds if it ran on the request path.
    assert!(
        with_shadow < base * 2 + Duration::from_micros(500),
        "p50 {with_shadow:?} with the shadow vs {base:?} without"
    );
    // The mirrored run in flight when the loop ends (the budget is one) is counted when
    // it ends: it ran, or (the worker has idle CPU priority, so on a machine kept busy by
    // other tests it may get no CPU at all) expired after the 1 s mirror timeout. Both
    // are the design: shadows are shed first. Wait for it.
    let count = |text: &str, metric: &str, labels: &[(&str, &str)]| -> f64 {
        sample(text, metric, labels).unwrap_or(0.0)
    };
    let shed_by = |text: &str, reasons: &[&str]| -> f64 {
        reasons
            .iter()
            .map(|r| {
                count(
                    text,
                    "modelgate_mirror_shed_total",
                    &[("model", "shadowslow"), ("source", "shadow"), ("reason", r)],
                )
            })
            .sum()
    };
    let until = Instant::now() + Duration::from_secs(10);
    let (shed, ran, expired) = loop {
        let text = s.metrics_text().await;
        // Shed because the budget (one run) was spent or the shadow's worker was busy.
        let shed = shed_by(&text, &["budget", "load"]);
        let ran = count(
            &text,
            "modelgate_requests_total",
            &[
                ("model", "shadowslow"),
                ("version", "5"),
                ("variant", "shadow"),
                ("code", "ok"),
            ],
        );
        let expired = shed_by(&text, &["deadline", "queue"]);
        if ran + expired > 0.0 || Instant::now() > until {
            break (shed, ran, expired);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(shed > 0.0, "the excess was shed");
    assert!(ran + expired > 0.0, "some shadows were run");
    assert!(shed + ran + expired <= 400.0 + 1.0);
    eprintln!(
        "primary p50 {base:?} without, {with_shadow:?} with a 100% slow shadow; {ran} ran, {shed} shed"
    );
}

/// Drives traffic (random keys) until `done` says the rollout ended.
async fn drive_until(
    s: &common::TestServer,
    model: &str,
    secs: u64,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let until = Instant::now() + Duration::from_secs(secs);
    let c = reqwest::Client::new();
    let mut i = 0;
    loop {
        for _ in 0..50 {
            let a = infer(&c, &s.http, model, i, None).await;
            assert!(a.status == 200 || a.status == 500, "{}", a.body);
            i += 1;
        }
        let (_, v) = get_traffic(s, model, None).await;
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < until, "rollout did not end: {v}");
    }
}

async fn audit_of(s: &common::TestServer, model: &str) -> Vec<Value> {
    let c = reqwest::Client::new();
    let (st, v) = admin(
        &c,
        reqwest::Method::GET,
        format!("{}/admin/audit?model={model}", s.http),
        None,
        None,
    )
    .await;
    assert_eq!(st, 200);
    v.as_array().unwrap().clone()
}

const FAST_PLAN: &str = r#"
[traffic]
new_versions = "canary"
[traffic.rollout]
steps = [20, 50, 100]
interval_secs = 1.0
min_requests = 30
# Debug builds on a shared machine jitter by milliseconds; p99 is tested in the unit tests.
p99_slack_ms = 100.0
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_good_version_enters_as_canary_and_is_promoted() {
    let repo = route_repo("rollgood", &[1], FAST_PLAN);
    let s = common::start_with(repo.path(), |c| {
        c.traffic.controller_tick_ms = 100;
        c.settle_ms = 200;
    })
    .await;
    let c = reqwest::Client::new();
    assert_eq!(infer(&c, &s.http, "rollgood", 0, None).await.version, "1");
    // Publish version 2 (the good one): it enters as the canary at the first step.
    publish(repo.path(), "rollgood", 2, 2);
    let v = eventually(20, "automatic entry", async || {
        let (_, v) = get_traffic(&s, "rollgood", None).await;
        (v["routing"]["canary"]["version"] == 2).then_some(v)
    })
    .await;
    assert_eq!(v["routing"]["stable"], 1);
    assert_eq!(v["routing"]["canary"]["weight"], 20.0);
    // Traffic flows; the rollout walks 20 -> 50 -> 100 and promotes.
    let v = drive_until(&s, "rollgood", 60, |v| v["routing"]["stable"] == 2).await;
    assert!(v["routing"].get("canary").is_none(), "{v}");
    assert!(v["routing"].get("rollout").is_none(), "{v}");
    let entries = audit_of(&s, "rollgood").await;
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["enter", "advance", "advance", "promote"]);
    assert!(entries.iter().all(|e| e["actor"] == "auto"));
    assert!(
        entries[3]["reason"]
            .as_str()
            .unwrap()
            .contains("rollout completed")
    );
    // Verdicts carry the numbers they stood on; entry is no verdict.
    assert!(entries[0].get("analysis").is_none(), "{}", entries[0]);
    for e in &entries[1..] {
        assert_eq!(e["analysis"]["look"], "end", "{e}");
        assert!(e["analysis"]["canary"]["requests"].as_u64().unwrap() >= 30);
    }
    let text = s.metrics_text().await;
    assert_eq!(
        sample(
            &text,
            "modelgate_rollout_promotions_total",
            &[("model", "rollgood")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "modelgate_rollout_step", &[("model", "rollgood")]),
        Some(0.0)
    );
    // Canary traffic was compared with stable on the way: no disagreement.
    assert_eq!(
        sample(
            &text,
            "modelgate_compare_disagreed_rows_total",
            &[
                ("model", "rollgood"),
                ("version", "2"),
                ("source", "canary")
            ]
        ),
        Some(0.0)
    );
    assert_eq!(infer(&c, &s.http, "rollgood", 0, None).await.version, "2");
}

/// Starts a rollout of `canary` through the admin API and drives traffic until it ends.
async fn rollout_of(model: &str, canary: u64) -> (common::TestServer, tempfile::TempDir, Value) {
    let repo = route_repo(model, &[1, canary], "version_policy = \"all\"\n");
    let s = common::start_with(repo.path(), |c| c.traffic.controller_tick_ms = 100).await;
    let (st, v) = put_traffic(
        &s,
        model,
        None,
        json!({
            "stable": 1,
            "canary": {"version": canary, "weight": 0},
            "rollout": {"plan": {"steps": [25, 50, 100], "interval_secs": 30, "min_requests": 40, "p99_slack_ms": 100}}
        }),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["routing"]["canary"]["weight"], 25.0,
        "the plan sets the weight"
    );
    let v = drive_until(&s, model, 60, |v| v["routing"].get("rollout").is_none()).await;
    (s, repo, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_rolled_back_automatically() {
    let (s, _repo, v) = rollout_of("rollfail", 4).await;
    assert_eq!(v["routing"]["stable"], 1);
    assert_eq!(v["routing"]["canary"], json!({"version": 4, "weight": 0.0}));
    assert_eq!(v["routing"]["rejected"], json!([4]));
    let entries = audit_of(&s, "rollfail").await;
    let last = entries.last().unwrap();
    assert_eq!(last["action"], "rollback");
    assert_eq!(last["actor"], "auto");
    assert!(
        last["reason"].as_str().unwrap().contains("error rate"),
        "{last}"
    );
    // Everything goes to stable now, and succeeds.
    let answers = burst(&s.http, "rollfail", 100, 4, |_| None).await;
    assert!(answers.iter().all(|a| a.status == 200 && a.version == "1"));
    let text = s.metrics_text().await;
    assert_eq!(
        sample(
            &text,
            "modelgate_rollout_rollbacks_total",
            &[("model", "rollfail")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "modelgate_traffic_canary_weight_percent",
            &[("model", "rollfail")]
        ),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disagreeing_canary_is_rolled_back_automatically() {
    let (s, _repo, v) = rollout_of("rolldis", 3).await;
    assert_eq!(v["routing"]["rejected"], json!([3]));
    let entries = audit_of(&s, "rolldis").await;
    let last = entries.last().unwrap();
    assert_eq!(last["action"], "rollback");
    assert!(
        last["reason"].as_str().unwrap().contains("disagreement"),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_version_can_enter_as_a_shadow() {
    let repo = route_repo(
        "autoshadow",
        &[1],
        "[traffic]\nnew_versions = \"shadow\"\nshadow_percent = 25\n",
    );
    let s = common::start_with(repo.path(), |c| {
        c.traffic.controller_tick_ms = 100;
        c.settle_ms = 200;
    })
    .await;
    publish(repo.path(), "autoshadow", 2, 2);
    let v = eventually(20, "automatic shadow entry", async || {
        let (_, v) = get_traffic(&s, "autoshadow", None).await;
        v["routing"]["shadows"].is_array().then_some(v)
    })
    .await;
    assert_eq!(
        unversioned(&v["routing"]),
        json!({"stable": 1, "shadows": [{"version": 2, "percent": 25.0}]})
    );
    // Requests still go to stable.
    let c = reqwest::Client::new();
    assert_eq!(infer(&c, &s.http, "autoshadow", 0, None).await.version, "1");
    let entries = audit_of(&s, "autoshadow").await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["action"], "enter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_audit_log_refuses_the_change_and_keeps_the_routing() {
    let repo = route_repo("auditfull", &[1, 2], "version_policy = \"all\"\n");
    // /dev/full: every write fails with ENOSPC, as on a full disk.
    let s = common::start_with(repo.path(), |c| {
        c.traffic.audit_log = Some("/dev/full".into());
    })
    .await;
    let (st, v) = put_traffic(
        &s,
        "auditfull",
        None,
        json!({"stable": 1, "canary": {"version": 2, "weight": 50}}),
    )
    .await;
    assert_eq!(st, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("audit log"), "{v}");
    // Nothing changed: routing as before, requests to the newest version.
    let (_, now) = get_traffic(&s, "auditfull", None).await;
    assert_eq!(now["routing"], json!({}));
    let c = reqwest::Client::new();
    for i in 0..20 {
        let a = infer(&c, &s.http, "auditfull", i, None).await;
        assert_eq!((a.status, a.version.as_str()), (200, "2"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_file_that_cannot_be_written_changes_nothing() {
    let repo = route_repo("rofs", &[1, 2], "version_policy = \"all\"\n");
    let s = common::start_with(repo.path(), |_| {}).await;
    let good = json!({"stable": 1, "canary": {"version": 2, "weight": 20.0}});
    assert_eq!(put_traffic(&s, "rofs", None, good.clone()).await.0, 200);
    // The filesystem refuses the next write (here: the rename onto routing.toml fails).
    let model = repo.path().join("rofs");
    std::fs::remove_file(model.join("routing.toml")).unwrap();
    std::fs::create_dir(model.join("routing.toml")).unwrap();
    std::fs::write(
        model.join("routing.toml").join("x"),
        b"keeps the folder non-empty",
    )
    .unwrap();
    let (st, v) = put_traffic(&s, "rofs", None, json!({"stable": 2})).await;
    assert_eq!(st, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("routing.toml"), "{v}");
    // Nothing half-written is left, and the routing in force is the last good one.
    let leftovers: Vec<_> = std::fs::read_dir(&model)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let (_, now) = get_traffic(&s, "rofs", None).await;
    assert_eq!(unversioned(&now["routing"]), good);
    let c = reqwest::Client::new();
    assert!(infer(&c, &s.http, "rofs", 0, None).await.status == 200);
    // The audit log has only the good change.
    let entries = audit_of(&s, "rofs").await;
    assert_eq!(entries.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_registry_serves_and_refuses_changes_cleanly() {
    let repo = route_repo("rorepo", &[1, 2], "version_policy = \"all\"\n");
    std::fs::write(repo.path().join("rorepo/routing.toml"), "stable = 1\n").unwrap();
    let port = |_: ()| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (http, grpc, metrics) = (port(()), port(()), port(()));
    let dir = repo.path().display().to_string();
    // The gateway runs in its own mount namespace where the registry is mounted read-only
    // (the test, outside it, still writes to it as a publisher would).
    let script = format!(
        "mount --bind {dir} {dir} && mount -o remount,ro,bind {dir} && exec {bin} serve \
         --model-repository {dir} --host 127.0.0.1 --http-port {http} --grpc-port {grpc} \
         --metrics-port {metrics} --repository-poll-secs 1",
        bin = env!("CARGO_BIN_EXE_modelgate")
    );
    let mut gw = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{http}");
    let c = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = c.get(format!("{base}/v2/health/ready")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(
            Instant::now() < until,
            "the gateway on a read-only registry did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It serves what routing.toml says.
    assert_eq!(infer(&c, &base, "rorepo", 0, None).await.version, "1");
    // A change cannot be written: refused, clearly, and nothing changes.
    let (st, v) = admin(
        &c,
        reqwest::Method::PUT,
        format!("{base}/admin/models/rorepo/traffic"),
        None,
        Some(json!({"stable": 2})),
    )
    .await;
    assert_eq!(st, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("Read-only"), "{v}");
    assert_eq!(infer(&c, &base, "rorepo", 1, None).await.version, "1");
    // A version published by someone who can write is picked up (reading works).
    publish(repo.path(), "rorepo", 3, 2);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c
            .get(format!("{base}/v2/models/rorepo/versions/3/ready"))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < until,
            "version 3 was not loaded from the read-only registry"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!repo.path().join("rorepo/.routing.toml.tmp").exists());
    gw.kill().unwrap();
    gw.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_routing_changes_and_recovers() {
    // The whole registry (routing.toml, audit log, webhook outbox) on a 256 KiB disk.
    let disk = common::Tmpfs::mount(256);
    let repo = disk.0.clone();
    for v in [1u64, 2] {
        publish(&repo, "fulldisk", v, v);
    }
    std::fs::write(
        repo.join("fulldisk/config.toml"),
        "version_policy = \"all\"\n",
    )
    .unwrap();
    let s = common::start_with(&repo, |_| {}).await;
    let good = json!({"stable": 1, "canary": {"version": 2, "weight": 10.0}});
    assert_eq!(put_traffic(&s, "fulldisk", None, good.clone()).await.0, 200);
    // The disk fills up: the next change is refused, nothing changes, nothing is left
    // half-written.
    let filler = common::fill(&repo);
    let (st, v) = put_traffic(&s, "fulldisk", None, json!({"stable": 2})).await;
    assert_eq!(st, 503, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("No space left"),
        "{v}"
    );
    assert_eq!(
        unversioned(&get_traffic(&s, "fulldisk", None).await.1["routing"]),
        good
    );
    let text = std::fs::read_to_string(repo.join("fulldisk/routing.toml")).unwrap();
    assert!(text.contains("weight = 10.0"), "{text}");
    let leftovers: Vec<_> = std::fs::read_dir(repo.join("fulldisk"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let c = reqwest::Client::new();
    assert_eq!(infer(&c, &s.http, "fulldisk", 0, None).await.status, 200);
    // Space again: the change goes through and is audited.
    std::fs::remove_file(filler).unwrap();
    let (st, v) = put_traffic(&s, "fulldisk", None, json!({"stable": 2})).await;
    assert_eq!(st, 200, "{v}");
    let entries = audit_of(&s, "fulldisk").await;
    assert_eq!(entries.len(), 2);
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_refuses_a_canary_without_weight_and_exits_quietly_on_a_closed_pipe() {
    let repo = route_repo("pipe", &[1, 2, 3], "version_policy = \"all\"\n");
    let s = common::start_with(repo.path(), |c| c.admin_token = Some(TOKEN.into())).await;
    let t = Some(TOKEN);
    let (ok, _, err) = ctl(
        &s,
        t,
        &["traffic", "set", "pipe", "--stable", "1", "--canary", "2"],
    )
    .await;
    assert!(!ok, "a canary without --weight or --rollout is refused");
    assert!(
        err.contains("--weight") && err.contains("--rollout"),
        "{err}"
    );
    // A reader that goes away before the answer is printed (`| head -0`).
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"));
    cmd.args(["ctl", "--url", &s.http, "traffic", "get", "pipe"])
        .env("MODELGATE_ADMIN_TOKEN", TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().unwrap();
        drop(child.stdout.take());
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_becomes_stable_leaves_the_rejected_list() {
    let repo = route_repo("rej", &[1, 2], "version_policy = \"all\"\n");
    let s = common::start_with(repo.path(), |c| c.admin_token = Some(TOKEN.into())).await;
    let t = Some(TOKEN);
    for args in [
        &[
            "traffic", "set", "rej", "--stable", "1", "--canary", "2", "--weight", "10",
        ][..],
        &["traffic", "rollback", "rej"][..],
    ] {
        let (ok, _, err) = ctl(&s, t, args).await;
        assert!(ok, "{args:?}: {err}");
    }
    let (_, out, _) = ctl(&s, t, &["traffic", "get", "rej"]).await;
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["routing"]["rejected"], json!([2]), "{v}");
    let (ok, out, err) = ctl(
        &s,
        t,
        &["traffic", "set", "rej", "--stable", "2", "--no-canary"],
    )
    .await;
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["routing"]["stable"], json!(2), "{v}");
    assert!(v["routing"].get("rejected").is_none(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_rollout_plan_takes_the_configured_plan_over_http_grpc_and_ctl() {
    use modelgate::admin_proto as apb;
    use modelgate::admin_proto::traffic_admin_client::TrafficAdminClient;
    let config = "version_policy = \"all\"\n[traffic.rollout]\ninterval_secs = 3600\nmin_requests = 777\nalpha = 0.02\n";
    let repo = route_repo("partial", &[1, 2], config);
    let s = common::start_with(repo.path(), |c| c.admin_token = Some(TOKEN.into())).await;
    let t = Some(TOKEN);
    // What each path must answer: the steps it named, the rest from config.toml.
    let check = |v: &Value, how: &str| {
        let plan = &v["routing"]["rollout"]["plan"];
        assert_eq!(plan["steps"], json!([10.0, 100.0]), "{how}: {v}");
        assert_eq!(plan["interval_secs"], json!(3600.0), "{how}: {v}");
        assert_eq!(plan["min_requests"], json!(777), "{how}: {v}");
        assert_eq!(plan["alpha"], json!(0.02), "{how}: {v}");
        assert_eq!(v["routing"]["canary"]["weight"], json!(10.0), "{how}: {v}");
    };
    let reset = async || {
        let (st, v) = put_traffic(&s, "partial", t, json!({"stable": 1})).await;
        assert_eq!(st, 200, "{v}");
    };
    // HTTP.
    let (st, v) = put_traffic(
        &s,
        "partial",
        t,
        json!({"stable": 1, "canary": {"version": 2, "weight": 0},
               "rollout": {"plan": {"steps": [10, 100]}}}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    check(&v, "HTTP");
    check(&get_traffic(&s, "partial", t).await.1, "HTTP, read back");
    // A plan field that does not exist is refused, and nothing changes.
    reset().await;
    let (st, v) = put_traffic(
        &s,
        "partial",
        t,
        json!({"stable": 1, "canary": {"version": 2, "weight": 0},
               "rollout": {"plan": {"stepz": [10, 100]}}}),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("rollout.plan"), "{v}");
    assert_eq!(
        unversioned(&get_traffic(&s, "partial", t).await.1["routing"]),
        json!({"stable": 1})
    );
    // gRPC.
    let mut admin = TrafficAdminClient::connect(s.grpc.clone()).await.unwrap();
    let mut req = tonic::Request::new(apb::SetTrafficRequest {
        model: "partial".into(),
        spec: Some(apb::TrafficSpec {
            stable: Some(1),
            canary: Some(apb::Canary {
                version: 2,
                weight: 0.0,
            }),
            rollout: Some(apb::Rollout {
                plan: Some(apb::RolloutPlan {
                    steps: vec![10.0, 100.0],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        reason: "partial plan".into(),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let state = admin.set_traffic(req).await.unwrap().into_inner();
    let plan = state.spec.unwrap().rollout.unwrap().plan.unwrap();
    assert_eq!(plan.steps, vec![10.0, 100.0]);
    assert_eq!(plan.interval_secs, Some(3600.0));
    assert_eq!(plan.min_requests, Some(777));
    assert_eq!(plan.alpha, Some(0.02));
    check(&get_traffic(&s, "partial", t).await.1, "gRPC, read back");
    // ctl (through HTTP, sending only what its flags name).
    reset().await;
    let (ok, out, err) = ctl(
        &s,
        t,
        &[
            "traffic",
            "set",
            "partial",
            "--canary",
            "2",
            "--rollout",
            "--steps",
            "10,100",
        ],
    )
    .await;
    assert!(ok, "{err}");
    check(&serde_json::from_str(&out).unwrap(), "ctl");
}

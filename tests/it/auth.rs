//! Named, hashed tokens with permissions over a real server: each admin call needs its
//! permission (read, traffic, repository), inference can require `infer`, the audit log
//! names the token, failures are 401 / 403 and counted; `modelgate hash-token` makes
//! the stored hashes.
//!
//! The server runs in a process of its own: the failure counters have no model label,
//! and other tests in this process are refused too.

use crate::common;

use modelgate::api::auth::NamedToken;
use modelgate::api::auth::Permission;
use serde_json::{Value, json};

const READER: &str = "reader-token-0123456789";
const OPS: &str = "ops-token-0123456789abc";
const LOADER: &str = "loader-token-0123456789";
const CLIENT: &str = "client-token-0123456789";

fn token(name: &str, secret: &str, permissions: &[Permission]) -> NamedToken {
    NamedToken {
        name: name.into(),
        sha256: hex::encode(modelgate::api::auth::token_hash(secret)),
        permissions: permissions.to_vec(),
    }
}

async fn call(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = reqwest::Client::new().request(method, url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let st = resp.status().as_u16();
    (st, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_call_needs_its_permission() {
    let repo = common::copied_repo();
    let s = common::spawn_with(repo.path(), |c| {
        c.auth.inference = true;
        c.auth.tokens = vec![
            token("reader", READER, &[Permission::Read]),
            token("ops", OPS, &[Permission::Read, Permission::Traffic]),
            token("loader", LOADER, &[Permission::Repository]),
            token("client", CLIENT, &[Permission::Infer]),
        ];
    })
    .await;
    let get = |t: Option<&'static str>| {
        call(
            reqwest::Method::GET,
            format!("{}/admin/models/iris/traffic", s.http),
            t,
            None,
        )
    };
    assert_eq!(get(None).await.0, 401);
    assert_eq!(get(Some("not-a-token-0123456789")).await.0, 401);
    assert_eq!(get(Some(READER)).await.0, 200);
    assert_eq!(get(Some(LOADER)).await.0, 403);
    // Changing routing needs `traffic`.
    let put = |t: &'static str| {
        call(
            reqwest::Method::PUT,
            format!("{}/admin/models/iris/traffic?reason=auth%20test", s.http),
            Some(t),
            Some(json!({"stable": 1})),
        )
    };
    let (st, v) = put(READER).await;
    assert_eq!(st, 403);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("token 'reader' lacks the 'traffic' permission"),
        "{v}"
    );
    let (st, v) = put(OPS).await;
    assert_eq!(st, 200, "{v}");
    let (_, audit) = call(
        reqwest::Method::GET,
        format!("{}/admin/audit?model=iris", s.http),
        Some(READER),
        None,
    )
    .await;
    assert_eq!(audit.as_array().unwrap().last().unwrap()["actor"], "ops");
    // Loading needs `repository`.
    let load = |t: &'static str| {
        call(
            reqwest::Method::POST,
            format!("{}/v2/repository/models/mlp/load", s.http),
            Some(t),
            None,
        )
    };
    assert_eq!(load(OPS).await.0, 403);
    assert_eq!(load(LOADER).await.0, 200);
    // Inference needs `infer` (auth.inference = true), over both protocols.
    let body = json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]});
    let infer = |t: Option<&'static str>| {
        call(
            reqwest::Method::POST,
            format!("{}/v2/models/iris/infer", s.http),
            t,
            Some(body.clone()),
        )
    };
    let (status, body) = infer(None).await;
    assert_eq!(status, 401);
    // The caller is told what inference needs, not that it lacks an admin token.
    assert!(body.to_string().contains("'infer' permission"), "{body}");
    assert!(!body.to_string().contains("admin"), "{body}");
    assert_eq!(infer(Some(READER)).await.0, 403);
    assert_eq!(infer(Some(CLIENT)).await.0, 200);
    // The token is checked before the body is read: a caller without one who announces a
    // body and never sends it is answered at once, not after the body timeout.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = s.http.trim_start_matches("http://");
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(
            b"POST /v2/models/iris/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{",
        )
        .await
        .unwrap();
        let mut head = [0u8; 64];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut head))
            .await
            .expect("answered before the body arrived")
            .unwrap();
        let head = String::from_utf8_lossy(&head[..n]);
        assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    }
    let mut g =
        modelgate::proto::grpc_inference_service_client::GrpcInferenceServiceClient::connect(
            s.grpc.clone(),
        )
        .await
        .unwrap();
    let req = || modelgate::proto::ModelInferRequest {
        model_name: "iris".into(),
        inputs: vec![modelgate::proto::model_infer_request::InferInputTensor {
            name: "X".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            ..Default::default()
        }],
        raw_input_contents: vec![common::f32_bytes(&[5.1, 3.5, 1.4, 0.2]).into()],
        ..Default::default()
    };
    let e = g.model_infer(req()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("'infer' permission"), "{e:?}");
    let mut r = tonic::Request::new(req());
    r.metadata_mut()
        .insert("authorization", format!("Bearer {CLIENT}").parse().unwrap());
    g.model_infer(r).await.unwrap();
    // Failures are counted by reason, each one once; the tokens themselves appear nowhere.
    let text = s.metrics_text().await;
    for (reason, n) in [("missing", 4), ("invalid", 1), ("permission", 4)] {
        assert!(
            text.lines()
                .any(|l| l
                    == format!("modelgate_admin_auth_failures_total{{reason=\"{reason}\"}} {n}")),
            "want {n} {reason} in\n{text}"
        );
    }
    for secret in [READER, OPS, LOADER, CLIENT] {
        assert!(!text.contains(secret));
    }
}

#[test]
fn hash_token_prints_the_stored_form_and_bad_hashes_are_refused() {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .arg("hash-token")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{OPS}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        hex::encode(modelgate::api::auth::token_hash(OPS))
    );
    let repo = common::test_repo();
    let mut c = modelgate::config::Config {
        model_repository: repo.path().to_path_buf(),
        ..modelgate::config::Config::default()
    };
    c.auth.tokens = vec![NamedToken {
        name: "x".into(),
        sha256: "abc".into(),
        permissions: vec![Permission::Read],
    }];
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("auth.tokens.sha256")
    );
    c.auth.tokens.clear();
    c.auth.inference = true;
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("auth.inference")
    );
}

//! Dynamic batching over a real server: batched outputs equal unbatched ones row for row,
//! a burst beyond the queue gets 429 and the server recovers, deadlines expire in the
//! queue, and the batching shows in ModelConfig and metrics.

use std::path::Path;

use crate::common::*;
use serde_json::{Value, json};

/// A repository with the bundled mlp (version 1) as model `name`, under the given
/// config.toml. Each test uses its own name: the metrics recorder is process-wide.
fn repo_with_mlp_config(name: &str, config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join(name)).unwrap();
    std::os::unix::fs::symlink(root().join("models/mlp/1"), dir.path().join(name).join("1"))
        .unwrap();
    std::fs::write(dir.path().join(name).join("config.toml"), config).unwrap();
    dir
}

async fn infer_model(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    body: &Value,
) -> (u16, Value, Option<String>) {
    let r = client
        .post(format!("{base}/v2/models/{model}/infer"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, r.json().await.unwrap(), retry)
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

async fn batched_equals_unbatched(name: &str, config: &str) {
    let repo = repo_with_mlp_config(name, config);
    let s = start_with(repo.path(), |_| {}).await;
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let (client, base, name) = (client.clone(), s.http.clone(), name.to_string());
        tasks.push(tokio::spawn(async move {
            let rows = (i % 5 + 1) as usize;
            let x = rand_f32(rows * 16, 1000 + i);
            let body = json!({"inputs": [{"name": "input", "shape": [rows, 16], "datatype": "FP32", "data": x}]});
            let (st, v, _) = infer_model(&client, &base, &name, &body).await;
            assert_eq!(st, 200, "{v}");
            (rows, x, v)
        }));
    }
    let model = root().join("models/mlp/1/model.onnx");
    for t in tasks {
        let (rows, x, v) = t.await.unwrap();
        let want = reference(&model, &[fp32_tensor("input", &[rows, 16], &x)]);
        assert_eq!(v["outputs"][0]["shape"], json!([rows, 4]));
        let got: Vec<f32> = v["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_close(&got, &f32s(&want[0].data));
    }
    // Batching really happened: fewer batches than requests, and multi-row batches.
    let text = s.metrics_text().await;
    let batches = metric(
        &text,
        &format!("modelgate_batches_total{{model=\"{name}\",version=\"1\""),
    );
    assert!(
        (1.0..64.0).contains(&batches),
        "{batches} batches for 64 requests\n{text}"
    );
    let rows_sum = metric(
        &text,
        &format!("modelgate_batch_size_rows_sum{{model=\"{name}\""),
    );
    assert_eq!(rows_sum, (0..64).map(|i| (i % 5 + 1) as f64).sum::<f64>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_batches_equal_unbatched_outputs() {
    batched_equals_unbatched(
        "mlp_static",
        "batching = \"static\"\nmax_queue_delay_us = 20000\ninstances = 1\nmax_batch_size = 32\nwarmup = false\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_batches_equal_unbatched_outputs() {
    batched_equals_unbatched("mlp_adaptive", "batching = \"adaptive\"\nmax_queue_delay_us = 20000\ninstances = 1\nmax_batch_size = 32\ntarget_p99_ms = 100\nwarmup = false\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_beyond_the_queue_gets_429_and_recovers() {
    // Batches wait 300 ms to fill, and only 4 requests may wait: a burst overflows at once.
    let repo = repo_with_mlp_config(
        "mlp_burst",
        "batching = \"static\"\nmax_queue_delay_us = 300000\nmax_queue_size = 4\ninstances = 1\n",
    );
    let s = start_with(repo.path(), |_| {}).await;
    let client = reqwest::Client::new();
    let body = json!({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": rand_f32(16, 1)}]});
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (client, base, body) = (client.clone(), s.http.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            infer_model(&client, &base, "mlp_burst", &body).await
        }));
    }
    let (mut ok, mut rejected) = (0, 0);
    for t in tasks {
        let (st, v, retry) = t.await.unwrap();
        match st {
            200 => ok += 1,
            429 => {
                rejected += 1;
                assert_eq!(retry.as_deref(), Some("1"));
                assert!(
                    v["error"].as_str().unwrap().contains("queue is full"),
                    "{v}"
                );
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(ok >= 4 && rejected >= 1, "ok {ok}, rejected {rejected}");
    assert_eq!(ok + rejected, 40);
    let _ = started;
    // Recovers at once: the next request is served (after its own batching delay).
    let (st, _, _) = infer_model(&client, &s.http, "mlp_burst", &body).await;
    assert_eq!(st, 200);
    // Every refusal is counted, as this model's (a name no other test serves: the
    // recorder is the process's).
    let text = s.metrics_text().await;
    let overloaded: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("modelgate_requests_total{")
                && l.contains("model=\"mlp_burst\"")
                && l.contains("code=\"overloaded\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(overloaded, f64::from(rejected), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_expire_in_the_queue() {
    // One worker, kept busy by the slow fixture (about 25 ms per row); requests allowing
    // 2 ms expire while they wait for it: 504 / DEADLINE_EXCEEDED, never run.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("slow")).unwrap();
    std::os::unix::fs::symlink(
        root().join("tests/fixtures/repo/slow/1"),
        dir.path().join("slow/1"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("slow/config.toml"),
        "instances = 1\nintra_op_threads = 1\nmax_queue_delay_us = 100\n",
    )
    .unwrap();
    let s = start_with(dir.path(), |_| {}).await;
    let client = reqwest::Client::new();
    let busy_body = json!({"inputs": [{"name": "x", "shape": [40, 1], "datatype": "FP32", "data": vec![1.0f32; 40]}]});
    let (c2, base) = (client.clone(), s.http.clone());
    let busy = tokio::spawn(async move { infer_model(&c2, &base, "slow", &busy_body).await });
    // Give the slow request time to arrive and start (it runs for about a second).
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let body = json!({
        "parameters": {"timeout": 2000},
        "inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1]}]
    });
    let (st, v, _) = infer_model(&client, &s.http, "slow", &body).await;
    assert_eq!(st, 504, "{v}");
    assert!(v["error"].as_str().unwrap().contains("deadline"), "{v}");
    // Over gRPC, the grpc-timeout header does the same.
    let mut c =
        modelgate::proto::grpc_inference_service_client::GrpcInferenceServiceClient::connect(
            s.grpc.clone(),
        )
        .await
        .unwrap();
    let mut req = tonic::Request::new(modelgate::proto::ModelInferRequest {
        model_name: "slow".into(),
        inputs: vec![modelgate::proto::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, 1],
            ..Default::default()
        }],
        raw_input_contents: vec![bytes::Bytes::from(f32_bytes(&[1.0]))],
        ..Default::default()
    });
    // 200 ms: the server expires it 20 ms early, so its answer beats the client's own timer.
    req.metadata_mut()
        .insert("grpc-timeout", "200m".parse().unwrap());
    let e = c.model_infer(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{}", e.message());
    assert!(
        !busy.is_finished(),
        "the slow request must still be running for this test to mean anything"
    );
    let (st, v, _) = busy.await.unwrap();
    assert_eq!(st, 200, "{v}");
    // Only the slow request ran.
    let stats: Value = reqwest::get(format!("{}/v2/models/slow/stats", s.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["model_stats"][0]["execution_count"], 1, "{stats}");
    assert_eq!(
        stats["model_stats"][0]["inference_stats"]["fail"]["count"],
        2
    );
    let text = s.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "modelgate_queue_deadline_exceeded_total{model=\"slow\""
        ),
        2.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_config_reports_batching() {
    let repo = repo_with_mlp_config(
        "mlp",
        "batching = \"static\"\nmax_queue_delay_us = 250\npreferred_batch_sizes = [8, 16]\nmax_batch_size = 32\n",
    );
    link(
        repo.path(),
        "reshape",
        &root().join("tests/fixtures/repo/reshape"),
    );
    let s = start_with(repo.path(), |_| {}).await;
    let v: Value = reqwest::get(format!("{}/v2/models/mlp/config", s.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["max_batch_size"], 32);
    assert_eq!(v["dynamic_batching"]["max_queue_delay_microseconds"], 250);
    assert_eq!(
        v["dynamic_batching"]["preferred_batch_size"],
        json!([8, 16])
    );
    let v: Value = reqwest::get(format!("{}/v2/models/reshape/config", s.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v.get("dynamic_batching").is_none(), "{v}");
    let mut c =
        modelgate::proto::grpc_inference_service_client::GrpcInferenceServiceClient::connect(
            s.grpc.clone(),
        )
        .await
        .unwrap();
    let cfg = c
        .model_config(modelgate::proto::ModelConfigRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    match cfg.scheduling_choice {
        Some(modelgate::proto::model_config::SchedulingChoice::DynamicBatching(d)) => {
            assert_eq!(d.max_queue_delay_microseconds, 250);
            assert_eq!(d.preferred_batch_size, vec![8, 16]);
        }
        other => panic!("{other:?}"),
    }
}

fn link(repo: &Path, name: &str, src: &Path) {
    std::os::unix::fs::symlink(src, repo.join(name)).unwrap();
}

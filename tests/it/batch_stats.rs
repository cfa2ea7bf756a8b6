//! Triton's statistics of batched and unbatched models over a real server: under
//! concurrent load a batching model shows fewer executions than inferences and one
//! `batch_stats` entry per executed batch size adding up to the inferences; a model that
//! does not batch shows batch size 1 only; warm-up runs and failed executions are not
//! counted; HTTP and gRPC report the same numbers.

use crate::common::*;
use bytes::Bytes;
use modelgate::proto as pb;
use modelgate::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

/// A repository with the bundled mlp as `batched` (static batching, a 20 ms queue delay,
/// one session, so that concurrent requests wait and share batches) and as `solo`
/// (batching off), plus the reshape fixture, which has no batch dimension.
fn repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, config) in [
        (
            "batched",
            "batching = \"static\"\nmax_batch_size = 32\nmax_queue_delay_us = 20000\ninstances = 1\nintra_op_threads = 1\n",
        ),
        ("solo", "batching = \"off\"\ninstances = 2\n"),
    ] {
        std::fs::create_dir_all(dir.path().join(name)).unwrap();
        std::os::unix::fs::symlink(root().join("models/mlp/1"), dir.path().join(name).join("1"))
            .unwrap();
        std::fs::write(dir.path().join(name).join("config.toml"), config).unwrap();
    }
    std::os::unix::fs::symlink(
        root().join("tests/fixtures/repo/reshape"),
        dir.path().join("reshape"),
    )
    .unwrap();
    dir
}

async fn grpc(s: &TestServer) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .expect("connect")
}

/// One version's statistics over HTTP, and the same over gRPC rendered as Triton's JSON
/// (field for field, so the two can be compared whole).
async fn stats_both(s: &TestServer, model: &str) -> (Value, Value) {
    let http: Value = reqwest::get(format!("{}/v2/models/{model}/versions/1/stats", s.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let g = grpc(s)
        .await
        .model_statistics(pb::ModelStatisticsRequest {
            name: model.into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.model_stats.len(), 1);
    let m = &g.model_stats[0];
    let d = |x: &Option<pb::StatisticDuration>| {
        let x = x.unwrap();
        json!({"count": x.count, "ns": x.ns})
    };
    let i = m.inference_stats.unwrap();
    let grpc = json!({
        "name": m.name,
        "version": m.version,
        "last_inference": m.last_inference,
        "inference_count": m.inference_count,
        "execution_count": m.execution_count,
        "inference_stats": {
            "success": d(&i.success), "fail": d(&i.fail), "queue": d(&i.queue),
            "compute_input": d(&i.compute_input), "compute_infer": d(&i.compute_infer),
            "compute_output": d(&i.compute_output), "cache_hit": d(&i.cache_hit),
            "cache_miss": d(&i.cache_miss),
        },
        "batch_stats": m.batch_stats.iter().map(|b| json!({
            "batch_size": b.batch_size,
            "compute_input": d(&b.compute_input),
            "compute_infer": d(&b.compute_infer),
            "compute_output": d(&b.compute_output),
        })).collect::<Vec<_>>(),
    });
    (http["model_stats"][0].clone(), grpc)
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// (batch size, executions) of every `batch_stats` entry, checking that each phase of an
/// entry was counted once per execution.
fn sizes(m: &Value) -> Vec<(u64, u64)> {
    m["batch_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let count = n(&b["compute_infer"]["count"]);
            assert_eq!(n(&b["compute_input"]["count"]), count, "{b}");
            assert_eq!(n(&b["compute_output"]["count"]), count, "{b}");
            assert!(n(&b["compute_infer"]["ns"]) > 0, "{b}");
            (n(&b["batch_size"]), count)
        })
        .collect()
}

/// Statistics read over both protocols must be equal; `last_inference` too, since
/// nothing runs between the two reads.
async fn same_over_both(s: &TestServer, model: &str) -> Value {
    let (http, grpc) = stats_both(s, model).await;
    assert_eq!(http, grpc, "HTTP and gRPC disagree for {model}");
    http
}

async fn infer_http(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    rows: usize,
    seed: u64,
) -> u16 {
    let body = json!({"inputs": [{"name": "input", "shape": [rows, 16], "datatype": "FP32",
        "data": rand_f32(rows * 16, seed)}]});
    client
        .post(format!("{base}/v2/models/{model}/infer"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn infer_grpc(
    c: &mut GrpcInferenceServiceClient<Channel>,
    model: &str,
    rows: usize,
    seed: u64,
) {
    c.model_infer(pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 16],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(f32_bytes(&rand_f32(rows * 16, seed)))],
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Sends `count` requests at once, alternating HTTP and gRPC, of 1 to 3 rows; returns
/// the rows sent.
async fn load(s: &TestServer, model: &str, count: u64, rows_of: fn(u64) -> usize) -> u64 {
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..count {
        let rows = rows_of(i);
        let (client, base, model) = (client.clone(), s.http.clone(), model.to_string());
        let mut g = grpc(s).await;
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                assert_eq!(infer_http(&client, &base, &model, rows, i).await, 200);
            } else {
                infer_grpc(&mut g, &model, rows, i).await;
            }
            rows as u64
        }));
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await.unwrap();
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batching_shows_in_execution_count_and_batch_stats() {
    let repo = repo();
    let s = start_with(repo.path(), |_| {}).await;

    // Warm-up ran every batch size through the real queue: none of it is counted.
    let m = same_over_both(&s, "batched").await;
    assert_eq!(n(&m["execution_count"]), 0, "{m}");
    assert_eq!(n(&m["inference_count"]), 0, "{m}");
    assert_eq!(m["batch_stats"], json!([]), "{m}");

    let requests = 96;
    let rows = load(&s, "batched", requests, |i| (i % 3 + 1) as usize).await;
    let m = same_over_both(&s, "batched").await;
    let (inferences, executions) = (n(&m["inference_count"]), n(&m["execution_count"]));
    // inference_count counts rows, execution_count batches.
    assert_eq!(inferences, rows, "{m}");
    assert!(
        executions < requests,
        "{executions} executions for {requests} concurrent requests: nothing was batched: {m}"
    );
    let sizes = sizes(&m);
    assert!(
        sizes.iter().any(|&(size, _)| size > 3),
        "no batch larger than one request: {sizes:?}"
    );
    assert!(
        sizes.iter().all(|&(size, _)| (1..=32).contains(&size)),
        "{sizes:?}"
    );
    assert!(
        sizes.windows(2).all(|w| w[0].0 < w[1].0),
        "one entry per size: {sizes:?}"
    );
    assert_eq!(
        sizes.iter().map(|&(size, c)| size * c).sum::<u64>(),
        inferences
    );
    assert_eq!(sizes.iter().map(|&(_, c)| c).sum::<u64>(), executions);

    // inference_stats count requests: each reports the whole time of the batch it ran in,
    // so their compute time adds up to more than the batches' own.
    let i = &m["inference_stats"];
    assert_eq!(n(&i["success"]["count"]), requests, "{m}");
    assert_eq!(n(&i["fail"]["count"]), 0, "{m}");
    for phase in ["queue", "compute_input", "compute_infer", "compute_output"] {
        assert_eq!(n(&i[phase]["count"]), requests, "{phase}: {m}");
    }
    let per_batch: u64 = m["batch_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| n(&b["compute_infer"]["ns"]))
        .sum();
    assert!(n(&i["compute_infer"]["ns"]) > per_batch, "{m}");
    // Requests waited for their batch to fill (static batching, 20 ms delay) and spent
    // that time in the queue, within the time they spent in the server.
    assert!(n(&i["queue"]["ns"]) > 0, "{m}");
    assert!(n(&i["success"]["ns"]) > n(&i["queue"]["ns"]), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbatched_models_show_batch_size_one() {
    let repo = repo();
    let s = start_with(repo.path(), |_| {}).await;

    // Batching off: every request runs alone, so executions = requests = rows.
    let requests = 24;
    let rows = load(&s, "solo", requests, |_| 1).await;
    let m = same_over_both(&s, "solo").await;
    assert_eq!(n(&m["inference_count"]), requests, "{m}");
    assert_eq!(n(&m["execution_count"]), requests, "{m}");
    assert_eq!(rows, requests);
    assert_eq!(sizes(&m), vec![(1, requests)], "{m}");
    // A model with a batch dimension reports its rows as the batch size even when
    // batching is off, as Triton does for a request of several rows.
    let client = reqwest::Client::new();
    assert_eq!(infer_http(&client, &s.http, "solo", 3, 7).await, 200);
    let m = same_over_both(&s, "solo").await;
    assert_eq!(sizes(&m), vec![(1, requests), (3, 1)], "{m}");
    assert_eq!(n(&m["inference_count"]), requests + 3, "{m}");
    assert_eq!(n(&m["execution_count"]), requests + 1, "{m}");

    // No batch dimension: batch size 1 whatever the shape; a failed execution counts as
    // a failed request, not as an execution.
    let ok = json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]});
    let bad = json!({"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": rand_f32(12, 5)}]});
    for body in [&ok, &bad, &ok, &ok] {
        client
            .post(format!("{}/v2/models/reshape/infer", s.http))
            .json(body)
            .send()
            .await
            .unwrap();
    }
    let m = same_over_both(&s, "reshape").await;
    assert_eq!(sizes(&m), vec![(1, 3)], "{m}");
    assert_eq!(n(&m["inference_count"]), 3, "{m}");
    assert_eq!(n(&m["execution_count"]), 3, "{m}");
    assert_eq!(n(&m["inference_stats"]["success"]["count"]), 3, "{m}");
    assert_eq!(n(&m["inference_stats"]["fail"]["count"]), 1, "{m}");
}

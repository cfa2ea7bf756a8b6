//! HTTP/REST API over a real server: every endpoint, JSON and binary tensors, every
//! bad-input case, numerical agreement with ONNX Runtime, and concurrency.

use crate::common::*;
use serde_json::{Value, json};

async fn get(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text })),
    )
}

fn f32_data(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metadata_endpoints() {
    let s = start().await;
    let (st, v) = get(&format!("{}/v2", s.http)).await;
    assert_eq!(st, 200);
    assert_eq!(v["name"], "modelgate");
    assert!(
        v["extensions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "binary_tensor_data")
    );
    assert_eq!(
        reqwest::get(format!("{}/v2/health/live", s.http))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(format!("{}/v2/health/ready", s.http))
            .await
            .unwrap()
            .status(),
        200
    );

    let (st, v) = get(&format!("{}/v2/models/iris", s.http)).await;
    assert_eq!(st, 200);
    assert_eq!(v["versions"], json!(["1", "2"]));
    assert_eq!(v["platform"], "onnxruntime_onnx");
    assert_eq!(
        v["inputs"],
        json!([{"name": "X", "datatype": "FP32", "shape": [-1, 4]}])
    );
    assert_eq!(
        v["outputs"],
        json!([{"name": "label", "datatype": "INT64", "shape": [-1]},
               {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}])
    );
    let (st, v) = get(&format!("{}/v2/models/mlp/versions/1", s.http)).await;
    assert_eq!(st, 200);
    assert_eq!(v["inputs"][0]["shape"], json!([-1, 16]));

    for path in [
        "/v2/models/iris/ready",
        "/v2/models/iris/versions/1/ready",
        "/v2/models/iris/versions/2/ready",
    ] {
        assert_eq!(
            reqwest::get(format!("{}{path}", s.http))
                .await
                .unwrap()
                .status(),
            200,
            "{path}"
        );
    }
    assert_eq!(
        reqwest::get(format!("{}/v2/models/nope/ready", s.http))
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        reqwest::get(format!("{}/v2/models/iris/versions/9/ready", s.http))
            .await
            .unwrap()
            .status(),
        404
    );

    let (st, v) = get(&format!("{}/v2/models/iris/config", s.http)).await;
    assert_eq!(st, 200);
    assert_eq!(v["name"], "iris");
    assert_eq!(v["max_batch_size"], 64);
    assert_eq!(v["input"][0]["dims"], json!([4]));
    assert_eq!(v["input"][0]["data_type"], "TYPE_FP32");
    assert_eq!(v["output"][0]["dims"], json!([1]));
    assert_eq!(v["output"][0]["reshape"], json!({"shape": []}));
    // The reshape fixture has a fixed output shape: not a batching model.
    let (_, v) = get(&format!("{}/v2/models/reshape/versions/1/config", s.http)).await;
    assert_eq!(v["max_batch_size"], 0);
    assert_eq!(v["input"][0]["dims"], json!([-1, 4]));

    // Statistics count successful inferences.
    let body = json!({"inputs": [{"name": "X", "shape": [3, 4], "datatype": "FP32", "data": rand_f32(12, 1)}]});
    assert_eq!(
        post(&format!("{}/v2/models/iris/versions/1/infer", s.http), body)
            .await
            .0,
        200
    );
    let (st, v) = get(&format!("{}/v2/models/iris/versions/1/stats", s.http)).await;
    assert_eq!(st, 200);
    let m = &v["model_stats"][0];
    assert_eq!(m["name"], "iris");
    assert_eq!(m["version"], "1");
    assert_eq!(m["inference_count"], 3);
    assert_eq!(m["execution_count"], 1);
    assert_eq!(m["inference_stats"]["success"]["count"], 1);
    assert!(m["inference_stats"]["success"]["ns"].as_u64().unwrap() > 0);
    let (_, v) = get(&format!("{}/v2/models/iris/stats", s.http)).await;
    assert_eq!(v["model_stats"].as_array().unwrap().len(), 2);
    let (_, v) = get(&format!("{}/v2/models/stats", s.http)).await;
    assert!(v["model_stats"].as_array().unwrap().len() >= 5);
    let (st, v) = get(&format!("{}/v2/nothing/here", s.http)).await;
    assert_eq!(st, 404);
    assert!(v["error"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_inference_matches_onnxruntime() {
    let s = start().await;
    for (model, version, input, width, rows) in [
        ("iris", "1", "X", 4, 1),
        ("iris", "2", "X", 4, 5),
        ("mlp", "1", "input", 16, 7),
    ] {
        let x = rand_f32(rows * width, rows as u64);
        let want = reference(
            &root().join(format!("models/{model}/{version}/model.onnx")),
            &[fp32_tensor(input, &[rows, width], &x)],
        );
        // Nested data, as [[row], [row]].
        let nested: Vec<Vec<f32>> = x.chunks(width).map(<[f32]>::to_vec).collect();
        for data in [json!(x), json!(nested)] {
            let body = json!({"id": "req-7", "inputs": [{"name": input, "shape": [rows, width], "datatype": "FP32", "data": data}]});
            let (st, v) = post(
                &format!("{}/v2/models/{model}/versions/{version}/infer", s.http),
                body,
            )
            .await;
            assert_eq!(st, 200, "{v}");
            assert_eq!(v["id"], "req-7");
            assert_eq!(v["model_name"], model);
            assert_eq!(v["model_version"], version);
            let outs = v["outputs"].as_array().unwrap();
            assert_eq!(outs.len(), want.len());
            for (o, w) in outs.iter().zip(&want) {
                assert_eq!(o["name"], w.name.as_str());
                assert_eq!(o["datatype"], w.dtype.as_str());
                assert_eq!(o["shape"], json!(w.shape));
                match w.dtype {
                    modelgate::tensor::DataType::Int64 => {
                        let got: Vec<i64> = o["data"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|x| x.as_i64().unwrap())
                            .collect();
                        assert_eq!(got, i64s(&w.data));
                    }
                    _ => assert_close(&f32_data(&o["data"]), &f32s(&w.data)),
                }
            }
        }
    }
    // No version: the newest ready version answers, and says so.
    let body = json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]});
    let (st, v) = post(&format!("{}/v2/models/iris/infer", s.http), body).await;
    assert_eq!(st, 200);
    assert_eq!(v["model_version"], "2");
    // No id given: the answer carries the one the server generated (issue 17: the id a
    // captured record and its feedback are joined by).
    assert!(v["id"].as_str().unwrap().starts_with("gen-"), "{v}");
    assert_eq!(
        v["outputs"][0]["data"],
        json!([0]),
        "a setosa row is class 0"
    );
    // Inference paths the direct handler leaves to the router answer as they did: a
    // percent-escaped name is decoded, a GET is 405.
    let body = json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]});
    for path in [
        "/v2/models/%69ris/infer",
        "/v2/models/iris/versions/%32/infer",
    ] {
        let (st, v) = post(&format!("{}{path}", s.http), body.clone()).await;
        assert_eq!(st, 200, "{path}: {v}");
        assert_eq!(v["model_name"], "iris", "{path}");
        assert_eq!(v["model_version"], "2", "{path}");
    }
    let r = reqwest::get(format!("{}/v2/models/iris/infer", s.http))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_subset_and_server_timing() {
    let s = start().await;
    let body = json!({
        "inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP32", "data": rand_f32(8, 3)}],
        "outputs": [{"name": "probabilities"}]
    });
    let r = reqwest::Client::new()
        .post(format!("{}/v2/models/iris/infer", s.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let timing = r.headers()["server-timing"].to_str().unwrap().to_string();
    assert!(
        timing.contains("queue;dur=")
            && timing.contains("infer;dur=")
            && timing.contains("total;dur="),
        "{timing}"
    );
    let v: Value = r.json().await.unwrap();
    let outs = v["outputs"].as_array().unwrap();
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0]["name"], "probabilities");
    assert_eq!(outs[0]["shape"], json!([2, 3]));
}

/// Builds a binary-extension body: JSON header then the raw bytes.
fn binary_body(header: &Value, blobs: &[&[u8]]) -> (Vec<u8>, usize) {
    let head = serde_json::to_vec(header).unwrap();
    let n = head.len();
    let mut body = head;
    for b in blobs {
        body.extend_from_slice(b);
    }
    (body, n)
}

/// Splits a binary-extension response into its JSON header and binary part.
async fn read_binary(r: reqwest::Response) -> (Value, Vec<u8>) {
    let hlen: usize = r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = r.bytes().await.unwrap();
    (
        serde_json::from_slice(&body[..hlen]).unwrap(),
        body[hlen..].to_vec(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_tensor_extension() {
    let s = start().await;
    let x = rand_f32(16 * 3, 9);
    let want = reference(
        &root().join("models/mlp/1/model.onnx"),
        &[fp32_tensor("input", &[3, 16], &x)],
    );
    let xb = f32_bytes(&x);
    let header = json!({
        "inputs": [{"name": "input", "shape": [3, 16], "datatype": "FP32", "parameters": {"binary_data_size": xb.len()}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": true}}]
    });
    let (body, hlen) = binary_body(&header, &[&xb]);
    let r = reqwest::Client::new()
        .post(format!("{}/v2/models/mlp/infer", s.http))
        .header("Inference-Header-Content-Length", hlen)
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    // Sent as separate buffers, but with its exact length.
    let hlen: usize = r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        r.headers()["content-length"].to_str().unwrap(),
        (hlen + 48).to_string()
    );
    let (head, bin) = read_binary(r).await;
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 48);
    assert!(head["outputs"][0].get("data").is_none());
    assert_close(&f32s(&bin), &f32s(&want[0].data));

    // binary_data_output for all outputs, with a per-output override back to JSON.
    let x = rand_f32(8, 4);
    let xb = f32_bytes(&x);
    let header = json!({
        "parameters": {"binary_data_output": true},
        "inputs": [{"name": "X", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": false}}, {"name": "probabilities"}]
    });
    let (body, hlen) = binary_body(&header, &[&xb]);
    let r = reqwest::Client::new()
        .post(format!("{}/v2/models/iris/versions/1/infer", s.http))
        .header("Inference-Header-Content-Length", hlen)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (head, bin) = read_binary(r).await;
    let want = reference(
        &root().join("models/iris/1/model.onnx"),
        &[fp32_tensor("X", &[2, 4], &x)],
    );
    let labels: Vec<i64> = head["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(labels, i64s(&want[0].data));
    assert_eq!(head["outputs"][1]["parameters"]["binary_data_size"], 24);
    assert_close(&f32s(&bin), &f32s(&want[1].data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_datatype_round_trips() {
    let s = start().await;
    // JSON values for 2 rows x 3 columns per type, and the expected echo.
    let cases: Vec<(&str, &str, Value)> = vec![
        (
            "bool",
            "BOOL",
            json!([true, false, true, false, false, true]),
        ),
        ("int8", "INT8", json!([-128, -1, 0, 1, 2, 127])),
        ("int16", "INT16", json!([-32768, -1, 0, 1, 2, 32767])),
        (
            "int32",
            "INT32",
            json!([-2147483648i64, -1, 0, 1, 2, 2147483647]),
        ),
        (
            "int64",
            "INT64",
            json!([-9007199254740993i64, -1, 0, 1, 2, 9007199254740993i64]),
        ),
        ("uint8", "UINT8", json!([0, 1, 2, 3, 4, 255])),
        ("uint16", "UINT16", json!([0, 1, 2, 3, 4, 65535])),
        ("uint32", "UINT32", json!([0, 1, 2, 3, 4, 4294967295u64])),
        (
            "uint64",
            "UINT64",
            json!([0, 1, 2, 3, 4, 18446744073709551615u64]),
        ),
        (
            "fp16",
            "FP16",
            json!([0.5, -1.0, 2.0, 0.25, 1024.0, -0.125]),
        ),
        ("fp32", "FP32", json!([0.5, -1.5, 3.25, 1e-3, 1e10, -7.0])),
        (
            "fp64",
            "FP64",
            json!([0.1, -1.5, 3.25, 1e-300, 1e300, -7.0]),
        ),
    ];
    let inputs: Vec<Value> = cases
        .iter()
        .map(|(n, dt, data)| json!({"name": format!("in_{n}"), "shape": [2, 3], "datatype": dt, "data": data}))
        .collect();
    let (st, v) = post(
        &format!("{}/v2/models/types/infer", s.http),
        json!({ "inputs": inputs }),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let outs = v["outputs"].as_array().unwrap();
    for ((n, dt, data), o) in cases.iter().zip(outs) {
        assert_eq!(o["name"], format!("out_{n}"));
        assert_eq!(o["datatype"], *dt);
        assert_eq!(o["shape"], json!([2, 3]));
        if *dt == "FP32" {
            assert_close(&f32_data(&o["data"]), &f32_data(data));
        } else {
            assert_eq!(&o["data"], data, "{dt}");
        }
    }
    // The same through the binary extension, all outputs binary: bytes come back unchanged.
    let mut blobs: Vec<Vec<u8>> = Vec::new();
    let mut header_inputs = Vec::new();
    for (i, (n, dt, _)) in cases.iter().enumerate() {
        let size = modelgate::tensor::DataType::parse(dt)
            .unwrap()
            .size()
            .unwrap();
        let blob: Vec<u8> = (0..6 * size).map(|b| ((b * 7 + i) % 2) as u8).collect();
        header_inputs.push(json!({"name": format!("in_{n}"), "shape": [2, 3], "datatype": dt, "parameters": {"binary_data_size": blob.len()}}));
        blobs.push(blob);
    }
    let header = json!({"inputs": header_inputs, "parameters": {"binary_data_output": true}});
    let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
    let (body, hlen) = binary_body(&header, &refs);
    let r = reqwest::Client::new()
        .post(format!("{}/v2/models/types/infer", s.http))
        .header("Inference-Header-Content-Length", hlen)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, bin) = read_binary(r).await;
    assert_eq!(bin, blobs.concat());
}

async fn expect_error(s: &TestServer, path: &str, body: Value, status: u16, needle: &str) {
    let (st, v) = post(&format!("{}{path}", s.http), body.clone()).await;
    assert_eq!(st, status, "{body} -> {v}");
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field in {v}"));
    assert!(msg.contains(needle), "{body}: '{msg}' lacks '{needle}'");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_server_keeps_serving() {
    let s = start().await;
    let x = |shape: Value, data: Value| json!({"inputs": [{"name": "X", "shape": shape, "datatype": "FP32", "data": data}]});
    let ok = x(json!([1, 4]), json!([1, 2, 3, 4]));
    expect_error(
        &s,
        "/v2/models/nope/infer",
        ok.clone(),
        404,
        "unknown model 'nope'",
    )
    .await;
    expect_error(
        &s,
        "/v2/models/iris/versions/7/infer",
        ok.clone(),
        404,
        "no version '7'",
    )
    .await;
    expect_error(
        &s,
        "/v2/models/iris/versions/abc/infer",
        ok.clone(),
        404,
        "no version 'abc'",
    )
    .await;
    expect_error(&s, "/v2/models/iris/infer",
        json!({"inputs": [{"name": "Y", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}), 400, "unknown input 'Y'").await;
    expect_error(
        &s,
        "/v2/models/iris/infer",
        json!({"inputs": []}),
        400,
        "missing input 'X'",
    )
    .await;
    expect_error(&s, "/v2/models/iris/infer",
        json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                          {"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}), 400, "more than once").await;
    expect_error(&s, "/v2/models/iris/infer",
        json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]}), 400, "datatype FP64 does not match").await;
    expect_error(
        &s,
        "/v2/models/iris/infer",
        x(json!([1, 5]), json!([1, 2, 3, 4, 5])),
        400,
        "does not fit",
    )
    .await;
    expect_error(
        &s,
        "/v2/models/iris/infer",
        x(json!([4]), json!([1, 2, 3, 4])),
        400,
        "does not fit",
    )
    .await;
    expect_error(
        &s,
        "/v2/models/iris/infer",
        x(json!([2, 4]), json!([1, 2, 3, 4])),
        400,
        "needs 8",
    )
    .await;
    expect_error(
        &s,
        "/v2/models/iris/infer",
        x(json!([-1, 4]), json!([1, 2, 3, 4])),
        400,
        "negative",
    )
    .await;
    expect_error(
        &s,
        "/v2/models/iris/infer",
        x(json!([4294967296u64, 4294967296u64, 4]), json!([1])),
        400,
        "too many elements",
    )
    .await;
    expect_error(
        &s,
        "/v2/models/iris/infer",
        x(json!([1, 4]), json!([1, 2, "x", 4])),
        400,
        "bad data",
    )
    .await;
    expect_error(
        &s,
        "/v2/models/iris/infer",
        json!({"inputs": [{"name": "X", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]}]}),
        400,
        "BYTES is not supported",
    )
    .await;
    expect_error(
        &s,
        "/v2/models/iris/infer",
        json!({"inputs": [{"name": "X"}]}),
        400,
        "malformed request JSON",
    )
    .await;
    expect_error(&s, "/v2/models/iris/infer",
        json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}], "outputs": [{"name": "nope"}]}), 400, "unknown output 'nope'").await;
    // Raw malformed bodies.
    for body in ["{", "not json", "", "{\"inputs\": 5}"] {
        let r = reqwest::Client::new()
            .post(format!("{}/v2/models/iris/infer", s.http))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("malformed request JSON"),
            "{v}"
        );
    }
    // Binary extension errors.
    for (hlen, body) in [("abc", b"{}".to_vec()), ("999", b"{}".to_vec())] {
        let r = reqwest::Client::new()
            .post(format!("{}/v2/models/iris/infer", s.http))
            .header("Inference-Header-Content-Length", hlen)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    }
    let header = json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]});
    let (body, hlen) = binary_body(&header, &[&[0u8; 8]]);
    let r = reqwest::Client::new()
        .post(format!("{}/v2/models/iris/infer", s.http))
        .header("Inference-Header-Content-Length", hlen)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("runs past the end"));
    // A failing ORT run is INTERNAL / 500 with ONNX Runtime's message.
    let (st, v) = post(
        &format!("{}/v2/models/reshape/infer", s.http),
        json!({"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": rand_f32(12, 5)}]}),
    )
    .await;
    assert_eq!(st, 500, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("inference failed:"),
        "{v}"
    );
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("reshape"),
        "{v}"
    );
    // Still serving, correctly.
    let (st, _) = post(&format!("{}/v2/models/reshape/infer", s.http),
        json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})).await;
    assert_eq!(st, 200);
    let (st, _) = post(&format!("{}/v2/models/iris/infer", s.http), ok).await;
    assert_eq!(st, 200);
    assert_eq!(
        reqwest::get(format!("{}/v2/health/ready", s.http))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_is_413() {
    let s = start_tweaked(|c| c.max_request_bytes = 4096).await;
    let big = json!({"inputs": [{"name": "input", "shape": [100, 16], "datatype": "FP32", "data": rand_f32(1600, 1)}]});
    let (st, v) = post(&format!("{}/v2/models/mlp/infer", s.http), big).await;
    assert_eq!(st, 413, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("over the limit of 4096 bytes"),
        "{v}"
    );
    let small = json!({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": rand_f32(16, 1)}]});
    assert_eq!(
        post(&format!("{}/v2/models/mlp/infer", s.http), small)
            .await
            .0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests() {
    let s = start().await;
    let client = reqwest::Client::new();
    let x = rand_f32(16, 42);
    let want = f32s(
        &reference(
            &root().join("models/mlp/1/model.onnx"),
            &[fp32_tensor("input", &[1, 16], &x)],
        )[0]
        .data,
    );
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let client = client.clone();
        let url = format!("{}/v2/models/mlp/infer", s.http);
        let body =
            json!({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": x}]});
        tasks.push(tokio::spawn(async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }));
    }
    for t in tasks {
        let v = t.await.unwrap();
        assert_close(&f32_data(&v["outputs"][0]["data"]), &want);
    }
}

/// The whole exposition is checked, so the server runs in a process of its own: this
/// process's recorder has every other test's series (iris with other versions, other
/// unknown-model requests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_metrics() {
    let s = spawn().await;
    let body = json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]});
    assert_eq!(
        post(
            &format!("{}/v2/models/iris/versions/1/infer", s.http),
            body.clone()
        )
        .await
        .0,
        200
    );
    assert_eq!(
        post(&format!("{}/v2/models/unknown-model/infer", s.http), body)
            .await
            .0,
        404
    );
    let r = reqwest::get(&s.metrics).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();
    for needle in [
        "# HELP modelgate_requests_total",
        "# TYPE modelgate_requests_total counter",
        "# TYPE modelgate_request_duration_seconds histogram",
        "# TYPE modelgate_inference_duration_seconds histogram",
        "modelgate_request_duration_seconds_bucket{",
        "modelgate_model_versions_ready{model=\"iris\"} 2",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("modelgate_requests_total{")
                && l.contains("model=\"iris\"")
                && l.contains("version=\"1\"")
                && l.contains("protocol=\"http\"")
                && l.contains("code=\"ok\"")
        })
        .unwrap_or_else(|| panic!("no ok counter in\n{text}"));
    assert_eq!(
        line.rsplit(' ').next().unwrap().parse::<f64>().unwrap(),
        1.0
    );
    // A made-up model name never becomes a label value; the request is counted all the same.
    assert!(!text.contains("unknown-model"));
    let not_found: f64 = text
        .lines()
        .filter(|l| l.starts_with("modelgate_requests_total{") && l.contains("code=\"not_found\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(not_found, 1.0, "{text}");
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// HTTP's "deflate": the zlib format (RFC 1950), as tritonclient sends it.
fn zlib(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Bare deflate (RFC 1951), which some clients send as "deflate".
fn raw_deflate(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn inflate(coding: &str, data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    match coding {
        "gzip" => flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .unwrap(),
        "deflate" => flate2::read::ZlibDecoder::new(data)
            .read_to_end(&mut out)
            .unwrap(),
        other => panic!("unexpected coding {other}"),
    };
    out
}

async fn post_encoded(
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = reqwest::Client::new().post(url).body(body);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.bytes().await.expect("body").to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_request_bodies_are_accepted() {
    let s = start().await;
    let url = format!("{}/v2/models/mlp/infer", s.http);
    let x = rand_f32(16 * 5, 21);
    let want = reference(
        &root().join("models/mlp/1/model.onnx"),
        &[fp32_tensor("input", &[5, 16], &x)],
    );
    let json_body = serde_json::to_vec(&json!({
        "inputs": [{"name": "input", "shape": [5, 16], "datatype": "FP32", "data": x}]
    }))
    .unwrap();
    for (coding, body) in [
        ("gzip", gzip(&json_body)),
        ("x-gzip", gzip(&json_body)),
        ("deflate", zlib(&json_body)),
        ("deflate", raw_deflate(&json_body)),
        ("identity", json_body.clone()),
        // Codings applied in the order listed: deflate first, then gzip.
        ("deflate, gzip", gzip(&zlib(&json_body))),
    ] {
        let (st, _, got) = post_encoded(
            &url,
            &[
                ("content-type", "application/json".into()),
                ("content-encoding", coding.into()),
            ],
            body,
        )
        .await;
        assert_eq!(st, 200, "{coding}: {}", String::from_utf8_lossy(&got));
        let v: Value = serde_json::from_slice(&got).unwrap();
        assert_close(&f32_data(&v["outputs"][0]["data"]), &f32s(&want[0].data));
    }

    // The binary extension: Inference-Header-Content-Length counts the decompressed
    // body, as Triton's clients send it.
    let xb = f32_bytes(&x);
    let header = json!({
        "inputs": [{"name": "input", "shape": [5, 16], "datatype": "FP32", "parameters": {"binary_data_size": xb.len()}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": true}}]
    });
    let (plain, hlen) = binary_body(&header, &[&xb]);
    for (coding, body) in [("gzip", gzip(&plain)), ("deflate", zlib(&plain))] {
        let (st, headers, got) = post_encoded(
            &url,
            &[
                ("inference-header-content-length", hlen.to_string()),
                ("content-encoding", coding.into()),
            ],
            body,
        )
        .await;
        assert_eq!(st, 200, "{coding}: {}", String::from_utf8_lossy(&got));
        let n: usize = headers["inference-header-content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_close(&f32s(&got[n..]), &f32s(&want[0].data));
    }

    // Unknown codings and corrupt data: clear 4xx, nothing served.
    for (coding, body, status, needle) in [
        (
            "br",
            json_body.clone(),
            400,
            "Content-Encoding 'br' is not supported",
        ),
        ("gzip", json_body.clone(), 400, "not valid gzip"),
        (
            "deflate",
            b"\x78\x9c garbage".to_vec(),
            400,
            "not valid deflate",
        ),
        (
            "gzip",
            gzip(&json_body)[..40].to_vec(),
            400,
            "not valid gzip",
        ),
    ] {
        let (st, headers, got) =
            post_encoded(&url, &[("content-encoding", coding.into())], body).await;
        let text = String::from_utf8_lossy(&got);
        assert_eq!(st, status, "{coding}: {text}");
        assert!(text.contains(needle), "{coding}: {text}");
        if coding == "br" {
            assert_eq!(headers["accept-encoding"], "gzip, deflate");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zip_bomb_is_413_after_decompression() {
    let s = start_tweaked(|c| c.max_request_bytes = 64 * 1024).await;
    let url = format!("{}/v2/models/mlp/infer", s.http);
    // 64 MiB of JSON whitespace compress to about 64 KiB... of which the wire carries
    // far less than the limit: only the decompressed size is over it.
    let mut bomb = b"{\"inputs\":[".to_vec();
    bomb.resize(64 << 20, b' ');
    for (coding, body) in [("gzip", gzip(&bomb)), ("deflate", zlib(&bomb))] {
        assert!(body.len() < 64 * 1024, "{}", body.len());
        let (st, _, got) = post_encoded(&url, &[("content-encoding", coding.into())], body).await;
        let text = String::from_utf8_lossy(&got);
        assert_eq!(st, 413, "{coding}: {text}");
        assert!(
            text.contains("over the limit of 65536 bytes (max_request_bytes)"),
            "{text}"
        );
    }
    // Small compressed bodies under the limit still serve.
    let ok = serde_json::to_vec(&json!({
        "inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": rand_f32(16, 2)}]
    }))
    .unwrap();
    let (st, _, _) = post_encoded(&url, &[("content-encoding", "gzip".into())], gzip(&ok)).await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_compressed_as_accept_encoding_asks() {
    let s = start().await;
    let url = format!("{}/v2/models/mlp/infer", s.http);
    let x = rand_f32(16 * 200, 5);
    let want = reference(
        &root().join("models/mlp/1/model.onnx"),
        &[fp32_tensor("input", &[200, 16], &x)],
    );
    let body = serde_json::to_vec(&json!({
        "inputs": [{"name": "input", "shape": [200, 16], "datatype": "FP32", "data": x}]
    }))
    .unwrap();
    for (accept, coding) in [
        ("gzip", Some("gzip")),
        ("deflate", Some("deflate")),
        ("gzip;q=0.2, deflate;q=0.8", Some("deflate")),
        ("gzip, deflate", Some("gzip")),
        ("*", Some("gzip")),
        ("deflate;q=0, *;q=0.5", Some("gzip")),
        ("identity;q=1, gzip;q=0.5", None),
        ("gzip;q=0", None),
        ("br", None),
        ("", None),
    ] {
        let mut headers = vec![("content-type", "application/json".to_string())];
        if !accept.is_empty() {
            headers.push(("accept-encoding", accept.to_string()));
        }
        let (st, h, got) = post_encoded(&url, &headers, body.clone()).await;
        assert_eq!(st, 200, "{accept}");
        assert_eq!(
            h.get("content-encoding").map(|v| v.to_str().unwrap()),
            coding,
            "{accept}"
        );
        assert_eq!(h["vary"], "accept-encoding", "{accept}");
        assert_eq!(h["content-length"].to_str().unwrap(), got.len().to_string());
        let plain = match coding {
            Some(c) => {
                assert!(got.len() < body.len() / 2, "{accept}: {} bytes", got.len());
                inflate(c, &got)
            }
            None => got,
        };
        let v: Value = serde_json::from_slice(&plain).unwrap();
        assert_close(&f32_data(&v["outputs"][0]["data"]), &f32s(&want[0].data));
    }

    // Binary outputs: Inference-Header-Content-Length counts the decompressed JSON.
    let header = json!({
        "inputs": [{"name": "input", "shape": [200, 16], "datatype": "FP32", "data": x}],
        "outputs": [{"name": "output", "parameters": {"binary_data": true}}]
    });
    let (st, h, got) = post_encoded(
        &url,
        &[("accept-encoding", "gzip".into())],
        serde_json::to_vec(&header).unwrap(),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(h["content-encoding"], "gzip");
    let plain = inflate("gzip", &got);
    let n: usize = h["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let head: Value = serde_json::from_slice(&plain[..n]).unwrap();
    assert_eq!(
        head["outputs"][0]["parameters"]["binary_data_size"],
        200 * 4 * 4
    );
    assert_close(&f32s(&plain[n..]), &f32s(&want[0].data));

    // A tiny answer may go uncompressed, unless identity was refused.
    let tiny = serde_json::to_vec(&json!({
        "inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
    }))
    .unwrap();
    let iris = format!("{}/v2/models/iris/infer", s.http);
    let (_, h, got) =
        post_encoded(&iris, &[("accept-encoding", "gzip".into())], tiny.clone()).await;
    assert_eq!(h.get("content-encoding"), None);
    serde_json::from_slice::<Value>(&got).unwrap();
    let (_, h, got) = post_encoded(
        &iris,
        &[("accept-encoding", "gzip, identity;q=0".into())],
        tiny,
    )
    .await;
    assert_eq!(h["content-encoding"], "gzip");
    serde_json::from_slice::<Value>(&inflate("gzip", &got)).unwrap();
}

//! Criterion benchmarks of the request path's pure components and of the ORT floor.
//!
//! `cargo bench --bench components`. Needs the ONNX Runtime library
//! (scripts/fetch-onnxruntime.sh) for the `ort_run` group.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use modelgate::proto as pb;
use modelgate::tensor::{DataType, Tensor, parse_json_data, write_json_data};

fn floats(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37).sin()).collect()
}

fn json_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("json_decode_fp32");
    for rows in [1usize, 64] {
        let n = rows * 16;
        let text = serde_json::to_string(&floats(n)).expect("json");
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(rows), &text, |b, text| {
            b.iter(|| parse_json_data("input", DataType::Fp32, black_box(text), n).expect("parse"))
        });
    }
    g.finish();
}

fn json_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("json_encode_fp32");
    for rows in [1usize, 64] {
        let data: Vec<u8> = floats(rows * 4)
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        g.bench_with_input(BenchmarkId::from_parameter(rows), &data, |b, data| {
            b.iter(|| {
                let mut out = Vec::with_capacity(64);
                write_json_data(&mut out, DataType::Fp32, black_box(data)).expect("encode");
                out
            })
        });
    }
    g.finish();
}

fn protobuf_decode(c: &mut Criterion) {
    use prost::Message;
    let mut g = c.benchmark_group("protobuf_decode");
    for rows in [1usize, 64] {
        let raw: Vec<u8> = floats(rows * 16)
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let req = pb::ModelInferRequest {
            model_name: "mlp".into(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![rows as i64, 16],
                ..Default::default()
            }],
            raw_input_contents: vec![Bytes::from(raw)],
            ..Default::default()
        };
        let wire = Bytes::from(req.encode_to_vec());
        g.bench_with_input(BenchmarkId::from_parameter(rows), &wire, |b, wire| {
            b.iter(|| {
                let req = pb::ModelInferRequest::decode(black_box(wire.clone())).expect("decode");
                modelgate::api::grpc::decode_infer(req).expect("tensors")
            })
        });
    }
    g.finish();
}

fn binary_extension_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("http_binary_decode");
    for rows in [1usize, 64] {
        let raw: Vec<u8> = floats(rows * 16)
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let head = serde_json::to_vec(&serde_json::json!({
            "inputs": [{"name": "input", "shape": [rows, 16], "datatype": "FP32",
                        "parameters": {"binary_data_size": raw.len()}}],
            "outputs": [{"name": "output", "parameters": {"binary_data": true}}]
        }))
        .expect("json");
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            modelgate::api::http::HEADER_CONTENT_LENGTH,
            head.len().into(),
        );
        let mut body = head;
        body.extend_from_slice(&raw);
        let body = Bytes::from(body);
        g.bench_with_input(BenchmarkId::from_parameter(rows), &body, |b, body| {
            b.iter(|| {
                modelgate::api::http::decode_infer(
                    "mlp".into(),
                    None,
                    &headers,
                    black_box(body.clone()),
                )
                .expect("decode")
            })
        });
    }
    g.finish();
}

fn batch_split(c: &mut Criterion) {
    // Splitting a 64-row batch output back to 16 requests of 4 rows: zero-copy slices.
    let data: Vec<u8> = floats(64 * 4)
        .iter()
        .flat_map(|f| f.to_le_bytes())
        .collect();
    let out = vec![Tensor {
        name: "output".into(),
        dtype: DataType::Fp32,
        shape: vec![64, 4],
        data: Bytes::from(data),
    }];
    let rows = vec![4usize; 16];
    c.bench_function("batch_split_64_rows_16_requests", |b| {
        b.iter(|| modelgate::batcher::split_rows(black_box(&out), &rows, 64).expect("split"))
    });
}

fn ort_run(c: &mut Criterion) {
    let Ok(env) = modelgate::runtime::init(None) else {
        eprintln!("ort_run skipped: ONNX Runtime library not found (scripts/fetch-onnxruntime.sh)");
        return;
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut g = c.benchmark_group("ort_run_mlp");
    let path = root.join("models/mlp/1/model.onnx");
    let mut session = modelgate::runtime::create_session(env, &path, 1).expect("session");
    let (_, outputs) = modelgate::runtime::interface(&session).expect("interface");
    // Batch assembly: 16 requests of 4 rows copied into one 64-row input tensor and run.
    let parts: Vec<Vec<u8>> = (0..16)
        .map(|_| {
            floats(4 * 16)
                .iter()
                .flat_map(|f| f.to_le_bytes())
                .collect()
        })
        .collect();
    g.bench_function("assembled_64_from_16", |b| {
        b.iter(|| {
            let input = modelgate::runtime::InputParts {
                name: "input",
                dtype: DataType::Fp32,
                shape: vec![64, 16],
                parts: parts.iter().map(Vec::as_slice).collect(),
            };
            modelgate::runtime::run_parts(&mut session, std::slice::from_ref(&input), &outputs)
                .expect("run")
        })
    });
    for rows in [1usize, 8, 32, 128] {
        let input = Tensor {
            name: "input".into(),
            dtype: DataType::Fp32,
            shape: vec![rows, 16],
            data: Bytes::from(
                floats(rows * 16)
                    .iter()
                    .flat_map(|f| f.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
        };
        g.throughput(Throughput::Elements(rows as u64));
        g.bench_with_input(BenchmarkId::from_parameter(rows), &input, |b, input| {
            b.iter(|| {
                modelgate::runtime::run(&mut session, std::slice::from_ref(input), &outputs)
                    .expect("run")
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    json_decode,
    json_encode,
    protobuf_decode,
    binary_extension_decode,
    batch_split,
    ort_run
);
criterion_main!(benches);

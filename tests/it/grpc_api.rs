//! gRPC API over a real server: every RPC we serve, raw and typed contents, errors with
//! their status codes, the health service, large messages and concurrency.

use crate::common::*;
use bytes::Bytes;
use modelgate::proto as pb;
use modelgate::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use tonic::Code;
use tonic::transport::Channel;

async fn client(s: &TestServer) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .expect("connect")
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

fn input(name: &str, datatype: &str, shape: &[i64]) -> pb::model_infer_request::InferInputTensor {
    pb::model_infer_request::InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        ..Default::default()
    }
}

fn raw_request(
    model: &str,
    version: &str,
    name: &str,
    shape: &[i64],
    data: &[f32],
) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: model.into(),
        model_version: version.into(),
        id: "grpc-1".into(),
        inputs: vec![input(name, "FP32", shape)],
        raw_input_contents: vec![Bytes::from(f32_bytes(data))],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_model_rpcs() {
    let s = start().await;
    let mut c = client(&s).await;
    assert!(
        c.server_live(pb::ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        c.server_ready(pb::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    for (name, version, want) in [
        ("iris", "", true),
        ("iris", "1", true),
        ("iris", "2", true),
        ("iris", "3", false),
        ("nope", "", false),
    ] {
        let r = c
            .model_ready(pb::ModelReadyRequest {
                name: name.into(),
                version: version.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.ready, want, "{name} {version}");
    }
    let md = c
        .server_metadata(pb::ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(md.name, "modelgate");
    assert!(md.extensions.contains(&"model_configuration".to_string()));

    let m = c
        .model_metadata(pb::ModelMetadataRequest {
            name: "iris".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.versions, vec!["1", "2"]);
    assert_eq!(m.platform, "onnxruntime_onnx");
    assert_eq!(
        (
            m.inputs[0].name.as_str(),
            m.inputs[0].datatype.as_str(),
            m.inputs[0].shape.clone()
        ),
        ("X", "FP32", vec![-1, 4])
    );
    assert_eq!(
        m.outputs
            .iter()
            .map(|o| o.name.as_str())
            .collect::<Vec<_>>(),
        ["label", "probabilities"]
    );
    assert_eq!(m.outputs[0].datatype, "INT64");
    let err = c
        .model_metadata(pb::ModelMetadataRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let cfg = c
        .model_config(pb::ModelConfigRequest {
            name: "mlp".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(cfg.name, "mlp");
    assert_eq!(cfg.platform, "onnxruntime_onnx");
    assert_eq!(cfg.max_batch_size, 64);
    assert_eq!(cfg.input[0].dims, vec![16]);
    assert_eq!(cfg.input[0].data_type, pb::DataType::TypeFp32 as i32);
    assert_eq!(cfg.output[0].dims, vec![4]);

    // Statistics move with inference.
    c.model_infer(raw_request("mlp", "1", "input", &[2, 16], &rand_f32(32, 2)))
        .await
        .unwrap();
    let st = c
        .model_statistics(pb::ModelStatisticsRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.model_stats.len(), 1);
    assert_eq!(st.model_stats[0].inference_count, 2);
    assert_eq!(
        st.model_stats[0]
            .inference_stats
            .unwrap()
            .success
            .unwrap()
            .count,
        1
    );
    assert!(st.model_stats[0].last_inference > 0);
    let all = c
        .model_statistics(pb::ModelStatisticsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(all.model_stats.len() >= 5);

    // Standard gRPC health checking.
    let channel = Channel::from_shared(s.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "inference.GRPCInferenceService"] {
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    // RPCs we do not serve answer UNIMPLEMENTED, not a hang or a crash.
    let e = c
        .system_shared_memory_status(pb::SystemSharedMemoryStatusRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_and_typed_inference_match_onnxruntime() {
    // With the answer metadata on, as operators who want it in gRPC set it.
    let s = start_tweaked(|c| c.grpc_answer_metadata = true).await;
    let mut c = client(&s).await;
    let plain = start().await;
    let mut p = client(&plain).await;
    // By default the body alone names the version and the id: no answer metadata.
    let r = p
        .model_infer(raw_request(
            "iris",
            "1",
            "X",
            &[1, 4],
            &[5.1, 3.5, 1.4, 0.2],
        ))
        .await
        .unwrap();
    for name in [
        "server-timing",
        "x-model-version",
        "x-variant",
        "x-request-id",
    ] {
        assert!(
            r.metadata().get(name).is_none(),
            "{name}: {:?}",
            r.metadata()
        );
    }
    assert_eq!(r.get_ref().model_version, "1");
    assert_eq!(r.get_ref().id, "grpc-1");
    for (model, version, name, width, rows) in [
        ("iris", "1", "X", 4, 3),
        ("iris", "2", "X", 4, 1),
        ("mlp", "1", "input", 16, 9),
    ] {
        let x = rand_f32(rows * width, 11 + rows as u64);
        let want = reference(
            &root().join(format!("models/{model}/{version}/model.onnx")),
            &[fp32_tensor(name, &[rows, width], &x)],
        );
        let shape = [rows as i64, width as i64];
        let mut typed = raw_request(model, version, name, &shape, &x);
        typed.raw_input_contents.clear();
        typed.inputs[0].contents = Some(pb::InferTensorContents {
            fp32_contents: x.clone(),
            ..Default::default()
        });
        for req in [raw_request(model, version, name, &shape, &x), typed] {
            let r = c.model_infer(req).await.unwrap();
            let timing = r
                .metadata()
                .get("server-timing")
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            assert!(
                timing.starts_with("queue;dur=") && timing.contains("total;dur="),
                "{timing}"
            );
            let r = r.into_inner();
            assert_eq!(r.id, "grpc-1");
            assert_eq!(r.model_name, model);
            assert_eq!(r.model_version, version);
            assert_eq!(r.outputs.len(), want.len());
            assert_eq!(r.raw_output_contents.len(), want.len());
            for ((o, raw), w) in r.outputs.iter().zip(&r.raw_output_contents).zip(&want) {
                assert_eq!(o.name, w.name);
                assert_eq!(o.datatype, w.dtype.as_str());
                assert_eq!(
                    o.shape,
                    w.shape.iter().map(|&d| d as i64).collect::<Vec<_>>()
                );
                if w.dtype == modelgate::tensor::DataType::Int64 {
                    assert_eq!(i64s(raw), i64s(&w.data));
                } else {
                    assert_close(&f32s(raw), &f32s(&w.data));
                }
            }
        }
    }
    // No version: the newest version answers and says which.
    let r = c
        .model_infer(raw_request("iris", "", "X", &[1, 4], &[5.1, 3.5, 1.4, 0.2]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.model_version, "2");
    assert_eq!(i64s(&r.raw_output_contents[0]), vec![0]);
    // A requested subset of outputs.
    let mut req = raw_request("iris", "1", "X", &[2, 4], &rand_f32(8, 1));
    req.outputs = vec![pb::model_infer_request::InferRequestedOutputTensor {
        name: "probabilities".into(),
        ..Default::default()
    }];
    let r = c.model_infer(req).await.unwrap().into_inner();
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(r.outputs[0].name, "probabilities");
    assert_eq!(r.outputs[0].shape, vec![2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_contents_for_every_datatype() {
    let s = start().await;
    let mut c = client(&s).await;
    let contents = |dt: &str| -> pb::InferTensorContents {
        let mut t = pb::InferTensorContents::default();
        match dt {
            "BOOL" => t.bool_contents = vec![true, false, true, true, false, false],
            "INT8" => t.int_contents = vec![-128, -1, 0, 1, 2, 127],
            "INT16" => t.int_contents = vec![-32768, -1, 0, 1, 2, 32767],
            "INT32" => t.int_contents = vec![i32::MIN, -1, 0, 1, 2, i32::MAX],
            "INT64" => t.int64_contents = vec![i64::MIN, -1, 0, 1, 2, i64::MAX],
            "UINT8" => t.uint_contents = vec![0, 1, 2, 3, 4, 255],
            "UINT16" => t.uint_contents = vec![0, 1, 2, 3, 4, 65535],
            "UINT32" => t.uint_contents = vec![0, 1, 2, 3, 4, u32::MAX],
            "UINT64" => t.uint64_contents = vec![0, 1, 2, 3, 4, u64::MAX],
            "FP32" => t.fp32_contents = vec![0.5, -1.5, 3.25, 1e-3, 1e10, -7.0],
            "FP64" => t.fp64_contents = vec![0.1, -1.5, 3.25, 1e-300, 1e300, -7.0],
            _ => unreachable!(),
        }
        t
    };
    let types = [
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "fp16",
        "fp32", "fp64",
    ];
    let mut req = pb::ModelInferRequest {
        model_name: "types".into(),
        ..Default::default()
    };
    let mut raw_req = req.clone();
    for t in types {
        let dt = t.to_uppercase();
        let mut i = input(&format!("in_{t}"), &dt, &[2, 3]);
        let size = modelgate::tensor::DataType::parse(&dt)
            .unwrap()
            .size()
            .unwrap();
        let raw: Vec<u8> = (0..6 * size).map(|b| (b % 2) as u8).collect();
        raw_req.inputs.push(i.clone());
        raw_req.raw_input_contents.push(Bytes::from(raw));
        // FP16 has no typed field: it is sent raw in the raw request only.
        if dt != "FP16" {
            i.contents = Some(contents(&dt));
            req.inputs.push(i);
        }
    }
    // Raw: every type's bytes echo back unchanged.
    let r = c.model_infer(raw_req.clone()).await.unwrap().into_inner();
    assert_eq!(r.raw_output_contents, raw_req.raw_input_contents);
    // Typed: the model needs every input, so FP16 typed must be refused clearly.
    let mut fp16 = input("in_fp16", "FP16", &[2, 3]);
    fp16.contents = Some(pb::InferTensorContents {
        fp32_contents: vec![0.0; 6],
        ..Default::default()
    });
    let mut typed = req.clone();
    typed.inputs.push(fp16);
    let e = c.model_infer(typed).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("raw_input_contents"),
        "{}",
        e.message()
    );
    // Typed without FP16 is a missing input: refused by name.
    let e = c.model_infer(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("missing input 'in_fp16'"),
        "{}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_contents_decode_exactly() {
    // Every typed contents field through the identity model (no FP16: it has no typed field).
    let s = start().await;
    let mut c = client(&s).await;
    let mut req = pb::ModelInferRequest {
        model_name: "typed".into(),
        ..Default::default()
    };
    let mut expected: Vec<Vec<u8>> = Vec::new();
    let typed: Vec<(&str, pb::InferTensorContents, Vec<u8>)> = vec![
        (
            "BOOL",
            pb::InferTensorContents {
                bool_contents: vec![true, false, true, true, false, false],
                ..Default::default()
            },
            vec![1, 0, 1, 1, 0, 0],
        ),
        (
            "INT8",
            pb::InferTensorContents {
                int_contents: vec![-128, -1, 0, 1, 2, 127],
                ..Default::default()
            },
            [-128i8, -1, 0, 1, 2, 127]
                .iter()
                .map(|&v| v as u8)
                .collect(),
        ),
        (
            "INT16",
            pb::InferTensorContents {
                int_contents: vec![-32768, -1, 0, 1, 2, 32767],
                ..Default::default()
            },
            [-32768i16, -1, 0, 1, 2, 32767]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        (
            "INT32",
            pb::InferTensorContents {
                int_contents: vec![i32::MIN, -1, 0, 1, 2, i32::MAX],
                ..Default::default()
            },
            [i32::MIN, -1, 0, 1, 2, i32::MAX]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        (
            "INT64",
            pb::InferTensorContents {
                int64_contents: vec![i64::MIN, -1, 0, 1, 2, i64::MAX],
                ..Default::default()
            },
            [i64::MIN, -1, 0, 1, 2, i64::MAX]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        (
            "UINT8",
            pb::InferTensorContents {
                uint_contents: vec![0, 1, 2, 3, 4, 255],
                ..Default::default()
            },
            vec![0, 1, 2, 3, 4, 255],
        ),
        (
            "UINT16",
            pb::InferTensorContents {
                uint_contents: vec![0, 1, 2, 3, 4, 65535],
                ..Default::default()
            },
            [0u16, 1, 2, 3, 4, 65535]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        (
            "UINT32",
            pb::InferTensorContents {
                uint_contents: vec![0, 1, 2, 3, 4, u32::MAX],
                ..Default::default()
            },
            [0u32, 1, 2, 3, 4, u32::MAX]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        (
            "UINT64",
            pb::InferTensorContents {
                uint64_contents: vec![0, 1, 2, 3, 4, u64::MAX],
                ..Default::default()
            },
            [0u64, 1, 2, 3, 4, u64::MAX]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        (
            "FP32",
            pb::InferTensorContents {
                fp32_contents: vec![0.5, -1.5, 3.25, 1e-3, 1e10, -7.0],
                ..Default::default()
            },
            [0.5f32, -1.5, 3.25, 1e-3, 1e10, -7.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        (
            "FP64",
            pb::InferTensorContents {
                fp64_contents: vec![0.1, -1.5, 3.25, 1e-300, 1e300, -7.0],
                ..Default::default()
            },
            [0.1f64, -1.5, 3.25, 1e-300, 1e300, -7.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    ];
    for (dt, contents, bytes) in typed {
        let mut i = input(&format!("in_{}", dt.to_lowercase()), dt, &[2, 3]);
        i.contents = Some(contents);
        req.inputs.push(i);
        expected.push(bytes);
    }
    let r = c.model_infer(req).await.unwrap().into_inner();
    assert_eq!(r.raw_output_contents.len(), expected.len());
    for ((o, got), want) in r.outputs.iter().zip(&r.raw_output_contents).zip(&expected) {
        assert_eq!(&got[..], &want[..], "{}", o.name);
        assert_eq!(o.shape, vec![2, 3]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_status_codes_and_server_keeps_serving() {
    let s = start().await;
    let mut c = client(&s).await;
    let ok = raw_request("iris", "1", "X", &[1, 4], &[1.0, 2.0, 3.0, 4.0]);
    let cases: Vec<(pb::ModelInferRequest, Code, &str)> = vec![
        (
            {
                let mut r = ok.clone();
                r.model_name = "nope".into();
                r
            },
            Code::NotFound,
            "unknown model 'nope'",
        ),
        (
            {
                let mut r = ok.clone();
                r.model_version = "9".into();
                r
            },
            Code::NotFound,
            "no version '9'",
        ),
        (
            {
                let mut r = ok.clone();
                r.inputs[0].name = "Y".into();
                r
            },
            Code::InvalidArgument,
            "unknown input 'Y'",
        ),
        (
            {
                let mut r = ok.clone();
                r.inputs.clear();
                r.raw_input_contents.clear();
                r
            },
            Code::InvalidArgument,
            "missing input 'X'",
        ),
        (
            {
                let mut r = ok.clone();
                r.inputs.push(r.inputs[0].clone());
                r.raw_input_contents.push(r.raw_input_contents[0].clone());
                r
            },
            Code::InvalidArgument,
            "more than once",
        ),
        (
            {
                let mut r = ok.clone();
                r.inputs[0].datatype = "INT32".into();
                r
            },
            Code::InvalidArgument,
            "datatype INT32 does not match",
        ),
        (
            {
                let mut r = ok.clone();
                r.inputs[0].datatype = "FLOAT".into();
                r
            },
            Code::InvalidArgument,
            "unknown datatype",
        ),
        (
            {
                let mut r = ok.clone();
                r.inputs[0].datatype = "BYTES".into();
                r
            },
            Code::InvalidArgument,
            "BYTES is not supported",
        ),
        (
            {
                let mut r = ok.clone();
                r.inputs[0].shape = vec![1, 2, 2];
                r
            },
            Code::InvalidArgument,
            "does not fit",
        ),
        (
            {
                let mut r = ok.clone();
                r.inputs[0].shape = vec![2, 4];
                r
            },
            Code::InvalidArgument,
            "needs 32",
        ),
        (
            {
                let mut r = ok.clone();
                r.inputs[0].shape = vec![-1, 4];
                r
            },
            Code::InvalidArgument,
            "negative",
        ),
        (
            {
                let mut r = ok.clone();
                r.inputs[0].shape = vec![i64::MAX, i64::MAX];
                r
            },
            Code::InvalidArgument,
            "too many elements",
        ),
        (
            {
                let mut r = ok.clone();
                r.raw_input_contents.clear();
                r
            },
            Code::InvalidArgument,
            "has no data",
        ),
        (
            {
                let mut r = ok.clone();
                r.raw_input_contents.push(Bytes::new());
                r
            },
            Code::InvalidArgument,
            "raw_input_contents has 2 entries",
        ),
        (
            {
                let mut r = ok.clone();
                r.outputs
                    .push(pb::model_infer_request::InferRequestedOutputTensor {
                        name: "zzz".into(),
                        ..Default::default()
                    });
                r
            },
            Code::InvalidArgument,
            "unknown output 'zzz'",
        ),
        (
            raw_request("reshape", "1", "x", &[3, 4], &rand_f32(12, 3)),
            Code::Internal,
            "inference failed",
        ),
    ];
    for (req, code, needle) in cases {
        let e = c.model_infer(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {}", e.message());
        assert!(
            e.message().contains(needle),
            "'{}' lacks '{needle}'",
            e.message()
        );
    }
    let r = c.model_infer(ok).await.unwrap().into_inner();
    assert_eq!(r.outputs.len(), 2);
    assert!(
        c.server_ready(pb::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_and_the_limit() {
    // 70 000 rows x 16 FP32 = 4.48 MB: over tonic's 4 MiB default, under our 64 MiB limit.
    let s = start().await;
    let mut c = client(&s).await;
    let rows = 70_000;
    let x = rand_f32(rows * 16, 8);
    let r = c
        .model_infer(raw_request("mlp", "1", "input", &[rows as i64, 16], &x))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outputs[0].shape, vec![rows as i64, 4]);
    assert_eq!(r.raw_output_contents[0].len(), rows * 4 * 4);
    drop(s);
    let s = start_tweaked(|c| c.max_request_bytes = 64 * 1024).await;
    let mut c = client(&s).await;
    let e = c
        .model_infer(raw_request(
            "mlp",
            "1",
            "input",
            &[2000, 16],
            &rand_f32(32_000, 1),
        ))
        .await
        .unwrap_err();
    // Refused from the message prefix, before it is buffered, with gRPC's (and
    // Triton's) code for it.
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(
        e.message()
            .contains("over the limit of 65536 bytes (max_request_bytes)"),
        "{}",
        e.message()
    );
    // The same over a stream: the stream ends with RESOURCE_EXHAUSTED.
    let big = raw_request("mlp", "1", "input", &[2000, 16], &rand_f32(32_000, 1));
    let small = raw_request("mlp", "1", "input", &[1, 16], &rand_f32(16, 1));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(small.clone()).await.unwrap();
    let mut answers = c
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = answers
        .message()
        .await
        .unwrap()
        .expect("the small request's answer");
    assert_eq!(first.error_message, "");
    tx.send(big).await.unwrap();
    let e = match answers.message().await {
        Ok(m) => panic!("expected RESOURCE_EXHAUSTED, got {m:?}"),
        Err(e) => e,
    };
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("max_request_bytes"), "{}", e.message());
    // A compressed message under the limit that inflates past it: refused without
    // inflating more than the limit (tonic's decompression bound), same code.
    let mut cz = client(&s)
        .await
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let zeros = raw_request("mlp", "1", "input", &[2000, 16], &[0.0; 32_000]);
    let e = cz.model_infer(zeros).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    // The server is fine afterwards.
    c.model_infer(raw_request("mlp", "1", "input", &[1, 16], &rand_f32(16, 1)))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests() {
    let s = start().await;
    let c = client(&s).await;
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let rows = (i % 4 + 1) as usize;
            let x = rand_f32(rows * 16, i);
            let r = c
                .model_infer(raw_request("mlp", "1", "input", &[rows as i64, 16], &x))
                .await
                .expect("infer")
                .into_inner();
            (x, rows, r)
        }));
    }
    for t in tasks {
        let (x, rows, r) = t.await.unwrap();
        let want = reference(
            &root().join("models/mlp/1/model.onnx"),
            &[fp32_tensor("input", &[rows, 16], &x)],
        );
        assert_close(&f32s(&r.raw_output_contents[0]), &f32s(&want[0].data));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repository_index_carries_each_versions_lineage() {
    let s = start().await;
    let mut c = client(&s).await;
    let idx = c
        .repository_index(pb::RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    let param = |version: &str, key: &str| {
        idx.models
            .iter()
            .find(|m| m.name == "iris" && m.version == version)
            .unwrap_or_else(|| panic!("iris {version} in {:?}", idx.models))
            .parameters
            .get(key)
            .and_then(|p| match &p.parameter_choice {
                Some(pb::infer_parameter::ParameterChoice::StringParam(s)) => Some(s.clone()),
                _ => None,
            })
    };
    // iris/2 has a model.toml (the same flat keys as its metadata); iris/1 has none.
    assert_eq!(param("2", "lineage.parent_version").as_deref(), Some("1"));
    assert_eq!(
        param("2", "lineage.metrics.training_accuracy").as_deref(),
        Some("0.987")
    );
    assert_eq!(param("1", "lineage.parent_version"), None);
}

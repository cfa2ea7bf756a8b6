//! Property-based fuzzing of every decoder, bounded so that it runs in CI: HTTP JSON and
//! binary-extension requests, protobuf requests into tensors, config.toml (server and
//! model), routing.toml and profile.json. Each must return a value or a clear error,
//! never panic, and never allocate in proportion to what a small input claims.
//! (The same decoders have cargo-fuzz targets in fuzz/ for open-ended runs.)

use axum::http::HeaderMap;
use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;

use modelgate::config::Config;
use modelgate::drift::profile::Profile;
use modelgate::registry::settings::{ModelConfigFile, ModelSettings};
use modelgate::routing::TrafficSpec;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A JSON inference request built from parts that matter to the decoder: datatypes,
/// shapes (negative, zero, huge), data of any JSON shape, binary sizes, parameters.
fn json_request() -> impl Strategy<Value = (String, Vec<u8>)> {
    let dtype = prop_oneof![
        Just("FP32"),
        Just("FP16"),
        Just("INT64"),
        Just("BOOL"),
        Just("UINT8"),
        Just("BYTES"),
        Just("fp32"),
        Just("NOPE")
    ];
    let dim = prop_oneof![
        -3i64..5,
        Just(1i64 << 60),
        Just(i64::MAX),
        Just(i64::MIN),
        1i64..100_000
    ];
    let data = prop_oneof![
        Just("[1,2,3,4]".to_string()),
        Just("[[1.5,2],[3,4]]".to_string()),
        Just("[true,false]".to_string()),
        Just("\"x\"".to_string()),
        Just(
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"
                .to_string()
        ),
        Just("[1e309, -1e309, NaN]".to_string()),
        "[-0-9., \\[\\]e]{0,40}".prop_map(|s| s),
    ];
    let input = (
        dtype,
        prop::collection::vec(dim, 0..4),
        data,
        prop::option::of(0u64..64),
    )
        .prop_map(|(dt, shape, data, bin)| {
            let params = bin.map_or(String::new(), |b| {
                format!(r#","parameters":{{"binary_data_size":{b}}}"#)
            });
            let data = if bin.is_some() {
                String::new()
            } else {
                format!(r#","data":{data}"#)
            };
            format!(r#"{{"name":"X","datatype":"{dt}","shape":{shape:?}{params}{data}}}"#)
        });
    (
        prop::collection::vec(input, 0..3),
        prop::collection::vec(any::<u8>(), 0..64),
        prop::bool::ANY,
    )
        .prop_map(|(inputs, binary, out_binary)| {
            let head = format!(
                r#"{{"id":"1","parameters":{{"binary_data_output":{out_binary},"priority":1,"timeout":5}},"inputs":[{}],"outputs":[{{"name":"label"}}]}}"#,
                inputs.join(",")
            );
            (head, binary)
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn http_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512), header in prop::option::of(0usize..600)) {
        let mut headers = HeaderMap::new();
        if let Some(n) = header {
            headers.insert(modelgate::api::http::HEADER_CONTENT_LENGTH, n.into());
        }
        let _ = modelgate::api::http::decode_infer("iris".into(), None, &headers, Bytes::from(body));
    }

    #[test]
    fn http_requests_decode_or_fail_cleanly((head, binary) in json_request()) {
        let mut headers = HeaderMap::new();
        headers.insert(modelgate::api::http::HEADER_CONTENT_LENGTH, head.len().into());
        let mut body = head.into_bytes();
        body.extend_from_slice(&binary);
        if let Ok((req, _)) = modelgate::api::http::decode_infer("iris".into(), None, &headers, Bytes::from(body)) {
            // What decodes is consistent: every tensor's bytes match its shape.
            for t in &req.inputs {
                let size = t.dtype.size().unwrap_or(1);
                prop_assert_eq!(t.data.len(), t.element_count() * size);
            }
        }
    }

    #[test]
    fn protobuf_requests_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(req) = modelgate::proto::ModelInferRequest::decode(bytes.as_slice()) {
            let _ = modelgate::api::grpc::decode_infer(req);
        }
    }

    #[test]
    fn structured_protobuf_requests(shape in prop::collection::vec(prop_oneof![-2i64..6, Just(1i64 << 60), Just(i64::MAX)], 0..4),
                                    raw in prop::collection::vec(any::<u8>(), 0..64),
                                    dtype in prop_oneof![Just("FP32"), Just("INT8"), Just("BYTES"), Just("x")],
                                    typed in prop::bool::ANY) {
        use modelgate::proto::model_infer_request::InferInputTensor;
        let contents = typed.then(|| modelgate::proto::InferTensorContents {
            fp32_contents: vec![1.0; raw.len() % 9],
            int_contents: vec![1; raw.len() % 5],
            ..Default::default()
        });
        let req = modelgate::proto::ModelInferRequest {
            model_name: "iris".into(),
            inputs: vec![InferInputTensor {
                name: "X".into(),
                datatype: dtype.into(),
                shape,
                contents,
                ..Default::default()
            }],
            raw_input_contents: if typed { vec![] } else { vec![raw.into()] },
            ..Default::default()
        };
        if let Ok(r) = modelgate::api::grpc::decode_infer(req) {
            for t in &r.inputs {
                prop_assert_eq!(t.data.len(), t.element_count() * t.dtype.size().unwrap_or(1));
            }
        }
    }

    #[test]
    fn config_files_parse_or_fail_cleanly(text in "[a-z_ =\\[\\]{}\"0-9.,\n#-]{0,200}") {
        let _ = toml::from_str::<Config>(&text);
        if let Ok(f) = ModelConfigFile::parse(&text) {
            let _ = f.resolve(&ModelSettings::default());
            let _ = f.traffic();
            let _ = f.drift();
        }
    }

    #[test]
    fn model_config_keys_with_any_values(key in prop_oneof![
            Just("max_batch_size"), Just("preferred_batch_sizes"), Just("version_policy"),
            Just("instances"), Just("target_p99_ms"), Just("[traffic]\nnew_versions"),
            Just("[drift]\nwindow"), Just("[traffic.rollout]\nsteps"), Just("[drift]\nalpha")],
        value in prop_oneof![Just("0".to_string()), Just("-1".to_string()), Just("1e308".to_string()),
            Just("nan".to_string()), Just("inf".to_string()), Just("\"all\"".to_string()),
            Just("{ latest = 0 }".to_string()), Just("[0, 1, 2]".to_string()), Just("[]".to_string()),
            any::<i64>().prop_map(|v| v.to_string()), any::<f64>().prop_map(|v| format!("{v:?}"))]) {
        let text = format!("{key} = {value}\n");
        if let Ok(f) = ModelConfigFile::parse(&text) {
            let _ = f.resolve(&ModelSettings::default());
            let _ = f.traffic();
            let _ = f.drift();
        }
    }

    #[test]
    fn routing_files_parse_or_fail_cleanly(text in "[a-z_ =\\[\\]{}\"0-9.,\n-]{0,200}",
                                           stable in any::<u64>(), weight in any::<f64>(), step in any::<u64>()) {
        if let Ok(spec) = toml::from_str::<TrafficSpec>(&text) {
            let _ = spec.validate();
        }
        let structured = format!(
            "stable = {stable}\n[canary]\nversion = {}\nweight = {weight:?}\n[rollout]\nstep = {step}\n[rollout.plan]\nsteps = [{weight:?}]\n",
            stable.wrapping_add(1)
        );
        if let Ok(spec) = toml::from_str::<TrafficSpec>(&structured) {
            let _ = spec.validate();
        }
    }

    #[test]
    fn profiles_parse_or_fail_cleanly(text in "[a-z_:\\[\\]{}\"0-9.,e-]{0,300}",
                                      edges in prop::collection::vec(any::<f64>(), 0..5),
                                      props in prop::collection::vec(any::<f64>(), 0..6)) {
        if let Ok(p) = serde_json::from_str::<Profile>(&text) {
            let _ = p.validate();
        }
        let structured = serde_json::json!({
            "format": 1, "model": "m", "version": 1, "created_at": "", "source": "", "rows": 1,
            "input": "x",
            "features": [{"name": "a", "edges": edges, "proportions": props, "mean": 0.0,
                          "std": 1.0, "min": 0.0, "max": 1.0, "sample": []}],
            "prediction": {"kind": "classes", "output": "y", "classes": [0, 1], "proportions": props}
        });
        if let Ok(p) = serde_json::from_value::<Profile>(structured) {
            let _ = p.validate();
        }
    }
}

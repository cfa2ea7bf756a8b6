//! The three ways into an inference (HTTP, gRPC unary, gRPC stream) behave alike: they
//! go through one front door (`api::infer`). Each test drives all three against one real
//! server and checks the same answer, where they used to differ.

use crate::common;

use std::time::Duration;

use modelgate::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use modelgate::proto::{self as pb, model_infer_request::InferInputTensor};
use tonic::Code;

fn iris(id: &str, rows: &[f32]) -> pb::ModelInferRequest {
    iris_as("iris", id, rows)
}

/// A request to `model` (iris under another name).
fn iris_as(model: &str, id: &str, rows: &[f32]) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: model.into(),
        id: id.into(),
        inputs: vec![InferInputTensor {
            name: "X".into(),
            datatype: "FP32".into(),
            shape: vec![(rows.len() / 4) as i64, 4],
            ..Default::default()
        }],
        raw_input_contents: vec![common::f32_bytes(rows).into()],
        ..Default::default()
    }
}

const ROW: [f32; 4] = [5.1, 3.5, 1.4, 0.2];

/// The model the counting test serves iris as: the metrics recorder is the process's,
/// and no other test serves a model of this name.
const COUNTED: &str = "front_door_counted";

fn http_body() -> serde_json::Value {
    serde_json::json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": ROW}]})
}

/// One request over a fresh stream; its answer (or error message).
async fn over_stream(
    c: &mut GrpcInferenceServiceClient<tonic::transport::Channel>,
    req: pb::ModelInferRequest,
    key: Option<&[u8]>,
) -> pb::ModelStreamInferResponse {
    let mut call = tonic::Request::new(tokio_stream::iter(vec![req]));
    if let Some(k) = key {
        call.metadata_mut().insert(
            "x-routing-key",
            tonic::metadata::MetadataValue::try_from(k).expect("header bytes"),
        );
    }
    let mut answers = c.model_stream_infer(call).await.unwrap().into_inner();
    answers
        .message()
        .await
        .unwrap()
        .expect("one answer on the stream")
}

/// `modelgate_requests_total` for [`COUNTED`] with this protocol and code.
fn requests(text: &str, protocol: &str, code: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("modelgate_requests_total{"))
        .filter(|l| {
            l.contains(&format!("model=\"{COUNTED}\""))
                && l.contains(&format!("protocol=\"{protocol}\""))
                && l.contains(&format!("code=\"{code}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_key_header_that_is_not_ascii_is_refused_on_every_path() {
    let s = common::start().await;
    let key = "ключ".as_bytes();
    // HTTP.
    let r = reqwest::Client::new()
        .post(format!("{}/v2/models/iris/infer", s.http))
        .header(
            "x-routing-key",
            reqwest::header::HeaderValue::from_bytes(key).unwrap(),
        )
        .json(&http_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("x-routing-key"));
    // gRPC unary: it used to be dropped silently.
    let mut c = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let mut call = tonic::Request::new(iris("u", &ROW));
    call.metadata_mut().insert(
        "x-routing-key",
        tonic::metadata::MetadataValue::try_from(key).unwrap(),
    );
    let e = c.model_infer(call).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("x-routing-key"), "{e:?}");
    // gRPC stream: an error answer for the request, the stream goes on.
    let a = over_stream(&mut c, iris("s", &ROW), Some(key)).await;
    assert!(a.error_message.contains("x-routing-key"), "{a:?}");
    // A visible-ASCII key serves on every path.
    let a = over_stream(&mut c, iris("ok", &ROW), Some(b"user-1")).await;
    assert_eq!(a.error_message, "", "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_before_the_service_are_counted_on_every_path() {
    let repo = common::named_repo(&[(COUNTED, "models/iris")]);
    let s = common::start_with(repo.path(), |_| {}).await;
    let before = s.metrics_text().await;
    // A datatype nobody serves: refused while decoding.
    let bad_http = serde_json::json!({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP33", "data": ROW}]});
    let r = reqwest::Client::new()
        .post(format!("{}/v2/models/{COUNTED}/infer", s.http))
        .json(&bad_http)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let mut bad = iris_as(COUNTED, "b", &ROW);
    bad.inputs[0].datatype = "FP33".into();
    let mut c = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let e = c.model_infer(bad.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let a = over_stream(&mut c, bad.clone(), None).await;
    assert!(a.error_message.contains("FP33"), "{a:?}");
    let a = over_stream(&mut c, bad, None).await;
    assert!(!a.error_message.is_empty());
    // Metrics render every few seconds at most; poll.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = s.metrics_text().await;
        let http = requests(&text, "http", "invalid_request")
            - requests(&before, "http", "invalid_request");
        let grpc = requests(&text, "grpc", "invalid_request")
            - requests(&before, "grpc", "invalid_request");
        // One over HTTP; one unary and two over the stream (the stream used to count none).
        if http == 1.0 && grpc == 3.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "http {http}, grpc {grpc} refused requests counted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shorter_of_the_timeout_parameter_and_the_deadline_applies_on_every_path() {
    let s = common::start().await;
    let mut c = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    // A `timeout` parameter that is not an integer is refused alike on the three paths.
    let mut bad = iris("t", &ROW);
    bad.parameters.insert(
        "timeout".into(),
        pb::InferParameter {
            parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(
                "soon".into(),
            )),
        },
    );
    let e = c.model_infer(bad.clone()).await.unwrap_err();
    assert!(e.message().contains("timeout"), "{e:?}");
    let a = over_stream(&mut c, bad, None).await;
    assert!(a.error_message.contains("timeout"), "{a:?}");
    let r = reqwest::Client::new()
        .post(format!("{}/v2/models/iris/infer", s.http))
        .json(&serde_json::json!({"parameters": {"timeout": "soon"}, "inputs": http_body()["inputs"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("timeout"));
    // A generous parameter and a generous stream deadline: served on the stream, where
    // the deadline is now merged (minimum, less its margin) as on the unary call.
    let mut ok = iris("ok", &ROW);
    ok.parameters.insert(
        "timeout".into(),
        pb::InferParameter {
            parameter_choice: Some(pb::infer_parameter::ParameterChoice::Uint64Param(5_000_000)),
        },
    );
    let mut call = tonic::Request::new(tokio_stream::iter(vec![ok.clone()]));
    call.set_timeout(Duration::from_secs(30));
    let mut answers = c.model_stream_infer(call).await.unwrap().into_inner();
    let a = answers.message().await.unwrap().expect("an answer");
    assert_eq!(a.error_message, "", "{a:?}");
    let mut call = tonic::Request::new(ok);
    call.set_timeout(Duration::from_secs(30));
    c.model_infer(call).await.unwrap();
}

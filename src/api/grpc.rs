//! gRPC front end: `inference.GRPCInferenceService` (Open Inference Protocol plus the
//! Triton extensions its tools use). Decode and check, call the service, encode.
//!
//! Tensor payloads arrive as `Bytes` slices of the request buffer (`raw_input_contents`)
//! and leave as `Bytes` (`raw_output_contents`): no copy in this layer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tonic::{Request, Response, Status};

use crate::api;
use crate::api::Api;
use crate::api::auth::Permission;
use crate::api::infer;
use crate::error::{Error, Result};
use crate::metrics::Protocol;
use crate::proto as pb;
use crate::proto::grpc_inference_service_server::GrpcInferenceService;
use crate::service::{self, InferRequest};
use crate::tensor::{DataType, Tensor, extend_le};

/// The gRPC service over shared server state.
pub struct GrpcService {
    state: Arc<Api>,
}

impl GrpcService {
    pub fn new(state: Arc<Api>) -> Self {
        GrpcService { state }
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for GrpcService {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.state.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let req = req.into_inner();
        let snapshot = self.state.registry.snapshot();
        // Unknown models are "not ready" rather than an error, as Triton answers.
        let ready = !self.state.shutdown.is_cancelled()
            && snapshot.resolve(&req.name, Some(&req.version)).is_ok();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: api::SERVER_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: api::EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let req = req.into_inner();
        let snapshot = self.state.registry.snapshot();
        let model = snapshot.model(&req.name)?;
        let mv = model.resolve(Some(&req.version))?;
        Ok(Response::new(api::describe::model_metadata(model, mv)))
    }

    async fn model_config(
        &self,
        req: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let req = req.into_inner();
        let snapshot = self.state.registry.snapshot();
        let mv = snapshot.resolve(&req.name, Some(&req.version))?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(api::describe::model_config(mv)),
        }))
    }

    async fn model_statistics(
        &self,
        req: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let req = req.into_inner();
        let model_stats = api::describe::statistics(
            &self.state.registry.snapshot(),
            Some(&req.name),
            Some(&req.version),
        )?;
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        req: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        admit(&self.state, &req, Permission::Read)?;
        let models = api::admin::repository_index(&self.state, req.get_ref().ready)
            .into_iter()
            .map(|r| pb::repository_index_response::ModelIndex {
                parameters: api::describe::string_parameters(
                    r.lineage.map(|l| l.parameters()).unwrap_or_default(),
                ),
                name: r.name,
                version: r.version,
                state: r.state.to_string(),
                reason: r.reason,
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        req: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        admit(&self.state, &req, Permission::Repository)?;
        api::admin::load(&self.state.service, &req.get_ref().model_name).await?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        admit(&self.state, &req, Permission::Repository)?;
        api::admin::unload(&self.state.service, &req.get_ref().model_name).await?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }

    /// Each request of the stream is answered on the stream, as it completes (responses
    /// carry the request's id); a failed request is an `error_message`, not the end of
    /// the stream. At most 64 requests of one stream run at once; when the stream itself
    /// fails, the requests already running are answered before the error.
    async fn model_stream_infer(
        &self,
        req: Request<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<StreamInferStream>, Status> {
        infer::admit(&self.state, bearer(&req))?;
        let mut meta = CallMeta::of(req.metadata());
        meta.request_id = None;
        let mut incoming = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_IN_FLIGHT);
        let state = Arc::clone(&self.state);
        let in_flight = Arc::new(tokio::sync::Semaphore::new(STREAM_IN_FLIGHT));
        let tasks = self.state.tasks.clone();
        self.state.tasks.spawn(async move {
            loop {
                let msg = match incoming.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(status) => {
                        // Let the requests in flight answer first: their answers would
                        // be lost behind the error that ends the stream.
                        let _all = in_flight.acquire_many(STREAM_IN_FLIGHT as u32).await;
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                    break;
                };
                let (state, tx, meta) = (Arc::clone(&state), tx.clone(), meta.clone());
                tasks.spawn(async move {
                    let _permit = permit;
                    let id = msg.id.clone();
                    let model = msg.model_name.clone();
                    let result = infer::infer(
                        &state,
                        &model,
                        decode_infer(msg),
                        &meta.call(),
                        Protocol::Grpc,
                    )
                    .await;
                    let resp = match result {
                        Ok(resp) => pb::ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(encode_infer(resp)),
                        },
                        Err(e) => pb::ModelStreamInferResponse {
                            error_message: e.to_string(),
                            infer_response: Some(pb::ModelInferResponse {
                                id,
                                ..Default::default()
                            }),
                        },
                    };
                    let _ = tx.send(Ok(resp)).await;
                });
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn model_infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        infer::admit(&self.state, bearer(&req))?;
        let meta = CallMeta::of(req.metadata());
        let inner = req.into_inner();
        let model = inner.model_name.clone();
        let resp = infer::infer(
            &self.state,
            &model,
            decode_infer(inner),
            &meta.call(),
            Protocol::Grpc,
        )
        .await?;
        // The body names the version and the id. The rest is metadata only when asked
        // for (`grpc_answer_metadata`), and the id also when the request was captured
        // (a client sends feedback by it); tonic offers no trailers on a successful
        // unary call, so initial metadata carries it.
        let full = self.state.grpc_answer_metadata;
        let headers = (full || resp.captured).then(|| infer::response_metadata(&resp, full));
        let mut out = Response::new(encode_infer(resp));
        if let Some(headers) = headers {
            *out.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers);
        }
        Ok(out)
    }
}

/// Requests of one ModelStreamInfer stream running at once.
const STREAM_IN_FLIGHT: usize = 64;

/// The transport side of a call, owned (a stream's requests outlive its metadata map).
#[derive(Debug, Clone)]
struct CallMeta {
    deadline: Option<Duration>,
    routing_key: Option<Vec<u8>>,
    /// `x-request-id`: a unary call's id when its message has none (a stream's
    /// messages name themselves).
    request_id: Option<Vec<u8>>,
}

impl CallMeta {
    fn of(md: &tonic::metadata::MetadataMap) -> CallMeta {
        // Names made at compile time: looking up by &str parses the name every call.
        use axum::http::HeaderName;
        const ROUTING_KEY: HeaderName = HeaderName::from_static(api::HEADER_ROUTING_KEY);
        const REQUEST_ID: HeaderName = HeaderName::from_static(api::infer::HEADER_REQUEST_ID);
        let headers = md.as_ref();
        CallMeta {
            deadline: grpc_timeout(md),
            routing_key: headers.get(ROUTING_KEY).map(|v| v.as_bytes().to_vec()),
            request_id: headers.get(REQUEST_ID).map(|v| v.as_bytes().to_vec()),
        }
    }

    fn call(&self) -> infer::Call<'_> {
        infer::Call {
            authorization: None,
            deadline: self.deadline,
            routing_key: self.routing_key.as_deref(),
            request_id: self.request_id.as_deref(),
        }
    }
}

/// The response stream of ModelStreamInfer (the generated trait's boxed stream).
type StreamInferStream = std::pin::Pin<
    Box<
        dyn tokio_stream::Stream<Item = Result<pb::ModelStreamInferResponse, Status>>
            + Send
            + 'static,
    >,
>;

/// Admits an admin call (token, or this host when none is configured): its actor.
pub(crate) fn admit<T>(state: &Api, req: &Request<T>, needs: Permission) -> Result<String, Status> {
    Ok(state
        .auth
        .authorize(bearer(req), crate::serve::peer(), needs)?)
}

/// The `authorization` metadata of a call.
pub(crate) fn bearer<T>(req: &Request<T>) -> Option<&str> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
}

/// Turns a ModelInferRequest into a service request, checking the wire-level rules.
pub fn decode_infer(req: pb::ModelInferRequest) -> Result<InferRequest> {
    let pb::ModelInferRequest {
        model_name,
        model_version,
        id,
        inputs,
        outputs,
        raw_input_contents,
        parameters,
    } = req;
    let params = infer::params(|key| {
        use pb::infer_parameter::ParameterChoice as P;
        parameters
            .get(key)
            .and_then(|p| p.parameter_choice.as_ref())
            .map(|c| match c {
                P::Int64Param(v) => infer::ParamValue::Int(*v),
                P::Uint64Param(v) => infer::ParamValue::Uint(*v),
                P::BoolParam(v) => infer::ParamValue::Bool(*v),
                P::StringParam(v) => infer::ParamValue::Str(v),
                P::DoubleParam(v) => infer::ParamValue::Other(v.to_string()),
            })
    })?;
    if !raw_input_contents.is_empty() && raw_input_contents.len() != inputs.len() {
        return Err(Error::invalid(format!(
            "raw_input_contents has {} entries for {} inputs: give raw data for every input or for none",
            raw_input_contents.len(),
            inputs.len()
        )));
    }
    let mut raw = raw_input_contents.into_iter();
    let mut tensors = Vec::with_capacity(inputs.len());
    for input in inputs {
        let dtype = DataType::parse_supported(&input.datatype, &input.name)?;
        let data = match (raw.next(), input.contents) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(format!(
                    "input '{}': give either contents or raw_input_contents, not both",
                    input.name
                )));
            }
            (Some(bytes), None) => bytes,
            (None, Some(contents)) => typed_contents(&input.name, dtype, contents)?,
            (None, None) => {
                return Err(Error::invalid(format!(
                    "input '{}' has no data",
                    input.name
                )));
            }
        };
        tensors.push(Tensor::from_raw(input.name, dtype, &input.shape, data)?);
    }
    Ok(InferRequest {
        model: model_name,
        version: Some(model_version),
        id,
        inputs: tensors,
        outputs: outputs.into_iter().map(|o| o.name).collect(),
        timeout: params.timeout,
        priority: params.priority,
        routing_key: params.routing_key,
    })
}

/// Parses the `grpc-timeout` header (`<digits><unit>`, unit one of H M S m u n).
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Converts typed `contents` to raw little-endian bytes, refusing the wrong field or a
/// value out of range for the datatype.
fn typed_contents(name: &str, dtype: DataType, c: pb::InferTensorContents) -> Result<Bytes> {
    let mut out = Vec::new();
    let wrong = |field: &str| {
        Error::invalid(format!(
            "input '{name}': datatype {dtype} takes its typed data in {field}"
        ))
    };
    let range = |v: i64| Error::invalid(format!("input '{name}': {v} is out of range for {dtype}"));
    let used = [
        !c.bool_contents.is_empty(),
        !c.int_contents.is_empty(),
        !c.int64_contents.is_empty(),
        !c.uint_contents.is_empty(),
        !c.uint64_contents.is_empty(),
        !c.fp32_contents.is_empty(),
        !c.fp64_contents.is_empty(),
        !c.bytes_contents.is_empty(),
    ];
    let (field_index, field) = match dtype {
        DataType::Bool => (0, "bool_contents"),
        DataType::Int8 | DataType::Int16 | DataType::Int32 => (1, "int_contents"),
        DataType::Int64 => (2, "int64_contents"),
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => (3, "uint_contents"),
        DataType::Uint64 => (4, "uint64_contents"),
        DataType::Fp32 => (5, "fp32_contents"),
        DataType::Fp64 => (6, "fp64_contents"),
        DataType::Fp16 => {
            return Err(Error::invalid(format!(
                "input '{name}': FP16 has no typed contents field; send it in raw_input_contents"
            )));
        }
        DataType::Bytes => return Err(wrong("bytes_contents")),
    };
    if used.iter().enumerate().any(|(i, &u)| u && i != field_index) {
        return Err(wrong(field));
    }
    match dtype {
        DataType::Bool => out.extend(c.bool_contents.iter().map(|&b| u8::from(b))),
        DataType::Int8 => {
            for v in c.int_contents {
                out.push(i8::try_from(v).map_err(|_| range(v.into()))? as u8);
            }
        }
        DataType::Int16 => {
            for v in c.int_contents {
                out.extend_from_slice(
                    &i16::try_from(v).map_err(|_| range(v.into()))?.to_le_bytes(),
                );
            }
        }
        DataType::Int32 => extend_le(&mut out, c.int_contents, i32::to_le_bytes),
        DataType::Int64 => extend_le(&mut out, c.int64_contents, i64::to_le_bytes),
        DataType::Uint8 => {
            for v in c.uint_contents {
                out.push(u8::try_from(v).map_err(|_| range(v.into()))?);
            }
        }
        DataType::Uint16 => {
            for v in c.uint_contents {
                out.extend_from_slice(
                    &u16::try_from(v).map_err(|_| range(v.into()))?.to_le_bytes(),
                );
            }
        }
        DataType::Uint32 => extend_le(&mut out, c.uint_contents, u32::to_le_bytes),
        DataType::Uint64 => extend_le(&mut out, c.uint64_contents, u64::to_le_bytes),
        DataType::Fp32 => extend_le(&mut out, c.fp32_contents, f32::to_le_bytes),
        DataType::Fp64 => extend_le(&mut out, c.fp64_contents, f64::to_le_bytes),
        DataType::Fp16 | DataType::Bytes => return Err(wrong(field)),
    }
    Ok(Bytes::from(out))
}

/// Encodes a service response with every output in `raw_output_contents`.
pub fn encode_infer(resp: service::InferResponse) -> pb::ModelInferResponse {
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut raw = Vec::with_capacity(resp.outputs.len());
    for t in resp.outputs {
        outputs.push(pb::model_infer_response::InferOutputTensor {
            name: t.name,
            datatype: t.dtype.as_str().to_string(),
            shape: t.shape.iter().map(|&d| d as i64).collect(),
            ..Default::default()
        });
        raw.push(t.data);
    }
    pb::ModelInferResponse {
        model_name: resp.model,
        model_version: resp.version,
        id: resp.id,
        outputs,
        raw_output_contents: raw,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(
        name: &str,
        datatype: &str,
        shape: Vec<i64>,
        contents: Option<pb::InferTensorContents>,
    ) -> pb::model_infer_request::InferInputTensor {
        pb::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            contents,
            ..Default::default()
        }
    }

    #[test]
    fn typed_contents_become_raw_bytes() {
        let req = pb::ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![input(
                "x",
                "INT16",
                vec![2],
                Some(pb::InferTensorContents {
                    int_contents: vec![-2, 300],
                    ..Default::default()
                }),
            )],
            ..Default::default()
        };
        let r = decode_infer(req).unwrap();
        assert_eq!(&r.inputs[0].data[..], &[254, 255, 44, 1]);
    }

    #[test]
    fn typed_contents_errors() {
        for (dt, c, want) in [
            (
                "INT8",
                pb::InferTensorContents {
                    int_contents: vec![200],
                    ..Default::default()
                },
                "out of range",
            ),
            (
                "FP32",
                pb::InferTensorContents {
                    fp64_contents: vec![1.0],
                    ..Default::default()
                },
                "fp32_contents",
            ),
            (
                "FP16",
                pb::InferTensorContents {
                    fp32_contents: vec![1.0],
                    ..Default::default()
                },
                "raw_input_contents",
            ),
            (
                "FP32",
                pb::InferTensorContents {
                    fp32_contents: vec![1.0, 2.0],
                    ..Default::default()
                },
                "needs 4",
            ),
        ] {
            let req = pb::ModelInferRequest {
                inputs: vec![input("x", dt, vec![1], Some(c))],
                ..Default::default()
            };
            let e = decode_infer(req).unwrap_err().to_string();
            assert!(e.contains(want), "{dt}: {e}");
        }
    }

    #[test]
    fn grpc_timeout_header() {
        let mut m = tonic::metadata::MetadataMap::new();
        for (v, want) in [
            ("5S", Some(Duration::from_secs(5))),
            ("250m", Some(Duration::from_millis(250))),
            ("100u", Some(Duration::from_micros(100))),
            ("2H", Some(Duration::from_secs(7200))),
            ("x", None),
            ("10X", None),
            ("1234567890S", None),
        ] {
            m.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&m), want, "{v}");
        }
    }

    #[test]
    fn priority_and_timeout_parameters() {
        use pb::infer_parameter::ParameterChoice as P;
        let mut req = pb::ModelInferRequest::default();
        req.parameters.insert(
            "priority".into(),
            pb::InferParameter {
                parameter_choice: Some(P::Int64Param(2)),
            },
        );
        req.parameters.insert(
            "timeout".into(),
            pb::InferParameter {
                parameter_choice: Some(P::Uint64Param(1500)),
            },
        );
        let r = decode_infer(req.clone()).unwrap();
        assert_eq!(r.priority, 2);
        assert_eq!(r.timeout, Some(Duration::from_micros(1500)));
        req.parameters.insert(
            "priority".into(),
            pb::InferParameter {
                parameter_choice: Some(P::StringParam("high".into())),
            },
        );
        assert!(
            decode_infer(req)
                .unwrap_err()
                .to_string()
                .contains("priority")
        );
    }

    #[test]
    fn raw_count_must_match_inputs() {
        let req = pb::ModelInferRequest {
            inputs: vec![
                input("a", "FP32", vec![1], None),
                input("b", "FP32", vec![1], None),
            ],
            raw_input_contents: vec![Bytes::from_static(&[0; 4])],
            ..Default::default()
        };
        assert!(
            decode_infer(req)
                .unwrap_err()
                .to_string()
                .contains("raw_input_contents")
        );
    }
}

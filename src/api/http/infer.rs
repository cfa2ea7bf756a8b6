//! Inference over HTTP: the handler, and the codec between the OIP JSON body (with
//! Triton's binary tensor extension) and the protocol-neutral request and answer.

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{HEADER_CONTENT_LENGTH_NAME, HttpError, bearer};
use crate::api;
use crate::api::Api;
use crate::error::{Error, Result};
use crate::metrics::Protocol;
use crate::service::{InferRequest, InferResponse};
use crate::tensor::{DataType, Tensor, byte_len, checked_shape, parse_json_data, write_json_data};

/// The body deadline's error, when reading the body failed because the client was too
/// slow (the error itself or somewhere in its source chain).
fn body_timed_out<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a crate::serve::BodyTimeout> {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(t) = e.downcast_ref::<crate::serve::BodyTimeout>() {
            return Some(t);
        }
        source = e.source();
    }
    None
}

/// Why a body could not be read: too large, too slow, or broken.
fn body_error(state: &Api, too_large: bool, err: &(dyn std::error::Error + 'static)) -> Error {
    if too_large {
        Error::PayloadTooLarge {
            limit: state.max_request_bytes,
        }
    } else if let Some(t) = body_timed_out(err) {
        Error::ClientTimeout(t.to_string())
    } else {
        Error::invalid(format!("cannot read the request body: {err}"))
    }
}

fn rejected(state: &Api, rej: &BytesRejection) -> Error {
    body_error(state, rej.status() == StatusCode::PAYLOAD_TOO_LARGE, rej)
}

/// `(model, version)` of a plain `POST /v2/models/{m}[/versions/{v}]/infer`: the calls
/// [`direct`] serves without the router. Anything else (percent-escapes, empty or extra
/// segments, other methods) is left to the router, which answers it as before.
pub(super) fn infer_route<B>(req: &axum::http::Request<B>) -> Option<(String, Option<String>)> {
    if req.method() != axum::http::Method::POST {
        return None;
    }
    let rest = req
        .uri()
        .path()
        .strip_prefix("/v2/models/")?
        .strip_suffix("/infer")?;
    let (model, version) = match rest.split_once('/') {
        None => (rest, None),
        Some((m, v)) => (m, Some(v.strip_prefix("versions/")?)),
    };
    let plain = |s: &str| !s.is_empty() && !s.contains(['/', '%']);
    (plain(model) && version.is_none_or(plain))
        .then(|| (model.to_string(), version.map(str::to_string)))
}

/// An inference call straight from the connection: the token is checked before the body
/// is read, the body is read under the same limit as the router's, and the rest is
/// [`infer_inner`], as the router's handlers do it. Saves the router's matching, its
/// extractors' copies of the head and its boxed futures on the hottest path.
pub(super) async fn direct<B>(
    state: Arc<Api>,
    model: String,
    version: Option<String>,
    req: axum::http::Request<B>,
) -> Response
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let (parts, body) = req.into_parts();
    let limit = state.max_request_bytes;
    let read = async {
        http_body_util::Limited::new(body, limit)
            .collect()
            .await
            .map(http_body_util::Collected::to_bytes)
            .map_err(|e| {
                let too_large = e.is::<http_body_util::LengthLimitError>();
                body_error(&state, too_large, &*e)
            })
    };
    infer_inner(&state, model, version, &parts.headers, read).await
}

pub(super) async fn infer(
    State(s): State<Arc<Api>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let body = body.map_err(|rej| rejected(&s, &rej));
    infer_inner(&s, model, None, &headers, std::future::ready(body)).await
}

pub(super) async fn infer_v(
    State(s): State<Arc<Api>>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let body = body.map_err(|rej| rejected(&s, &rej));
    infer_inner(&s, model, Some(version), &headers, std::future::ready(body)).await
}

/// The token check, then the body (read only once the caller is admitted), decoded,
/// predicted and encoded; any error as the HTTP API answers it.
async fn infer_inner(
    state: &Api,
    model: String,
    version: Option<String>,
    headers: &HeaderMap,
    body: impl std::future::Future<Output = Result<Bytes>>,
) -> Response {
    let result = async {
        api::infer::admit(state, bearer(headers))?;
        let body = body.await?;
        let name = model.clone();
        let limit = state.max_request_bytes;
        let decoded = match super::coding::decode_request(headers, body, limit).await {
            Ok(body) => decode_infer(model, version, headers, body),
            Err(e) => Err(e),
        };
        let (decoded, output_prefs) = match decoded {
            Ok((req, prefs)) => (Ok(req), prefs),
            Err(e) => (Err(e), OutputPrefs::default()),
        };
        // Names made at compile time: looking up by &str parses the name every call.
        const ROUTING_KEY: header::HeaderName =
            header::HeaderName::from_static(api::HEADER_ROUTING_KEY);
        const REQUEST_ID: header::HeaderName =
            header::HeaderName::from_static(api::infer::HEADER_REQUEST_ID);
        let call = api::infer::Call {
            authorization: None,
            deadline: None,
            routing_key: headers.get(ROUTING_KEY).map(|v| v.as_bytes()),
            request_id: headers.get(REQUEST_ID).map(|v| v.as_bytes()),
        };
        let resp = api::infer::infer(state, &name, decoded, &call, Protocol::Http).await?;
        let (head, binary) = encode_body(&resp, &output_prefs)?;
        let body = super::coding::encode_response(headers, head, binary).await?;
        infer_response(&resp, body)
    }
    .await;
    match result {
        Ok(resp) => resp,
        Err(e) => {
            let mut resp = HttpError(e).into_response();
            if super::coding::request_codings(headers).is_err() {
                // RFC 9110 15.5.16: say which codings would have been understood.
                resp.headers_mut().insert(
                    header::ACCEPT_ENCODING,
                    HeaderValue::from_static(super::coding::ACCEPTED),
                );
            }
            resp
        }
    }
}

#[derive(Deserialize)]
struct JsonInferRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow)]
    inputs: Vec<JsonInput<'a>>,
    #[serde(default)]
    outputs: Option<Vec<JsonOutput>>,
}

#[derive(Deserialize)]
struct JsonInput<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct JsonOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// How the client wants the outputs encoded: binary or JSON, per output name.
#[derive(Debug, Default)]
pub struct OutputPrefs {
    default_binary: bool,
    per_output: Vec<(String, bool)>,
}

impl OutputPrefs {
    fn binary(&self, name: &str) -> bool {
        self.per_output
            .iter()
            .find(|(n, _)| n == name)
            .map_or(self.default_binary, |&(_, b)| b)
    }
}

fn bool_param(params: &Option<Map<String, Value>>, key: &str, what: &str) -> Result<Option<bool>> {
    match params.as_ref().and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(Error::invalid(format!(
            "{what}: parameter '{key}' must be true or false, got {other}"
        ))),
    }
}

/// Splits a body into its JSON header and binary part, then decodes the request.
pub fn decode_infer(
    model: String,
    version: Option<String>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(InferRequest, OutputPrefs)> {
    let header_len = match headers.get(HEADER_CONTENT_LENGTH_NAME) {
        None => body.len(),
        Some(v) => {
            let n: usize = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| Error::invalid("Inference-Header-Content-Length is not a number"))?;
            if n > body.len() {
                return Err(Error::invalid(format!(
                    "Inference-Header-Content-Length {n} is larger than the body ({} bytes)",
                    body.len()
                )));
            }
            n
        }
    };
    let json_part = std::str::from_utf8(&body[..header_len])
        .map_err(|_| Error::invalid("request JSON is not valid UTF-8"))?;
    let req: JsonInferRequest<'_> = serde_json::from_str(json_part)
        .map_err(|e| Error::invalid(format!("malformed request JSON: {e}")))?;
    let binary = body.slice(header_len..);
    let mut offset = 0usize;
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for input in req.inputs {
        let dtype = DataType::parse_supported(&input.datatype, &input.name)?;
        let binary_size = match input
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
        {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "input '{}': binary_data_size must be a non-negative integer",
                            input.name
                        ))
                    })?,
            ),
        };
        let data = match (binary_size, input.data) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(format!(
                    "input '{}': give either data or binary_data_size, not both",
                    input.name
                )));
            }
            (Some(size), None) => {
                let end = offset.checked_add(size).filter(|&e| e <= binary.len()).ok_or_else(|| {
                    Error::invalid(format!(
                        "input '{}': binary_data_size {size} runs past the end of the binary data ({} bytes)",
                        input.name,
                        binary.len()
                    ))
                })?;
                let slice = binary.slice(offset..end);
                offset = end;
                slice
            }
            (None, Some(raw)) => {
                let (_, count) = checked_shape(&input.name, &input.shape)?;
                byte_len(&input.name, dtype, count)?;
                Bytes::from(parse_json_data(&input.name, dtype, raw.get(), count)?)
            }
            (None, None) => {
                return Err(Error::invalid(format!(
                    "input '{}' has no data",
                    input.name
                )));
            }
        };
        inputs.push(Tensor::from_raw(input.name, dtype, &input.shape, data)?);
    }
    if offset != binary.len() {
        return Err(Error::invalid(format!(
            "{} bytes of binary data are not claimed by any input's binary_data_size",
            binary.len() - offset
        )));
    }
    let default_binary =
        bool_param(&req.parameters, "binary_data_output", "request")?.unwrap_or(false);
    let params = api::infer::params(|key| {
        req.parameters
            .as_ref()
            .and_then(|p| p.get(key))
            .map(|v| match v {
                Value::Bool(b) => api::infer::ParamValue::Bool(*b),
                Value::String(s) => api::infer::ParamValue::Str(s),
                Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                    (Some(u), _) => api::infer::ParamValue::Uint(u),
                    (None, Some(i)) => api::infer::ParamValue::Int(i),
                    (None, None) => api::infer::ParamValue::Other(n.to_string()),
                },
                other => api::infer::ParamValue::Other(other.to_string()),
            })
    })?;
    let mut per_output = Vec::new();
    let mut names = Vec::new();
    for o in req.outputs.unwrap_or_default() {
        if let Some(b) = bool_param(
            &o.parameters,
            "binary_data",
            &format!("output '{}'", o.name),
        )? {
            per_output.push((o.name.clone(), b));
        }
        names.push(o.name);
    }
    Ok((
        InferRequest {
            model,
            version,
            id: req.id.unwrap_or_default(),
            inputs,
            outputs: names,
            timeout: params.timeout,
            priority: params.priority,
            routing_key: params.routing_key,
        },
        OutputPrefs {
            default_binary,
            per_output,
        },
    ))
}

/// Encodes the response: JSON, or a JSON header followed by binary outputs.
pub fn encode_infer(resp: InferResponse, prefs: &OutputPrefs) -> Result<Response> {
    let (head, binary) = encode_body(&resp, prefs)?;
    infer_response(&resp, super::coding::Encoded::plain(head, binary))
}

/// The inference answer around an encoded body. Inference-Header-Content-Length counts
/// the JSON header before any content coding, as Triton's clients read it.
fn infer_response(resp: &InferResponse, body: super::coding::Encoded) -> Result<Response> {
    // Headers go straight into the answer's own map, with values known at compile time
    // where they can be: a builder parses each value and the metadata needs no map of
    // its own (per request, this was a tenth of the HTTP path's own instructions).
    let (binary, head_len, coding) = (body.binary, body.head_len, body.coding);
    let body = if body.chunks.len() == 1 {
        axum::body::Body::from(body.chunks.into_iter().next().unwrap_or_default())
    } else {
        axum::body::Body::new(Chunks::new(body.chunks.into()))
    };
    let mut out = Response::new(body);
    let headers = out.headers_mut();
    headers.reserve(8);
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    api::infer::write_response_metadata(headers, resp, true);
    if binary {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(HEADER_CONTENT_LENGTH_NAME, HeaderValue::from(head_len));
    } else {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    if let Some(c) = coding {
        headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(c.as_str()),
        );
    }
    Ok(out)
}

/// The response's JSON (with `data`, or `binary_data_size` for binary outputs) and the
/// binary outputs to send after it, in order.
pub fn encode_body(resp: &InferResponse, prefs: &OutputPrefs) -> Result<(Vec<u8>, Vec<Bytes>)> {
    use std::io::Write;
    let mut head: Vec<u8> = Vec::with_capacity(256);
    let mut binary: Vec<Bytes> = Vec::new();
    let str_json = |s: &str| serde_json::to_string(s).map_err(|e| Error::Internal(e.to_string()));
    let io = |e: std::io::Error| Error::Internal(e.to_string());
    write!(
        head,
        "{{\"model_name\":{},\"model_version\":{}",
        str_json(&resp.model)?,
        str_json(&resp.version)?
    )
    .map_err(io)?;
    if !resp.id.is_empty() {
        write!(head, ",\"id\":{}", str_json(&resp.id)?).map_err(io)?;
    }
    head.extend_from_slice(b",\"outputs\":[");
    for (i, t) in resp.outputs.iter().enumerate() {
        if i > 0 {
            head.push(b',');
        }
        write!(
            head,
            "{{\"name\":{},\"datatype\":\"{}\",\"shape\":{}",
            str_json(&t.name)?,
            t.dtype.as_str(),
            serde_json::to_string(&t.shape).map_err(|e| Error::Internal(e.to_string()))?
        )
        .map_err(io)?;
        if prefs.binary(&t.name) {
            write!(
                head,
                ",\"parameters\":{{\"binary_data_size\":{}}}}}",
                t.data.len()
            )
            .map_err(io)?;
            binary.push(t.data.clone());
        } else {
            head.extend_from_slice(b",\"data\":");
            write_json_data(&mut head, t.dtype, &t.data)?;
            head.push(b'}');
        }
    }
    head.extend_from_slice(b"]}");
    Ok((head, binary))
}

/// A response body sent as the output buffers themselves, one after another: binary
/// outputs are not copied into one buffer. The exact length is known, so the response
/// keeps its Content-Length.
struct Chunks {
    chunks: std::collections::VecDeque<Bytes>,
    remaining: u64,
}

impl Chunks {
    fn new(chunks: std::collections::VecDeque<Bytes>) -> Chunks {
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        Chunks { chunks, remaining }
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<http_body::Frame<Bytes>, Self::Error>>> {
        let next = self.chunks.pop_front();
        if let Some(c) = &next {
            self.remaining -= c.len() as u64;
        }
        std::task::Poll::Ready(next.map(|c| Ok(http_body::Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_inference_paths_are_served_directly() {
        let req = |method: &str, path: &str| {
            axum::http::Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .unwrap()
        };
        let route = |m: &str, p: &str| infer_route(&req(m, p));
        assert_eq!(
            route("POST", "/v2/models/iris/infer"),
            Some(("iris".into(), None))
        );
        assert_eq!(
            route("POST", "/v2/models/iris/versions/2/infer?x=1"),
            Some(("iris".into(), Some("2".into())))
        );
        for (m, p) in [
            ("GET", "/v2/models/iris/infer"),
            ("POST", "/v2/models/%69ris/infer"),
            ("POST", "/v2/models/iris/versions/%32/infer"),
            ("POST", "/v2/models//infer"),
            ("POST", "/v2/models/iris/versions//infer"),
            ("POST", "/v2/models/iris/versions/2/3/infer"),
            ("POST", "/v2/models/iris/other/2/infer"),
            ("POST", "/v2/models/iris/infer/"),
            ("POST", "/v2/models/iris/ready"),
        ] {
            assert_eq!(route(m, p), None, "{m} {p}");
        }
    }

    fn decode(body: &str) -> Result<(InferRequest, OutputPrefs)> {
        decode_infer(
            "m".into(),
            None,
            &HeaderMap::new(),
            Bytes::from(body.to_string()),
        )
    }

    #[test]
    fn json_request_decodes() {
        let (r, p) = decode(
            r#"{"id":"a","inputs":[{"name":"X","shape":[1,2],"datatype":"FP32","data":[[1,2]]}],
               "outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#,
        )
        .unwrap();
        assert_eq!(r.id, "a");
        assert_eq!(r.inputs[0].shape, vec![1, 2]);
        assert_eq!(r.outputs, vec!["y".to_string()]);
        assert!(p.binary("y"));
        assert!(!p.binary("z"));
    }

    #[test]
    fn binary_request_decodes() {
        let head = r#"{"inputs":[{"name":"X","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = head.as_bytes().to_vec();
        body.extend_from_slice(&1f32.to_le_bytes());
        body.extend_from_slice(&2f32.to_le_bytes());
        let mut h = HeaderMap::new();
        h.insert(HEADER_CONTENT_LENGTH_NAME, head.len().into());
        let (r, _) = decode_infer("m".into(), None, &h, Bytes::from(body.clone())).unwrap();
        assert_eq!(r.inputs[0].data.len(), 8);
        // Extra trailing bytes nobody claims are an error.
        body.push(0);
        let e = decode_infer("m".into(), None, &h, Bytes::from(body)).unwrap_err();
        assert!(e.to_string().contains("not claimed"), "{e}");
    }

    #[test]
    fn malformed_requests_are_400() {
        for (body, want) in [
            ("{", "malformed request JSON"),
            (
                r#"{"inputs":[{"name":"X","shape":[2],"datatype":"FP32"}]}"#,
                "has no data",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[-2],"datatype":"FP32","data":[1]}]}"#,
                "negative",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[3],"datatype":"FP32","data":[1]}]}"#,
                "needs 3",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[1],"datatype":"BYTES","data":["a"]}]}"#,
                "BYTES",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[1],"datatype":"FP33","data":[1]}]}"#,
                "unknown datatype",
            ),
            (
                r#"{"inputs":[{"name":"X","shape":[4611686018427387904,4],"datatype":"FP32","data":[1]}]}"#,
                "too many",
            ),
        ] {
            let e = decode(body).expect_err(body);
            assert_eq!(e.http_status(), 400, "{body}");
            assert!(e.to_string().contains(want), "{body}: {e}");
        }
    }
}

//! The protocol-neutral front door of an inference call, used by HTTP, gRPC unary and
//! gRPC stream alike, so that the three cannot behave differently: the request
//! parameters (`priority`, `timeout`, `routing_key`), how the transport's own deadline
//! and routing-key header merge with them, the inference token check, the counting of
//! requests refused before they reach the service, and the response metadata (version,
//! variant, timing). Each protocol decodes its own tensors into the shared
//! [`Tensor::from_raw`](crate::tensor::Tensor::from_raw).

use std::time::Duration;

use super::Api;
use super::auth::Permission;
use crate::error::{Error, Result};
use crate::metrics::Protocol;
use crate::service::{self, InferRequest, InferResponse};

/// Request header (and gRPC metadata) carrying a sticky routing key.
pub const HEADER_ROUTING_KEY: &str = "x-routing-key";
/// Response header (and gRPC metadata): the version that answered.
pub const HEADER_MODEL_VERSION: &str = "x-model-version";
/// Response header (and gRPC metadata): stable, canary or direct.
pub const HEADER_VARIANT: &str = "x-variant";
/// Request and response header (and gRPC metadata): the request's id. A request
/// without one (neither the OIP `id` nor this header) gets a generated one, returned
/// here and in the answer's `id`, so that feedback can name the prediction.
pub const HEADER_REQUEST_ID: &str = "x-request-id";
/// Response header (and gRPC metadata): where the time went.
pub const HEADER_SERVER_TIMING: &str = "server-timing";

/// One value of a request's `parameters` map, whatever the protocol's encoding.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue<'a> {
    Int(i64),
    Uint(u64),
    Bool(bool),
    Str(&'a str),
    /// Anything else (a float, a list, an object), described for the error message.
    Other(String),
}

impl std::fmt::Display for ParamValue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamValue::Int(v) => write!(f, "{v}"),
            ParamValue::Uint(v) => write!(f, "{v}"),
            ParamValue::Bool(v) => write!(f, "{v}"),
            ParamValue::Str(v) => write!(f, "{v:?}"),
            ParamValue::Other(v) => f.write_str(v),
        }
    }
}

/// The parameters the service acts on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params {
    /// Triton's priority: 1 the highest, 0 the model's default level.
    pub priority: u64,
    /// How long the request may wait in the queue (`timeout`, microseconds).
    pub timeout: Option<Duration>,
    /// Sticky routing (`routing_key`).
    pub routing_key: Option<String>,
}

/// Decodes the parameters from a request's map (`get` looks a key up).
pub fn params<'a>(get: impl Fn(&str) -> Option<ParamValue<'a>>) -> Result<Params> {
    let uint = |key: &str| -> Result<Option<u64>> {
        match get(key) {
            None => Ok(None),
            Some(ParamValue::Uint(v)) => Ok(Some(v)),
            Some(ParamValue::Int(v)) if v >= 0 => Ok(Some(v.unsigned_abs())),
            Some(other) => Err(Error::invalid(format!(
                "parameter '{key}' must be a non-negative integer, got {other}"
            ))),
        }
    };
    let routing_key = match get("routing_key") {
        None => None,
        Some(ParamValue::Str(k)) => Some(k.to_string()),
        Some(other) => {
            return Err(Error::invalid(format!(
                "parameter 'routing_key' must be a string, got {other}"
            )));
        }
    };
    Ok(Params {
        priority: uint("priority")?.unwrap_or(0),
        timeout: uint("timeout")?
            .filter(|&us| us > 0)
            .map(Duration::from_micros),
        routing_key,
    })
}

/// What the transport carries besides the request itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Call<'a> {
    /// The `authorization` header or metadata.
    pub authorization: Option<&'a str>,
    /// The transport's deadline (gRPC's `grpc-timeout`).
    pub deadline: Option<Duration>,
    /// The `x-routing-key` header or metadata, as sent.
    pub routing_key: Option<&'a [u8]>,
    /// The `x-request-id` header or metadata, as sent.
    pub request_id: Option<&'a [u8]>,
}

/// Expire a little before the client's own timer does (10 %, at most 20 ms), so that
/// the client gets the server's DEADLINE_EXCEEDED rather than its local cancellation.
fn with_margin(deadline: Duration) -> Duration {
    deadline.saturating_sub((deadline / 10).min(Duration::from_millis(20)))
}

/// Merges the transport into a decoded request: the shorter of the `timeout` parameter
/// and the transport deadline (less its margin) wins; a `routing_key` parameter wins
/// over the header, and a header that is not visible ASCII is refused.
pub fn merge(req: &mut InferRequest, call: &Call<'_>) -> Result<()> {
    let deadline = call.deadline.map(with_margin);
    req.timeout = match (req.timeout, deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if req.routing_key.is_none()
        && let Some(raw) = call.routing_key
    {
        let key = std::str::from_utf8(raw)
            .ok()
            .filter(|k| k.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
            .ok_or_else(|| Error::invalid("the x-routing-key header must be visible ASCII"))?;
        req.routing_key = Some(key.to_string());
    }
    if req.id.is_empty() {
        // The header names the request when the body does not; else one is made up.
        req.id = call
            .request_id
            .and_then(|raw| std::str::from_utf8(raw).ok())
            .filter(|k| !k.is_empty() && k.len() <= 256 && k.bytes().all(|b| b.is_ascii_graphic()))
            .map_or_else(crate::capture::generate_id, str::to_string);
    }
    Ok(())
}

/// With `auth.inference`, inference needs a token with the `infer` permission.
pub fn admit(api: &Api, authorization: Option<&str>) -> Result<()> {
    if api.auth.inference_needs_token() {
        api.auth.authorize(authorization, None, Permission::Infer)?;
    }
    Ok(())
}

/// The one way into the service for an inference call: the token check (done by the
/// caller before it reads the body, see [`admit`]), then the decoded request (a
/// decoding failure is counted as refused), merged with the transport, predicted.
pub async fn infer(
    api: &Api,
    model: &str,
    decoded: Result<InferRequest>,
    call: &Call<'_>,
    protocol: Protocol,
) -> Result<InferResponse> {
    let refused = |e: &Error| service::record_rejected(api, model, protocol, e);
    let mut req = decoded.inspect_err(refused)?;
    merge(&mut req, call).inspect_err(refused)?;
    service::predict(api, req, protocol).await
}

/// The answer's metadata in a map of its own (a gRPC answer's): see
/// [`write_response_metadata`].
pub fn response_metadata(resp: &InferResponse, full: bool) -> axum::http::HeaderMap {
    let mut md = axum::http::HeaderMap::with_capacity(if full { 4 } else { 1 });
    write_response_metadata(&mut md, resp, full);
    md
}

/// Adds the metadata an answer carries to `md`: the version that answered, the variant,
/// where the time went (with `full`), and the request's id (when it can be a header
/// value: a client's id in the body may not be). The values that change with every
/// request are marked sensitive, which HTTP/2's HPACK encodes as never-indexed literals:
/// indexed, each would push the constant ones out of the connection's header table, and
/// every answer would then pay for all of them in full.
pub fn write_response_metadata(md: &mut axum::http::HeaderMap, resp: &InferResponse, full: bool) {
    let changing = |mut v: axum::http::HeaderValue| {
        v.set_sensitive(true);
        v
    };
    // Names made at compile time: parsing them costs more than inserting.
    use axum::http::HeaderName;
    const SERVER_TIMING: HeaderName = HeaderName::from_static(HEADER_SERVER_TIMING);
    const MODEL_VERSION: HeaderName = HeaderName::from_static(HEADER_MODEL_VERSION);
    const VARIANT: HeaderName = HeaderName::from_static(HEADER_VARIANT);
    const REQUEST_ID: HeaderName = HeaderName::from_static(HEADER_REQUEST_ID);
    if full {
        if let Ok(v) = axum::http::HeaderValue::try_from(resp.timing.server_timing()) {
            md.insert(SERVER_TIMING, changing(v));
        }
        if let Ok(v) = axum::http::HeaderValue::from_str(&resp.version) {
            md.insert(MODEL_VERSION, v);
        }
        md.insert(
            VARIANT,
            axum::http::HeaderValue::from_static(resp.variant.as_str()),
        );
    }
    if !resp.id.is_empty()
        && resp.id.len() <= 256
        && resp.id.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        && let Ok(v) = axum::http::HeaderValue::from_str(&resp.id)
    {
        md.insert(REQUEST_ID, changing(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> InferRequest {
        InferRequest {
            model: "m".into(),
            version: None,
            id: String::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            timeout: None,
            priority: 0,
            routing_key: None,
        }
    }

    #[test]
    fn parameters_decode_the_same_whatever_the_encoding() {
        let p = params(|k| match k {
            "priority" => Some(ParamValue::Int(2)),
            "timeout" => Some(ParamValue::Uint(1500)),
            "routing_key" => Some(ParamValue::Str("user-1")),
            _ => None,
        })
        .unwrap();
        assert_eq!(p.priority, 2);
        assert_eq!(p.timeout, Some(Duration::from_micros(1500)));
        assert_eq!(p.routing_key.as_deref(), Some("user-1"));
        let e = params(|k| (k == "priority").then_some(ParamValue::Str("high"))).unwrap_err();
        assert!(e.to_string().contains("priority"), "{e}");
        let e = params(|k| (k == "routing_key").then_some(ParamValue::Int(3))).unwrap_err();
        assert!(e.to_string().contains("routing_key"), "{e}");
        assert_eq!(params(|_| None).unwrap(), Params::default());
    }

    #[test]
    fn transport_merges_by_one_rule() {
        let mut r = req();
        r.timeout = Some(Duration::from_millis(50));
        let call = Call {
            deadline: Some(Duration::from_millis(100)),
            routing_key: Some(b"k1"),
            ..Call::default()
        };
        merge(&mut r, &call).unwrap();
        // The shorter wins; the header key applies when no parameter gave one.
        assert_eq!(r.timeout, Some(Duration::from_millis(50)));
        assert_eq!(r.routing_key.as_deref(), Some("k1"));
        let mut r = req();
        merge(&mut r, &call).unwrap();
        // A transport deadline keeps a margin (10 %, at most 20 ms).
        assert_eq!(r.timeout, Some(Duration::from_millis(90)));
        let mut r = req();
        r.routing_key = Some("param".into());
        merge(&mut r, &call).unwrap();
        assert_eq!(r.routing_key.as_deref(), Some("param"));
        let bad = Call {
            routing_key: Some("ключ".as_bytes()),
            ..Call::default()
        };
        let e = merge(&mut req(), &bad).unwrap_err();
        assert_eq!(e.http_status(), 400, "{e}");
    }
}

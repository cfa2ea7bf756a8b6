//! A small client of Prometheus' HTTP query API (`GET /api/v1/query`): instant queries
//! at a given evaluation time, answered as labelled numbers. The rollout controller
//! reads a fleet's figures through it (`routing/analysis.rs`), and `modelgate ctl
//! traffic get --fleet` asks it which replicas lag.
//!
//! One HTTP/1.1 connection per query (a few queries per step and tick: no pool worth
//! keeping), an optional bearer token, and one time limit over connect, send and read.
//! Plain `http://` only: Prometheus inside a cluster is usually reached that way; TLS
//! to it would need a client TLS stack this crate does not carry.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Largest answer read (a fleet's series for one model fit in far less).
const MAX_ANSWER_BYTES: usize = 4 << 20;

/// Where Prometheus is and how to ask it.
#[derive(Debug, Clone)]
pub struct Client {
    /// `host:port` from an `http://host:port[/prefix]` URL.
    authority: String,
    /// Path prefix (a Prometheus behind a proxy at `/prometheus`), without a trailing `/`.
    prefix: String,
    token: Option<String>,
    timeout: Duration,
}

/// One series of an answer: its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct VectorItem {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

impl Client {
    /// A client of the Prometheus at `url` (`http://host:port`, optionally with a path).
    pub fn new(url: &str, token: Option<String>, timeout: Duration) -> Result<Client> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            Error::Config(format!(
                "prometheus_url '{url}': must start with http:// (https is not supported)"
            ))
        })?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(Error::Config(format!("prometheus_url '{url}': no host")));
        }
        Ok(Client {
            authority: authority.to_string(),
            prefix: prefix.to_string(),
            token,
            timeout,
        })
    }

    /// The URL asked, for messages.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.authority, self.prefix)
    }

    /// Evaluates `expr` at `time_ms` (Unix milliseconds; `None`: now). An instant vector
    /// answers its series; a scalar answers one sample without labels. Prometheus not
    /// answering, answering an error, or answering something else is an error (never an
    /// empty answer: an empty vector means no series matched).
    pub async fn query(&self, expr: &str, time_ms: Option<u64>) -> Result<Vec<Sample>> {
        tokio::time::timeout(self.timeout, self.query_inner(expr, time_ms))
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "Prometheus at {} did not answer within {} ms",
                    self.url(),
                    self.timeout.as_millis()
                ))
            })?
    }

    async fn query_inner(&self, expr: &str, time_ms: Option<u64>) -> Result<Vec<Sample>> {
        let mut path = format!("{}/api/v1/query?query={}", self.prefix, encode(expr));
        if let Some(t) = time_ms {
            path.push_str(&format!("&time={}.{:03}", t / 1000, t % 1000));
        }
        let unreachable = |e: &dyn std::fmt::Display| {
            Error::Unavailable(format!("cannot reach Prometheus at {}: {e}", self.url()))
        };
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| unreachable(&e))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(&e))?;
        let exchange = async move {
            let mut req = hyper::Request::builder()
                .method("GET")
                .uri(&path)
                .header(hyper::header::HOST, &self.authority)
                .header(hyper::header::ACCEPT, "application/json");
            if let Some(t) = &self.token {
                req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let req = req
                .body(Empty::<Bytes>::new())
                .map_err(|e| Error::Internal(format!("Prometheus query: {e}")))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| unreachable(&e))?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| unreachable(&e))?
                .to_bytes();
            Ok::<_, Error>((status, body))
        };
        // The connection is driven beside the exchange, not on a task of its own.
        let (answer, _closed) = tokio::join!(exchange, conn);
        let (status, body) = answer?;
        parse(status.as_u16(), &body).map_err(|e| match e {
            Error::Unavailable(m) => Error::Unavailable(format!("Prometheus ({expr}): {m}")),
            other => other,
        })
    }
}

/// Reads an answer of the query API.
fn parse(status: u16, body: &[u8]) -> Result<Vec<Sample>> {
    let bad = |why: String| Error::Unavailable(why);
    let answer: Answer = serde_json::from_slice(body).map_err(|e| {
        bad(format!(
            "HTTP {status}, not a query answer ({e}): {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))
    })?;
    if answer.status != "success" {
        return Err(bad(format!(
            "HTTP {status}: {}",
            answer.error.unwrap_or_else(|| "query failed".into())
        )));
    }
    let data = answer
        .data
        .ok_or_else(|| bad("a success without data".into()))?;
    let number = |s: &str| -> Result<f64> {
        s.parse::<f64>()
            .map_err(|_| bad(format!("'{s}' is not a number")))
    };
    match data.result_type.as_str() {
        "vector" => {
            let items: Vec<VectorItem> = serde_json::from_value(data.result)
                .map_err(|e| bad(format!("a vector that does not parse: {e}")))?;
            items
                .into_iter()
                .map(|i| {
                    Ok(Sample {
                        labels: i.metric,
                        value: number(&i.value.1)?,
                    })
                })
                .collect()
        }
        "scalar" => {
            let (_, v): (f64, String) = serde_json::from_value(data.result)
                .map_err(|e| bad(format!("a scalar that does not parse: {e}")))?;
            Ok(vec![Sample {
                labels: BTreeMap::new(),
                value: number(&v)?,
            }])
        }
        other => Err(bad(format!("a {other} answer where a vector was expected"))),
    }
}

/// Percent-encodes a query parameter (everything but unreserved characters).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A PromQL string literal of `s` (for label matchers built from model names).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_and_errors_are_errors() {
        let v = parse(
            200,
            br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"variant":"canary"},"value":[1.5,"12"]},{"metric":{},"value":[1.5,"NaN"]}]}}"#,
        )
        .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].labels["variant"], "canary");
        assert_eq!(v[0].value, 12.0);
        assert!(v[1].value.is_nan());
        let s = parse(
            200,
            br#"{"status":"success","data":{"resultType":"scalar","result":[1.5,"3"]}}"#,
        )
        .unwrap();
        assert_eq!(s[0].value, 3.0);
        let e = parse(
            400,
            br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("parse error"), "{e}");
        assert!(parse(502, b"<html>bad gateway</html>").is_err());
        assert!(
            parse(
                200,
                br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#
            )
            .is_err()
        );
    }

    #[test]
    fn urls_and_quoting() {
        let c = Client::new("http://prom:9090/p/", None, Duration::from_secs(1)).unwrap();
        assert_eq!(
            (c.authority.as_str(), c.prefix.as_str()),
            ("prom:9090", "/p")
        );
        assert!(Client::new("https://prom", None, Duration::from_secs(1)).is_err());
        assert!(Client::new("http:///x", None, Duration::from_secs(1)).is_err());
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(encode("a b{c=\"d\"}"), "a%20b%7Bc%3D%22d%22%7D");
    }
}

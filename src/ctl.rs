//! `modelgate ctl`: the operator's client of the admin HTTP API (traffic get / set /
//! promote / rollback, audit log, drift state). A small HTTP/1.1 client over one connection per call;
//! the server's JSON answer is printed, its error message becomes the exit status.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::routing::{Canary, PlanPatch, RolloutState, Shadow, TrafficSpec};

/// Longest an admin call may take (a change may load model versions first).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the server is and how to authenticate.
pub struct Target {
    /// `http://host:port` of the HTTP API.
    pub url: String,
    pub token: Option<String>,
}

/// The changes `ctl traffic set` makes to the current routing.
#[derive(Debug, Default, Clone)]
pub struct SetArgs {
    pub stable: Option<u64>,
    pub canary: Option<u64>,
    pub weight: Option<f64>,
    pub no_canary: bool,
    /// `version:percent` pairs; they replace the shadow list.
    pub shadows: Vec<String>,
    pub no_shadows: bool,
    /// Start an automated rollout of the canary.
    pub rollout: bool,
    pub steps: Option<Vec<f64>>,
    pub interval_secs: Option<f64>,
}

impl SetArgs {
    /// Applies these changes to `current`: the routing state, and a new rollout's plan
    /// as a patch (what the flags leave out, the server takes from the model's
    /// configured plan).
    pub fn apply(&self, current: &TrafficSpec) -> Result<(TrafficSpec, Option<PlanPatch>)> {
        let mut spec = current.clone();
        if let Some(v) = self.stable {
            spec.stable = Some(v);
        }
        if self.no_canary {
            spec.canary = None;
            spec.rollout = None;
        }
        if let Some(v) = self.canary {
            let weight = match (self.weight, self.rollout) {
                (Some(w), _) => w,
                // The rollout sets the weight from its first step.
                (None, true) => 0.0,
                // Keeping whatever weight the canary had (0 after a rollback) would
                // look like a change that did nothing.
                (None, false) => {
                    return Err(Error::invalid(
                        "--canary needs --weight PERCENT or --rollout (how much traffic it gets)",
                    ));
                }
            };
            spec.canary = Some(Canary { version: v, weight });
            spec.rollout = None;
        } else if let Some(w) = self.weight {
            let c = spec
                .canary
                .as_mut()
                .ok_or_else(|| Error::invalid("--weight needs a canary (--canary V)"))?;
            c.weight = w;
            spec.rollout = None;
        }
        if self.no_shadows {
            spec.shadows.clear();
        }
        if !self.shadows.is_empty() {
            spec.shadows = self
                .shadows
                .iter()
                .map(|s| parse_shadow(s))
                .collect::<Result<_>>()?;
        }
        let mut plan = None;
        if self.rollout {
            if self.steps.is_some() || self.interval_secs.is_some() {
                plan = Some(PlanPatch {
                    steps: self.steps.clone(),
                    interval_secs: self.interval_secs,
                    ..PlanPatch::default()
                });
            }
            spec.rollout = Some(RolloutState::default());
        }
        Ok((spec, plan))
    }
}

/// Parses `version:percent` (percent defaults to 100).
fn parse_shadow(s: &str) -> Result<Shadow> {
    let (v, p) = s.split_once(':').unwrap_or((s, "100"));
    let version = v
        .trim()
        .parse()
        .map_err(|_| Error::invalid(format!("shadow '{s}': version is not a number")))?;
    let percent = p
        .trim()
        .parse()
        .map_err(|_| Error::invalid(format!("shadow '{s}': percent is not a number")))?;
    Ok(Shadow { version, percent })
}

/// One HTTP call to the admin API; returns the JSON answer or the server's error.
pub async fn call(target: &Target, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    tokio::time::timeout(CALL_TIMEOUT, call_inner(target, method, path, body))
        .await
        .map_err(|_| Error::Unavailable(format!("{} did not answer in time", target.url)))?
}

async fn call_inner(
    target: &Target,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value> {
    let authority = target
        .url
        .strip_prefix("http://")
        .ok_or_else(|| Error::invalid(format!("--url '{}' must start with http://", target.url)))?
        .trim_end_matches('/');
    let unreachable =
        |e: &dyn std::fmt::Display| Error::Unavailable(format!("cannot reach {}: {e}", target.url));
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| unreachable(&e))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
    let exchange = async move {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(t) = &target.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let bytes = match body {
            Some(v) => Bytes::from(v.to_string()),
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| Error::invalid(format!("bad request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(&e))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        Ok::<_, Error>((status, body))
        // `sender` is dropped here, which lets the connection below finish.
    };
    // The connection is driven beside the exchange, not on a task of its own.
    let (answer, _closed) = tokio::join!(exchange, conn);
    let (status, body) = answer?;
    let value: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    if status.is_success() {
        return Ok(value);
    }
    let msg = value
        .get("error")
        .and_then(Value::as_str)
        .map_or_else(|| value.to_string(), str::to_string);
    Err(match status.as_u16() {
        400 => Error::InvalidRequest(msg),
        401 => Error::Unauthenticated(msg),
        403 => Error::Forbidden(msg),
        404 => Error::NotFound(msg),
        503 => Error::Unavailable(msg),
        code => Error::Internal(format!("HTTP {code}: {msg}")),
    })
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn with_reason(path: String, reason: Option<&str>) -> String {
    match reason {
        Some(r) if !r.is_empty() => format!("{path}?reason={}", encode(r)),
        _ => path,
    }
}

/// `ctl traffic get`.
pub async fn traffic_get(t: &Target, model: &str) -> Result<Value> {
    call(t, "GET", &format!("/admin/models/{model}/traffic"), None).await
}

/// `ctl traffic set`: reads the routing, applies the flags, writes it back.
/// `traffic get M --fleet`: every replica's routing generation and versions as
/// Prometheus last saw them (the last hour), and which replicas lag behind the newest
/// generation or are not scraped now. Answers JSON like the other calls.
pub async fn traffic_fleet(prometheus: &str, model: &str, replica_label: &str) -> Result<Value> {
    let client = crate::promql::Client::new(prometheus, None, Duration::from_secs(10))?;
    let m = crate::promql::quote(model);
    let by = |metric: &str| {
        format!("max by ({replica_label}) (last_over_time({metric}{{model={m}}}[1h]))")
    };
    let now_by = |metric: &str| format!("max by ({replica_label}) ({metric}{{model={m}}})");
    let generation = client
        .query(&by("modelgate_routing_generation"), None)
        .await?;
    let live = client
        .query(&now_by("modelgate_routing_generation"), None)
        .await?;
    let stable = client
        .query(&by("modelgate_traffic_stable_version"), None)
        .await?;
    let canary = client
        .query(&by("modelgate_traffic_canary_version"), None)
        .await?;
    let weight = client
        .query(&by("modelgate_traffic_canary_weight_percent"), None)
        .await?;
    let of = |v: &[crate::promql::Sample], r: &str| {
        v.iter()
            .find(|s| s.labels.get(replica_label).map(String::as_str) == Some(r))
            .map(|s| s.value)
    };
    let newest = generation.iter().map(|s| s.value).fold(0.0, f64::max);
    let mut replicas = Vec::new();
    let mut lagging = Vec::new();
    for s in &generation {
        let Some(r) = s.labels.get(replica_label) else {
            continue;
        };
        let scraped = of(&live, r).is_some();
        let lags = s.value < newest || !scraped;
        if lags {
            lagging.push(Value::String(r.clone()));
        }
        replicas.push(serde_json::json!({
            "replica": r,
            "generation": s.value as u64,
            "scraped_now": scraped,
            "stable": of(&stable, r).map(|v| v as u64),
            "canary": of(&canary, r).map(|v| v as u64),
            "canary_weight": of(&weight, r),
            "lags": lags,
        }));
    }
    if replicas.is_empty() {
        return Err(Error::NotFound(format!(
            "Prometheus at {prometheus} has no modelgate_routing_generation of model '{model}'"
        )));
    }
    Ok(serde_json::json!({
        "model": model,
        "newest_generation": newest as u64,
        "replicas": replicas,
        "lagging": lagging,
    }))
}

pub async fn traffic_set(
    t: &Target,
    model: &str,
    args: &SetArgs,
    reason: Option<&str>,
) -> Result<Value> {
    let now = traffic_get(t, model).await?;
    let current: TrafficSpec = serde_json::from_value(now["routing"].clone())
        .map_err(|e| Error::Internal(format!("unexpected answer from the server: {e}")))?;
    let (spec, plan) = args.apply(&current)?;
    let mut body = serde_json::to_value(&spec).map_err(|e| Error::Internal(e.to_string()))?;
    if let Some(plan) = plan {
        body["rollout"]["plan"] =
            serde_json::to_value(&plan).map_err(|e| Error::Internal(e.to_string()))?;
    }
    let path = with_reason(format!("/admin/models/{model}/traffic"), reason);
    call(t, "PUT", &path, Some(body)).await
}

/// `ctl traffic promote` / `rollback`.
pub async fn traffic_action(
    t: &Target,
    model: &str,
    action: &str,
    reason: Option<&str>,
) -> Result<Value> {
    let path = with_reason(format!("/admin/models/{model}/{action}"), reason);
    call(t, "POST", &path, None).await
}

/// `ctl audit`.
pub async fn audit(t: &Target, model: Option<&str>, limit: usize) -> Result<Value> {
    let mut path = format!("/admin/audit?limit={limit}");
    if let Some(m) = model {
        path.push_str(&format!("&model={}", encode(m)));
    }
    call(t, "GET", &path, None).await
}

/// `ctl drift`.
pub async fn drift(t: &Target, model: Option<&str>) -> Result<Value> {
    let path = match model {
        Some(m) => format!("/admin/drift/{}", encode(m)),
        None => "/admin/drift".to_string(),
    };
    call(t, "GET", &path, None).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_flags_change_only_what_they_name() {
        let current = TrafficSpec {
            stable: Some(1),
            canary: Some(Canary {
                version: 2,
                weight: 10.0,
            }),
            ..TrafficSpec::default()
        };
        let weight_only = SetArgs {
            weight: Some(25.0),
            ..SetArgs::default()
        };
        let (s, _) = weight_only.apply(&current).unwrap();
        assert_eq!(s.canary.unwrap().weight, 25.0);
        assert_eq!(s.stable, Some(1));
        let shadow = SetArgs {
            shadows: vec!["3:50".into(), "4".into()],
            ..SetArgs::default()
        };
        let (s, _) = shadow.apply(&current).unwrap();
        assert_eq!(s.shadows.len(), 2);
        assert_eq!(s.shadows[1].percent, 100.0);
        let new_canary = SetArgs {
            canary: Some(3),
            ..SetArgs::default()
        };
        assert!(new_canary.apply(&current).is_err());
        // Not even for the canary in place (a rolled-back one has weight 0).
        let same_canary = SetArgs {
            canary: Some(2),
            ..SetArgs::default()
        };
        let e = same_canary.apply(&current).unwrap_err().to_string();
        assert!(e.contains("--weight") && e.contains("--rollout"), "{e}");
        let rollout = SetArgs {
            canary: Some(3),
            rollout: true,
            steps: Some(vec![10.0, 100.0]),
            ..SetArgs::default()
        };
        let (s, plan) = rollout.apply(&current).unwrap();
        assert!(s.rollout.is_some());
        // Only what the flags name: the server fills in the model's configured plan.
        let plan = plan.unwrap();
        assert_eq!(plan.steps, Some(vec![10.0, 100.0]));
        assert_eq!(plan.interval_secs, None);
        assert_eq!(plan.min_requests, None);
        assert!(parse_shadow("x:1").is_err());
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }
}

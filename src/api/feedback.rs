//! Ground-truth feedback and the capture state, shared by HTTP (`POST
//! /v2/models/{m}/feedback`, `GET /admin/capture`, `POST /admin/capture/flush`) and the
//! gRPC admin service (`Feedback`): each item is checked on its own and
//! answered on its own (joined, unknown, expired, malformed); only an unknown model or
//! a body that is not a list of items fails the whole call.

use serde::Serialize;
use serde_json::Value;

use super::Api;
use crate::capture::{FeedbackItem, FeedbackResult};
use crate::error::{Error, Result};

/// Most items in one feedback call.
pub const MAX_ITEMS: usize = 10_000;

/// The answer to a feedback call: one result per item, in order, and the counts.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FeedbackAnswer {
    pub model: String,
    pub results: Vec<FeedbackResult>,
    pub joined: usize,
    pub unknown: usize,
    pub expired: usize,
    pub malformed: usize,
}

/// Joins the items (JSON values as sent) with their predictions.
pub async fn feedback(api: &Api, model: &str, items: Vec<Value>) -> Result<FeedbackAnswer> {
    if !api.registry.snapshot().models.contains_key(model) {
        return Err(Error::NotFound(format!("unknown model '{model}'")));
    }
    if items.len() > MAX_ITEMS {
        return Err(Error::invalid(format!(
            "at most {MAX_ITEMS} feedback items per call, got {}",
            items.len()
        )));
    }
    // Items that do not even have the item's form are answered here; the rest go to
    // the capture writer, which owns the index of predictions.
    let mut results: Vec<Option<FeedbackResult>> = Vec::with_capacity(items.len());
    let mut valid = Vec::new();
    for v in items {
        let id = v
            .get("id")
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
            .unwrap_or_default();
        match serde_json::from_value::<FeedbackItem>(v) {
            Ok(item) => {
                results.push(None);
                valid.push(item);
            }
            Err(e) => {
                ::metrics::counter!(crate::metrics::FEEDBACK, "model" => model.to_string(), "outcome" => "malformed")
                    .increment(1);
                results.push(Some(FeedbackResult {
                    id,
                    status: "malformed".into(),
                    error: Some(format!(
                        "an item is {{\"id\": \"...\", \"label\": 2}} or {{\"id\": \"...\", \"value\": 0.7}}: {e}"
                    )),
                }))
            }
        }
    }
    let mut joined = if valid.is_empty() {
        Vec::new()
    } else {
        api.capture.feedback(model, valid).await?
    }
    .into_iter();
    let results: Vec<FeedbackResult> = results
        .into_iter()
        .filter_map(|r| r.or_else(|| joined.next()))
        .collect();
    let count = |s: &str| results.iter().filter(|r| r.status == s).count();
    Ok(FeedbackAnswer {
        model: model.to_string(),
        joined: count("joined"),
        unknown: count("unknown"),
        expired: count("expired"),
        malformed: count("malformed"),
        results,
    })
}

/// Parses an HTTP feedback body: `{"feedback": [items]}`.
pub fn items_from_json(body: &[u8]) -> Result<Vec<Value>> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Error::invalid(format!("malformed feedback JSON: {e}")))?;
    match v.get("feedback") {
        Some(Value::Array(items)) if v.as_object().is_some_and(|o| o.len() == 1) => {
            Ok(items.clone())
        }
        _ => Err(Error::invalid(
            "the body is {\"feedback\": [{\"id\": \"req-1\", \"label\": 2}, {\"id\": \"req-2\", \"value\": 0.7}]}",
        )),
    }
}

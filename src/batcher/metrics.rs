//! The batcher's own metrics: batches by release reason, rows per batch, batch
//! inference time and deadline expiries, as handles registered once per version so
//! the worker threads record without building label sets.

use std::time::Duration;

use ::metrics::{Counter, Histogram, counter, histogram};

use super::policy::Reason;
use crate::metrics::{
    BATCH_INFERENCE_DURATION, BATCH_SIZE, BATCHES_TOTAL, DEADLINE_EXCEEDED_TOTAL,
};

/// Batcher metric handles of one model version, registered once.
pub struct BatchMetrics {
    reasons: Vec<(Reason, Counter)>,
    size: Histogram,
    infer: Histogram,
    pub deadline_exceeded: Counter,
}

impl BatchMetrics {
    pub fn new(model: &str, version: &str) -> BatchMetrics {
        let labels = || {
            vec![
                ("model", model.to_string()),
                ("version", version.to_string()),
            ]
        };
        let reasons = [
            Reason::Full,
            Reason::Preferred,
            Reason::Delay,
            Reason::Deadline,
            Reason::Adaptive,
            Reason::Immediate,
            Reason::Drain,
            Reason::Inline,
        ]
        .into_iter()
        .map(|r| {
            let mut l = labels();
            l.push(("reason", r.as_str().to_string()));
            (r, counter!(BATCHES_TOTAL, &l))
        })
        .collect();
        BatchMetrics {
            reasons,
            size: histogram!(BATCH_SIZE, &labels()),
            infer: histogram!(BATCH_INFERENCE_DURATION, &labels()),
            deadline_exceeded: counter!(DEADLINE_EXCEEDED_TOTAL, &labels()),
        }
    }

    /// Counts a released batch.
    pub fn released(&self, reason: Reason) {
        if let Some((_, c)) = self.reasons.iter().find(|(r, _)| *r == reason) {
            c.increment(1);
        }
    }

    /// Records a batch that ran.
    pub fn ran(&self, rows: usize, took: Duration) {
        self.size.record(rows as f64);
        self.infer.record(took.as_secs_f64());
    }
}

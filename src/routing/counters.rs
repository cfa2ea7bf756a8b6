//! Per-version traffic counters for rollout analysis, recorded on the request path:
//! atomics for requests, server-side errors and comparisons, and an hdrhistogram of
//! microseconds (2 significant digits: buckets under 1 % wide, finer than any threshold
//! a plan sets) behind one uncontended lock, so recording stays cheap. They are
//! cumulative; the rollout controller copies them at the start of a step and judges
//! the difference ([`Counts::since`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;

use super::compare::Comparison;
use super::judge::{Arm, Compared, Latency};
use crate::error::Error;

/// The longest latency told apart (100 s, in microseconds); longer ones count as it.
const MAX_LATENCY_US: u64 = 100_000_000;

/// An empty latency histogram: microseconds, 2 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("constant bounds are valid")
}

/// Cumulative counters of one version, recorded on the request path.
pub struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Latency of successful requests.
    latency: Mutex<Histogram<u64>>,
    compared_rows: AtomicU64,
    disagreed_rows: AtomicU64,
    /// Sum of absolute differences, in billionths.
    abs_diff_nano: AtomicU64,
    compared_values: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: Mutex::new(new_histogram()),
            compared_rows: AtomicU64::new(0),
            disagreed_rows: AtomicU64::new(0),
            abs_diff_nano: AtomicU64::new(0),
            compared_values: AtomicU64::new(0),
        }
    }
}

/// Whether an error counts against a version: failures of the server or the model, not
/// of the request (a bad request or a client's short deadline says nothing of it).
pub fn counts_against(e: &Error) -> bool {
    match e {
        Error::Inference(_) | Error::Internal(_) => true,
        Error::InvalidRequest(_)
        | Error::PayloadTooLarge { .. }
        | Error::NotFound(_)
        | Error::Unavailable(_)
        | Error::Overloaded { .. }
        | Error::DeadlineExceeded(_)
        | Error::ClientTimeout(_)
        | Error::Unauthenticated(_)
        | Error::Forbidden(_)
        | Error::Config(_) => false,
    }
}

impl Counters {
    /// Records a request this version answered (or failed).
    pub fn record(&self, total: Duration, failed: bool) {
        self.requests.fetch_add(1, Relaxed);
        if failed {
            self.errors.fetch_add(1, Relaxed);
        } else {
            let us = u64::try_from(total.as_micros()).unwrap_or(u64::MAX).max(1);
            // A panic elsewhere while holding the lock left whole counts behind: go on.
            self.latency
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .saturating_record(us);
        }
    }

    /// Records a comparison of this version's answer with stable's.
    pub fn record_comparison(&self, c: &Comparison) {
        self.compared_rows.fetch_add(c.rows, Relaxed);
        self.disagreed_rows.fetch_add(c.disagreed_rows, Relaxed);
        let nano = (c.abs_diff_sum * 1e9).clamp(0.0, 1e18) as u64;
        self.abs_diff_nano.fetch_add(nano, Relaxed);
        self.compared_values.fetch_add(c.values, Relaxed);
    }

    /// A copy of the counters now.
    pub fn read(&self) -> Counts {
        let latency = self
            .latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Counts {
            requests: self.requests.load(Relaxed),
            errors: self.errors.load(Relaxed),
            latency,
            compared_rows: self.compared_rows.load(Relaxed),
            disagreed_rows: self.disagreed_rows.load(Relaxed),
            abs_diff_nano: self.abs_diff_nano.load(Relaxed),
            compared_values: self.compared_values.load(Relaxed),
        }
    }
}

/// Counter values at one moment, or the difference over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
    /// Latency of successful requests, microseconds.
    pub latency: Histogram<u64>,
    pub compared_rows: u64,
    pub disagreed_rows: u64,
    pub abs_diff_nano: u64,
    pub compared_values: u64,
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            requests: 0,
            errors: 0,
            latency: new_histogram(),
            compared_rows: 0,
            disagreed_rows: 0,
            abs_diff_nano: 0,
            compared_values: 0,
        }
    }
}

impl Counts {
    /// What happened between `base` and `self` (the same counters, later).
    pub fn since(&self, base: &Counts) -> Counts {
        let mut latency = self.latency.clone();
        if latency.subtract(&base.latency).is_err() {
            // Not a later reading of the same counters: nothing to tell from it.
            latency = new_histogram();
        }
        Counts {
            requests: self.requests.saturating_sub(base.requests),
            errors: self.errors.saturating_sub(base.errors),
            latency,
            compared_rows: self.compared_rows.saturating_sub(base.compared_rows),
            disagreed_rows: self.disagreed_rows.saturating_sub(base.disagreed_rows),
            abs_diff_nano: self.abs_diff_nano.saturating_sub(base.abs_diff_nano),
            compared_values: self.compared_values.saturating_sub(base.compared_values),
        }
    }

    /// The judge's view of one arm.
    pub fn arm(&self) -> Arm {
        Arm {
            requests: self.requests,
            errors: self.errors,
            latency: Latency::from_hdr(&self.latency),
        }
    }

    /// The judge's view of the comparisons.
    pub fn compared(&self) -> Compared {
        Compared {
            rows: self.compared_rows,
            disagreed_rows: self.disagreed_rows,
            values: self.compared_values,
            abs_diff_sum: self.abs_diff_nano as f64 / 1e9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_recorded_finely_and_windows_subtract() {
        let c = Counters::default();
        c.record(Duration::from_micros(100), false);
        let base = c.read();
        c.record(Duration::from_micros(100), true);
        for us in [1000, 1010, 1020, 5000] {
            c.record(Duration::from_micros(us), false);
        }
        let w = c.read().since(&base);
        assert_eq!((w.requests, w.errors), (5, 1));
        let arm = w.arm();
        assert_eq!(arm.latency.count(), 4);
        // 1 % resolution: 1.00, 1.01 and 1.02 ms stay apart.
        assert_eq!(arm.latency.count_surely_above(1.005), 3, "{arm:?}");
        assert_eq!(arm.latency.count_surely_above(1.015), 2, "{arm:?}");
        assert!((arm.latency.quantile(0.99).unwrap() - 5.0).abs() < 0.05);
        // The base's 100 us request is not in the window.
        assert_eq!(arm.latency.count_maybe_above(0.2), 4);
        // A reading of other counters (a reloaded version) subtracts to nothing.
        let other = Counters::default();
        other.record(Duration::from_micros(7), false);
        let odd = other.read().since(&c.read());
        assert_eq!(odd.latency.len(), 0);
        // Beyond the histogram's range: counted as the longest.
        c.record(Duration::from_secs(1000), false);
        assert_eq!(c.read().latency.len(), 6);
    }

    #[test]
    fn comparisons_add_up() {
        let c = Counters::default();
        c.record_comparison(&Comparison {
            rows: 10,
            disagreed_rows: 2,
            classifier: true,
            abs_diff_sum: 0.5,
            values: 30,
            mismatched_outputs: 0,
        });
        let k = c.read().compared();
        assert_eq!((k.rows, k.disagreed_rows, k.values), (10, 2, 30));
        assert!((k.abs_diff_sum - 0.5).abs() < 1e-9);
    }
}

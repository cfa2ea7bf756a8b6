//! Results: latency histograms (hdrhistogram, microseconds, 1 µs..60 s, 3 significant
//! digits), success and per-error-code counts, and the report printed as a table and
//! written as JSON.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency recorded; slower requests are clamped to it (and are timeouts anyway).
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// A new latency histogram with the bounds every recorder uses.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant bounds are valid")
}

/// Why a request did not count as ok.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A non-OK gRPC status.
    Grpc(tonic::Code),
    /// An HTTP status other than 200.
    Http(u16),
    /// No connection could be made.
    Connect,
    /// The connection broke or the response was malformed.
    Transport,
    /// No answer within `--timeout`.
    Timeout,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Grpc(code) => f.write_str(grpc_code_name(*code)),
            ErrorKind::Http(status) => write!(f, "{status}"),
            ErrorKind::Connect => f.write_str("connect"),
            ErrorKind::Transport => f.write_str("transport"),
            ErrorKind::Timeout => f.write_str("timeout"),
        }
    }
}

/// The canonical gRPC status name (as in grpc/status.h and the other clients).
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Counts and latencies of one recorder (a client task, or the open loop's shared one).
#[derive(Debug, Clone)]
pub struct Stats {
    /// Latencies of successful requests only: a fast 429 must not improve the percentiles.
    pub latency: Histogram<u64>,
    pub ok: u64,
    pub errors: HashMap<ErrorKind, u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            latency: new_histogram(),
            ok: 0,
            errors: HashMap::new(),
        }
    }
}

impl Stats {
    /// Records one finished request.
    pub fn record(&mut self, outcome: Result<(), ErrorKind>, latency: Duration) {
        match outcome {
            Ok(()) => {
                self.ok += 1;
                self.latency.saturating_record(duration_us(latency));
            }
            Err(kind) => *self.errors.entry(kind).or_default() += 1,
        }
    }

    /// Adds another recorder's results.
    pub fn merge(&mut self, other: &Stats) {
        self.ok += other.ok;
        for (k, n) in &other.errors {
            *self.errors.entry(*k).or_default() += n;
        }
        self.latency
            .add(&other.latency)
            .expect("histograms share the same bounds");
    }

    /// Requests that got an answer or failed (dropped ones were never sent).
    pub fn requests(&self) -> u64 {
        self.ok + self.errors.values().sum::<u64>()
    }
}

/// A duration in whole microseconds, at least 1 (the histogram's lowest value).
pub fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_LATENCY_US)
}

/// Percentiles of a histogram, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: (h.mean() * 10.0).round() / 10.0,
        }
    }
}

/// Everything a run measured; serialized as the `--json` file.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub protocol: String,
    pub url: String,
    pub model: String,
    pub model_version: Option<String>,
    /// "closed" or "open".
    pub mode: String,
    pub concurrency: Option<usize>,
    pub rate: Option<f64>,
    pub connections: usize,
    pub rows: u64,
    /// Measured time: from the end of warmup to the last measured completion.
    pub duration_s: f64,
    pub warmup_s: f64,
    /// Requests sent and finished in the measured window (ok + errors).
    pub requests: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    /// Open loop: sends skipped because `--max-outstanding` requests were in flight.
    pub dropped: u64,
    /// Successful requests per second.
    pub throughput_rps: f64,
    pub rows_per_s: f64,
    /// Successful requests only. Open loop: from each request's intended send time.
    pub latency_us: Percentiles,
    /// Open loop: how late the scheduler sent relative to the intended times.
    pub schedule_lag_us: Option<Percentiles>,
}

/// The run's settings the report repeats.
pub struct RunInfo {
    pub protocol: String,
    pub url: String,
    pub model: String,
    pub model_version: Option<String>,
    pub concurrency: Option<usize>,
    pub rate: Option<f64>,
    pub connections: usize,
    pub rows: u64,
    pub warmup: Duration,
}

impl Report {
    pub fn new(
        info: RunInfo,
        stats: &Stats,
        elapsed: Duration,
        dropped: u64,
        lag: Option<&Histogram<u64>>,
    ) -> Report {
        let secs = elapsed.as_secs_f64();
        let rps = if secs > 0.0 {
            stats.ok as f64 / secs
        } else {
            0.0
        };
        let round = |x: f64| (x * 10.0).round() / 10.0;
        Report {
            protocol: info.protocol,
            url: info.url,
            model: info.model,
            model_version: info.model_version,
            mode: if info.rate.is_some() {
                "open"
            } else {
                "closed"
            }
            .to_string(),
            concurrency: info.concurrency,
            rate: info.rate,
            connections: info.connections,
            rows: info.rows,
            duration_s: (secs * 1000.0).round() / 1000.0,
            warmup_s: info.warmup.as_secs_f64(),
            requests: stats.requests(),
            ok: stats.ok,
            errors: stats
                .errors
                .iter()
                .map(|(k, n)| (k.to_string(), *n))
                .collect(),
            dropped,
            throughput_rps: round(rps),
            rows_per_s: round(rps * info.rows as f64),
            latency_us: Percentiles::of(&stats.latency),
            schedule_lag_us: lag.map(Percentiles::of),
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(&str, String)> = vec![
            ("protocol", self.protocol.clone()),
            ("url", self.url.clone()),
            (
                "model",
                match &self.model_version {
                    Some(v) => format!("{} (version {v})", self.model),
                    None => self.model.clone(),
                },
            ),
        ];
        let mode = match (self.concurrency, self.rate) {
            (Some(c), _) => format!(
                "closed loop, concurrency {c} over {} connection(s)",
                self.connections
            ),
            (_, Some(r)) => format!(
                "open loop, {r} req/s over {} connection(s)",
                self.connections
            ),
            _ => String::new(),
        };
        rows.push(("mode", mode));
        rows.push(("rows/request", self.rows.to_string()));
        rows.push((
            "duration",
            format!(
                "{:.3} s measured (after {} s warmup)",
                self.duration_s, self.warmup_s
            ),
        ));
        rows.push(("requests", format!("{} (ok {})", self.requests, self.ok)));
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            self.errors
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        rows.push(("errors", errors));
        if self.rate.is_some() {
            rows.push(("dropped", self.dropped.to_string()));
        }
        rows.push((
            "throughput",
            format!(
                "{:.1} req/s, {:.1} rows/s",
                self.throughput_rps, self.rows_per_s
            ),
        ));
        let pct = |p: &Percentiles| {
            format!(
                "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {:.1}",
                p.p50, p.p90, p.p99, p.p999, p.max, p.mean
            )
        };
        rows.push(("latency (µs)", pct(&self.latency_us)));
        if let Some(lag) = &self.schedule_lag_us {
            rows.push(("send lag (µs)", pct(lag)));
        }
        let width = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            let pad = width - k.chars().count();
            // Writing to a String cannot fail.
            let _ = writeln!(out, "{k}{}  {v}", " ".repeat(pad));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut s = Stats::default();
        // 1..=1000 µs once each: p50 = 500, p90 = 900, p99 = 990, p99.9 = 999.
        for us in 1..=1000u64 {
            s.record(Ok(()), Duration::from_micros(us));
        }
        let p = Percentiles::of(&s.latency);
        assert_eq!(
            (p.p50, p.p90, p.p99, p.p999, p.max),
            (500, 900, 990, 999, 1000)
        );
        assert!((p.mean - 500.5).abs() < 0.5, "{}", p.mean);
        // Three significant digits: 123456 µs is kept to within 0.1%.
        let mut h = new_histogram();
        h.record(123_456).unwrap();
        let v = h.value_at_quantile(0.5);
        assert!(v.abs_diff(123_456) <= 124, "{v}");
    }

    #[test]
    fn errors_are_counted_not_timed_and_merge() {
        let mut a = Stats::default();
        a.record(Ok(()), Duration::from_micros(100));
        a.record(Err(ErrorKind::Http(429)), Duration::from_micros(1));
        let mut b = Stats::default();
        b.record(Err(ErrorKind::Http(429)), Duration::from_micros(1));
        b.record(
            Err(ErrorKind::Grpc(tonic::Code::Unavailable)),
            Duration::from_micros(1),
        );
        b.record(Ok(()), Duration::from_secs(120));
        a.merge(&b);
        assert_eq!(a.ok, 2);
        assert_eq!(a.requests(), 5);
        assert_eq!(a.latency.len(), 2);
        // The 120 s request is clamped to the 60 s ceiling, not lost.
        assert!(a.latency.max() >= 59_000_000, "{}", a.latency.max());
        let r = Report::new(
            RunInfo {
                protocol: "grpc".into(),
                url: "x".into(),
                model: "m".into(),
                model_version: None,
                concurrency: Some(2),
                rate: None,
                connections: 1,
                rows: 4,
                warmup: Duration::ZERO,
            },
            &a,
            Duration::from_secs(2),
            0,
            None,
        );
        assert_eq!(r.errors.get("429"), Some(&2));
        assert_eq!(r.errors.get("UNAVAILABLE"), Some(&1));
        assert_eq!(r.throughput_rps, 1.0);
        assert_eq!(r.rows_per_s, 4.0);
        assert_eq!(r.mode, "closed");
        let json = serde_json::to_value(&r).unwrap();
        for key in [
            "protocol",
            "url",
            "model",
            "mode",
            "concurrency",
            "rate",
            "rows",
            "duration_s",
            "requests",
            "ok",
            "errors",
            "throughput_rps",
            "rows_per_s",
            "latency_us",
        ] {
            assert!(json.get(key).is_some(), "{key} missing");
        }
        for key in ["p50", "p90", "p99", "p999", "max", "mean"] {
            assert!(
                json["latency_us"].get(key).is_some(),
                "latency_us.{key} missing"
            );
        }
        assert!(
            r.table().contains("429: 2, UNAVAILABLE: 1"),
            "{}",
            r.table()
        );
    }

    #[test]
    fn sub_microsecond_latencies_count_as_one() {
        assert_eq!(duration_us(Duration::from_nanos(10)), 1);
        assert_eq!(duration_us(Duration::from_millis(3)), 3000);
        assert_eq!(duration_us(Duration::from_secs(1000)), MAX_LATENCY_US);
    }
}

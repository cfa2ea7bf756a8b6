//! Fleet-wide rollout analysis: a step's canary and stable figures read from
//! Prometheus, summed over every replica, instead of this process's counters
//! (`[traffic.analysis] source = "prometheus"`).
//!
//! The judge ([`super::judge`]) is unchanged: it gets the same per-arm counts and
//! latency buckets, only from PromQL (`increase()` over the step window of
//! `modelgate_requests_total`, the summed `_bucket` series of
//! `modelgate_request_duration_seconds`, and the canary comparison counters), and the
//! labelled rows of the quality criteria from the capture writer's quality counters,
//! over the whole rollout so far (`rollout.started_ms`), as the local judge counts them.
//!
//! # One verdict per step, whoever judges it
//!
//! Every replica may run the controller. Where a step stands is in `routing.toml`
//! (plan, step, when it began, generation), and the windows looked at are functions of
//! that state only ([`look_at`]): the end-of-step look is over `[start, start + k x
//! interval]` for the largest whole `k` whose end is `settle` (two scrape intervals) in
//! the past, evaluated with `time=` that end, so replicas that judge the same step
//! read the same figures and reach the same verdict; the next step starts at that end.
//! Looks before the end are over `[start, now - settle]` and only a certain breach acts
//! on them (a rollback, the same file whoever writes it). The write is made only over
//! the generation judged (`control::apply`), so the fleet writes and audits it once.
//!
//! When Prometheus cannot answer, the step is inconclusive: nothing changes but the
//! count of inconclusive looks in `routing.toml` (audited, counted, logged); the look
//! is retried after `retry_secs`, and at `max_inconclusive` the rollout pauses.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::judge::{Arm, Compared, Labelled, Latency};
use crate::error::{Error, Result};
use crate::promql::{self, Sample};

/// Where a step's figures come from.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// This process's counters: the replica's own share of the traffic.
    #[default]
    Local,
    /// Prometheus, summed over the replicas the selector matches.
    Prometheus,
}

/// `[traffic.analysis]` of the server config. Its `Debug` leaves the token out.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AnalysisConfig {
    pub source: Source,
    /// `http://host:port` of the Prometheus that scrapes every replica.
    pub prometheus_url: Option<String>,
    /// Sent as `Authorization: Bearer ...` when set.
    pub bearer_token: Option<String>,
    /// One query's time limit, in milliseconds.
    pub timeout_ms: u64,
    /// PromQL label matchers that select this deployment's replicas and no other
    /// (`job="modelgate",namespace="prod"`); empty = every scraped modelgate.
    pub selector: String,
    /// The label that tells replicas apart (`instance`, or `pod`).
    pub replica_label: String,
    /// Prometheus' scrape interval for the replicas, in seconds: looks wait two of them
    /// after a window ends (for the last scrape to land), and a step should be several
    /// of them long.
    pub scrape_interval_secs: f64,
    /// Inconclusive looks at one step before the rollout pauses.
    pub max_inconclusive: u32,
    /// Wait between two inconclusive looks, in seconds.
    pub retry_secs: f64,
}

impl std::fmt::Debug for AnalysisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnalysisConfig")
            .field("source", &self.source)
            .field("prometheus_url", &self.prometheus_url)
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout_ms", &self.timeout_ms)
            .field("selector", &self.selector)
            .field("replica_label", &self.replica_label)
            .field("scrape_interval_secs", &self.scrape_interval_secs)
            .field("max_inconclusive", &self.max_inconclusive)
            .field("retry_secs", &self.retry_secs)
            .finish()
    }
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        AnalysisConfig {
            source: Source::Local,
            prometheus_url: None,
            bearer_token: None,
            timeout_ms: 5000,
            selector: String::new(),
            replica_label: "instance".into(),
            scrape_interval_secs: 15.0,
            max_inconclusive: 10,
            retry_secs: 30.0,
        }
    }
}

/// Steps shorter than this many scrape intervals get a warning from `--validate`.
pub const MIN_SCRAPES_PER_STEP: f64 = 4.0;

impl AnalysisConfig {
    /// Checks the values; the message names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: &str| Err(Error::Config(format!("traffic.analysis.{f}: {why}")));
        if self.source == Source::Prometheus {
            let Some(url) = &self.prometheus_url else {
                return bad("prometheus_url", "needed with source = \"prometheus\"");
            };
            promql::Client::new(url, None, Duration::from_secs(1))
                .map_err(|e| Error::Config(format!("traffic.analysis.{e}")))?;
        }
        if self.timeout_ms == 0 || self.timeout_ms > 600_000 {
            return bad("timeout_ms", "must be between 1 and 600000");
        }
        if !(self.scrape_interval_secs > 0.0 && self.scrape_interval_secs <= 3600.0) {
            return bad("scrape_interval_secs", "must be above 0 and at most 3600");
        }
        if !(self.retry_secs > 0.0 && self.retry_secs <= 86_400.0) {
            return bad("retry_secs", "must be above 0 and at most 86400");
        }
        if self.max_inconclusive == 0 {
            return bad("max_inconclusive", "must be at least 1");
        }
        if self.replica_label.is_empty()
            || !self
                .replica_label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return bad("replica_label", "must be a Prometheus label name");
        }
        if self.selector.contains(['{', '}']) {
            return bad(
                "selector",
                "label matchers without braces: job=\"modelgate\",namespace=\"prod\"",
            );
        }
        Ok(())
    }

    /// The client, when the source is Prometheus.
    pub fn client(&self) -> Result<Option<promql::Client>> {
        match (&self.source, &self.prometheus_url) {
            (Source::Prometheus, Some(url)) => Ok(Some(promql::Client::new(
                url,
                self.bearer_token.clone(),
                Duration::from_millis(self.timeout_ms),
            )?)),
            (Source::Prometheus, None) => Err(Error::Config(
                "traffic.analysis.prometheus_url: needed with source = \"prometheus\"".into(),
            )),
            (Source::Local, _) => Ok(None),
        }
    }

    /// How long after a window ends its figures are read: two scrape intervals.
    pub fn settle(&self) -> Duration {
        Duration::from_secs_f64(self.scrape_interval_secs * 2.0)
    }

    /// `--validate`'s warning for a plan whose steps are too short for the scrape
    /// interval, or `None`.
    pub fn step_warning(&self, what: &str, interval_secs: f64) -> Option<String> {
        (self.source == Source::Prometheus
            && interval_secs < MIN_SCRAPES_PER_STEP * self.scrape_interval_secs)
            .then(|| {
                format!(
                    "{what}: rollout steps of {interval_secs} s are fewer than {MIN_SCRAPES_PER_STEP} scrape intervals \
                     ({} s each); fleet figures over so short a window are coarse (make interval_secs at least {} s)",
                    self.scrape_interval_secs,
                    MIN_SCRAPES_PER_STEP * self.scrape_interval_secs
                )
            })
    }
}

/// A look at a step: the window's end (Unix ms) and whether it is the end-of-step look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookAt {
    pub end_ms: u64,
    /// The end-of-step look (`k` whole intervals), else an early one.
    pub closed: bool,
}

/// Which window to judge now, a function of the step's state and the clock: `None`
/// while the window would be shorter than `min_ms` (too few scrapes to say anything).
/// A closed window ends at `start + k x interval` for the largest `k >= 1` with that end
/// at least `settle` ago, so every replica judging the step judges the same window.
pub fn look_at(
    start_ms: u64,
    interval_ms: u64,
    settle_ms: u64,
    min_ms: u64,
    now_ms: u64,
) -> Option<LookAt> {
    let readable = now_ms.checked_sub(settle_ms)?;
    let span = readable.checked_sub(start_ms)?;
    let interval = interval_ms.max(1);
    if span >= interval {
        let k = span / interval;
        return Some(LookAt {
            end_ms: start_ms + k * interval,
            closed: true,
        });
    }
    (span >= min_ms).then_some(LookAt {
        end_ms: readable,
        closed: false,
    })
}

/// One step's fleet figures, as the judge takes them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetFigures {
    pub canary: Arm,
    pub stable: Arm,
    pub compared: Compared,
    /// Stable's latency over the interval before the step (a 100 % step's reference).
    pub previous_stable: Option<Latency>,
    /// Replicas whose series the window has.
    pub replicas: u64,
    /// Canary's and stable's labelled rows (joined feedback) since the rollout began,
    /// when the window asked for them.
    pub labelled: Option<(Labelled, Labelled)>,
}

/// What is asked of Prometheus for one window.
#[derive(Debug, Clone)]
pub struct Window<'a> {
    pub model: &'a str,
    pub canary: u64,
    pub stable: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Also read stable's latency over the interval before `start_ms`.
    pub previous_interval_ms: Option<u64>,
    /// Also read both arms' labelled rows from this time (the rollout's beginning) to
    /// `end_ms`.
    pub labelled_since_ms: Option<u64>,
}

/// The PromQL matchers of one window: the selector, the model, and more.
fn matchers(selector: &str, model: &str, more: &str) -> String {
    let mut m = Vec::new();
    if !selector.trim().is_empty() {
        m.push(selector.trim().trim_end_matches(',').to_string());
    }
    m.push(format!("model={}", promql::quote(model)));
    if !more.is_empty() {
        m.push(more.to_string());
    }
    m.join(",")
}

/// Rounds a summed `increase()` (extrapolated, so fractional) to a count.
fn count(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v.round() as u64
    } else {
        0
    }
}

fn sum_where(samples: &[Sample], pred: impl Fn(&BTreeMap<String, String>) -> bool) -> u64 {
    count(
        samples
            .iter()
            .filter(|s| pred(&s.labels))
            .map(|s| s.value)
            .filter(|v| v.is_finite())
            .sum(),
    )
}

/// Cumulative buckets `(le, count)` of the samples whose labels `pred` accepts.
fn latency_of(samples: &[Sample], pred: impl Fn(&BTreeMap<String, String>) -> bool) -> Latency {
    let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for s in samples.iter().filter(|s| pred(&s.labels)) {
        let Some(le) = s.labels.get("le").and_then(|l| l.parse::<f64>().ok()) else {
            continue;
        };
        if le.is_nan() || !s.value.is_finite() {
            continue;
        }
        // Keyed by the bound's bits (sortable for non-negative floats and +Inf).
        by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += s.value;
    }
    let cumulative: Vec<(f64, u64)> = by_le.values().map(|&(le, v)| (le, count(v))).collect();
    Latency::from_cumulative(&cumulative)
}

/// One arm's labelled rows from the five quality queries (class rows, correct rows,
/// value rows, absolute and squared error sums), in that order.
fn labelled_of(q: &[Vec<Sample>; 5], pred: impl Fn(&BTreeMap<String, String>) -> bool) -> Labelled {
    let float = |samples: &[Sample]| -> f64 {
        samples
            .iter()
            .filter(|s| pred(&s.labels))
            .map(|s| s.value)
            .filter(|v| v.is_finite() && *v > 0.0)
            .sum()
    };
    let [class_rows, correct, value_rows, abs_sum, sq_sum] = q;
    let class_rows = count(float(class_rows));
    let value_rows = count(float(value_rows));
    Labelled {
        class_rows,
        // Extrapolated separately, so rounded separately: never more right than rows.
        correct: count(float(correct)).min(class_rows),
        value_rows,
        abs_sum: float(abs_sum),
        sq_sum: float(sq_sum),
    }
}

/// Error codes that count against a version (`counters::counts_against`).
const SERVER_ERRORS: &str = "inference_failed|internal";

/// Reads a window's figures from Prometheus (queries at once, evaluated at its end).
pub async fn fleet_figures(
    client: &promql::Client,
    config: &AnalysisConfig,
    w: &Window<'_>,
) -> Result<FleetFigures> {
    let range = format!("{}ms", w.end_ms.saturating_sub(w.start_ms).max(1));
    let at = Some(w.end_ms);
    let sel = |more: &str| matchers(&config.selector, w.model, more);
    let versions = format!(
        "version=~\"{}|{}\",variant=~\"canary|stable\"",
        w.canary, w.stable
    );
    let requests = format!(
        "sum by (version, variant, code) (increase(modelgate_requests_total{{{}}}[{range}]))",
        sel(&versions)
    );
    let latency = format!(
        "sum by (version, variant, le) (increase(modelgate_request_duration_seconds_bucket{{{}}}[{range}]))",
        sel(&versions)
    );
    let cmp = |name: &str| {
        format!(
            "sum(increase({name}{{{}}}[{range}]))",
            sel(&format!("version=\"{}\",source=\"canary\"", w.canary))
        )
    };
    let replicas = format!(
        "count(count by ({}) (modelgate_requests_total{{{}}}))",
        config.replica_label,
        sel("")
    );
    let previous = w.previous_interval_ms.map(|p| {
        format!(
            "sum by (le) (increase(modelgate_request_duration_seconds_bucket{{{}}}[{p}ms]))",
            sel(&format!("version=\"{}\",variant=\"stable\"", w.stable))
        )
    });
    let (rows, disagreed, mad_sum, mad_count) = (
        cmp("modelgate_compare_rows_total"),
        cmp("modelgate_compare_disagreed_rows_total"),
        cmp("modelgate_compare_mean_abs_diff_sum"),
        cmp("modelgate_compare_mean_abs_diff_count"),
    );
    // The quality sums, over the whole rollout so far (feedback comes late).
    let quality = w.labelled_since_ms.map(|since| {
        let range = format!("{}ms", w.end_ms.saturating_sub(since).max(1));
        [
            "modelgate_quality_class_rows_total",
            "modelgate_quality_correct_rows_total",
            "modelgate_quality_value_rows_total",
            "modelgate_quality_abs_error_sum",
            "modelgate_quality_squared_error_sum",
        ]
        .map(|name| {
            format!(
                "sum by (version, variant) (increase({name}{{{}}}[{range}]))",
                sel(&versions)
            )
        })
    });
    let prev_at = Some(w.start_ms);
    let (req, lat, rows, disagreed, mad_sum, mad_count, replicas, previous, quality) = tokio::join!(
        client.query(&requests, at),
        client.query(&latency, at),
        client.query(&rows, at),
        client.query(&disagreed, at),
        client.query(&mad_sum, at),
        client.query(&mad_count, at),
        client.query(&replicas, at),
        async {
            match &previous {
                Some(q) => client.query(q, prev_at).await.map(Some),
                None => Ok(None),
            }
        },
        async {
            let Some([a, b, c, d, e]) = &quality else {
                return Ok(None);
            };
            let (a, b, c, d, e) = tokio::join!(
                client.query(a, at),
                client.query(b, at),
                client.query(c, at),
                client.query(d, at),
                client.query(e, at),
            );
            Ok::<_, Error>(Some([a?, b?, c?, d?, e?]))
        },
    );
    let (req, lat, previous, quality) = (req?, lat?, previous?, quality?);
    let scalar = |r: Result<Vec<Sample>>| -> Result<f64> {
        Ok(r?.first().map_or(0.0, |s| s.value).max(0.0))
    };
    let replicas = count(scalar(replicas)?);
    if replicas == 0 {
        return Err(Error::Unavailable(format!(
            "Prometheus at {} has no series of model '{}' from any replica at the window's end (selector '{}')",
            client.url(),
            w.model,
            config.selector
        )));
    }
    let arm_is = |version: u64, variant: &'static str| {
        let version = version.to_string();
        move |l: &BTreeMap<String, String>| {
            l.get("version") == Some(&version)
                && l.get("variant").map(String::as_str) == Some(variant)
        }
    };
    let arm = |version: u64, variant: &'static str| {
        let is = arm_is(version, variant);
        let ok = sum_where(&req, |l| {
            is(l) && l.get("code").map(String::as_str) == Some("ok")
        });
        let errors = sum_where(&req, |l| {
            is(l)
                && l.get("code")
                    .is_some_and(|c| SERVER_ERRORS.split('|').any(|e| e == c))
        });
        Arm {
            requests: ok + errors,
            errors,
            latency: latency_of(&lat, is),
        }
    };
    let mad_values = count(scalar(mad_count)?);
    Ok(FleetFigures {
        canary: arm(w.canary, "canary"),
        stable: arm(w.stable, "stable"),
        compared: Compared {
            rows: count(scalar(rows)?),
            disagreed_rows: count(scalar(disagreed)?),
            // The histogram holds one mean per compared answer: their count and sum
            // stand for the values and their differences (exact for equal-sized answers).
            values: mad_values,
            abs_diff_sum: scalar(mad_sum)?,
        },
        previous_stable: previous.map(|p| latency_of(&p, |_| true)),
        replicas,
        labelled: quality.map(|q| {
            let of =
                |version: u64, variant: &'static str| labelled_of(&q, arm_is(version, variant));
            (of(w.canary, "canary"), of(w.stable, "stable"))
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_a_function_of_the_step_state() {
        let (start, interval, settle, min) = (1_000_000, 10_000, 2_000, 2_000);
        // Too early for any look, then early looks up to now - settle.
        assert_eq!(look_at(start, interval, settle, min, start + 3_000), None);
        assert_eq!(
            look_at(start, interval, settle, min, start + 5_000),
            Some(LookAt {
                end_ms: start + 3_000,
                closed: false
            })
        );
        // Once the interval is settle in the past: the closed window, the same for
        // every replica whatever its clock reads within the next interval.
        for now in [start + 12_000, start + 15_500, start + 21_999] {
            assert_eq!(
                look_at(start, interval, settle, min, now),
                Some(LookAt {
                    end_ms: start + 10_000,
                    closed: true
                }),
                "{now}"
            );
        }
        // A step short of data at its end is judged again one interval later.
        assert_eq!(
            look_at(start, interval, settle, min, start + 22_000),
            Some(LookAt {
                end_ms: start + 20_000,
                closed: true
            })
        );
        assert_eq!(look_at(start, interval, settle, min, 10), None);
    }

    fn sample(labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    #[test]
    fn quality_sums_become_each_arms_labelled_rows() {
        let arm = |version: &str, variant: &str, v: f64| {
            sample(&[("version", version), ("variant", variant)], v)
        };
        // Two replicas' series summed already; extrapolated values round, and a
        // correct count rounded above its rows is held at the rows.
        let q = [
            vec![arm("2", "canary", 99.6), arm("1", "stable", 400.2)],
            vec![arm("2", "canary", 100.4), arm("1", "stable", 380.0)],
            vec![arm("2", "canary", 0.0), arm("1", "stable", f64::NAN)],
            vec![arm("2", "canary", 0.0)],
            vec![],
        ];
        let canary = labelled_of(&q, |l| {
            l.get("variant").map(String::as_str) == Some("canary")
        });
        assert_eq!(
            canary,
            Labelled {
                class_rows: 100,
                correct: 100,
                value_rows: 0,
                abs_sum: 0.0,
                sq_sum: 0.0
            }
        );
        let stable = labelled_of(&q, |l| {
            l.get("variant").map(String::as_str) == Some("stable")
        });
        assert_eq!(
            (stable.class_rows, stable.correct, stable.value_rows),
            (400, 380, 0)
        );
        let values = [
            vec![],
            vec![],
            vec![arm("2", "canary", 50.0)],
            vec![arm("2", "canary", 12.5)],
            vec![arm("2", "canary", 7.25)],
        ];
        let v = labelled_of(&values, |_| true);
        assert_eq!((v.value_rows, v.abs_sum, v.sq_sum), (50, 12.5, 7.25));
    }

    #[test]
    fn summed_buckets_become_the_judges_latency() {
        let s = [
            sample(&[("le", "0.001"), ("version", "2")], 10.4),
            sample(&[("le", "0.005"), ("version", "2")], 19.6),
            sample(&[("le", "+Inf"), ("version", "2")], 20.0),
            sample(&[("le", "0.001"), ("version", "1")], 99.0),
        ];
        let l = latency_of(&s, |l| l.get("version").map(String::as_str) == Some("2"));
        assert_eq!(l.count(), 20);
        // 10 at or below 1 ms, 10 in (1, 5] ms.
        assert_eq!(l.count_surely_above(1.0), 10);
        assert_eq!(l.quantile(0.99), Some(5.0));
        assert_eq!(
            sum_where(&s, |l| l.get("version").map(String::as_str) == Some("2")),
            50
        );
    }

    #[test]
    fn the_token_stays_out_of_debug_output() {
        let c = AnalysisConfig {
            bearer_token: Some("s3cret-token".into()),
            ..AnalysisConfig::default()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn settings_are_checked_and_short_steps_warned_of() {
        let mut c = AnalysisConfig::default();
        c.validate().unwrap();
        c.source = Source::Prometheus;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("prometheus_url")
        );
        c.prometheus_url = Some("http://127.0.0.1:9090".into());
        c.validate().unwrap();
        assert!(c.client().unwrap().is_some());
        c.selector = "{job=\"x\"}".into();
        assert!(c.validate().is_err());
        c.selector = "job=\"x\"".into();
        assert_eq!(
            matchers(&c.selector, "m\"1", "version=\"2\""),
            r#"job="x",model="m\"1",version="2""#
        );
        assert!(c.step_warning("model m", 30.0).is_some());
        assert!(c.step_warning("model m", 60.0).is_none());
        c.source = Source::Local;
        assert!(c.step_warning("model m", 1.0).is_none());
    }
}

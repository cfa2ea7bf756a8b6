//! The overview of every model for the operator's page (`GET /admin/overview`): the
//! repository index rows grouped by model ([`super::admin::repository_index`]), each
//! model's version policy and routing ([`super::admin::traffic_get`]), and per loaded
//! version its role and its live request rate, error rate and p99.
//!
//! The live figures come from the rollout counters every version keeps (cumulative
//! requests, server-side errors and an hdrhistogram of successful latencies; shadow
//! copies are not counted). [`Rates`] keeps two readings per version, at least
//! [`WINDOW_SECS`] / 2 apart, and the figures are the difference between now and the
//! older one: a window of 15 to 30 seconds once the page has polled a while. Readings
//! are taken when the overview is asked for, not by a timer: a server nobody looks at
//! does no work for it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::admin::{self, RoutingView};
use crate::metrics::Variant;
use crate::registry::ModelVersion;
use crate::registry::settings::VersionPolicy;
use crate::routing::counters::Counts;
use crate::service::AppState;

/// The longest window the live figures span, in seconds.
pub const WINDOW_SECS: u64 = 30;

/// Shortest window a rate is given for: below it, a rate is noise.
const MIN_WINDOW: Duration = Duration::from_secs(1);

/// Every model (`GET /admin/overview`).
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    pub models: Vec<ModelOverview>,
}

/// One model: its versions, version policy and routing.
#[derive(Debug, Clone, Serialize)]
pub struct ModelOverview {
    pub name: String,
    /// The version policy of the config.toml in force (`None` before any was).
    pub version_policy: Option<VersionPolicy>,
    /// Why the model has no version at all, or why its config.toml is not in force.
    pub reason: String,
    /// Every version the repository holds or serves, oldest first.
    pub versions: Vec<VersionOverview>,
    /// The routing; `None` when the model is not loaded.
    pub routing: Option<RoutingView>,
}

/// One version: its repository state and, when loaded, its role and live figures.
#[derive(Debug, Clone, Serialize)]
pub struct VersionOverview {
    pub version: u64,
    /// READY, LOADING or UNAVAILABLE, as the repository index says.
    pub state: &'static str,
    /// Why it is loading or unavailable (or what a READY version's reload found).
    pub reason: String,
    /// `stable`, `canary`, `shadow`, or `direct` (served only when named).
    pub role: Option<&'static str>,
    /// Live figures of a loaded version.
    pub live: Option<Live>,
}

/// What a version served over the last window.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Live {
    /// The window the figures span (0 on the first reading: no rate yet).
    pub window_secs: f64,
    pub requests: u64,
    pub errors: u64,
    /// Requests a second; `None` until the window is a second long.
    pub requests_per_sec: Option<f64>,
    /// Server-side errors per request; `None` without requests.
    pub error_rate: Option<f64>,
    /// p99 of the successful requests' time in the server; `None` without any.
    pub p99_ms: Option<f64>,
    /// Requests since the version was loaded.
    pub total_requests: u64,
}

/// Two readings of a version's counters: the window's start, and the next start.
struct Readings {
    /// Which loaded instance they belong to (a reload starts the counters over).
    instance: usize,
    base: (Instant, Counts),
    next: Option<(Instant, Counts)>,
}

impl Readings {
    fn new(instance: usize, now: Instant, counts: Counts) -> Readings {
        Readings {
            instance,
            base: (now, counts),
            next: None,
        }
    }

    /// Takes the reading `counts` at `now`: the figures since the window's start, then
    /// moves the window on (its start stays between `WINDOW_SECS / 2` and `WINDOW_SECS`
    /// old once two readings that far apart were taken).
    fn take(&mut self, now: Instant, counts: Counts) -> Live {
        let d = counts.since(&self.base.1);
        let window = now.saturating_duration_since(self.base.0);
        let secs = window.as_secs_f64();
        let live = Live {
            window_secs: secs,
            requests: d.requests,
            errors: d.errors,
            requests_per_sec: (window >= MIN_WINDOW).then(|| d.requests as f64 / secs),
            error_rate: (d.requests > 0).then(|| d.errors as f64 / d.requests as f64),
            p99_ms: (!d.latency.is_empty())
                .then(|| d.latency.value_at_quantile(0.99) as f64 / 1000.0),
            total_requests: counts.requests,
        };
        let half = Duration::from_secs(WINDOW_SECS / 2);
        match &self.next {
            None if window >= half => self.next = Some((now, counts)),
            Some((t, _)) if now.saturating_duration_since(*t) >= half => {
                if let Some(next) = self.next.take() {
                    self.base = next;
                }
                self.next = Some((now, counts));
            }
            _ => {}
        }
        live
    }
}

/// The readings behind the live figures, one pair per loaded version.
#[derive(Default)]
pub struct Rates {
    readings: Mutex<HashMap<(String, u64), Readings>>,
}

impl Rates {
    /// The live figures of `mv`, and a new reading of its counters.
    fn live(
        &self,
        readings: &mut HashMap<(String, u64), Readings>,
        mv: &Arc<ModelVersion>,
    ) -> Live {
        let now = Instant::now();
        let counts = mv.counters.read();
        let instance = Arc::as_ptr(mv) as usize;
        let key = (mv.model.clone(), mv.version);
        match readings.get_mut(&key) {
            Some(r) if r.instance == instance => r.take(now, counts),
            _ => {
                let mut r = Readings::new(instance, now, counts.clone());
                let live = r.take(now, counts);
                readings.insert(key, r);
                live
            }
        }
    }
}

/// The role a version plays in its model's routing.
fn role(routing: &crate::routing::TrafficSpec, stable: Option<u64>, version: u64) -> &'static str {
    if routing.shadows.iter().any(|s| s.version == version) {
        return "shadow";
    }
    if Some(version) == stable {
        return Variant::Stable.as_str();
    }
    routing.variant_of(version).as_str()
}

/// Every model with its versions, routing and live figures.
pub fn overview(state: &AppState, rates: &Rates) -> Overview {
    let snapshot = state.registry.snapshot();
    let mut models: BTreeMap<String, ModelOverview> = BTreeMap::new();
    for row in admin::repository_index(state, false) {
        let m = models
            .entry(row.name.clone())
            .or_insert_with(|| ModelOverview {
                name: row.name.clone(),
                version_policy: None,
                reason: String::new(),
                versions: Vec::new(),
                routing: None,
            });
        match row.version.parse::<u64>() {
            Ok(version) => m.versions.push(VersionOverview {
                version,
                state: row.state,
                reason: row.reason,
                role: None,
                live: None,
            }),
            Err(_) => m.reason = row.reason,
        }
    }
    let mut readings = rates
        .readings
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Versions no longer loaded are forgotten.
    readings.retain(|(model, version), _| {
        snapshot
            .models
            .get(model)
            .is_some_and(|m| m.versions.contains_key(version))
    });
    for m in models.values_mut() {
        let Some(loaded) = snapshot.models.get(&m.name) else {
            continue;
        };
        m.version_policy = loaded.settings.as_ref().map(|s| s.version_policy.clone());
        if let Some(e) = &loaded.error
            && m.reason.is_empty()
        {
            m.reason = e.clone();
        }
        m.routing = admin::traffic_get(state, &m.name).ok();
        for v in &mut m.versions {
            if let Some(mv) = loaded.versions.get(&v.version) {
                v.role = Some(role(&loaded.routing, loaded.stable, v.version));
                v.live = Some(rates.live(&mut readings, mv));
            }
        }
    }
    Overview {
        models: models.into_values().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, errors: u64, latencies_us: &[u64]) -> Counts {
        let mut c = Counts {
            requests,
            errors,
            ..Counts::default()
        };
        for &l in latencies_us {
            c.latency.record(l).unwrap();
        }
        c
    }

    #[test]
    fn the_window_spans_the_last_readings_and_moves_on() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut r = Readings::new(1, t0, counts(0, 0, &[]));
        // The first reading: no window yet.
        let l = r.take(t0, counts(0, 0, &[]));
        assert_eq!(l.requests_per_sec, None);
        assert_eq!(l.error_rate, None);
        assert_eq!(l.p99_ms, None);
        // 10 s later: 100 requests, 5 failed; latencies: 199 of 2 ms and one slow one
        // (above the 99th percentile).
        let mut lat = vec![2000; 199];
        lat.push(50_000);
        let l = r.take(at(10), counts(100, 5, &lat));
        assert_eq!(l.requests, 100);
        assert!((l.requests_per_sec.unwrap() - 10.0).abs() < 1e-9);
        assert!((l.error_rate.unwrap() - 0.05).abs() < 1e-9);
        let p99 = l.p99_ms.unwrap();
        assert!((1.9..2.1).contains(&p99), "{p99}");
        // 16 s: the window is half full, the next start is taken.
        r.take(at(16), counts(160, 5, &lat));
        assert!(r.next.is_some());
        // 32 s: the window moves to start at 16 s.
        let l = r.take(at(32), counts(320, 5, &lat));
        assert!((l.window_secs - 32.0).abs() < 1e-9);
        assert_eq!(r.base.0, at(16));
        let l2 = r.take(at(36), counts(360, 5, &lat));
        assert!((l2.window_secs - 20.0).abs() < 1e-9);
        assert!((l2.requests_per_sec.unwrap() - 10.0).abs() < 1e-9);
        // No error since 16 s, and no latency recorded since: none to report.
        assert_eq!(l2.error_rate, Some(0.0));
        assert_eq!(l2.p99_ms, None);
        assert_eq!(l2.total_requests, 360);
        assert_eq!(l.total_requests, 320);
    }

    #[test]
    fn roles_follow_the_routing() {
        let spec: crate::routing::TrafficSpec = serde_json::from_value(serde_json::json!({
            "stable": 1, "canary": {"version": 2, "weight": 10.0},
            "shadows": [{"version": 3, "percent": 50.0}]
        }))
        .unwrap();
        assert_eq!(role(&spec, Some(1), 1), "stable");
        assert_eq!(role(&spec, Some(1), 2), "canary");
        assert_eq!(role(&spec, Some(1), 3), "shadow");
        assert_eq!(role(&spec, Some(1), 4), "direct");
        // No routing: the newest ready version is the effective stable.
        let none = crate::routing::TrafficSpec::default();
        assert_eq!(role(&none, Some(4), 4), "stable");
    }
}

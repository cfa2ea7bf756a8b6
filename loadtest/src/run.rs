//! The load loops.
//!
//! Closed loop: `N` client tasks, each sending its next request as soon as the previous
//! one answers; latency is each request's own round trip.
//!
//! Open loop: requests are due at fixed intervals (`k / rate` after the start) whatever
//! the server does, and each one's latency runs from that *intended* time to its answer.
//! A request that could not be sent on time (server or generator behind, all
//! connections busy) is thus charged for its wait, which is the coordinated-omission
//! correction. The schedule runs on its own OS thread sleeping with a 1 ns timer slack,
//! since tokio's timer wheel has 1 ms resolution and would add up to 1 ms to every
//! latency; requests are spawned onto the runtime from there. In-flight requests are
//! bounded by `--max-outstanding`: a send due while that many are in flight is counted
//! as dropped instead of queued, so memory stays bounded when the server falls behind.
//!
//! Both: the first `--warmup` seconds are excluded (by start time, intended start time
//! in the open loop); the measured window ends after `--duration` seconds or `--requests`
//! measured requests, whichever comes first.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

use crate::client::Target;
use crate::stats::{ErrorKind, Stats, duration_us, new_histogram};

/// When to measure and when to stop.
#[derive(Debug, Clone)]
pub struct Plan {
    pub warmup: Duration,
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
    pub timeout: Duration,
}

/// What a loop measured.
pub struct Measured {
    pub stats: Stats,
    /// From the end of warmup to the last measured completion.
    pub elapsed: Duration,
    pub dropped: u64,
    /// Open loop: actual minus intended send times.
    pub lag: Option<Histogram<u64>>,
}

/// One request with the run's timeout; a timeout is a failure like any other.
async fn infer_once(target: &Target, k: usize, timeout: Duration) -> Result<(), ErrorKind> {
    match tokio::time::timeout(timeout, target.infer(k)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(f)) => Err(f.kind),
        Err(_) => Err(ErrorKind::Timeout),
    }
}

/// Runs `concurrency` clients, each with its own stats (merged at the end, so the hot
/// path shares nothing but the request counter).
pub async fn closed_loop(
    target: Arc<Target>,
    concurrency: usize,
    plan: &Plan,
    stop: Arc<AtomicBool>,
) -> Result<Measured> {
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let deadline = plan.duration.map(|d| measure_from + d);
    let claimed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(concurrency);
    for client in 0..concurrency {
        let (target, stop, claimed) =
            (Arc::clone(&target), Arc::clone(&stop), Arc::clone(&claimed));
        let (requests, timeout) = (plan.requests, plan.timeout);
        tasks.push(tokio::spawn(async move {
            let mut stats = Stats::default();
            let mut last_done: Option<Instant> = None;
            loop {
                let t0 = Instant::now();
                if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| t0 >= d) {
                    break;
                }
                let measured = t0 >= measure_from;
                if measured
                    && let Some(n) = requests
                    && claimed.fetch_add(1, Ordering::Relaxed) >= n
                {
                    break;
                }
                let outcome = infer_once(&target, client, timeout).await;
                let t1 = Instant::now();
                if measured {
                    stats.record(outcome, t1 - t0);
                    last_done = Some(t1);
                }
            }
            (stats, last_done)
        }));
    }
    let mut stats = Stats::default();
    let mut last: Option<Instant> = None;
    for t in tasks {
        let (s, done) = t.await.context("a client task failed")?;
        stats.merge(&s);
        last = last.max(done);
    }
    Ok(Measured {
        stats,
        elapsed: last.map_or(Duration::ZERO, |l| {
            l.saturating_duration_since(measure_from)
        }),
        dropped: 0,
        lag: None,
    })
}

/// Offset of the `k`-th send from the start, computed from `k` (not accumulated) so the
/// schedule does not drift.
pub fn intended_offset(k: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(k as f64 / rate)
}

/// Shared between the scheduler thread and the request tasks.
struct OpenShared {
    stats: Mutex<Stats>,
    outstanding: AtomicUsize,
    last_done: Mutex<Option<Instant>>,
}

/// Decrements the in-flight count however the request task ends.
struct InFlight(Arc<OpenShared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends at `rate` requests per second from a dedicated scheduler thread.
pub async fn open_loop(
    target: Arc<Target>,
    rate: f64,
    max_outstanding: usize,
    plan: &Plan,
    stop: Arc<AtomicBool>,
) -> Result<Measured> {
    let shared = Arc::new(OpenShared {
        stats: Mutex::new(Stats::default()),
        outstanding: AtomicUsize::new(0),
        last_done: Mutex::new(None),
    });
    let handle = tokio::runtime::Handle::current();
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let deadline = plan.duration.map(|d| measure_from + d);
    let sched_shared = Arc::clone(&shared);
    let sched_stop = Arc::clone(&stop);
    let (requests, timeout) = (plan.requests, plan.timeout);
    let scheduler = std::thread::Builder::new()
        .name("loadgen-schedule".into())
        .spawn(move || {
            set_fine_timer_slack();
            let mut lag = new_histogram();
            let (mut dropped, mut measured_slots) = (0u64, 0u64);
            let mut schedule_end = start;
            for k in 0u64.. {
                let intended = start + intended_offset(k, rate);
                if sched_stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| intended >= d) {
                    break;
                }
                let measured = intended >= measure_from;
                if measured {
                    if requests.is_some_and(|n| measured_slots >= n) {
                        break;
                    }
                    measured_slots += 1;
                }
                let now = Instant::now();
                if intended > now {
                    std::thread::sleep(intended - now);
                }
                schedule_end = intended;
                if measured {
                    lag.saturating_record(duration_us(
                        Instant::now().saturating_duration_since(intended),
                    ));
                }
                if sched_shared.outstanding.load(Ordering::Acquire) >= max_outstanding {
                    dropped += u64::from(measured);
                    continue;
                }
                sched_shared.outstanding.fetch_add(1, Ordering::AcqRel);
                let in_flight = InFlight(Arc::clone(&sched_shared));
                let target = Arc::clone(&target);
                handle.spawn(async move {
                    let outcome = infer_once(&target, k as usize, timeout).await;
                    let done = Instant::now();
                    if measured {
                        let shared = &in_flight.0;
                        shared
                            .stats
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .record(outcome, done.saturating_duration_since(intended));
                        let mut last = shared
                            .last_done
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        *last = (*last).max(Some(done));
                    }
                });
            }
            (lag, dropped, schedule_end)
        })
        .context("cannot start the scheduler thread")?;
    let (lag, dropped, schedule_end) = tokio::task::spawn_blocking(move || scheduler.join())
        .await
        .context("waiting for the scheduler")?
        .map_err(|_| anyhow::anyhow!("the scheduler thread panicked"))?;
    // Every request ends within its timeout, so this wait is bounded.
    let wait_until = Instant::now() + timeout + Duration::from_secs(1);
    while shared.outstanding.load(Ordering::Acquire) > 0 && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let stats = shared
        .stats
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let last_done = *shared
        .last_done
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    // The window covers the whole schedule even if the last answers came early.
    let end = last_done.max(Some(schedule_end)).unwrap_or(schedule_end);
    Ok(Measured {
        stats,
        elapsed: end.saturating_duration_since(measure_from),
        dropped,
        lag: Some(lag),
    })
}

/// Asks Linux for 1 ns timer slack on this thread (the default 50 µs would make every
/// scheduled send up to 50 µs late). Best effort: elsewhere, sends are just coarser.
fn set_fine_timer_slack() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and only affects this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_does_not_drift() {
        // 3 req/s: 1/3 s is not representable exactly, yet send 3000 is at 1000 s.
        assert_eq!(intended_offset(3000, 3.0), Duration::from_secs(1000));
        assert_eq!(intended_offset(0, 123.0), Duration::ZERO);
        let a = intended_offset(1_000_000, 7000.0);
        let b = intended_offset(1_000_001, 7000.0);
        let step = b - a;
        assert!(
            step.abs_diff(Duration::from_nanos(142_857)) <= Duration::from_nanos(2),
            "{step:?}"
        );
    }

    use crate::client::{HttpPool, test_server};

    async fn slow_target(delay: Duration, connections: usize) -> Arc<Target> {
        let (addr, _) = test_server::spawn(delay).await;
        let pool = HttpPool::connect(&addr, connections).await.unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, addr.parse().unwrap());
        Arc::new(Target::Http {
            pool,
            uri: http::Uri::from_static("/v2/models/m/infer"),
            headers,
            body: bytes::Bytes::from_static(b"{}"),
        })
    }

    fn plan(duration: Option<f64>, requests: Option<u64>, timeout: Duration) -> Plan {
        Plan {
            warmup: Duration::ZERO,
            duration: duration.map(Duration::from_secs_f64),
            requests,
            timeout,
        }
    }

    /// 50 sends due over 250 ms against one connection that takes 20 ms per request:
    /// the server needs a second for them, so the later requests wait ever longer. The
    /// open loop must charge that wait (latency from the intended send time), which a
    /// loop timing only the round trip would hide.
    #[tokio::test]
    async fn open_loop_charges_queueing_to_latency() {
        let target = slow_target(Duration::from_millis(20), 1).await;
        let stop = Arc::new(AtomicBool::new(false));
        let plan = plan(Some(0.25), None, Duration::from_secs(10));
        let m = open_loop(target, 200.0, 10_000, &plan, stop).await.unwrap();
        assert_eq!(m.stats.ok, 50, "{:?}", m.stats.errors);
        assert_eq!(m.dropped, 0);
        let p = crate::stats::Percentiles::of(&m.stats.latency);
        // The last request is due at 245 ms and answered at about 1000 ms.
        assert!(p.max >= 650_000, "max {} µs", p.max);
        assert!(p.p50 >= 250_000, "p50 {} µs", p.p50);
        // The run lasts until the last answer, not just the 250 ms schedule.
        assert!(m.elapsed >= Duration::from_millis(900), "{:?}", m.elapsed);
        assert!(m.lag.is_some());
    }

    /// With at most 3 requests in flight, the sends due while 3 are outstanding are
    /// dropped, and every slot is either sent or dropped.
    #[tokio::test]
    async fn open_loop_drops_beyond_max_outstanding() {
        let target = slow_target(Duration::from_millis(20), 1).await;
        let stop = Arc::new(AtomicBool::new(false));
        let plan = plan(None, Some(40), Duration::from_secs(10));
        let m = open_loop(target, 400.0, 3, &plan, stop).await.unwrap();
        assert_eq!(m.stats.requests() + m.dropped, 40);
        assert!(m.dropped >= 20, "dropped {}", m.dropped);
        assert_eq!(m.stats.requests(), m.stats.ok);
    }

    /// `--requests N` measures exactly N requests however many clients race for them.
    #[tokio::test]
    async fn closed_loop_counts_exactly_and_times_round_trips() {
        let target = slow_target(Duration::from_millis(10), 2).await;
        let stop = Arc::new(AtomicBool::new(false));
        let plan = plan(Some(30.0), Some(12), Duration::from_secs(10));
        let m = closed_loop(target, 3, &plan, stop).await.unwrap();
        assert_eq!(m.stats.ok, 12);
        assert_eq!(m.stats.requests(), 12);
        let p = crate::stats::Percentiles::of(&m.stats.latency);
        assert!(p.p50 >= 10_000, "p50 {} µs", p.p50);
        // 12 requests, 2 connections, 10 ms each: about 60 ms, far below the 30 s bound.
        assert!(m.elapsed < Duration::from_secs(5), "{:?}", m.elapsed);
    }

    /// Timed-out requests count as "timeout" and give their connection back (the pool
    /// must not leak permits, or the second request would wait forever).
    #[tokio::test]
    async fn timeouts_are_errors_and_free_the_connection() {
        let target = slow_target(Duration::from_millis(200), 1).await;
        let stop = Arc::new(AtomicBool::new(false));
        let plan = plan(Some(30.0), Some(3), Duration::from_millis(20));
        let m = closed_loop(target, 1, &plan, stop).await.unwrap();
        assert_eq!(m.stats.ok, 0);
        assert_eq!(m.stats.errors.get(&ErrorKind::Timeout), Some(&3));
    }
}

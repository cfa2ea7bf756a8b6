//! The batching policy, kept pure (no I/O, time passed in) so it can be tested exactly:
//! the queue of waiting entries with priority levels, which entries form the next batch,
//! and when to release it.
//!
//! Rules:
//! - A batch holds entries of one [`BatchKey`] (same non-batch dims and requested
//!   outputs) and at most `max_batch_size` rows; an entry larger than that runs alone.
//! - Priority: level 0 is the highest. The next batch starts from the oldest entry of the
//!   highest non-empty level, except that an entry that has waited `max_priority_wait`
//!   is served first whatever its level (oldest first): lower priority is delayed, never
//!   starved.
//! - Static release: full (`max_batch_size` rows ready), a preferred size reached, the
//!   oldest entry waited `max_queue_delay`, or a deadline would pass while waiting.
//! - Adaptive release: as static, but also at once when waiting would not pay off (fewer
//!   than one more row is expected during one batch's fixed cost) or would break the
//!   latency target; it never waits longer than static would.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Entry;

/// What must match for entries to share a batch: the non-batch dims of every input and
/// the requested outputs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub dims: Vec<Vec<usize>>,
    pub outputs: Option<Arc<[usize]>>,
}

impl BatchKey {
    /// The key of a request: non-batch dims count only when the version batches.
    pub fn of(
        inputs: &[crate::tensor::Tensor],
        batching: bool,
        outputs: Option<Arc<[usize]>>,
    ) -> BatchKey {
        BatchKey {
            dims: if batching {
                inputs
                    .iter()
                    .map(|t| t.shape.get(1..).unwrap_or(&[]).to_vec())
                    .collect()
            } else {
                Vec::new()
            },
            outputs,
        }
    }
}

/// Why a batch was released (the `reason` label of the batches metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Full,
    Preferred,
    Delay,
    Deadline,
    Adaptive,
    /// Batching is off: every request runs as soon as a worker is free.
    Immediate,
    /// The batcher is closing: what is queued runs now.
    Drain,
    /// Light work on an I/O core with a session idle: run now on the connection's
    /// thread, where waiting for a batch would mean a hand-off to the batcher and back.
    Inline,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Full => "full",
            Reason::Preferred => "preferred",
            Reason::Delay => "delay",
            Reason::Deadline => "deadline",
            Reason::Adaptive => "adaptive",
            Reason::Immediate => "immediate",
            Reason::Drain => "drain",
            Reason::Inline => "inline",
        }
    }
}

/// Batching mode of a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    Static,
    Adaptive,
}

/// The policy's parameters.
#[derive(Debug, Clone)]
pub struct Params {
    pub mode: Mode,
    pub max_batch_size: usize,
    pub max_queue_delay: Duration,
    /// Sorted ascending.
    pub preferred: Vec<usize>,
    pub max_priority_wait: Duration,
    /// Adaptive: the latency the batcher must not break by waiting.
    pub target_p99: Duration,
}

/// Learnt cost of a batch: `a + b * rows` seconds, and the arrival rate in rows/second.
#[derive(Debug, Clone, Copy, Default)]
pub struct Estimates {
    pub fixed: f64,
    pub per_row: f64,
    pub arrival_rate: f64,
    /// Time since the last request arrived.
    pub since_last_arrival: Duration,
    /// Typical gap between consecutive arrivals (short inside a burst).
    pub typical_gap: Duration,
    /// How late a timed release starts running (timer overshoot and hand-off).
    pub dispatch_lag: Duration,
}

impl Estimates {
    pub fn cost(&self, rows: usize) -> Duration {
        // Clamped: from_secs_f64 panics on NaN or overflow, and no batch takes an hour.
        let secs = self.fixed + self.per_row * rows as f64;
        Duration::from_secs_f64(if secs.is_finite() {
            secs.clamp(0.0, 3600.0)
        } else {
            3600.0
        })
    }
}

/// What the batching task should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing queued.
    Idle,
    /// Form a batch now.
    Release(Reason),
    /// Check again at this instant (or when something new arrives).
    WaitUntil(Instant),
}

/// Waiting entries, one FIFO per priority level.
pub struct Queue {
    levels: Vec<VecDeque<Entry>>,
    len: usize,
    capacity: usize,
}

impl Queue {
    pub fn new(levels: usize, capacity: usize) -> Queue {
        Queue {
            levels: (0..levels.max(1)).map(|_| VecDeque::new()).collect(),
            len: 0,
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds an entry, or gives it back when the queue is full.
    pub fn push(&mut self, entry: Entry) -> Result<(), Entry> {
        if self.len >= self.capacity {
            return Err(entry);
        }
        let level = usize::try_from(entry.priority)
            .unwrap_or(usize::MAX)
            .min(self.levels.len() - 1);
        self.levels[level].push_back(entry);
        self.len += 1;
        Ok(())
    }

    /// Removes and returns every entry whose deadline has passed or whose client left.
    pub fn expire(&mut self, now: Instant) -> Vec<Entry> {
        let mut gone = Vec::new();
        for level in &mut self.levels {
            let mut i = 0;
            while i < level.len() {
                let e = &level[i];
                if e.deadline.is_some_and(|d| d <= now) || e.reply.is_closed() {
                    if let Some(e) = level.remove(i) {
                        gone.push(e);
                    }
                } else {
                    i += 1;
                }
            }
        }
        self.len -= gone.len();
        gone
    }

    /// Position (level, index) of the entry the next batch starts from.
    fn head(&self, now: Instant, max_priority_wait: Duration) -> Option<(usize, usize)> {
        // Aged entries first, oldest first: each level is FIFO, so only fronts can be oldest.
        let aged = self
            .levels
            .iter()
            .enumerate()
            .filter_map(|(l, q)| q.front().map(|e| (l, e.enqueued)))
            .filter(|&(_, t)| now.saturating_duration_since(t) >= max_priority_wait)
            .min_by_key(|&(_, t)| t);
        if let Some((l, _)) = aged {
            return Some((l, 0));
        }
        self.levels
            .iter()
            .position(|q| !q.is_empty())
            .map(|l| (l, 0))
    }

    /// Entries in service order: aged fronts' levels first is approximated by level order
    /// after the head; yields (level, index).
    fn order(&self, head_level: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let first = (0..self.levels[head_level].len()).map(move |i| (head_level, i));
        let rest = self
            .levels
            .iter()
            .enumerate()
            .filter(move |&(l, _)| l != head_level)
            .flat_map(|(l, q)| (0..q.len()).map(move |i| (l, i)));
        first.chain(rest)
    }

    /// Rows the next batch would take now (0 when nothing is ready).
    fn next_batch_rows(&self, now: Instant, p: &Params) -> usize {
        self.ready_rows(now, p).map_or(0, |(rows, _)| rows)
    }

    /// Rows of the head's key that a batch could take now (capped at `max_rows`).
    fn ready_rows(&self, now: Instant, p: &Params) -> Option<(usize, &Entry)> {
        let (hl, hi) = self.head(now, p.max_priority_wait)?;
        let head = &self.levels[hl][hi];
        if head.rows >= p.max_batch_size {
            return Some((head.rows, head));
        }
        let mut rows = 0;
        for (l, i) in self.order(hl) {
            let e = &self.levels[l][i];
            if e.key == head.key && rows + e.rows <= p.max_batch_size {
                rows += e.rows;
                if rows == p.max_batch_size {
                    break;
                }
            }
        }
        Some((rows, head))
    }

    fn oldest(&self) -> Option<Instant> {
        self.levels
            .iter()
            .filter_map(|q| q.front().map(|e| e.enqueued))
            .min()
    }

    /// The earliest deadline of any queued entry.
    pub fn earliest_deadline(&self) -> Option<Instant> {
        self.levels
            .iter()
            .flat_map(|q| q.iter().filter_map(|e| e.deadline))
            .min()
    }

    /// Decides whether to release a batch now.
    pub fn decide(&self, now: Instant, p: &Params, est: &Estimates) -> Decision {
        let Some((rows, _)) = self.ready_rows(now, p) else {
            return Decision::Idle;
        };
        release_rule(
            rows,
            || self.oldest().unwrap_or(now),
            || self.earliest_deadline(),
            now,
            p,
            est,
        )
    }

    /// [`Queue::decide`] for a submitter on an I/O core with a session idle: where
    /// adaptive batching would wait for more rows, a batch estimated to take at most
    /// `budget` is released now ([`Reason::Inline`]) to run on the connection's thread,
    /// as a bare server's handler would; waiting would cost the batcher thread's
    /// wake-up and a worker's, more than a light model itself. Under load no session is
    /// idle, requests queue and the batcher batches them as before. Static batching's
    /// delay is the operator's choice and is kept.
    pub fn decide_inline(
        &self,
        now: Instant,
        p: &Params,
        est: &Estimates,
        budget: Duration,
    ) -> Decision {
        inline_rule(
            self.decide(now, p, est),
            || self.next_batch_rows(now, p),
            p,
            est,
            budget,
        )
    }

    /// [`Queue::decide_inline`] for a lone entry of `rows` arriving at `now` (with its
    /// `deadline`) while the queue is empty, without queueing it: what the decision on a
    /// queue holding only that entry would be. The submitter's fast path asks this
    /// before it builds an entry and its answer channel.
    pub fn decide_alone(
        now: Instant,
        rows: usize,
        deadline: Option<Instant>,
        p: &Params,
        est: &Estimates,
        budget: Duration,
    ) -> Decision {
        // A lone entry is the head and the whole next batch (`ready_rows`), the oldest
        // and the earliest deadline.
        let decision = release_rule(rows, || now, || deadline, now, p, est);
        inline_rule(decision, || rows, p, est, budget)
    }
}

/// When the next batch (`rows` ready, the oldest entry and the earliest deadline asked
/// for only when needed) is released: the rules of the module's documentation.
fn release_rule(
    rows: usize,
    oldest: impl FnOnce() -> Instant,
    earliest_deadline: impl FnOnce() -> Option<Instant>,
    now: Instant,
    p: &Params,
    est: &Estimates,
) -> Decision {
    if p.mode == Mode::Off {
        return Decision::Release(Reason::Immediate);
    }
    if rows >= p.max_batch_size {
        return Decision::Release(Reason::Full);
    }
    if p.preferred.contains(&rows) {
        return Decision::Release(Reason::Preferred);
    }
    let oldest = oldest();
    // Released early by the measured dispatch lag, so the wait before running is the delay.
    let delay_due = oldest + p.max_queue_delay.saturating_sub(est.dispatch_lag);
    if now >= delay_due {
        return Decision::Release(Reason::Delay);
    }
    let mut wake = delay_due;
    if let Some(deadline) = earliest_deadline() {
        // Leave time to run the batch before the deadline.
        let latest_start = deadline.checked_sub(est.cost(rows)).unwrap_or(now);
        if now >= latest_start {
            return Decision::Release(Reason::Deadline);
        }
        wake = wake.min(latest_start);
    }
    if p.mode == Mode::Adaptive {
        // Waiting pays off only if more rows are expected during one batch's fixed cost.
        if est.arrival_rate * est.fixed < 1.0 {
            return Decision::Release(Reason::Adaptive);
        }
        // Arrivals have paused (a closed loop whose clients are all queued, or the end
        // of a burst): nothing more is coming soon, so waiting only adds latency. A
        // pause is four typical gaps (bursts have short gaps) but never longer than
        // the mean gap of the long-run rate.
        let mean_gap = Duration::from_secs_f64((1.0 / est.arrival_rate).min(3600.0));
        let gap = (est.typical_gap * 4)
            .max(Duration::from_micros(20))
            .min(mean_gap);
        if est.since_last_arrival >= gap {
            return Decision::Release(Reason::Adaptive);
        }
        let budget = p.target_p99.saturating_sub(est.cost(rows));
        let target_due = oldest + budget;
        if now >= target_due {
            return Decision::Release(Reason::Adaptive);
        }
        // Expected time until the batch is full at the current arrival rate.
        let fill = Duration::from_secs_f64(
            ((p.max_batch_size - rows) as f64 / est.arrival_rate).min(3600.0),
        );
        // And wake when the current silence would count as a pause.
        let pause_due = now + gap.saturating_sub(est.since_last_arrival);
        wake = wake.min(target_due).min(now + fill).min(pause_due);
    }
    Decision::WaitUntil(wake)
}

/// [`Queue::decide_inline`]'s rule on top of a decision: adaptive batching's wait becomes
/// an inline release when the next batch (`rows`, asked for only then) is light enough.
fn inline_rule(
    decision: Decision,
    rows: impl FnOnce() -> usize,
    p: &Params,
    est: &Estimates,
    budget: Duration,
) -> Decision {
    match decision {
        Decision::WaitUntil(_) if p.mode == Mode::Adaptive && est.cost(rows()) <= budget => {
            Decision::Release(Reason::Inline)
        }
        d => d,
    }
}

impl Queue {
    /// Takes the next batch: the head entry and compatible entries in service order, up
    /// to `max_batch_size` rows (or the head alone if it is larger).
    pub fn take_batch(&mut self, now: Instant, p: &Params) -> Vec<Entry> {
        let Some((hl, hi)) = self.head(now, p.max_priority_wait) else {
            return Vec::new();
        };
        if self.len == 1 {
            // The common case at low load: the head alone, without the search below.
            let Some(e) = self.levels[hl].remove(hi) else {
                return Vec::new();
            };
            self.len = 0;
            return vec![e];
        }
        let head_rows = self.levels[hl][hi].rows;
        let limit = if p.mode == Mode::Off {
            head_rows
        } else {
            p.max_batch_size.max(head_rows)
        };
        let key = self.levels[hl][hi].key.clone();
        let mut picked: Vec<(usize, usize)> = Vec::new();
        let mut rows = 0;
        for (l, i) in self.order(hl) {
            let e = &self.levels[l][i];
            if e.key == key && rows + e.rows <= limit {
                rows += e.rows;
                picked.push((l, i));
                if p.mode == Mode::Off || rows == limit {
                    break;
                }
            }
        }
        // Remove from the back so earlier indices stay valid; keep service order in the batch.
        let mut out: Vec<Entry> = Vec::with_capacity(picked.len());
        let mut sorted = picked.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let mut removed: Vec<((usize, usize), Entry)> = Vec::with_capacity(picked.len());
        for (l, i) in sorted {
            if let Some(e) = self.levels[l].remove(i) {
                removed.push(((l, i), e));
            }
        }
        for pos in picked {
            if let Some(k) = removed.iter().position(|(p, _)| *p == pos) {
                out.push(removed.swap_remove(k).1);
            }
        }
        self.len -= out.len();
        out
    }

    /// Takes everything (closing).
    pub fn drain(&mut self) -> Vec<Entry> {
        self.len = 0;
        self.levels.iter_mut().flat_map(|q| q.drain(..)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    fn key(d: usize) -> BatchKey {
        BatchKey {
            dims: vec![vec![d]],
            outputs: None,
        }
    }

    fn entry(
        rows: usize,
        k: BatchKey,
        at: Instant,
        priority: u32,
        deadline: Option<Instant>,
    ) -> (
        Entry,
        oneshot::Receiver<crate::error::Result<super::super::RunOutput>>,
    ) {
        let (tx, rx) = oneshot::channel();
        (
            Entry {
                inputs: Vec::new(),
                rows,
                key: k,
                enqueued: at,
                deadline,
                priority,
                warmup: false,
                reply: tx,
            },
            rx,
        )
    }

    /// Dense arrivals, no pause: adaptive batching waits for more rows.
    fn dense() -> Estimates {
        Estimates {
            fixed: 0.000_05,
            per_row: 0.000_01,
            arrival_rate: 100_000.0,
            since_last_arrival: Duration::ZERO,
            typical_gap: Duration::from_micros(10),
            dispatch_lag: Duration::ZERO,
        }
    }

    fn params(mode: Mode) -> Params {
        Params {
            mode,
            max_batch_size: 8,
            max_queue_delay: Duration::from_millis(1),
            preferred: vec![],
            max_priority_wait: Duration::from_millis(100),
            target_p99: Duration::from_millis(10),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_at_most_the_delay() {
        let t0 = Instant::now();
        let mut q = Queue::new(1, 16);
        let (e, _rx) = entry(1, key(4), t0, 0, None);
        q.push(e).ok().unwrap();
        let p = params(Mode::Static);
        assert_eq!(
            q.decide(t0, &p, &Estimates::default()),
            Decision::WaitUntil(t0 + Duration::from_millis(1))
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            q.decide(Instant::now(), &p, &Estimates::default()),
            Decision::Release(Reason::Delay)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn delay_is_shortened_by_the_measured_dispatch_lag() {
        let t0 = Instant::now();
        let mut q = Queue::new(1, 16);
        let (e, _rx) = entry(1, key(4), t0, 0, None);
        q.push(e).ok().unwrap();
        let lagging = Estimates {
            dispatch_lag: Duration::from_micros(200),
            ..Estimates::default()
        };
        assert_eq!(
            q.decide(t0, &params(Mode::Static), &lagging),
            Decision::WaitUntil(t0 + Duration::from_micros(800))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn full_and_preferred_release_at_once() {
        let t0 = Instant::now();
        let mut q = Queue::new(1, 16);
        let mut rxs = Vec::new();
        let mut p = params(Mode::Static);
        p.preferred = vec![4];
        for _ in 0..2 {
            let (e, rx) = entry(2, key(4), t0, 0, None);
            q.push(e).ok().unwrap();
            rxs.push(rx);
        }
        assert_eq!(
            q.decide(t0, &p, &Estimates::default()),
            Decision::Release(Reason::Preferred)
        );
        for _ in 0..2 {
            let (e, rx) = entry(2, key(4), t0, 0, None);
            q.push(e).ok().unwrap();
            rxs.push(rx);
        }
        assert_eq!(
            q.decide(t0, &p, &Estimates::default()),
            Decision::Release(Reason::Full)
        );
        let b = q.take_batch(t0, &p);
        assert_eq!(b.iter().map(|e| e.rows).sum::<usize>(), 8);
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn batches_never_mix_keys_or_exceed_max() {
        let t0 = Instant::now();
        let mut q = Queue::new(1, 16);
        let mut rxs = Vec::new();
        for (rows, k) in [(3, 4), (3, 5), (3, 4), (3, 4), (20, 4)] {
            let (e, rx) = entry(rows, key(k), t0, 0, None);
            q.push(e).ok().unwrap();
            rxs.push(rx);
        }
        let p = params(Mode::Static);
        let b = q.take_batch(t0, &p);
        assert_eq!(b.iter().map(|e| e.rows).collect::<Vec<_>>(), vec![3, 3]);
        assert!(b.iter().all(|e| e.key == key(4)));
        let b = q.take_batch(t0, &p);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].key, key(5));
        let b = q.take_batch(t0, &p);
        assert_eq!(b.iter().map(|e| e.rows).collect::<Vec<_>>(), vec![3]);
        // Larger than max_batch_size: runs alone.
        let b = q.take_batch(t0, &p);
        assert_eq!(b.iter().map(|e| e.rows).collect::<Vec<_>>(), vec![20]);
    }

    #[tokio::test(start_paused = true)]
    async fn on_an_io_core_a_light_batch_runs_now_where_adaptive_would_wait() {
        let t0 = Instant::now();
        let mut q = Queue::new(1, 16);
        for _ in 0..2 {
            let (e, rx) = entry(1, key(4), t0, 0, None);
            q.push(e).ok().unwrap();
            std::mem::forget(rx);
        }
        // Dense arrivals, no pause: adaptive batching would wait for more rows.
        let est = dense();
        let adaptive = params(Mode::Adaptive);
        assert!(matches!(
            q.decide(t0, &adaptive, &est),
            Decision::WaitUntil(_)
        ));
        // Two rows cost 70 µs: within a 70 µs budget they run now, not over 69 µs.
        assert_eq!(
            q.decide_inline(t0, &adaptive, &est, Duration::from_micros(70)),
            Decision::Release(Reason::Inline)
        );
        assert!(matches!(
            q.decide_inline(t0, &adaptive, &est, Duration::from_micros(69)),
            Decision::WaitUntil(_)
        ));
        // Static batching's delay is kept; what the policy releases anyway keeps its reason.
        let fixed_delay = params(Mode::Static);
        assert_eq!(
            q.decide_inline(t0, &fixed_delay, &est, Duration::from_secs(1)),
            q.decide(t0, &fixed_delay, &est)
        );
        let mut full = params(Mode::Adaptive);
        full.max_batch_size = 2;
        assert_eq!(
            q.decide_inline(t0, &full, &est, Duration::from_secs(1)),
            Decision::Release(Reason::Full)
        );
        assert_eq!(
            Queue::new(1, 16).decide_inline(t0, &adaptive, &est, Duration::from_secs(1)),
            Decision::Idle
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_entry_is_decided_as_if_it_were_queued_alone() {
        let t0 = Instant::now();
        let dense = dense();
        let sparse = Estimates {
            arrival_rate: 10.0,
            since_last_arrival: Duration::from_millis(50),
            ..dense
        };
        let lagging = Estimates {
            dispatch_lag: Duration::from_millis(2),
            ..dense
        };
        let mut preferred = params(Mode::Adaptive);
        preferred.preferred = vec![3];
        let mut no_delay = params(Mode::Static);
        no_delay.max_queue_delay = Duration::ZERO;
        let modes = [
            params(Mode::Adaptive),
            params(Mode::Static),
            params(Mode::Off),
            preferred,
            no_delay,
        ];
        let deadlines = [
            None,
            Some(t0 + Duration::from_secs(1)),
            Some(t0 + Duration::from_micros(20)),
        ];
        let budgets = [
            Duration::ZERO,
            Duration::from_micros(70),
            Duration::from_secs(1),
        ];
        let mut releases = std::collections::HashSet::new();
        for p in &modes {
            for est in [&dense, &sparse, &lagging] {
                for rows in [1, 2, 3, 8, 20] {
                    for deadline in deadlines {
                        for budget in budgets {
                            let mut q = Queue::new(1, 16);
                            let (e, _rx) = entry(rows, key(4), t0, 0, deadline);
                            q.push(e).ok().unwrap();
                            let queued = q.decide_inline(t0, p, est, budget);
                            let alone = Queue::decide_alone(t0, rows, deadline, p, est, budget);
                            assert_eq!(
                                alone, queued,
                                "{:?} rows {rows} deadline {deadline:?} budget {budget:?}",
                                p.mode
                            );
                            if let Decision::Release(r) = alone {
                                releases.insert(r.as_str());
                            }
                        }
                    }
                }
            }
        }
        // The cases cover every reason a lone entry can be released for, and waiting.
        for r in [
            "full",
            "preferred",
            "delay",
            "deadline",
            "adaptive",
            "immediate",
            "inline",
        ] {
            assert!(releases.contains(r), "no case released for {r}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_expire_and_force_release() {
        let t0 = Instant::now();
        let mut q = Queue::new(1, 16);
        let (e, mut rx) = entry(1, key(4), t0, 0, Some(t0 + Duration::from_micros(500)));
        q.push(e).ok().unwrap();
        let p = params(Mode::Static);
        let est = Estimates {
            fixed: 0.000_2,
            per_row: 0.0,
            arrival_rate: 0.0,
            since_last_arrival: Duration::ZERO,
            typical_gap: Duration::ZERO,
            dispatch_lag: Duration::ZERO,
        };
        // Must start by 300 µs to finish by the deadline, before the 1 ms delay.
        assert_eq!(
            q.decide(t0, &p, &est),
            Decision::WaitUntil(t0 + Duration::from_micros(300))
        );
        assert_eq!(
            q.decide(t0 + Duration::from_micros(300), &p, &est),
            Decision::Release(Reason::Deadline)
        );
        let gone = q.expire(t0 + Duration::from_micros(500));
        assert_eq!(gone.len(), 1);
        assert!(q.is_empty());
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn priorities_order_and_do_not_starve() {
        let t0 = Instant::now();
        let mut q = Queue::new(2, 16);
        let mut p = params(Mode::Static);
        p.max_batch_size = 1;
        let (low, _a) = entry(1, key(4), t0, 1, None);
        let (high, _b) = entry(1, key(4), t0 + Duration::from_millis(1), 0, None);
        q.push(low).ok().unwrap();
        q.push(high).ok().unwrap();
        // Higher priority first although it came later.
        let b = q.take_batch(t0 + Duration::from_millis(2), &p);
        assert_eq!(b[0].priority, 0);
        // A low-priority entry that waited max_priority_wait goes before new high ones.
        let (high2, _c) = entry(1, key(4), t0 + Duration::from_millis(150), 0, None);
        q.push(high2).ok().unwrap();
        let b = q.take_batch(t0 + Duration::from_millis(150), &p);
        assert_eq!(b[0].priority, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_rejects() {
        let t0 = Instant::now();
        let mut q = Queue::new(1, 2);
        let mut rxs = Vec::new();
        for _ in 0..2 {
            let (e, rx) = entry(1, key(4), t0, 0, None);
            assert!(q.push(e).is_ok());
            rxs.push(rx);
        }
        let (e, _rx) = entry(1, key(4), t0, 0, None);
        assert!(q.push(e).is_err());
        assert_eq!(q.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_releases_when_waiting_cannot_pay() {
        let t0 = Instant::now();
        let mut q = Queue::new(1, 16);
        let (e, _rx) = entry(1, key(4), t0, 0, None);
        q.push(e).ok().unwrap();
        let p = params(Mode::Adaptive);
        // Sparse arrivals (100 rows/s) against a 10 µs fixed cost: no point waiting.
        let sparse = Estimates {
            fixed: 0.000_01,
            per_row: 0.000_001,
            arrival_rate: 100.0,
            since_last_arrival: Duration::ZERO,
            typical_gap: Duration::ZERO,
            dispatch_lag: Duration::ZERO,
        };
        assert_eq!(
            q.decide(t0, &p, &sparse),
            Decision::Release(Reason::Adaptive)
        );
        // Dense arrivals (1e6 rows/s) against a 1 ms fixed cost: wait, but not past the fill time.
        let dense = Estimates {
            fixed: 0.001,
            per_row: 0.000_01,
            arrival_rate: 1e6,
            since_last_arrival: Duration::ZERO,
            typical_gap: Duration::ZERO,
            dispatch_lag: Duration::ZERO,
        };
        match q.decide(t0, &p, &dense) {
            Decision::WaitUntil(t) => assert!(t <= t0 + Duration::from_micros(8), "{:?}", t - t0),
            other => panic!("{other:?}"),
        }
        // Arrivals every 100 µs on average, last one 10 µs ago: wake when the silence
        // reaches a pause (here the mean gap, 100 µs), long before the 1 ms delay.
        let steady = Estimates {
            fixed: 0.001,
            per_row: 0.0,
            arrival_rate: 10_000.0,
            since_last_arrival: Duration::from_micros(10),
            typical_gap: Duration::from_micros(100),
            dispatch_lag: Duration::ZERO,
        };
        assert_eq!(
            q.decide(t0, &p, &steady),
            Decision::WaitUntil(t0 + Duration::from_micros(90))
        );
        // Dense, but nothing arrived for longer than the mean gap: the stream paused.
        let paused = Estimates {
            since_last_arrival: Duration::from_micros(5),
            ..dense
        };
        assert_eq!(
            q.decide(t0, &p, &paused),
            Decision::Release(Reason::Adaptive)
        );
        // Off: release at once.
        assert_eq!(
            q.decide(t0, &params(Mode::Off), &dense),
            Decision::Release(Reason::Immediate)
        );
    }
}

//! Per-version execution: a bounded, priority-aware queue; a batcher thread that forms
//! batches by rows ([`policy`]); and worker threads that run them on ORT sessions.
//!
//! `Session::run` takes `&mut self` and blocks, so sessions are taken one at a time from
//! the pool's idle set, by a worker thread or by the inline fast path below; on the
//! async runtime's threads ONNX Runtime runs only light batches. The batcher is an OS
//! thread too: it waits on a condition variable with microsecond precision (tokio's
//! timers tick in milliseconds, which would turn a 500 µs queue delay into 1-2 ms). It
//! takes a free worker first and then decides when to release, so a batch keeps filling
//! while every worker is busy. The queue is bounded: when it is full a request is refused
//! at once (429 / RESOURCE_EXHAUSTED). A request whose deadline passes while queued is
//! answered DEADLINE_EXCEEDED and never run. Dropping the [`WorkerPool`] stops the task;
//! the workers then exit and release their sessions.
//!
//! The inline fast path: when a request can run at once, nothing else of the version
//! runs (every session idle), requests arrive sparsely (below `INLINE_MAX_LOAD` of the
//! sessions' time) and the batch is estimated to take at most `inline_budget_us`, the
//! thread that submits it runs it, with no hand-off to a worker thread and back. Under
//! load the workers take over and the batcher forms batches as before. Sessions are
//! shared by the workers and the inline path: the layout stays one session per core.
//! On an I/O core a request that finds nothing queued is decided before it is queued
//! ([`policy::Queue::decide_alone`]); released, it runs on the submitting thread with no
//! entry, queue slot or answer channel at all ([`Pending`] then holds the answer).

pub mod metrics;
pub mod policy;
pub mod settings;
pub mod stats;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::sync::Condvar;

use tokio::sync::oneshot;
use tokio::time::Instant;

pub use self::metrics::BatchMetrics;
pub use self::settings::{Batching, PoolSettings};
pub use self::stats::{ExecutionStats, Executions, SizeStats};
use crate::error::{Error, Result};
use crate::runtime::{self, InputParts, Phases};
use crate::tensor::{Tensor, TensorSpec};
use policy::{BatchKey, Decision, Estimates, Mode, Params, Queue};

/// A model whose single row takes this long on one thread gains from intra-op threads
/// more than waking them costs (see `PoolSettings::threads`).
const COMPUTE_HEAVY: Duration = Duration::from_micros(100);

/// ... and only while requests arrive sparsely: at most this share of the sessions' time
/// busy, by the learnt cost and the arrival rate.
const INLINE_MAX_LOAD: f64 = 0.25;

/// True when a model can batch: it has inputs, and every input and output has a dynamic
/// first dimension, so requests may carry any number of rows (and Triton clients see a
/// batching model). The one definition the pool, the registry and the front ends use.
pub fn batchable(inputs: &[TensorSpec], outputs: &[TensorSpec]) -> bool {
    !inputs.is_empty() && inputs.iter().chain(outputs).all(TensorSpec::has_batch_dim)
}

/// How a request is queued ([`WorkerPool::submit`]).
#[derive(Debug, Clone, Default)]
pub struct Submit {
    /// The outputs the caller will keep (positions), so that only requests asking for
    /// the same ones share a batch; `None` = all.
    pub outputs: Option<Arc<[usize]>>,
    /// How long it may wait in the queue; `None` = the version's default queue timeout.
    pub timeout: Option<Duration>,
    /// Triton's priority: 1 the highest, 0 the version's default level; beyond the
    /// version's levels = the lowest (mirrored runs use `u64::MAX`).
    pub priority: u64,
    /// A warm-up run: it executes like any other but stays out of the statistics,
    /// which count the clients' inferences.
    pub warmup: bool,
}

/// A request accepted by the queue: its answer, once a worker ran it.
pub struct Pending(Answer);

/// Where a request's answer is: here already (the submitting thread ran it), or to come
/// from a worker.
enum Answer {
    Here(Option<Result<RunOutput>>),
    Coming(oneshot::Receiver<Result<RunOutput>>),
}

impl Pending {
    /// Waits for the answer.
    pub async fn answer(self) -> Result<RunOutput> {
        match self.0 {
            Answer::Here(Some(answer)) => answer,
            Answer::Here(None) => Err(answered_twice()),
            Answer::Coming(rx) => rx.await.map_err(|_| worker_stopped())?,
        }
    }

    /// The answer if it is here already: a worker gave it, or the submitting thread ran
    /// the request itself (the inline fast path); `None` while it is still to come.
    pub fn try_answer(&mut self) -> Option<Result<RunOutput>> {
        match &mut self.0 {
            Answer::Here(answer) => Some(answer.take().unwrap_or_else(|| Err(answered_twice()))),
            Answer::Coming(rx) => match rx.try_recv() {
                Ok(answer) => Some(answer),
                Err(oneshot::error::TryRecvError::Empty) => None,
                Err(oneshot::error::TryRecvError::Closed) => Some(Err(worker_stopped())),
            },
        }
    }

    /// Waits for the answer, blocking the thread (loading and warm-up only).
    pub fn blocking_answer(self) -> Result<RunOutput> {
        match self.0 {
            Answer::Here(Some(answer)) => answer,
            Answer::Here(None) => Err(answered_twice()),
            Answer::Coming(rx) => rx.blocking_recv().map_err(|_| worker_stopped())?,
        }
    }
}

fn worker_stopped() -> Error {
    Error::Internal("worker stopped before answering".into())
}

fn answered_twice() -> Error {
    Error::Internal("the answer was taken already".into())
}

/// One queued request: inputs in the model's input order, and where to answer.
pub struct Entry {
    pub inputs: Vec<Tensor>,
    /// Rows (first dimension) for batching models; 1 otherwise.
    pub rows: usize,
    pub key: BatchKey,
    pub enqueued: Instant,
    pub deadline: Option<Instant>,
    /// 0-based priority level, 0 the highest. A u32 so that `warmup` shares its word:
    /// the queue moves entries by value, and they stay within 128 bytes.
    pub priority: u32,
    /// Left out of the statistics ([`Submit::warmup`]).
    pub warmup: bool,
    pub reply: oneshot::Sender<Result<RunOutput>>,
}

/// A worker's answer for one entry: every model output, plus where the time went.
#[derive(Debug)]
pub struct RunOutput {
    pub outputs: Vec<Tensor>,
    /// From queueing to the worker starting the batch (Triton's `queue`).
    pub queue: Duration,
    /// The batch's execution, by phase: every request of a batch reports the whole
    /// batch's, as Triton's per-request `compute_*` statistics do.
    pub compute: Phases,
    /// Rows in the batch this request ran in.
    pub batch_rows: usize,
}

struct Batch {
    entries: Vec<Entry>,
    released: Instant,
}

struct Shared {
    queue: Mutex<QueueState>,
    /// Wakes the batcher: a new entry, a free worker, or closing.
    wake: Condvar,
    params: Params,
    cost: Mutex<CostModel>,
    /// How late a timed release actually starts running, as two EWMAs in nanoseconds:
    /// the timer's overshoot and the hand-off to a worker. Delays are shortened by their
    /// sum so that a request waits at most `max_queue_delay` before it runs.
    overshoot_ns: std::sync::atomic::AtomicU64,
    handoff_ns: std::sync::atomic::AtomicU64,
    /// Batches run, by size: Triton's execution statistics.
    executions: ExecutionStats,
}

impl Shared {
    fn observe(ewma: &std::sync::atomic::AtomicU64, lag: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let sample = u64::try_from(lag.as_nanos())
            .unwrap_or(u64::MAX)
            .min(1_000_000);
        let old = ewma.load(Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 7 + sample) / 8
        };
        ewma.store(new, Relaxed);
    }

    fn dispatch_lag(&self) -> Duration {
        use std::sync::atomic::Ordering::Relaxed;
        Duration::from_nanos(self.overshoot_ns.load(Relaxed) + self.handoff_ns.load(Relaxed))
    }
}

struct QueueState {
    queue: Queue,
    arrivals: RateEstimator,
    /// Workers not running a batch.
    free_workers: usize,
    closed: bool,
}

/// The queue, batching task and worker threads of one model version.
pub struct WorkerPool {
    shared: Arc<Shared>,
    /// Queue timeout of requests that carry none.
    default_timeout: Option<Duration>,
    /// Priority levels, and the (1-based) level of requests without a priority.
    priority_levels: usize,
    default_priority_level: usize,
    /// For the fast path: a request that can run at once goes straight to a worker.
    tx: crossbeam_channel::Sender<Batch>,
    /// The sessions not running a batch. A worker takes one for each batch it gets; the
    /// inline fast path takes one to run a batch on the submitting thread.
    sessions: Sessions,
    /// Whether batches may run inline: single-threaded sessions in the foreground (a
    /// shadow's idle priority and a multi-threaded session need their own threads).
    inline: bool,
    /// The longest a batch may be estimated to take to run inline.
    inline_budget: Duration,
    input_specs: Arc<[TensorSpec]>,
    output_specs: Arc<[TensorSpec]>,
    batchable: bool,
    metrics: Arc<BatchMetrics>,
    instances: usize,
    mode: Mode,
}

/// The pool's idle sessions. Invariant: at least `free_workers` of them are here (a
/// session is put back before `free_workers` grows, and taken after it shrank).
#[derive(Clone)]
struct Sessions {
    put: crossbeam_channel::Sender<ort::session::Session>,
    take: crossbeam_channel::Receiver<ort::session::Session>,
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shared.lock_queue().closed = true;
        self.shared.wake.notify_one();
    }
}

impl Shared {
    /// A worker (session) is free again: wakes the batcher only when requests wait for
    /// it. With none waiting the batcher has nothing to do (a new request wakes it), and
    /// waking it after every run would cost two context switches per request.
    fn worker_freed(&self) {
        let mut q = self.lock_queue();
        q.free_workers += 1;
        let waiting = !q.queue.is_empty();
        drop(q);
        if waiting {
            self.wake.notify_one();
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A panic while holding the lock cannot leave the queue inconsistent in a way that
        // matters more than stopping service would.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn estimates(&self, now: Instant, q: &QueueState) -> Estimates {
        let cost = *self
            .cost
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Estimates {
            fixed: cost.fixed,
            per_row: cost.per_row,
            arrival_rate: q.arrivals.rate(now),
            since_last_arrival: q.arrivals.since_last(now),
            dispatch_lag: self.dispatch_lag(),
            typical_gap: q.arrivals.typical_gap(),
        }
    }
}

impl WorkerPool {
    /// Creates the sessions (fallible, before anything is published), then starts one
    /// thread per session and the batcher thread. Returns the pool and the interface.
    pub fn start(
        label: &str,
        path: &Path,
        settings: &PoolSettings,
        env: &ort::environment::Environment,
        metrics: BatchMetrics,
    ) -> Result<(WorkerPool, Vec<TensorSpec>, Vec<TensorSpec>)> {
        // A first session tells the interface, hence whether the model can batch, which
        // decides how many sessions with how many threads (ModelSettings::threads).
        let mut probe = runtime::create_session(env, path, 1)?;
        let (inputs, outputs) = runtime::interface(&probe)?;
        let batchable = batchable(&inputs, &outputs);
        let mode = match (settings.batching, batchable) {
            (Batching::Off, _) | (_, false) => Mode::Off,
            (Batching::Static, true) => Mode::Static,
            (Batching::Auto | Batching::Adaptive, true) => Mode::Adaptive,
        };
        // Only time the probe when the answer matters (both counts automatic, batching on).
        let heavy = mode != Mode::Off
            && !settings.background
            && settings.instances == 0
            && settings.intra_op_threads == 0
            && runtime::single_row_cost(&mut probe, &inputs, &outputs)? >= COMPUTE_HEAVY;
        let (instances, intra) = settings.threads(mode != Mode::Off, heavy);
        let mut sessions = Vec::with_capacity(instances);
        if intra == 1 {
            sessions.push(probe);
        } else {
            drop(probe);
        }
        while sessions.len() < instances {
            sessions.push(runtime::create_session(env, path, intra)?);
        }
        let mut preferred = settings.preferred_batch_sizes.clone();
        preferred.sort_unstable();
        let params = Params {
            mode,
            max_batch_size: settings.max_batch_size,
            max_queue_delay: Duration::from_micros(settings.max_queue_delay_us),
            preferred,
            max_priority_wait: Duration::from_micros(settings.max_priority_wait_us),
            target_p99: Duration::from_secs_f64(settings.target_p99_ms / 1000.0),
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(QueueState {
                queue: Queue::new(settings.priority_levels, settings.max_queue_size),
                arrivals: RateEstimator::default(),
                free_workers: instances,
                closed: false,
            }),
            wake: Condvar::new(),
            params,
            cost: Mutex::new(CostModel::default()),
            overshoot_ns: std::sync::atomic::AtomicU64::new(0),
            handoff_ns: std::sync::atomic::AtomicU64::new(0),
            executions: ExecutionStats::new(if batchable {
                settings.max_batch_size
            } else {
                1
            }),
        });
        let metrics = Arc::new(metrics);
        // Capacity = instances: free_workers already bounds batches in flight to that.
        let (tx, rx) = crossbeam_channel::bounded::<Batch>(instances);
        let input_specs: Arc<[TensorSpec]> = inputs.clone().into();
        let output_specs: Arc<[TensorSpec]> = outputs.clone().into();
        let (put, take) = crossbeam_channel::bounded(instances);
        let idle = Sessions { put, take };
        for session in sessions {
            // Cannot fail: the channel holds `instances` sessions and this end is alive.
            let _ = idle.put.send(session);
        }
        for i in 0..instances {
            let rx = rx.clone();
            let (ins, outs) = (Arc::clone(&input_specs), Arc::clone(&output_specs));
            let shared = Arc::clone(&shared);
            let metrics = Arc::clone(&metrics);
            let idle = idle.clone();
            let background = settings.background;
            std::thread::Builder::new()
                .name(format!("ort-{label}-{i}"))
                .spawn(move || {
                    if background {
                        set_idle_priority();
                    }
                    while let Ok(batch) = rx.recv() {
                        // A batch comes with a free worker counted for it, so a session
                        // is idle (or about to be put back).
                        let Ok(mut session) = idle.take.recv() else {
                            break;
                        };
                        run_batch(
                            &mut session,
                            &ins,
                            &outs,
                            batch,
                            batchable,
                            &shared,
                            &metrics,
                        );
                        let _ = idle.put.send(session);
                        shared.worker_freed();
                    }
                })
                .map_err(|e| {
                    Error::Internal(format!("{label}: cannot start a worker thread: {e}"))
                })?;
        }
        let batcher_shared = Arc::clone(&shared);
        let (batcher_tx, batcher_metrics) = (tx.clone(), Arc::clone(&metrics));
        std::thread::Builder::new()
            .name(format!("batch-{label}"))
            .spawn(move || batcher(&batcher_shared, &batcher_tx, &batcher_metrics))
            .map_err(|e| {
                Error::Internal(format!("{label}: cannot start the batcher thread: {e}"))
            })?;
        Ok((
            WorkerPool {
                shared,
                default_timeout: (settings.default_queue_timeout_us > 0)
                    .then(|| Duration::from_micros(settings.default_queue_timeout_us)),
                priority_levels: settings.priority_levels,
                default_priority_level: settings.default_priority_level,
                tx,
                sessions: idle,
                inline: intra == 1 && !settings.background && !settings.inline_budget.is_zero(),
                inline_budget: settings.inline_budget,
                input_specs,
                output_specs,
                batchable,
                metrics,
                instances,
                mode,
            },
            inputs,
            outputs,
        ))
    }

    /// Requests waiting in the queue, and batches running on the sessions now (the
    /// queue-depth and in-flight gauges sample it once a second).
    pub fn load(&self) -> (usize, usize) {
        let q = self.shared.lock_queue();
        (q.queue.len(), self.instances.saturating_sub(q.free_workers))
    }

    /// Queues a request (inputs in the model's input order, already checked against its
    /// interface), or refuses it at once when the queue is full (429) or the version is
    /// unloading (503).
    pub fn submit(&self, inputs: Vec<Tensor>, opts: Submit) -> Result<Pending> {
        let batching = self.batching();
        let rows = if batching {
            inputs
                .first()
                .and_then(|t| t.shape.first())
                .copied()
                .unwrap_or(1)
        } else {
            1
        };
        let enqueued = Instant::now();
        let deadline = opts.timeout.or(self.default_timeout).map(|t| enqueued + t);
        let level = match opts.priority {
            0 => self.default_priority_level,
            p => usize::try_from(p)
                .unwrap_or(usize::MAX)
                .min(self.priority_levels),
        };
        let mut q = self.shared.lock_queue();
        if q.closed {
            return Err(Error::Unavailable("model version is unloading".into()));
        }
        let mut observed = false;
        // The inline fast path at its cheapest: nothing queued, a session idle and this
        // request released alone. It runs here without an entry, a queue slot or an
        // answer channel.
        if self.inline && q.free_workers > 0 && q.queue.is_empty() && crate::util::on_io_core() {
            q.arrivals.observe(enqueued, rows);
            observed = true;
            let est = self.shared.estimates(enqueued, &q);
            if est.cost(rows) <= self.inline_budget
                && let Decision::Release(reason) = Queue::decide_alone(
                    enqueued,
                    rows,
                    deadline,
                    &self.shared.params,
                    &est,
                    self.inline_budget,
                )
            {
                q.free_workers -= 1;
                drop(q);
                self.metrics.released(reason);
                return Ok(self.run_here(inputs, rows, enqueued, opts.warmup));
            }
        }
        let (reply, rx) = oneshot::channel();
        let entry = Entry {
            key: BatchKey::of(&inputs, batching, opts.outputs),
            inputs,
            rows,
            enqueued,
            deadline,
            priority: u32::try_from(level.saturating_sub(1)).unwrap_or(u32::MAX),
            warmup: opts.warmup,
            reply,
        };
        self.enqueue(q, entry, observed)?;
        Ok(Pending(Answer::Coming(rx)))
    }

    /// Runs a lone request on this thread, a free worker counted for it (the fast path
    /// of [`WorkerPool::submit`]), then frees the worker.
    fn run_here(
        &self,
        inputs: Vec<Tensor>,
        rows: usize,
        enqueued: Instant,
        warmup: bool,
    ) -> Pending {
        let Ok(mut session) = self.sessions.take.try_recv() else {
            // Not expected (a session is put back before its worker counts as free):
            // the request goes to a worker like any released batch.
            let (reply, rx) = oneshot::channel();
            let entry = Entry {
                key: BatchKey::of(&inputs, self.batching(), None),
                inputs,
                rows,
                enqueued,
                deadline: None,
                priority: 0,
                warmup,
                reply,
            };
            self.hand_off(Batch {
                entries: vec![entry],
                released: enqueued,
            });
            return Pending(Answer::Coming(rx));
        };
        let ran = execute(
            &mut session,
            &self.input_specs,
            &self.output_specs,
            &[Request {
                inputs: &inputs,
                rows,
            }],
            enqueued,
            !warmup,
            self.batchable,
            &self.shared,
            &self.metrics,
        );
        let _ = self.sessions.put.send(session);
        self.shared.worker_freed();
        let answer = ran.result.map(|split| RunOutput {
            outputs: match split {
                Split::One(outputs) => outputs,
                // One request makes a batch of one.
                Split::Many(mut per_entry) => per_entry.pop().unwrap_or_default(),
            },
            queue: ran.started.saturating_duration_since(enqueued),
            compute: ran.compute,
            batch_rows: ran.rows,
        });
        Pending(Answer::Here(Some(answer)))
    }

    /// Sends a released batch to a worker; answers its entries when the workers are gone.
    fn hand_off(&self, batch: Batch) {
        if let Err(e) = self.tx.send(batch) {
            for entry in e.into_inner().entries {
                let _ = entry
                    .reply
                    .send(Err(Error::Unavailable("model version is unloading".into())));
            }
        }
    }

    /// Queues an entry (its arrival `observed` already, or not), or refuses it at once
    /// when the queue is full.
    fn enqueue(
        &self,
        mut q: std::sync::MutexGuard<'_, QueueState>,
        entry: Entry,
        observed: bool,
    ) -> Result<()> {
        {
            let (now, rows) = (entry.enqueued, entry.rows);
            if q.queue.push(entry).is_err() {
                return Err(Error::Overloaded {
                    reason: format!("queue is full ({} requests waiting)", q.queue.len()),
                    retry_after: Duration::from_secs(1),
                });
            }
            if !observed {
                q.arrivals.observe(now, rows);
            }
            // Fast path: a worker is free and the policy would release at once (batching
            // off, or adaptive with nothing worth waiting for): hand the batch to the worker
            // from here and save the batcher thread's wake-up on the latency path.
            if q.free_workers > 0 {
                let est = self.shared.estimates(now, &q);
                let io_core = crate::util::on_io_core();
                // On an I/O core a light batch runs now rather than wait for rows
                // (Queue::decide_inline); elsewhere the policy decides as the batcher would.
                let decision = if self.inline && io_core {
                    q.queue
                        .decide_inline(now, &self.shared.params, &est, self.inline_budget)
                } else {
                    q.queue.decide(now, &self.shared.params, &est)
                };
                if let Decision::Release(reason) = decision {
                    let entries = q.queue.take_batch(now, &self.shared.params);
                    if !entries.is_empty() {
                        // Inline only while nothing else of this version runs: under
                        // load the workers take over, and the batcher batches again.
                        let alone = q.free_workers == self.instances;
                        q.free_workers -= 1;
                        let inline = self.inline && {
                            let rows: usize = entries.iter().map(|e| e.rows).sum();
                            // Light, and either on an I/O core (a thread of its own
                            // connections: running here is what a bare server does) or
                            // alone and arriving sparsely on a shared runtime thread: the
                            // sessions would be busy less than INLINE_MAX_LOAD of the
                            // time; under denser load those threads are better left to
                            // the connections.
                            est.cost(rows) <= self.inline_budget
                                && (io_core
                                    || alone
                                        && est.arrival_rate * (est.fixed + est.per_row)
                                            < INLINE_MAX_LOAD * self.instances as f64)
                        };
                        drop(q);
                        self.metrics.released(reason);
                        let batch = Batch {
                            entries,
                            released: now,
                        };
                        let batch = if inline {
                            match self.run_inline(batch) {
                                None => return Ok(()),
                                Some(batch) => batch,
                            }
                        } else {
                            batch
                        };
                        self.hand_off(batch);
                        return Ok(());
                    }
                }
            }
        }
        // The batcher takes it from here; it needs the lock to.
        drop(q);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Runs a released batch on this thread with an idle session (a free worker was
    /// counted for it), then frees the worker; gives the batch back when no session is
    /// idle after all.
    fn run_inline(&self, batch: Batch) -> Option<Batch> {
        let Ok(mut session) = self.sessions.take.try_recv() else {
            return Some(batch);
        };
        run_batch(
            &mut session,
            &self.input_specs,
            &self.output_specs,
            batch,
            self.batchable,
            &self.shared,
            &self.metrics,
        );
        let _ = self.sessions.put.send(session);
        self.shared.worker_freed();
        None
    }

    /// Whether requests that can run at once run on the submitting thread.
    pub fn runs_inline(&self) -> bool {
        self.inline
    }

    /// Requests waiting in the queue now.
    pub fn queue_len(&self) -> usize {
        self.shared.lock_queue().queue.len()
    }

    /// True while every worker is busy or requests wait: extra work would delay them.
    pub fn saturated(&self) -> bool {
        let q = self.shared.lock_queue();
        q.free_workers == 0 || !q.queue.is_empty()
    }

    /// Worker threads (sessions) serving this version.
    pub fn instances(&self) -> usize {
        self.instances
    }

    /// True when requests of this version are batched.
    pub fn batching(&self) -> bool {
        self.mode != Mode::Off
    }

    /// The policy parameters in force.
    pub fn params(&self) -> &Params {
        &self.shared.params
    }

    /// The batches this version ran for clients, by size.
    pub fn executions(&self) -> Executions {
        self.shared.executions.read()
    }
}

/// The batcher thread: expires entries, waits for a free worker and the policy's release
/// time, and hands batches to the workers, until the pool is dropped.
fn batcher(shared: &Shared, tx: &crossbeam_channel::Sender<Batch>, metrics: &BatchMetrics) {
    set_fine_timer_slack();
    let mut q = shared.lock_queue();
    loop {
        let now = Instant::now();
        let closed = q.closed;
        let mut gone = q.queue.expire(now);
        if closed {
            gone.extend(q.queue.drain());
        }
        for e in gone {
            let _ = e.reply.send(Err(if closed {
                Error::Unavailable("model version was unloaded".into())
            } else {
                metrics.deadline_exceeded.increment(1);
                Error::DeadlineExceeded("the request's deadline passed while it was queued".into())
            }));
        }
        if closed {
            return;
        }
        let decision = if q.free_workers == 0 {
            // All busy: the batch keeps filling; only deadlines need a wake-up meanwhile.
            match q.queue.earliest_deadline() {
                Some(t) => Decision::WaitUntil(t),
                None => Decision::Idle,
            }
        } else {
            let est = shared.estimates(now, &q);
            q.queue.decide(now, &shared.params, &est)
        };
        q = match decision {
            Decision::Idle => shared
                .wake
                .wait(q)
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            Decision::WaitUntil(t) => {
                let wait = t.saturating_duration_since(now);
                let (guard, timeout) = shared
                    .wake
                    .wait_timeout(q, wait)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if timeout.timed_out() {
                    // How late the timer woke us: part of the dispatch lag.
                    Shared::observe(
                        &shared.overshoot_ns,
                        Instant::now().saturating_duration_since(t),
                    );
                }
                guard
            }
            Decision::Release(reason) => {
                let entries = q.queue.take_batch(now, &shared.params);
                if entries.is_empty() {
                    continue;
                }
                q.free_workers -= 1;
                drop(q);
                metrics.released(reason);
                if let Err(e) = tx.send(Batch {
                    entries,
                    released: now,
                }) {
                    // Workers are gone (they only stop when this sender drops): fail the batch.
                    for entry in e.into_inner().entries {
                        let _ = entry
                            .reply
                            .send(Err(Error::Unavailable("model version is unloading".into())));
                    }
                    return;
                }
                shared.lock_queue()
            }
        };
    }
}

/// Asks Linux for precise timed waits on this thread: the default 50 µs slack would be a
/// tenth of a 500 µs queue delay.
#[allow(unsafe_code)] // libc / raw buffer calls, each with its SAFETY note
fn set_fine_timer_slack() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and only affects the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong, 0, 0, 0);
    }
}

/// Moves the calling thread to Linux's SCHED_IDLE class: it runs only on CPU time
/// nothing else wants. For the workers of shadow-only versions, so that mirrored work
/// never takes a core from the requests that clients wait for. (Irreversible without
/// CAP_SYS_NICE, which is why a version that changes role is reloaded, not re-prioritised.)
#[allow(unsafe_code)] // libc / raw buffer calls, each with its SAFETY note
fn set_idle_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` is a valid, initialised struct.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if rc != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot lower a shadow worker to idle priority"
            );
        }
    }
}

/// Runs one batch on a worker thread (or inline) and answers every entry.
fn run_batch(
    session: &mut ort::session::Session,
    input_specs: &[TensorSpec],
    output_specs: &[TensorSpec],
    batch: Batch,
    batchable: bool,
    shared: &Shared,
    metrics: &BatchMetrics,
) {
    // Entries whose client left while the batch formed are not worth running.
    let entries: Vec<Entry> = batch
        .entries
        .into_iter()
        .filter(|e| !e.reply.is_closed())
        .collect();
    if entries.is_empty() {
        return;
    }
    let requests: Vec<Request<'_>> = entries
        .iter()
        .map(|e| Request {
            inputs: &e.inputs,
            rows: e.rows,
        })
        .collect();
    let ran = execute(
        session,
        input_specs,
        output_specs,
        &requests,
        batch.released,
        entries.iter().any(|e| !e.warmup),
        batchable,
        shared,
        metrics,
    );
    drop(requests);
    let answer = |entry: Entry, outputs: Vec<Tensor>| {
        let queue = ran.started.saturating_duration_since(entry.enqueued);
        let _ = entry.reply.send(Ok(RunOutput {
            outputs,
            queue,
            compute: ran.compute,
            batch_rows: ran.rows,
        }));
    };
    match ran.result {
        Err(e) => {
            let msg = e.to_string();
            for entry in entries {
                let err = match &e {
                    Error::Inference(m) => Error::Inference(m.clone()),
                    Error::Internal(m) => Error::Internal(m.clone()),
                    _ => Error::Internal(msg.clone()),
                };
                let _ = entry.reply.send(Err(err));
            }
        }
        Ok(Split::One(outputs)) => {
            if let Some(entry) = entries.into_iter().next() {
                answer(entry, outputs);
            }
        }
        Ok(Split::Many(per_entry)) => {
            for (entry, outs) in entries.into_iter().zip(per_entry) {
                answer(entry, outs);
            }
        }
    }
}

/// One request of a batch to run: its inputs in the model's input order, and its rows
/// (first dimension) when the version batches, 1 otherwise.
struct Request<'a> {
    inputs: &'a [Tensor],
    rows: usize,
}

/// A batch's run: its outputs, split by request, and what it cost.
struct Ran {
    result: Result<Split>,
    compute: Phases,
    /// When the run began (a request's queue time ends there).
    started: Instant,
    /// Rows in the batch.
    rows: usize,
}

/// Runs requests' inputs (each in the model's input order; all of one batch key) as one
/// batch released at `released`, and records its cost, its metrics and, when `counted`
/// (not warm-up alone), its execution statistics, before anyone is answered: a client
/// that reads the statistics after its answer finds its batch counted.
#[allow(clippy::too_many_arguments)]
fn execute(
    session: &mut ort::session::Session,
    input_specs: &[TensorSpec],
    output_specs: &[TensorSpec],
    requests: &[Request<'_>],
    released: Instant,
    counted: bool,
    batchable: bool,
    shared: &Shared,
    metrics: &BatchMetrics,
) -> Ran {
    let started = Instant::now();
    Shared::observe(
        &shared.handoff_ns,
        started.saturating_duration_since(released),
    );
    let total_rows: usize = requests.iter().map(|r| r.rows).sum();
    let parts: Vec<InputParts<'_>> = input_specs
        .iter()
        .enumerate()
        .map(|(j, spec)| {
            let first = &requests[0].inputs[j];
            let mut shape = first.shape.clone();
            // Only batches of several have a batch dimension to grow.
            if requests.len() > 1 {
                shape[0] = total_rows;
            }
            InputParts {
                name: &spec.name,
                dtype: first.dtype,
                shape,
                parts: requests.iter().map(|r| &r.inputs[j].data[..]).collect(),
            }
        })
        .collect();
    let ran = runtime::run_parts_timed(session, &parts, output_specs);
    drop(parts);
    // Batch outputs are split back by request; the split counts as output time.
    let (result, compute) = match ran {
        Err(e) => (
            Err(e),
            Phases {
                infer: started.elapsed(),
                ..Phases::default()
            },
        ),
        Ok((outputs, compute)) if requests.len() == 1 => (Ok(Split::One(outputs)), compute),
        Ok((outputs, mut compute)) => {
            let t = std::time::Instant::now();
            let split = if batchable {
                let rows: Vec<usize> = requests.iter().map(|r| r.rows).collect();
                split_rows(&outputs, &rows, total_rows).map(Split::Many)
            } else {
                Err(Error::Internal(
                    "batched a model without a batch dimension".into(),
                ))
            };
            compute.output += t.elapsed();
            (split, compute)
        }
    };
    shared
        .cost
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .observe(total_rows, compute.total());
    metrics.ran(total_rows, compute.total());
    if result.is_ok() && counted {
        shared
            .executions
            .record(batch_size(requests, batchable), &compute);
    }
    Ran {
        result,
        compute,
        started,
        rows: total_rows,
    }
}

/// The batch size Triton would report: the rows (first dimension) of a model with a
/// batch dimension, batched or not; 1 per request of a model without one.
fn batch_size(requests: &[Request<'_>], batchable: bool) -> usize {
    if batchable {
        requests
            .iter()
            .map(|r| {
                r.inputs
                    .first()
                    .and_then(|t| t.shape.first())
                    .copied()
                    .unwrap_or(1)
            })
            .sum()
    } else {
        requests.len()
    }
}

/// A batch's outputs: a lone request's as they came, or split by request.
enum Split {
    One(Vec<Tensor>),
    Many(Vec<Vec<Tensor>>),
}

/// Splits batch outputs back by rows: zero-copy slices of each output's buffer.
pub fn split_rows(
    outputs: &[Tensor],
    rows: &[usize],
    total_rows: usize,
) -> Result<Vec<Vec<Tensor>>> {
    let mut per_entry: Vec<Vec<Tensor>> = (0..rows.len())
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for out in outputs {
        if out.shape.first() != Some(&total_rows) {
            return Err(Error::Inference(format!(
                "output '{}' has shape {:?} for a batch of {total_rows} rows",
                out.name, out.shape
            )));
        }
        let row_bytes = out.data.len().checked_div(total_rows).unwrap_or(0);
        let mut offset = 0;
        for (i, &r) in rows.iter().enumerate() {
            let mut shape = out.shape.clone();
            shape[0] = r;
            let len = r * row_bytes;
            per_entry[i].push(Tensor {
                name: out.name.clone(),
                dtype: out.dtype,
                shape,
                data: out.data.slice(offset..offset + len),
            });
            offset += len;
        }
    }
    Ok(per_entry)
}

/// Online fit of batch cost = fixed + per_row * rows (seconds), exponentially weighted so
/// that it follows the model as load and the machine change.
#[derive(Debug, Clone, Copy, Default)]
pub struct CostModel {
    n: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
    pub fixed: f64,
    pub per_row: f64,
}

impl CostModel {
    /// Weight kept per observation: about the last 100 batches count.
    const DECAY: f64 = 0.99;

    pub fn observe(&mut self, rows: usize, took: Duration) {
        let (x, y) = (rows as f64, took.as_secs_f64());
        let d = Self::DECAY;
        self.n = self.n * d + 1.0;
        self.sx = self.sx * d + x;
        self.sy = self.sy * d + y;
        self.sxx = self.sxx * d + x * x;
        self.sxy = self.sxy * d + x * y;
        let var = self.n * self.sxx - self.sx * self.sx;
        if var > 1e-9 * self.n * self.n {
            self.per_row = ((self.n * self.sxy - self.sx * self.sy) / var).max(0.0);
            self.fixed = ((self.sy - self.per_row * self.sx) / self.n).max(0.0);
        } else {
            // One batch size seen so far: all of it counts as fixed cost.
            self.per_row = 0.0;
            self.fixed = self.sy / self.n;
        }
    }
}

/// Arrival rate in rows per second: an exponentially decaying count (time constant 100 ms).
#[derive(Debug, Default)]
pub struct RateEstimator {
    value: f64,
    last: Option<Instant>,
    /// Typical gap between consecutive arrivals (EWMA, seconds): short inside a burst.
    gap: f64,
}

impl RateEstimator {
    const TAU: f64 = 0.1;

    fn decayed(&self, now: Instant) -> f64 {
        match self.last {
            None => 0.0,
            Some(t) => {
                self.value * (-(now.saturating_duration_since(t).as_secs_f64()) / Self::TAU).exp()
            }
        }
    }

    pub fn observe(&mut self, now: Instant, rows: usize) {
        if let Some(last) = self.last {
            let g = now.saturating_duration_since(last).as_secs_f64();
            self.gap = if self.gap == 0.0 {
                g
            } else {
                0.8 * self.gap + 0.2 * g
            };
        }
        self.value = self.decayed(now) + rows as f64 / Self::TAU;
        self.last = Some(now);
    }

    /// The typical gap between consecutive arrivals.
    pub fn typical_gap(&self) -> Duration {
        Duration::from_secs_f64(self.gap.min(3600.0))
    }

    pub fn rate(&self, now: Instant) -> f64 {
        self.decayed(now)
    }

    /// Time since the last arrival (zero before any).
    pub fn since_last(&self, now: Instant) -> Duration {
        self.last
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_model_fits_a_line() {
        let mut c = CostModel::default();
        for i in 0..200 {
            let rows = 1 + (i % 8) * 4;
            c.observe(rows, Duration::from_secs_f64(0.001 + 0.0001 * rows as f64));
        }
        assert!((c.fixed - 0.001).abs() < 1e-6, "{c:?}");
        assert!((c.per_row - 0.0001).abs() < 1e-7, "{c:?}");
        let mut one = CostModel::default();
        one.observe(4, Duration::from_millis(2));
        assert_eq!(one.per_row, 0.0);
        assert!((one.fixed - 0.002).abs() < 1e-12);
    }

    #[tokio::test(start_paused = true)]
    async fn arrival_rate_tracks_and_decays() {
        let mut r = RateEstimator::default();
        let t0 = Instant::now();
        // 1000 rows/s for a second.
        for i in 0..1000 {
            r.observe(t0 + Duration::from_millis(i), 1);
        }
        let at = t0 + Duration::from_millis(999);
        assert!((r.rate(at) - 1000.0).abs() < 60.0, "{}", r.rate(at));
        assert!(r.rate(at + Duration::from_secs(2)) < 1.0);
    }
}

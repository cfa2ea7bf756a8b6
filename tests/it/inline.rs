//! The inline fast path of the batcher: a request that can run at once is run by the
//! thread that submits it (no hand-off to a worker), with the same answer; a shadow's
//! background pool never runs inline; many submitters at once all get their own answers.

use crate::common;

use std::sync::Arc;

use modelgate::batcher::{Batching, PoolSettings, Submit, WorkerPool};
use modelgate::tensor::Tensor;

fn settings(batching: Batching, background: bool) -> PoolSettings {
    PoolSettings {
        instances: 0,
        intra_op_threads: 0,
        max_queue_size: 1024,
        batching,
        max_batch_size: 32,
        max_queue_delay_us: 500,
        preferred_batch_sizes: Vec::new(),
        default_queue_timeout_us: 0,
        priority_levels: 1,
        default_priority_level: 1,
        max_priority_wait_us: 0,
        target_p99_ms: 0.0,
        inline_budget: std::time::Duration::from_micros(200),
        background,
    }
}

fn mlp_pool(s: &PoolSettings, label: &str) -> WorkerPool {
    let env = modelgate::runtime::init(None).expect("ort");
    let path = common::root().join("models/mlp/1/model.onnx");
    let metrics = modelgate::batcher::BatchMetrics::new(label, "1");
    WorkerPool::start(label, &path, s, env, metrics)
        .expect("pool")
        .0
}

fn row(seed: u64) -> Vec<Tensor> {
    vec![common::fp32_tensor(
        "input",
        &[1, 16],
        &common::rand_f32(16, seed),
    )]
}

fn want(seed: u64) -> Vec<f32> {
    let path = common::root().join("models/mlp/1/model.onnx");
    common::f32s(&common::reference(&path, &row(seed))[0].data)
}

/// Submits `n` requests from a thread marked as an I/O core, checks every answer, and
/// returns how many were answered before `submit` returned (ran inline).
fn submit_from_an_io_core(pool: &Arc<WorkerPool>, n: u64) -> usize {
    let pool = Arc::clone(pool);
    std::thread::spawn(move || {
        modelgate::util::mark_io_core();
        let mut inline = 0;
        for seed in 0..n {
            let mut pending = pool.submit(row(seed), Submit::default()).unwrap();
            let answer = match pending.try_answer() {
                Some(a) => {
                    inline += 1;
                    a.unwrap()
                }
                None => pending.blocking_answer().unwrap(),
            };
            common::assert_close(&common::f32s(&answer.outputs[0].data), &want(seed));
        }
        inline
    })
    .join()
    .unwrap()
}

#[test]
fn a_request_that_can_run_at_once_is_answered_before_submit_returns() {
    for batching in [Batching::Off, Batching::Adaptive] {
        // A budget no learnt cost reaches, so that a machine other tests keep busy
        // cannot send a request to a worker: every one of them runs inline.
        let mut s = settings(batching, false);
        s.inline_budget = std::time::Duration::from_secs(1);
        // One thread per session set, so the pool is not sized by a timing probe that
        // a busy machine could make look compute-heavy (one session on every core).
        s.intra_op_threads = 1;
        let pool = mlp_pool(&s, &format!("inline-{batching:?}"));
        assert!(pool.runs_inline());
        for seed in 0..20 {
            let mut pending = pool.submit(row(seed), Submit::default()).unwrap();
            // Nothing was queued, a session was idle: the submitting thread ran it.
            let answer = pending
                .try_answer()
                .unwrap_or_else(|| panic!("{batching:?}: request {seed} was not run inline"))
                .unwrap();
            assert_eq!(answer.batch_rows, 1);
            common::assert_close(&common::f32s(&answer.outputs[0].data), &want(seed));
        }
    }
}

#[test]
fn an_inline_budget_of_zero_sends_every_request_to_a_worker() {
    let mut s = settings(Batching::Off, false);
    s.inline_budget = std::time::Duration::ZERO;
    let pool = mlp_pool(&s, "inline-zero");
    assert!(!pool.runs_inline());
    for seed in 0..5 {
        let pending = pool.submit(row(seed), Submit::default()).unwrap();
        let answer = pending.blocking_answer().unwrap();
        common::assert_close(&common::f32s(&answer.outputs[0].data), &want(seed));
    }
}

#[test]
fn a_background_or_multi_threaded_pool_never_runs_inline() {
    // Nor does a session with intra-op threads: it needs the cores it was given.
    let mut threaded = settings(Batching::Adaptive, false);
    (threaded.instances, threaded.intra_op_threads) = (1, 2);
    assert!(!mlp_pool(&threaded, "inline-threaded").runs_inline());
    let pool = mlp_pool(&settings(Batching::Off, true), "inline-background");
    assert!(!pool.runs_inline());
    for seed in 0..5 {
        let pending = pool.submit(row(seed), Submit::default()).unwrap();
        let answer = pending.blocking_answer().unwrap();
        common::assert_close(&common::f32s(&answer.outputs[0].data), &want(seed));
    }
    let ex = pool.executions();
    assert_eq!((ex.inferences, ex.executions), (5, 5), "{ex:?}");
}

#[test]
fn many_submitters_at_once_each_get_their_own_answer() {
    let pool = Arc::new(mlp_pool(
        &settings(Batching::Adaptive, false),
        "inline-many",
    ));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || {
                for i in 0..50 {
                    let seed = t * 1000 + i;
                    let answer = pool
                        .submit(row(seed), Submit::default())
                        .unwrap()
                        .blocking_answer()
                        .unwrap();
                    common::assert_close(&common::f32s(&answer.outputs[0].data), &want(seed));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let ex = pool.executions();
    assert_eq!(ex.inferences, 400, "{ex:?}");
}

#[test]
fn on_an_io_core_a_light_request_runs_inline_while_the_other_session_is_busy() {
    // Dense arrivals from another thread keep one session busy most of the time: a
    // shared runtime thread would hand its requests to the workers (not alone, not
    // sparse), but an I/O core thread (serve::IoCores) runs them itself whenever a
    // session is idle, as a bare server's handler would.
    let mut s = settings(Batching::Off, false);
    s.instances = 2;
    let pool = Arc::new(mlp_pool(&s, "inline-io-core"));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = {
        let (pool, stop) = (Arc::clone(&pool), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let answer = pool.submit(row(n), Submit::default()).unwrap();
                answer.blocking_answer().unwrap();
                n += 1;
            }
            n
        })
    };
    let inline = submit_from_an_io_core(&pool, 200);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let others = busy.join().unwrap();
    // Both sessions busy at once leaves the core's request to a worker now and then;
    // most find the second session idle.
    assert!(
        inline >= 100,
        "{inline} of 200 ran inline (other thread: {others} requests)"
    );
}

#[test]
fn an_io_core_running_adaptive_batches_inline_answers_every_submitter() {
    // Three threads submit bursts from outside any I/O core while an I/O core thread
    // submits too: the core runs light batches itself whenever a session is idle,
    // taking along rows the others queued (the policy's rule is unit-tested in
    // batcher::policy, `decide_inline`). Every submitter gets its own answer, none is
    // lost or run twice, and most of the core's requests never leave its thread.
    let mut s = settings(Batching::Adaptive, false);
    s.instances = 2;
    s.inline_budget = std::time::Duration::from_secs(1);
    let pool = Arc::new(mlp_pool(&s, "inline-adaptive-io-core"));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy: Vec<_> = (0..3u64)
        .map(|t| {
            let (pool, stop) = (Arc::clone(&pool), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Bursts of four: rows arrive faster than a batch's fixed cost.
                    let seeds: Vec<u64> = (n..n + 4).map(|i| 1_000_000 * (t + 1) + i).collect();
                    let pending: Vec<_> = seeds
                        .iter()
                        .map(|&seed| pool.submit(row(seed), Submit::default()).unwrap())
                        .collect();
                    for (seed, p) in seeds.into_iter().zip(pending) {
                        let answer = p.blocking_answer().unwrap();
                        common::assert_close(&common::f32s(&answer.outputs[0].data), &want(seed));
                    }
                    n += 4;
                    std::thread::sleep(std::time::Duration::from_micros(300));
                }
                n
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let inline = submit_from_an_io_core(&pool, 200);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let others: u64 = busy.into_iter().map(|t| t.join().unwrap()).sum();
    let ex = pool.executions();
    assert_eq!(ex.inferences, others + 200, "{ex:?}");
    assert!(
        inline >= 100,
        "{inline} of 200 ran inline (other threads: {others} requests, {ex:?})"
    );
}

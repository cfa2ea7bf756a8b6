//! The batcher's own settings: how many sessions with how many threads, the queue, and
//! when batches are released. Each model's config.toml (through the registry's
//! `ModelSettings`) fills them in.

use serde::{Deserialize, Serialize};

/// How a version batches requests.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Batching {
    /// `adaptive` for models whose first dimension is dynamic, `off` for the others.
    Auto,
    /// Every request runs alone, as soon as a worker is free.
    Off,
    /// Triton-style: release when full, at a preferred size, or after `max_queue_delay_us`.
    Static,
    /// Static's bounds, plus release as soon as waiting would not pay off or would break
    /// `target_p99_ms`, from a learnt cost per batch (a + b * rows) and arrival rate.
    Adaptive,
}

/// What a worker pool needs to know to run one version.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    /// Worker threads (sessions); 0 = automatic.
    pub instances: usize,
    /// Intra-op threads per session; 0 = automatic.
    pub intra_op_threads: usize,
    /// Requests that may wait; a full queue answers 429.
    pub max_queue_size: usize,
    pub batching: Batching,
    pub max_batch_size: usize,
    pub max_queue_delay_us: u64,
    pub preferred_batch_sizes: Vec<usize>,
    /// Queue timeout for requests without a deadline, in microseconds; 0 = none.
    pub default_queue_timeout_us: u64,
    /// Priority levels (1 the highest) and the level of requests without one.
    pub priority_levels: usize,
    pub default_priority_level: usize,
    pub max_priority_wait_us: u64,
    pub target_p99_ms: f64,
    /// A batch estimated to take at most this long may run on the submitting thread (the
    /// inline fast path); zero turns it off.
    pub inline_budget: std::time::Duration,
    /// A shadow-only version: one single-threaded session at idle CPU priority.
    pub background: bool,
}

impl PoolSettings {
    /// Worker threads and intra-op threads per session, resolving the automatic (0)
    /// values. Measured on the bundled benchmarks (BENCHMARKS.md): a batching model whose
    /// single row costs real compute (`heavy`) does best as one session using every core
    /// (batches stay whole, the GEMMs split across cores); anything else, including a tiny
    /// model for which waking a thread pool costs more than the work (`mlp`), as one
    /// single-threaded session per core.
    pub fn threads(&self, batching: bool, compute_heavy: bool) -> (usize, usize) {
        if self.background {
            return (1, 1);
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        match (self.instances, self.intra_op_threads) {
            (0, 0) if batching && compute_heavy => (1, cores),
            (0, 0) => (cores, 1),
            (0, t) => ((cores / t).max(1), t),
            (n, 0) => (n, (cores / n).max(1)),
            (n, t) => (n, t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto() -> PoolSettings {
        PoolSettings {
            instances: 0,
            intra_op_threads: 0,
            max_queue_size: 1,
            batching: Batching::Auto,
            max_batch_size: 1,
            max_queue_delay_us: 0,
            preferred_batch_sizes: Vec::new(),
            default_queue_timeout_us: 0,
            priority_levels: 1,
            default_priority_level: 1,
            max_priority_wait_us: 0,
            target_p99_ms: 1.0,
            inline_budget: std::time::Duration::from_micros(200),
            background: false,
        }
    }

    #[test]
    fn automatic_thread_counts() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(auto().threads(true, true), (1, cores));
        assert_eq!(auto().threads(true, false), (cores, 1));
        assert_eq!(auto().threads(false, true), (cores, 1));
        let two = PoolSettings {
            instances: 2,
            ..auto()
        };
        assert_eq!(two.threads(true, true), (2, (cores / 2).max(1)));
        let fixed = PoolSettings {
            instances: 3,
            intra_op_threads: 2,
            ..auto()
        };
        assert_eq!(fixed.threads(true, false), (3, 2));
        let shadow = PoolSettings {
            background: true,
            ..auto()
        };
        assert_eq!(shadow.threads(true, true), (1, 1));
    }
}

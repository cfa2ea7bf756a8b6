//! Triton's execution statistics of one version, recorded by the workers once per batch
//! they ran: inferences (rows), executions (batches), and per executed batch size the
//! count and the time of each phase (`batch_stats`).
//!
//! Batch sizes up to [`DENSE_SIZES`] have a fixed slot of atomics, so recording a batch
//! is four relaxed adds with no lock and no allocation; larger sizes (a request with more
//! rows than `max_batch_size` runs alone, and `max_batch_size` may be large) go to a map
//! behind a lock that only such batches take. The inference and execution counts are
//! derived from the same slots when read, so they always agree with `batch_stats`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::runtime::Phases;
use crate::util::nanos;

/// Batch sizes with a lock-free slot (32 bytes each).
pub const DENSE_SIZES: usize = 1024;

/// One batch size's executions and their time in nanoseconds, per phase.
#[repr(align(32))] // one slot, one cache line: a batch touches a single line
#[derive(Default)]
struct Slot {
    count: AtomicU64,
    input_ns: AtomicU64,
    infer_ns: AtomicU64,
    output_ns: AtomicU64,
}

/// What one executed batch size adds up to (Triton's `InferBatchStatistics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SizeStats {
    pub batch_size: u64,
    /// Executions of this size.
    pub count: u64,
    pub input_ns: u64,
    pub infer_ns: u64,
    pub output_ns: u64,
}

/// A consistent reading of [`ExecutionStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Executions {
    /// Rows run: Triton's `inference_count`.
    pub inferences: u64,
    /// Batches run: Triton's `execution_count`.
    pub executions: u64,
    /// One entry per batch size that ran, smallest first.
    pub sizes: Vec<SizeStats>,
}

/// Executions of one version by batch size.
pub struct ExecutionStats {
    /// Slot `i` holds batches of `i + 1` rows.
    dense: Box<[Slot]>,
    /// Sizes without a slot (0 rows, or more than the slots cover).
    other: Mutex<BTreeMap<u64, SizeStats>>,
}

impl ExecutionStats {
    /// Slots for batch sizes 1 to `max_batch_size` (at most [`DENSE_SIZES`]).
    pub fn new(max_batch_size: usize) -> ExecutionStats {
        ExecutionStats {
            dense: (0..max_batch_size.clamp(1, DENSE_SIZES))
                .map(|_| Slot::default())
                .collect(),
            other: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records one successful execution of `rows` rows.
    pub fn record(&self, rows: usize, phases: &Phases) {
        let (input, infer, output) = (
            nanos(phases.input),
            nanos(phases.infer),
            nanos(phases.output),
        );
        if let Some(slot) = rows.checked_sub(1).and_then(|i| self.dense.get(i)) {
            slot.count.fetch_add(1, Relaxed);
            slot.input_ns.fetch_add(input, Relaxed);
            slot.infer_ns.fetch_add(infer, Relaxed);
            slot.output_ns.fetch_add(output, Relaxed);
            return;
        }
        let size = rows as u64;
        let mut other = self
            .other
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = other.entry(size).or_insert(SizeStats {
            batch_size: size,
            ..SizeStats::default()
        });
        s.count += 1;
        s.input_ns = s.input_ns.saturating_add(input);
        s.infer_ns = s.infer_ns.saturating_add(infer);
        s.output_ns = s.output_ns.saturating_add(output);
    }

    /// Reads every batch size that ran, and the totals derived from them.
    pub fn read(&self) -> Executions {
        let mut sizes: Vec<SizeStats> = self
            .dense
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| {
                let count = slot.count.load(Relaxed);
                (count > 0).then(|| SizeStats {
                    batch_size: i as u64 + 1,
                    count,
                    input_ns: slot.input_ns.load(Relaxed),
                    infer_ns: slot.infer_ns.load(Relaxed),
                    output_ns: slot.output_ns.load(Relaxed),
                })
            })
            .collect();
        let other = self
            .other
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sizes.extend(other.values().copied());
        drop(other);
        sizes.sort_unstable_by_key(|s| s.batch_size);
        Executions {
            inferences: sizes
                .iter()
                .fold(0u64, |n, s| n.saturating_add(s.batch_size * s.count)),
            executions: sizes.iter().map(|s| s.count).sum(),
            sizes,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn phases(us: u64) -> Phases {
        Phases {
            input: Duration::from_micros(us),
            infer: Duration::from_micros(2 * us),
            output: Duration::from_micros(3 * us),
        }
    }

    #[test]
    fn counts_executions_by_size_with_and_without_a_slot() {
        let s = ExecutionStats::new(4);
        s.record(1, &phases(1));
        s.record(4, &phases(10));
        s.record(4, &phases(20));
        // A request larger than max_batch_size runs alone; 0 rows has no slot either.
        s.record(9, &phases(5));
        s.record(0, &phases(1));
        let r = s.read();
        let sizes: Vec<(u64, u64)> = r.sizes.iter().map(|x| (x.batch_size, x.count)).collect();
        assert_eq!(sizes, vec![(0, 1), (1, 1), (4, 2), (9, 1)]);
        assert_eq!(r.executions, 5);
        assert_eq!(r.inferences, 1 + 8 + 9);
        let four = r.sizes[2];
        assert_eq!(
            (four.input_ns, four.infer_ns, four.output_ns),
            (30_000, 60_000, 90_000)
        );
    }

    #[test]
    fn slots_stop_at_the_dense_limit() {
        let s = ExecutionStats::new(1 << 20);
        assert_eq!(s.dense.len(), DENSE_SIZES);
        s.record(DENSE_SIZES, &phases(1));
        s.record(DENSE_SIZES + 1, &phases(1));
        let r = s.read();
        assert_eq!(r.executions, 2);
        assert_eq!(r.inferences, 2 * DENSE_SIZES as u64 + 1);
        assert!(
            s.other
                .lock()
                .unwrap()
                .contains_key(&(DENSE_SIZES as u64 + 1))
        );
    }

    #[test]
    fn concurrent_workers_lose_no_batch() {
        let s = std::sync::Arc::new(ExecutionStats::new(8));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = std::sync::Arc::clone(&s);
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        s.record((i + t) % 10 + 1, &phases(1));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let r = s.read();
        assert_eq!(r.executions, 4000);
        let want: u64 = (0..4)
            .flat_map(|t| (0..1000).map(move |i| ((i + t) % 10 + 1) as u64))
            .sum();
        assert_eq!(r.inferences, want);
    }
}

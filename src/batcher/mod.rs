//! Per-version execution: a bounded queue feeding worker threads that own ORT sessions.
//!
//! `Session::run` takes `&mut self` and blocks, so each worker is an OS thread owning its
//! own session; ONNX Runtime never runs on the async runtime's threads. The queue is
//! bounded: when it is full the request is refused at once (429 / RESOURCE_EXHAUSTED)
//! instead of waiting without bound. Dropping the [`WorkerPool`] closes the queue; the
//! workers finish what is queued and exit, releasing their sessions.
//!
//! Dynamic batching (a batching task in front of the workers) builds on this.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::config::ModelSettings;
use crate::error::{Error, Result};
use crate::runtime;
use crate::tensor::{Tensor, TensorSpec};

/// One unit of work: the inputs in the model's input order, and where to answer.
pub struct Job {
    pub inputs: Vec<Tensor>,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<RunOutput>>,
}

/// A worker's answer: every model output, plus the time spent waiting and running.
#[derive(Debug)]
pub struct RunOutput {
    pub outputs: Vec<Tensor>,
    pub queue: Duration,
    pub infer: Duration,
}

/// The worker threads of one model version and the bounded queue in front of them.
pub struct WorkerPool {
    tx: crossbeam_channel::Sender<Job>,
    capacity: usize,
    instances: usize,
}

impl WorkerPool {
    /// Creates the sessions (fallible, before anything is published), then starts one
    /// thread per session. Returns the pool and the model's interface.
    pub fn start(
        label: &str,
        path: &Path,
        settings: &ModelSettings,
        env: &ort::environment::Environment,
    ) -> Result<(WorkerPool, Vec<TensorSpec>, Vec<TensorSpec>)> {
        let instances = settings.effective_instances();
        let mut sessions = Vec::with_capacity(instances);
        for _ in 0..instances {
            sessions.push(runtime::create_session(
                env,
                path,
                settings.intra_op_threads,
            )?);
        }
        let first = sessions
            .first()
            .ok_or_else(|| Error::Config(format!("{label}: no instances")))?;
        let (inputs, outputs) = runtime::interface(first)?;
        let (tx, rx) = crossbeam_channel::bounded::<Job>(settings.max_queue_size);
        let output_specs: Arc<[TensorSpec]> = outputs.clone().into();
        for (i, mut session) in sessions.into_iter().enumerate() {
            let rx = rx.clone();
            let specs = Arc::clone(&output_specs);
            std::thread::Builder::new()
                .name(format!("ort-{label}-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        // The client gave up (timeout, disconnect): do not spend a core on it.
                        if job.reply.is_closed() {
                            continue;
                        }
                        let started = Instant::now();
                        let queue = started.duration_since(job.enqueued);
                        let result =
                            runtime::run(&mut session, &job.inputs, &specs).map(|outputs| {
                                RunOutput {
                                    outputs,
                                    queue,
                                    infer: started.elapsed(),
                                }
                            });
                        // The receiver may have gone meanwhile; nothing to do then.
                        let _ = job.reply.send(result);
                    }
                })
                .map_err(|e| {
                    Error::Internal(format!("{label}: cannot start a worker thread: {e}"))
                })?;
        }
        Ok((
            WorkerPool {
                tx,
                capacity: settings.max_queue_size,
                instances,
            },
            inputs,
            outputs,
        ))
    }

    /// Queues a job, or refuses it at once when the queue is full.
    pub fn try_submit(&self, job: Job) -> Result<()> {
        self.tx.try_send(job).map_err(|e| match e {
            crossbeam_channel::TrySendError::Full(_) => Error::Overloaded {
                reason: format!("queue is full ({} requests waiting)", self.capacity),
                retry_after: Duration::from_secs(1),
            },
            crossbeam_channel::TrySendError::Disconnected(_) => {
                Error::Unavailable("model version is unloading".into())
            }
        })
    }

    /// Requests waiting for a worker now.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    /// Worker threads (sessions) serving this version.
    pub fn instances(&self) -> usize {
        self.instances
    }
}

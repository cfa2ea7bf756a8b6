//! `loadgen`: a load generator for Open Inference Protocol (KServe v2) servers such as
//! modelgate and Triton, over gRPC, HTTP/JSON and HTTP with Triton's binary tensor
//! extension, in a closed loop (fixed concurrency) or an open loop (fixed rate, with
//! coordinated-omission-corrected latencies). See loadtest/README.md.
//!
//! Flow: connect, read the model's metadata, build the request once, send one probe
//! request (a bad request fails the run at once with the server's message), run the
//! loop, then print the report and optionally write it as JSON.

mod client;
mod grpc;
mod payload;
mod run;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;

use crate::client::{Protocol, Target, Transport};
use crate::run::Plan;
use crate::stats::{Report, RunInfo};

/// Load generator for Open Inference Protocol servers.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
struct Args {
    /// Wire protocol.
    #[arg(long, value_enum, default_value = "grpc")]
    protocol: Protocol,
    /// Server address, host:port (the gRPC or the HTTP port, to match --protocol).
    #[arg(long)]
    url: String,
    /// Model name.
    #[arg(long)]
    model: String,
    /// Model version (default: the server's choice).
    #[arg(long)]
    model_version: Option<String>,
    /// Closed loop: number of clients, each sending its next request when the last answers.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: requests per second, sent at fixed intervals.
    #[arg(long)]
    rate: Option<f64>,
    /// Connections to open (default: the concurrency in a closed loop, 32 in an open loop).
    #[arg(long)]
    connections: Option<usize>,
    /// Open loop: most requests in flight; a send due beyond it is counted as dropped.
    #[arg(long, default_value_t = 10_000)]
    max_outstanding: usize,
    /// Measure for this many seconds (after warmup).
    #[arg(long)]
    duration: Option<f64>,
    /// Measure this many requests (after warmup); with --duration, whichever ends first.
    #[arg(long)]
    requests: Option<u64>,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds a request may take before it counts as a "timeout" error.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Rows per request: replaces the inputs' dynamic first dimension.
    #[arg(long, default_value_t = 1)]
    rows: usize,
    /// An OIP JSON request body ({"inputs":[...]} with data) to send instead of random inputs.
    #[arg(long)]
    input_file: Option<PathBuf>,
    /// Seed for the random inputs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Threads of the generator: 1 runs a current-thread runtime, more a multi-thread one
    /// (keep cores for the server).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn seconds(what: &str, s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| anyhow::anyhow!("--{what} must be a non-negative number of seconds, got {s}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: Args) -> Result<()> {
    if args.duration.is_none() && args.requests.is_none() {
        bail!("give --duration SECS or --requests N (or both) to bound the run");
    }
    if args.threads == 0
        || args.rows == 0
        || args.connections == Some(0)
        || args.max_outstanding == 0
    {
        bail!("--threads, --rows, --connections and --max-outstanding must be at least 1");
    }
    // One thread: a current-thread runtime. Its run queue is FIFO, so the clients woken
    // by one read of a connection all send before the connection's task runs again and
    // writes their frames in one syscall; the multi-thread scheduler's LIFO slot would
    // run the connection task right after each send (one write per request). It also
    // saves the cross-thread wakeups and atomics of a work-stealing pool.
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .context("cannot start the tokio runtime")?;
    let report = runtime.block_on(drive(&args))?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Closed loop at a concurrency, or open loop at a rate.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Closed(usize),
    Open(f64),
}

async fn drive(args: &Args) -> Result<Report> {
    let mode = match (args.concurrency, args.rate) {
        (Some(0), _) => bail!("--concurrency must be at least 1"),
        (_, Some(r)) if !(r.is_finite() && r > 0.0) => bail!("--rate must be a positive number"),
        (_, Some(r)) => Mode::Open(r),
        (c, None) => Mode::Closed(c.unwrap_or(1)),
    };
    let connections = args.connections.unwrap_or(match mode {
        Mode::Closed(c) => c,
        Mode::Open(_) => 32,
    });
    let plan = Plan {
        warmup: seconds("warmup", args.warmup)?,
        duration: args.duration.map(|d| seconds("duration", d)).transpose()?,
        requests: args.requests,
        timeout: seconds("timeout", args.timeout)?,
    };
    let version = args.model_version.as_deref();

    let transport = Transport::connect(args.protocol, &args.url, connections).await?;
    let info = transport
        .metadata(&args.model, version)
        .await
        .context("reading the model's metadata")?;
    let model_outputs = info.outputs.iter().map(|o| o.name.clone()).collect();
    let payload = match &args.input_file {
        Some(path) => payload::load_file(path, model_outputs)?,
        None => payload::random_payload(&info, args.rows, args.seed)?,
    };
    let target = Arc::new(Target::new(
        transport,
        args.protocol,
        &payload,
        &args.model,
        version,
    )?);
    if let Err(f) = target.infer(0).await {
        bail!("the probe request failed ({}): {}", f.kind, f.message);
    }

    // Ctrl-C ends the measurement early; the report covers what was measured.
    let stop = Arc::new(AtomicBool::new(false));
    let on_signal = Arc::clone(&stop);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.store(true, Ordering::Relaxed);
        }
    });
    let measured = match mode {
        Mode::Closed(c) => run::closed_loop(Arc::clone(&target), c, &plan, stop).await?,
        Mode::Open(rate) => {
            run::open_loop(Arc::clone(&target), rate, args.max_outstanding, &plan, stop).await?
        }
    };
    Ok(Report::new(
        RunInfo {
            protocol: args.protocol.name().to_string(),
            url: args.url.clone(),
            model: args.model.clone(),
            model_version: args.model_version.clone(),
            concurrency: match mode {
                Mode::Closed(c) => Some(c),
                Mode::Open(_) => None,
            },
            rate: match mode {
                Mode::Closed(_) => None,
                Mode::Open(r) => Some(r),
            },
            connections,
            rows: payload.rows,
            warmup: plan.warmup,
        },
        &measured.stats,
        measured.elapsed,
        measured.dropped,
        measured.lag.as_ref(),
    ))
}

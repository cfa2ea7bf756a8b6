//! The `modelgate` binary: parse flags, set up logging, load the config, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use modelgate::config::Config;

// The request path allocates many small, short-lived buffers (HTTP/2 frames, protobuf
// messages, tensors); glibc's malloc spent about a fifth of all instructions on them.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// mimalloc as the global allocator, asking for an alignment only when a layout needs
/// more than every mimalloc block has (a word). The `mimalloc` crate asks for the layout's
/// alignment always, and mimalloc 3 serves an aligned request over 1 KiB (or a small
/// one whose free block happens not to fit) by over-allocating, with a slower free after;
/// on the request path that was about 6 allocations of every HTTP request.
struct MiMalloc;

/// Every mimalloc block starts on a word boundary (its size classes are whole words).
const WORD: usize = std::mem::size_of::<usize>();

// SAFETY: each call hands mimalloc's own functions a size and, where asked, an alignment
// that is a power of two (`Layout` guarantees it); blocks are freed by `mi_free`, which
// takes blocks of either kind.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if layout.align() <= WORD {
                libmimalloc_sys::mi_malloc(layout.size()).cast()
            } else {
                libmimalloc_sys::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if layout.align() <= WORD {
                libmimalloc_sys::mi_zalloc(layout.size()).cast()
            } else {
                libmimalloc_sys::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: see the impl; `ptr` came from this allocator.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl; `ptr` came from this allocator with `layout`.
        unsafe {
            if layout.align() <= WORD {
                libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast()
            } else {
                libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}
use modelgate::error::{Error, Result};

#[derive(Parser)]
#[command(
    name = "modelgate",
    version,
    about = "Model-serving gateway for ONNX models (Open Inference Protocol)"
)]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "MODELGATE_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the models of a repository over gRPC and HTTP.
    Serve(ServeArgs),
    /// Operate a running server through its admin API: traffic routing and audit log.
    Ctl(CtlArgs),
    /// Make a version's drift reference profile (<version>/profile.json) from training data.
    Profile(ProfileArgs),
    /// Print the SHA-256 of a token (read from stdin) for [[auth.tokens]] sha256
    HashToken,
}

#[derive(Args)]
struct ProfileArgs {
    /// Model repository
    #[arg(long, env = "MODELGATE_MODEL_REPOSITORY", default_value = "models")]
    model_repository: PathBuf,
    /// Model name
    #[arg(long)]
    model: String,
    /// Version
    #[arg(long)]
    version: u64,
    /// Training data: .csv (optional header row) or .npy (2-D), one row per example
    #[arg(long)]
    data: PathBuf,
    /// Quantile bins per feature
    #[arg(long, default_value_t = 10)]
    bins: usize,
    /// The column holding the ground truth (a header name or a 0-based index): it is
    /// not a feature, and the version's accuracy (classes) or mean absolute error
    /// (scores) on the data becomes its reference quality
    #[arg(long)]
    label_column: Option<String>,
    /// Held-out labelled data (the same columns): the reference quality is measured
    /// on it instead of on --data
    #[arg(long)]
    validation_data: Option<PathBuf>,
    /// ONNX Runtime shared library [default: found automatically]
    #[arg(long, env = "ORT_DYLIB_PATH")]
    onnxruntime_lib: Option<PathBuf>,
}

#[derive(Args)]
struct CtlArgs {
    /// The server's HTTP API
    #[arg(long, env = "MODELGATE_URL", default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Admin bearer token (prefer the environment)
    #[arg(long, env = "MODELGATE_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Canary weights, shadows, rollouts
    #[command(subcommand)]
    Traffic(TrafficCommand),
    /// Print the newest routing changes from the audit log
    Audit {
        /// Only this model's changes
        #[arg(long)]
        model: Option<String>,
        /// How many entries
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Print the drift state: of one model (with its settings and profiles), or of all
    Drift { model: Option<String> },
}

#[derive(Subcommand)]
enum TrafficCommand {
    /// Print a model's routing
    Get {
        model: String,
        /// Ask Prometheus for every replica's routing generation and versions, and name
        /// the replicas that lag (or are down)
        #[arg(long, requires = "prometheus")]
        fleet: bool,
        /// `http://host:port` of the Prometheus scraping the replicas (with --fleet)
        #[arg(long, env = "MODELGATE_PROMETHEUS_URL")]
        prometheus: Option<String>,
        /// The label that tells replicas apart
        #[arg(long, default_value = "instance")]
        replica_label: String,
    },
    /// Change a model's routing (what is not named stays as it is)
    Set {
        model: String,
        /// The stable version
        #[arg(long)]
        stable: Option<u64>,
        /// The canary version (give --weight, or --rollout)
        #[arg(long)]
        canary: Option<u64>,
        /// Canary weight in percent (0 to 100)
        #[arg(long)]
        weight: Option<f64>,
        /// Remove the canary
        #[arg(long, conflicts_with_all = ["canary", "weight"])]
        no_canary: bool,
        /// Shadow as VERSION[:PERCENT] (repeatable; replaces the shadow list)
        #[arg(long = "shadow")]
        shadows: Vec<String>,
        /// Remove every shadow
        #[arg(long, conflicts_with = "shadows")]
        no_shadows: bool,
        /// Roll the canary out automatically, by the model's plan (--steps/--interval override those fields)
        #[arg(long)]
        rollout: bool,
        /// Rollout weights in percent, comma-separated
        #[arg(long, value_delimiter = ',', requires = "rollout")]
        steps: Option<Vec<f64>>,
        /// Seconds each rollout step holds
        #[arg(long, requires = "rollout")]
        interval: Option<f64>,
        /// Why (recorded in the audit log)
        #[arg(long)]
        reason: Option<String>,
    },
    /// Make the canary the stable version
    Promote {
        model: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Take all traffic off the canary
    Rollback {
        model: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Model repository: <dir>/<model>/<version>/model.onnx [default: models]
    #[arg(long, env = "MODELGATE_MODEL_REPOSITORY")]
    model_repository: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0]
    #[arg(long, env = "MODELGATE_HOST")]
    host: Option<String>,
    /// HTTP/REST port [default: 8000]
    #[arg(long, env = "MODELGATE_HTTP_PORT")]
    http_port: Option<u16>,
    /// gRPC port [default: 8001]
    #[arg(long, env = "MODELGATE_GRPC_PORT")]
    grpc_port: Option<u16>,
    /// Prometheus metrics port [default: 8002]
    #[arg(long, env = "MODELGATE_METRICS_PORT")]
    metrics_port: Option<u16>,
    /// TOML config file (unknown keys are errors)
    #[arg(long, env = "MODELGATE_CONFIG")]
    config: Option<PathBuf>,
    /// ONNX Runtime shared library [default: found next to the binary or in .onnxruntime/]
    #[arg(long, env = "ORT_DYLIB_PATH")]
    onnxruntime_lib: Option<PathBuf>,
    /// poll: watch the repository; explicit: only the load/unload API changes what serves
    #[arg(long, value_enum, env = "MODELGATE_MODEL_CONTROL_MODE")]
    model_control_mode: Option<modelgate::registry::settings::ControlMode>,
    /// Model to load at start-up in explicit mode (repeatable)
    #[arg(long = "load-model")]
    load_models: Vec<String>,
    /// Full repository rescan interval in seconds (a fallback for missed change events)
    #[arg(long, env = "MODELGATE_REPOSITORY_POLL_SECS")]
    repository_poll_secs: Option<u64>,
    /// Bearer token the admin and repository APIs require (prefer the environment)
    #[arg(long, env = "MODELGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Check the config and the repository (loading every model), then exit
    #[arg(long)]
    validate: bool,
}

impl ServeArgs {
    /// Defaults, then the file, then environment and flags (clap merges those two).
    fn into_config(self) -> Result<(Config, bool)> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = self.model_repository {
            c.model_repository = v;
        }
        if let Some(v) = self.host {
            c.host = v;
        }
        if let Some(v) = self.http_port {
            c.http_port = v;
        }
        if let Some(v) = self.grpc_port {
            c.grpc_port = v;
        }
        if let Some(v) = self.metrics_port {
            c.metrics_port = v;
        }
        if let Some(v) = self.onnxruntime_lib {
            c.onnxruntime_lib = Some(v);
        }
        if let Some(v) = self.model_control_mode {
            c.model_control_mode = v;
        }
        if !self.load_models.is_empty() {
            c.load_models = self.load_models;
        }
        if let Some(v) = self.repository_poll_secs {
            c.repository_poll_secs = v;
        }
        if let Some(v) = self.admin_token {
            c.admin_token = Some(v);
        }
        Ok((c, self.validate))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // notify logs at warn when its own watch of a removed folder is already gone (a race
    // inside the crate, nothing an operator can act on): only its errors are shown.
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("notify")) {
        filter = filter.add_directive(
            "notify=error"
                .parse()
                .expect("a constant, valid filter directive"),
        );
    }
    // Colour codes only for a terminal: in a file or a log shipper they are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        // For log shippers: one JSON object per line, span fields (request_id) included.
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Ctl(args) => ctl(args),
        Command::Profile(args) => profile(args),
        Command::HashToken => hash_token(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("modelgate: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let (config, validate) = args.into_config()?;
    if validate {
        return validate_only(&config);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async move {
        let mut signals = Signals::install();
        config.validate()?;
        let listeners = modelgate::Listeners::bind(&config).await?;
        let shutdown = CancellationToken::new();
        let server = modelgate::Server::start(listeners, config, shutdown.clone()).await?;
        let on_signal = async move {
            signals.recv().await;
            tracing::info!("shutdown requested; draining in-flight requests");
            shutdown.cancel();
            // The server now drains; its end ends the select below.
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = server.wait() => {}
            () = on_signal => {}
        }
        tracing::info!("stopped");
        Ok(())
    })
}

/// Writes a line to stdout. A reader that went away (`modelgate ctl ... | head -3`) ends
/// the output quietly: `println!` would panic on the broken pipe.
fn out(text: &str) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::Internal(format!("writing to stdout: {e}"))),
    }
}

fn hash_token() -> Result<()> {
    let mut token = String::new();
    std::io::stdin()
        .read_line(&mut token)
        .map_err(|e| Error::Config(format!("reading the token from stdin: {e}")))?;
    let token = token.trim_end_matches(['\n', '\r']);
    if token.len() < 16 {
        return Err(Error::Config("a token needs at least 16 characters".into()));
    }
    out(&hex::encode(modelgate::api::auth::token_hash(token)))
}

fn profile(args: ProfileArgs) -> Result<()> {
    let env = modelgate::runtime::init(args.onnxruntime_lib.as_deref())?;
    let (path, p) = modelgate::drift::make::make(
        env,
        &args.model_repository,
        &args.model,
        args.version,
        &args.data,
        args.bins,
        modelgate::drift::make::Labels {
            column: args.label_column.as_deref(),
            validation: args.validation_data.as_deref(),
        },
    )?;
    out(&format!(
        "wrote {}: {} rows, features {}, prediction {}",
        path.display(),
        p.rows,
        p.features
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        match &p.prediction {
            Some(modelgate::drift::profile::PredictionProfile::Classes {
                output, classes, ..
            }) => {
                format!("{output} ({} classes)", classes.len())
            }
            Some(modelgate::drift::profile::PredictionProfile::Scores { output, .. }) => {
                format!("{output} (score)")
            }
            None => "none".into(),
        },
    ))?;
    if let Some(q) = &p.quality {
        match (q.accuracy, q.mae) {
            (Some(a), _) => out(&format!(
                "reference accuracy {a:.4} on {} labelled rows",
                q.rows
            )),
            (_, Some(m)) => out(&format!("reference MAE {m:.6} on {} labelled rows", q.rows)),
            _ => Ok(()),
        }?;
    }
    Ok(())
}

fn ctl(args: CtlArgs) -> Result<()> {
    use modelgate::ctl;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the async runtime: {e}")))?;
    let target = ctl::Target {
        url: args.url,
        token: args.token,
    };
    let answer = rt.block_on(async {
        match args.command {
            CtlCommand::Audit { model, limit } => {
                ctl::audit(&target, model.as_deref(), limit).await
            }
            CtlCommand::Drift { model } => ctl::drift(&target, model.as_deref()).await,
            CtlCommand::Traffic(TrafficCommand::Get {
                model,
                fleet: true,
                prometheus: Some(url),
                replica_label,
            }) => ctl::traffic_fleet(&url, &model, &replica_label).await,
            CtlCommand::Traffic(TrafficCommand::Get { model, .. }) => {
                ctl::traffic_get(&target, &model).await
            }
            CtlCommand::Traffic(TrafficCommand::Set {
                model,
                stable,
                canary,
                weight,
                no_canary,
                shadows,
                no_shadows,
                rollout,
                steps,
                interval,
                reason,
            }) => {
                let set = ctl::SetArgs {
                    stable,
                    canary,
                    weight,
                    no_canary,
                    shadows,
                    no_shadows,
                    rollout,
                    steps,
                    interval_secs: interval,
                };
                ctl::traffic_set(&target, &model, &set, reason.as_deref()).await
            }
            CtlCommand::Traffic(TrafficCommand::Promote { model, reason }) => {
                ctl::traffic_action(&target, &model, "promote", reason.as_deref()).await
            }
            CtlCommand::Traffic(TrafficCommand::Rollback { model, reason }) => {
                ctl::traffic_action(&target, &model, "rollback", reason.as_deref()).await
            }
        }
    })?;
    let text = serde_json::to_string_pretty(&answer)
        .map_err(|e| Error::Internal(format!("printing the answer: {e}")))?;
    out(&text)
}

/// `serve --validate`: load everything as serving would, report, exit non-zero on any failure.
fn validate_only(config: &Config) -> Result<()> {
    // Worker pools run their batching tasks (and warm-up) on a runtime, even when only
    // validating; loading itself blocks, so it runs on a blocking thread.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the async runtime: {e}")))?;
    let cfg = config.clone();
    let registry = rt
        .block_on(async {
            tokio::task::spawn_blocking(move || modelgate::load_registry(&cfg)).await
        })
        .map_err(|e| Error::Internal(format!("loading task failed: {e}")))??;
    let snapshot = registry.snapshot();
    let mut problems = Vec::new();
    // MLflow sources: refused credentials are a problem; unreachable is only reported.
    if let Err(e) = rt.block_on(modelgate::routing::sync::check(&config.sources.mlflow)) {
        problems.push(e.to_string());
    }
    for (name, model) in &snapshot.models {
        if let Some(e) = &model.error {
            problems.push(format!("model '{name}': {e}"));
        }
        for (v, reason) in &model.failed {
            problems.push(format!("model '{name}' version {v}: {reason}"));
        }
        for (v, mv) in &model.versions {
            println!(
                "ok   {name} version {v}: inputs {}, outputs {}",
                describe(&mv.inputs),
                describe(&mv.outputs)
            );
        }
    }
    // Fleet analysis needs steps several scrape intervals long: a warning, not a failure.
    let analysis = &config.traffic.analysis;
    for (name, model) in &snapshot.models {
        let plans = std::iter::once(&model.traffic.rollout)
            .chain(model.routing.rollout.as_ref().and_then(|r| r.plan.as_ref()));
        for plan in plans {
            if let Some(w) = analysis.step_warning(&format!("model '{name}'"), plan.interval_secs) {
                println!("WARN {w}");
            }
        }
    }
    // Not served, but not wrong either: a model file in the wrong place is a warning, so
    // that a repository with notes or tooling beside the models still validates.
    for m in modelgate::registry::scan::misplaced(&config.model_repository) {
        println!("WARN {m}");
    }
    if snapshot.models.is_empty() {
        problems.push(format!(
            "no models in {}",
            config.model_repository.display()
        ));
    }
    if problems.is_empty() {
        println!("config and repository are valid");
        Ok(())
    } else {
        for p in &problems {
            println!("FAIL {p}");
        }
        Err(Error::Config(format!(
            "{} problem(s) found",
            problems.len()
        )))
    }
}

fn describe(specs: &[modelgate::tensor::TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| format!("{} {} {:?}", s.name, s.dtype, s.shape))
        .collect::<Vec<_>>()
        .join("; ")
}

/// SIGINT and SIGTERM, listened for from the moment they are installed: a signal that
/// arrives while the server starts is kept for [`Signals::recv`] instead of taking the
/// default action (which kills the process without draining).
struct Signals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    /// Installs the handlers; inside the runtime, before anything listens.
    fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let streams = signal(SignalKind::interrupt())
                .and_then(|i| Ok((i, signal(SignalKind::terminate())?)))
                .inspect_err(|e| tracing::warn!(error = %e, "cannot listen for signals"))
                .ok();
            Signals { streams }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Waits for the first SIGINT or SIGTERM.
    async fn recv(&mut self) {
        #[cfg(unix)]
        match self.streams.as_mut() {
            Some((int, term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            None => std::future::pending::<()>().await,
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};

    use super::MiMalloc;

    /// Every size class and alignment the program asks for: aligned as asked, zeroed
    /// when asked, and the bytes kept across a reallocation to another class.
    #[test]
    #[allow(unsafe_code)]
    fn blocks_are_aligned_zeroed_and_kept_across_reallocation() {
        let a = MiMalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [
                1,
                7,
                8,
                24,
                40,
                100,
                1000,
                1025,
                1500,
                4000,
                70_000,
                3 << 20,
            ] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; each block is freed with its layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    std::ptr::write_bytes(p, 0xAB, size);
                    let grown = a.realloc(p, layout, size * 3 + 5);
                    assert_eq!(
                        grown as usize % align,
                        0,
                        "realloc size {size} align {align}"
                    );
                    assert!((0..size).all(|i| *grown.add(i) == 0xAB));
                    let shrunk = a.realloc(
                        grown,
                        Layout::from_size_align(size * 3 + 5, align).unwrap(),
                        size / 2 + 1,
                    );
                    assert_eq!(shrunk as usize % align, 0);
                    assert!((0..size / 2 + 1).all(|i| *shrunk.add(i) == 0xAB));
                    a.dealloc(
                        shrunk,
                        Layout::from_size_align(size / 2 + 1, align).unwrap(),
                    );
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }
}

//! modelgate: a model-serving gateway for ONNX models speaking the Open Inference
//! Protocol (KServe v2) over gRPC and HTTP, compatible with Triton's clients and tools.
//!
//! Crate map (one request flows top to bottom):
//! - [`api::grpc`], [`api::http`]: thin front ends; decode + check, call the service, encode.
//! - [`service`]: `predict()`, the one path both front ends share.
//! - [`registry`]: scans the model repository and publishes snapshots (arc-swap).
//! - [`routing`]: stable / canary / shadow choice, routing changes, rollouts, audit log.
//! - [`capture`]: sampled request/answer records as Parquet, feedback joined by id.
//! - [`drift`]: request samples, reference profiles, drift tests, signed webhooks + outbox.
//! - [`batcher`]: per-version bounded queues and worker threads owning ORT sessions.
//! - [`runtime`]: loading ONNX Runtime, creating and running sessions.
//! - [`tensor`]: OIP tensors, datatypes, shape and byte-count checks, JSON data.
//! - [`serve`], [`tls`]: the accept loop (connection limits, timeouts) and TLS.
//! - [`config`], [`error`], [`metrics`]: settings, the error map, Prometheus metrics.
//! - [`lineage`]: a version's `model.toml` (source run, data, code, parent, metrics).
//! - [`sources`]: external registries (MLflow) publishing into the repository.
//! - [`ctl`]: the `modelgate ctl` client of the admin API.
//!
//! [`Server::start`] is the testable entry point: it takes bound listeners, so tests run
//! real servers on ephemeral ports in-process; `main.rs` only parses flags and calls it.

pub mod api;
pub mod batcher;
pub mod capture;
pub mod config;
pub mod ctl;
pub mod drift;
pub mod error;
pub mod lineage;
pub mod metrics;
pub mod outbox;
pub mod promql;
pub mod registry;
pub mod routing;
pub mod runtime;
pub mod serve;
pub mod service;
pub mod sources;
pub mod tensor;
pub mod tls;
pub mod util;

/// Generated protobuf and gRPC types (package `inference`).
#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod proto {
    tonic::include_proto!("inference");
}

/// Generated types of modelgate's admin service (package `modelgate.admin.v1`).
#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod admin_proto {
    tonic::include_proto!("modelgate.admin.v1");
}

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::registry::settings::ControlMode;
use crate::service::AppState;

/// The three listening sockets, bound before the server starts (port 0 in tests).
pub struct Listeners {
    pub http: TcpListener,
    pub grpc: TcpListener,
    pub metrics: TcpListener,
}

impl Listeners {
    /// Binds the configured host and ports.
    pub async fn bind(config: &Config) -> Result<Listeners> {
        let bind = |port: u16, what: &'static str| {
            let addr = format!("{}:{port}", config.host);
            async move {
                TcpListener::bind(&addr)
                    .await
                    .map_err(|e| Error::Config(format!("cannot listen on {addr} ({what}): {e}")))
            }
        };
        Ok(Listeners {
            http: bind(config.http_port, "http_port").await?,
            grpc: bind(config.grpc_port, "grpc_port").await?,
            metrics: bind(config.metrics_port, "metrics_port").await?,
        })
    }
}

/// Loads ONNX Runtime and the repository as `serve --validate` does: returns the
/// registry, or the first problem found. Failed versions are reported, not fatal.
pub fn load_registry(config: &Config) -> Result<Registry> {
    config.validate()?;
    let env = runtime::init(config.onnxruntime_lib.as_deref())?;
    Registry::load(
        &config.model_repository,
        &config.model_defaults,
        env,
        config.model_control_mode,
        Duration::from_millis(config.settle_ms),
        &config.load_models,
    )
}

/// A running server.
pub struct Server {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub state: Arc<AppState>,
    /// How long shutdown waits for in-flight requests.
    grace: Duration,
    tracker: TaskTracker,
    /// The connection threads live (and mirrors spawned on them run) until the server
    /// is dropped, after `wait`.
    _cores: Option<Arc<serve::IoCores>>,
}

impl Server {
    /// Loads the repository, then serves on the given listeners until `shutdown` is
    /// cancelled. Returns once everything is loaded and the listeners are serving.
    pub async fn start(
        listeners: Listeners,
        config: Config,
        shutdown: CancellationToken,
    ) -> Result<Server> {
        let metrics_handle = metrics::install()?;
        let cfg = config.clone();
        // Loading creates ORT sessions: blocking work, kept off the async threads.
        let registry = util::blocking("loading", move || load_registry(&cfg)).await?;
        // Refused MLflow credentials stop the start; an unreachable MLflow does not.
        routing::sync::check(&config.sources.mlflow).await?;
        let control = routing::control::Control::new(
            routing::store::AuditLog::new(config.traffic.audit_path(&config.model_repository)),
            config.traffic.mirror_inflight(),
            Duration::from_millis(config.traffic.mirror_timeout_ms),
            config.traffic.controller,
        );
        let tracker = TaskTracker::new();
        let drift =
            drift::Monitor::start(&config.drift, &config.model_repository, &tracker, &shutdown)?;
        let capture = capture::Capture::start(
            &config.capture,
            &config.model_repository,
            Arc::clone(&drift.outbox),
            &tracker,
            &shutdown,
        )?;
        // Drift events name the captured rows of their window.
        drift.set_locator(Arc::new(capture.locator()));
        let state = Arc::new(AppState {
            registry: Arc::new(registry),
            control: Arc::new(control),
            drift,
            capture,
            limits: config.limits.clone(),
            strict_readiness: config.strict_readiness,
            shutdown: shutdown.clone(),
            tasks: tracker.clone(),
        });
        let api = Arc::new(api::Api {
            service: Arc::clone(&state),
            auth: api::auth::Auth::new(config.admin_token.as_deref(), config.auth.clone()),
            max_request_bytes: config.max_request_bytes,
            body_read_timeout_ms: config.limits.body_read_timeout_ms,
            rates: api::overview::Rates::default(),
            grpc_answer_metadata: config.grpc_answer_metadata,
        });
        let addr = |l: &TcpListener| l.local_addr().map_err(|e| Error::Internal(e.to_string()));
        let (http_addr, grpc_addr, metrics_addr) = (
            addr(&listeners.http)?,
            addr(&listeners.grpc)?,
            addr(&listeners.metrics)?,
        );

        // HTTP inference API.
        // Request bodies are bounded in time by serve::Bounded (a client that trickles
        // its body is answered 408), for every listener alike.
        let app = api::http::front(Arc::clone(&api));
        let bounds = serve::Bounds {
            limits: config.limits.clone(),
            max_request_bytes: config.max_request_bytes,
        };
        let tls = config
            .tls
            .as_ref()
            .map(tls::TlsConfig::acceptor)
            .transpose()?;
        let metrics_tls = config.tls.as_ref().filter(|t| t.metrics).and(tls.clone());
        let io_threads = config
            .io_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let cores = (io_threads > 0)
            .then(|| serve::IoCores::start(io_threads))
            .transpose()?;
        tracker.spawn(serve::serve(
            listeners.http,
            app,
            bounds.clone(),
            tls.clone(),
            "http",
            cores.clone(),
            tracker.clone(),
            shutdown.clone(),
        ));

        // gRPC inference API and the standard health service.
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let grpc_svc = proto::grpc_inference_service_server::GrpcInferenceServiceServer::new(
            api::grpc::GrpcService::new(Arc::clone(&api)),
        )
        // serve::Bounded refuses a message over the limit from its prefix, with
        // RESOURCE_EXHAUSTED naming max_request_bytes, before tonic sees it; tonic's
        // limit stays the same so that it still bounds a message's decompressed size.
        .max_decoding_message_size(config.max_request_bytes)
        // Triton accepts compressed requests; perf_analyzer can send them.
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .accept_compressed(tonic::codec::CompressionEncoding::Deflate)
        .max_encoding_message_size(usize::MAX);
        // Served through axum's HTTP/2 rather than tonic's transport::Server, whose
        // grpc-timeout handling would answer CANCELLED; we honour grpc-timeout ourselves
        // (expiring in the queue as DEADLINE_EXCEEDED).
        let admin_svc = admin_proto::traffic_admin_server::TrafficAdminServer::new(
            api::admin_grpc::AdminService::new(Arc::clone(&api)),
        );
        let grpc_router = tonic::service::Routes::new(health_service)
            .add_service(grpc_svc)
            .add_service(admin_svc)
            .into_axum_router();
        tracker.spawn(serve::serve(
            listeners.grpc,
            grpc_router,
            bounds.clone(),
            tls,
            "grpc",
            cores.clone(),
            tracker.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(track_health(Arc::clone(&state), health_reporter));
        tracker.spawn(sample_queues(Arc::clone(&state)));
        if config.model_control_mode == ControlMode::Poll {
            tracker.spawn(registry::watch::run(
                Arc::clone(&state.registry),
                Duration::from_secs(config.repository_poll_secs),
                Duration::from_millis(config.settle_ms),
                shutdown.clone(),
            ));
        }

        for source in &config.sources.mlflow {
            tracker.spawn(routing::sync::run(
                Arc::clone(&state.registry),
                Arc::clone(&state.control),
                source.clone(),
                shutdown.clone(),
            ));
        }

        if state.control.controller {
            tracker.spawn(routing::rollout::run(
                Arc::clone(&state.registry),
                Arc::clone(&state.control),
                Duration::from_millis(config.traffic.controller_tick_ms),
                config.traffic.analysis.clone(),
                Some(state.capture.quality_reader()),
                shutdown.clone(),
            ));
        }

        // Prometheus metrics.
        let metrics_app = axum::Router::new()
            .route("/metrics", axum::routing::get(render_metrics))
            .with_state(metrics_handle.clone());
        tracker.spawn(serve::serve(
            listeners.metrics,
            metrics_app,
            bounds,
            metrics_tls,
            "metrics",
            None,
            tracker.clone(),
            shutdown.clone(),
        ));
        let upkeep = metrics_handle.clone();
        let token = shutdown.clone();
        tracker.spawn(async move {
            // Histograms accumulate until upkeep drains them into their buckets.
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => upkeep.run_upkeep(),
                }
            }
        });
        tracker.close();
        tracing::info!(%http_addr, %grpc_addr, %metrics_addr, replica = crate::util::replica_name(), "modelgate serving");
        Ok(Server {
            http_addr,
            grpc_addr,
            metrics_addr,
            state,
            grace: Duration::from_secs(config.shutdown_grace_secs),
            tracker,
            _cores: cores,
        })
    }

    /// Waits until shutdown was requested and in-flight requests finished (bounded by
    /// the configured grace period).
    pub async fn wait(self) {
        self.state.shutdown.cancelled().await;
        let grace = self.grace;
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "shutdown grace period over; exiting with requests in flight"
            );
        }
    }
}

async fn render_metrics(
    axum::extract::State(handle): axum::extract::State<PrometheusHandle>,
) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
}

/// Keeps grpc.health.v1 in step with readiness (checked twice a second).
/// Publishes each loaded version's queue depth and running batches once a second: a
/// gauge sampled off the request path (the autoscaling signal) costs it nothing.
async fn sample_queues(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snapshot = state.registry.snapshot();
        for (name, model) in &snapshot.models {
            for (&v, mv) in &model.versions {
                let (queued, running) = mv.pool.load();
                metrics::set_queue_load(name, v, queued, running);
            }
        }
    }
}

async fn track_health(state: Arc<AppState>, reporter: tonic_health::server::HealthReporter) {
    use tonic_health::ServingStatus;
    let mut last = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let cancelled = state.shutdown.is_cancelled();
        let status = if state.is_ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            for name in ["", "inference.GRPCInferenceService"] {
                reporter.set_service_status(name, status).await;
            }
            last = Some(status);
        }
        if cancelled {
            break;
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => {}
            _ = tick.tick() => {}
        }
    }
}

/// Starts a server and runs it until `shutdown` is cancelled.
pub async fn run(listeners: Listeners, config: Config, shutdown: CancellationToken) -> Result<()> {
    let server = Server::start(listeners, config, shutdown).await?;
    server.wait().await;
    Ok(())
}

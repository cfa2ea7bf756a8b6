//! `refserver`: the minimal reference Open Inference Protocol server, the floor modelgate
//! is measured against.
//!
//! It serves ONE ONNX model with only what a load test needs: gRPC ModelInfer
//! (`raw_input_contents` in, `raw_output_contents` out) and ModelMetadata; HTTP
//! `POST /v2/models/{m}[/versions/{v}]/infer` (JSON and Triton's binary extension),
//! `GET /v2/models/{m}` and `GET /v2/health/ready`. There is no batching, routing
//! table, queue, metrics or logging per request. Two thread layouts:
//! - `--layout per-core` (the default, the floor for small models): one single-threaded
//!   tokio runtime per core, each with its own SO_REUSEPORT listeners (the kernel spreads
//!   connections over them) and its own ORT session, run inline in the handler: no
//!   thread hand-off at all;
//! - `--layout pool`: one multi-thread runtime; the handler takes an idle session from
//!   a pool of `--instances` and runs it on tokio's blocking pool.
//!
//! Decoding and
//! running use modelgate's own `tensor` and `runtime` code, so the ORT call path is the
//! same and the difference between the two servers is everything around it.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use modelgate::error::Error;
use modelgate::proto as pb;
use modelgate::proto::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use modelgate::runtime;
use modelgate::tensor::{DataType, Tensor, TensorSpec, check_against_spec};
use ort::session::Session;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;

/// Largest request body or gRPC message accepted (modelgate's default).
const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
/// Triton's header giving the JSON part's length in a binary-extension body.
const HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";
/// The one version this server reports.
const VERSION: &str = "1";

/// Minimal reference OIP server for one ONNX model.
#[derive(Debug, Parser)]
#[command(name = "refserver", version)]
struct Args {
    /// The model file.
    #[arg(long)]
    model_path: PathBuf,
    /// The name it is served under.
    #[arg(long)]
    model_name: String,
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    http_port: u16,
    #[arg(long, default_value_t = 8001)]
    grpc_port: u16,
    /// Thread layout (see the module docs).
    #[arg(long, value_enum, default_value_t = Layout::PerCore)]
    layout: Layout,
    /// ORT sessions (requests run at once); default: one per core. With `per-core`, the
    /// number of cores used (threads, listeners and sessions).
    #[arg(long)]
    instances: Option<usize>,
    /// ORT intra-op threads per session (modelgate's default is 1 too).
    #[arg(long, default_value_t = 1)]
    intra_op_threads: usize,
    /// Tokio worker threads of the `pool` layout; default: one per core.
    #[arg(long)]
    threads: Option<usize>,
    /// ONNX Runtime library (default: found as modelgate finds it).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    onnxruntime_lib: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Layout {
    PerCore,
    Pool,
}

thread_local! {
    /// The `per-core` layout's session of this core's thread.
    static SESSION: RefCell<Option<Session>> = const { RefCell::new(None) };
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("refserver: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: Args) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let instances = args.instances.unwrap_or(cores).max(1);
    let (model, mut sessions) = Model::load(&args, instances)?;
    let model = Arc::new(model);
    if args.layout == Layout::Pool {
        *model.idle.lock().unwrap_or_else(PoisonError::into_inner) = sessions;
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        rt.enable_all();
        if let Some(n) = args.threads {
            rt.worker_threads(n.max(1));
        }
        let rt = rt.build().context("cannot start the tokio runtime")?;
        let addrs = addrs(&args)?;
        return rt.block_on(async {
            let http = TcpListener::bind(addrs.0)
                .await
                .with_context(|| format!("cannot listen on {}", addrs.0))?;
            let grpc = TcpListener::bind(addrs.1)
                .await
                .with_context(|| format!("cannot listen on {}", addrs.1))?;
            serve(http, grpc, Arc::clone(&model), instances, true).await
        });
    }
    // per-core: every thread binds its own listeners (SO_REUSEPORT) and keeps a session.
    let addrs = addrs(&args)?;
    let mut threads = Vec::new();
    for core in 0..instances {
        let session = sessions.pop().context("one session per core")?;
        let model = Arc::clone(&model);
        threads.push(std::thread::spawn(move || -> Result<()> {
            SESSION.with(|s| *s.borrow_mut() = Some(session));
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            rt.block_on(async {
                let http = reuseport_listener(addrs.0)?;
                let grpc = reuseport_listener(addrs.1)?;
                serve(http, grpc, model, instances, core == 0).await
            })
        }));
    }
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a core thread panicked"))??;
    }
    Ok(())
}

fn addrs(args: &Args) -> Result<(SocketAddr, SocketAddr)> {
    let http = format!("{}:{}", args.host, args.http_port)
        .parse()
        .context("bad --host")?;
    let grpc = format!("{}:{}", args.host, args.grpc_port)
        .parse()
        .context("bad --host")?;
    Ok((http, grpc))
}

/// A listener on `addr` that other threads may bind as well (the kernel balances new
/// connections over them).
fn reuseport_listener(addr: SocketAddr) -> Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("cannot make a socket")?;
    socket.set_reuseaddr(true).context("SO_REUSEADDR")?;
    socket.set_reuseport(true).context("SO_REUSEPORT")?;
    socket
        .bind(addr)
        .with_context(|| format!("cannot listen on {addr}"))?;
    socket
        .listen(1024)
        .with_context(|| format!("cannot listen on {addr}"))
}

async fn serve(
    http: TcpListener,
    grpc: TcpListener,
    model: Arc<Model>,
    instances: usize,
    announce: bool,
) -> Result<()> {
    let (http_addr, grpc_addr) = (http.local_addr()?, grpc.local_addr()?);
    tokio::spawn(serve_http(http, Arc::clone(&model)));
    let grpc_svc = GrpcInferenceServiceServer::new(GrpcService {
        model: Arc::clone(&model),
    })
    .max_decoding_message_size(MAX_REQUEST_BYTES)
    .max_encoding_message_size(usize::MAX);
    let incoming = tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
    let grpc_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(grpc_svc)
            .serve_with_incoming(incoming),
    );
    if announce {
        eprintln!(
            "refserver: serving '{}' ({instances} instance(s)) on http {http_addr}, grpc {grpc_addr}",
            model.name
        );
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        r = grpc_task => r.context("gRPC server task")?.context("gRPC server")?,
    }
    eprintln!("refserver: stopping");
    Ok(())
}

/// The model: its interface and a pool of sessions.
struct Model {
    name: String,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    /// Idle sessions; `permits` holds exactly one permit per idle session, so waiting for
    /// a session happens on the async side without tying up a blocking thread.
    idle: Mutex<Vec<Session>>,
    permits: Semaphore,
}

impl Model {
    /// The model and its sessions (the caller places them: a pool, or one per core).
    fn load(args: &Args, instances: usize) -> Result<(Model, Vec<Session>)> {
        let env = runtime::init(args.onnxruntime_lib.as_deref()).map_err(anyhow::Error::msg)?;
        let mut sessions = Vec::with_capacity(instances);
        for _ in 0..instances {
            sessions.push(
                runtime::create_session(env, &args.model_path, args.intra_op_threads)
                    .map_err(anyhow::Error::msg)?,
            );
        }
        let (inputs, outputs) = runtime::interface(&sessions[0]).map_err(anyhow::Error::msg)?;
        let model = Model {
            name: args.model_name.clone(),
            inputs,
            outputs,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(instances),
        };
        Ok((model, sessions))
    }

    fn check_name(&self, name: &str) -> Result<(), Error> {
        if name == self.name {
            Ok(())
        } else {
            Err(Error::NotFound(format!("unknown model '{name}'")))
        }
    }

    /// Puts the request's inputs in the model's order, checking names, types and shapes
    /// (the byte counts were checked by `Tensor::from_raw`, which `runtime::run` relies on).
    fn order_inputs(&self, mut given: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let mut ordered = Vec::with_capacity(self.inputs.len());
        for spec in &self.inputs {
            let i = given
                .iter()
                .position(|t| t.name == spec.name)
                .ok_or_else(|| Error::invalid(format!("missing input '{}'", spec.name)))?;
            let t = given.swap_remove(i);
            check_against_spec(spec, t.dtype, &t.shape)?;
            ordered.push(t);
        }
        if let Some(extra) = given.first() {
            return Err(Error::invalid(format!("unknown input '{}'", extra.name)));
        }
        Ok(ordered)
    }

    /// The output specs asked for (all of them when none is named).
    fn output_specs(&self, requested: &[String]) -> Result<Option<Vec<TensorSpec>>, Error> {
        if requested.is_empty() {
            return Ok(None);
        }
        requested
            .iter()
            .map(|name| {
                self.outputs
                    .iter()
                    .find(|s| &s.name == name)
                    .cloned()
                    .ok_or_else(|| Error::invalid(format!("unknown output '{name}'")))
            })
            .collect::<Result<Vec<_>, Error>>()
            .map(Some)
    }

    /// Runs one request on an idle session, on tokio's blocking pool.
    async fn infer(
        self: &Arc<Self>,
        inputs: Vec<Tensor>,
        requested: &[String],
    ) -> Result<Vec<Tensor>, Error> {
        let inputs = self.order_inputs(inputs)?;
        let specs = self.output_specs(requested)?;
        // per-core: this thread's own session, run right here.
        if let Some(result) = SESSION.with(|s| {
            s.borrow_mut().as_mut().map(|session| {
                runtime::run(session, &inputs, specs.as_deref().unwrap_or(&self.outputs))
            })
        }) {
            return result;
        }
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::Unavailable("shutting down".into()))?;
        let mut session = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .ok_or_else(|| Error::Internal("no idle session".into()))?;
        let model = Arc::clone(self);
        let joined = tokio::task::spawn_blocking(move || {
            let specs = specs.as_deref().unwrap_or(&model.outputs);
            let result = runtime::run(&mut session, &inputs, specs);
            (session, result)
        })
        .await;
        match joined {
            Ok((session, result)) => {
                self.idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(session);
                result
            }
            Err(e) => {
                // The session went down with the task: retire its permit with it.
                permit.forget();
                Err(Error::Internal(format!("inference task failed: {e}")))
            }
        }
    }

    fn metadata(&self) -> pb::ModelMetadataResponse {
        pb::ModelMetadataResponse {
            name: self.name.clone(),
            versions: vec![VERSION.to_string()],
            platform: "onnxruntime_onnx".to_string(),
            inputs: modelgate::api::describe::tensor_metadata(&self.inputs),
            outputs: modelgate::api::describe::tensor_metadata(&self.outputs),
            parameters: Default::default(),
        }
    }
}

// ---------------------------------------------------------------- gRPC

struct GrpcService {
    model: Arc<Model>,
}

#[tonic::async_trait]
impl GrpcInferenceService for GrpcService {
    async fn server_live(
        &self,
        _: tonic::Request<pb::ServerLiveRequest>,
    ) -> Result<tonic::Response<pb::ServerLiveResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: tonic::Request<pb::ServerReadyRequest>,
    ) -> Result<tonic::Response<pb::ServerReadyResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::ServerReadyResponse {
            ready: true,
        }))
    }

    async fn model_metadata(
        &self,
        req: tonic::Request<pb::ModelMetadataRequest>,
    ) -> Result<tonic::Response<pb::ModelMetadataResponse>, tonic::Status> {
        self.model.check_name(&req.get_ref().name)?;
        Ok(tonic::Response::new(self.model.metadata()))
    }

    async fn model_infer(
        &self,
        req: tonic::Request<pb::ModelInferRequest>,
    ) -> Result<tonic::Response<pb::ModelInferResponse>, tonic::Status> {
        let req = req.into_inner();
        self.model.check_name(&req.model_name)?;
        let id = req.id.clone();
        let (inputs, requested) = decode_grpc(req)?;
        let outputs = self.model.infer(inputs, &requested).await?;
        Ok(tonic::Response::new(encode_grpc(
            &self.model.name,
            id,
            outputs,
        )))
    }
}

/// Raw inputs only: typed `contents` are not part of what a load test sends.
fn decode_grpc(req: pb::ModelInferRequest) -> Result<(Vec<Tensor>, Vec<String>), Error> {
    if req.raw_input_contents.len() != req.inputs.len() {
        return Err(Error::invalid(
            "give every input's data in raw_input_contents",
        ));
    }
    let inputs = req
        .inputs
        .into_iter()
        .zip(req.raw_input_contents)
        .map(|(i, data)| {
            let dtype = DataType::parse_supported(&i.datatype, &i.name)?;
            Tensor::from_raw(i.name, dtype, &i.shape, data)
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok((inputs, req.outputs.into_iter().map(|o| o.name).collect()))
}

/// The same encoder as modelgate's gRPC front end.
fn encode_grpc(model: &str, id: String, outputs: Vec<Tensor>) -> pb::ModelInferResponse {
    modelgate::api::grpc::encode_infer(modelgate::service::InferResponse {
        model: model.to_string(),
        version: VERSION.to_string(),
        id,
        outputs,
        timing: Default::default(),
        variant: modelgate::routing::Variant::Stable,
        captured: false,
    })
}

// ---------------------------------------------------------------- HTTP

async fn serve_http(listener: TcpListener, model: Arc<Model>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                eprintln!("refserver: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let model = Arc::clone(&model);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let model = Arc::clone(&model);
                async move { Ok::<_, Infallible>(route(&model, req).await) }
            });
            // A client closing its connection ends this; nothing to report.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type HttpResponse = Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: Vec<u8>) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(e: &Error) -> HttpResponse {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(
        status,
        json!({ "error": e.to_string() }).to_string().into_bytes(),
    )
}

async fn route(model: &Arc<Model>, req: Request<Incoming>) -> HttpResponse {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result = match (req.method(), parts.as_slice()) {
        (&Method::GET, ["v2", "health", "ready" | "live"]) => {
            Ok(Response::new(Full::new(Bytes::new())))
        }
        (&Method::GET, ["v2", "models", m] | ["v2", "models", m, "versions", _]) => {
            metadata_json(model, m)
        }
        (
            &Method::POST,
            ["v2", "models", m, "infer"] | ["v2", "models", m, "versions", _, "infer"],
        ) => {
            let m = m.to_string();
            http_infer(model, &m, req).await
        }
        _ => Err(Error::NotFound("no such endpoint".into())),
    };
    result.unwrap_or_else(|e| error_response(&e))
}

fn metadata_json(model: &Model, name: &str) -> Result<HttpResponse, Error> {
    model.check_name(name)?;
    let md = model.metadata();
    let tensors = |ts: &[pb::model_metadata_response::TensorMetadata]| -> Vec<Value> {
        ts.iter()
            .map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
            .collect()
    };
    let body = json!({
        "name": md.name,
        "versions": md.versions,
        "platform": md.platform,
        "inputs": tensors(&md.inputs),
        "outputs": tensors(&md.outputs),
    });
    Ok(json_response(StatusCode::OK, body.to_string().into_bytes()))
}

async fn http_infer(
    model: &Arc<Model>,
    name: &str,
    req: Request<Incoming>,
) -> Result<HttpResponse, Error> {
    model.check_name(name)?;
    let (parts, body) = req.into_parts();
    let body = Limited::new(body, MAX_REQUEST_BYTES)
        .collect()
        .await
        .map_err(|e| Error::invalid(format!("cannot read the request body: {e}")))?
        .to_bytes();
    // The same HTTP codec as modelgate: the comparison isolates what serving adds.
    let (req, prefs) =
        modelgate::api::http::decode_infer(model.name.clone(), None, &parts.headers, body)?;
    let outputs = model.infer(req.inputs, &req.outputs).await?;
    let resp = modelgate::service::InferResponse {
        model: model.name.clone(),
        version: VERSION.to_string(),
        id: req.id,
        outputs,
        timing: Default::default(),
        variant: modelgate::routing::Variant::Stable,
        captured: false,
    };
    let (head, binary) = modelgate::api::http::encode_body(&resp, &prefs)?;
    if binary.is_empty() {
        return Ok(json_response(StatusCode::OK, head));
    }
    let header_len = head.len();
    let mut body = head;
    for b in &binary {
        body.extend_from_slice(b);
    }
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(HEADER_CONTENT_LENGTH, header_len.into());
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_needs_raw_contents_with_matching_sizes() {
        let input = |shape: Vec<i64>| pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape,
            ..Default::default()
        };
        let ok = pb::ModelInferRequest {
            inputs: vec![input(vec![1, 2])],
            raw_input_contents: vec![Bytes::from_static(&[0; 8])],
            ..Default::default()
        };
        assert_eq!(decode_grpc(ok).unwrap().0[0].shape, vec![1, 2]);
        let short = pb::ModelInferRequest {
            inputs: vec![input(vec![1, 3])],
            raw_input_contents: vec![Bytes::from_static(&[0; 8])],
            ..Default::default()
        };
        assert!(decode_grpc(short).is_err());
        let typed = pb::ModelInferRequest {
            inputs: vec![input(vec![1])],
            ..Default::default()
        };
        assert!(decode_grpc(typed).is_err());
    }
}

//! ONNX Runtime: finding and loading the shared library, creating sessions, running them.
//!
//! `ort` is built with `load-dynamic`, so the library is opened at run time. If it were
//! missing, `ort` would panic at the first call; we resolve and load it ourselves first
//! and turn every failure into a one-line error that says how to get the library.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::memory::Allocator;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynTensor, DynTensorValueType, ValueType};

use crate::error::{Error, Result};
use crate::tensor::{DataType, Tensor, TensorSpec};

/// File name of the library inside the onnxruntime wheel.
pub const LIB_NAME: &str = "libonnxruntime.so.1.31.1";

/// Where `scripts/fetch-onnxruntime.sh` puts the library in a source checkout.
const CHECKOUT_LIB_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.onnxruntime");

static ENVIRONMENT: OnceLock<ort::environment::Environment> = OnceLock::new();

/// The places searched, in order, when no path is given: next to the executable (an
/// installed layout), `../lib` from it (the container image), the source checkout's
/// `.onnxruntime/`, then the system library folders.
pub fn default_library_candidates() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        dirs.push(exe_dir.clone());
        dirs.push(exe_dir.join("../lib"));
    }
    dirs.push(PathBuf::from(CHECKOUT_LIB_DIR));
    dirs.push(PathBuf::from("/usr/local/lib"));
    dirs.push(PathBuf::from("/usr/lib"));
    dirs.into_iter().map(|d| d.join(LIB_NAME)).collect()
}

/// Resolves the library path: the explicit one (flag, `ORT_DYLIB_PATH`, or config), else
/// the first default candidate that exists.
pub fn resolve_library(explicit: Option<&Path>) -> Result<PathBuf> {
    const HOW: &str = "run scripts/fetch-onnxruntime.sh (it takes the library from the PyPI wheel onnxruntime==1.31.1), or pass --onnxruntime-lib PATH or set ORT_DYLIB_PATH";
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        return Err(Error::Config(format!(
            "ONNX Runtime library {} does not exist; {HOW}",
            p.display()
        )));
    }
    let candidates = default_library_candidates();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            Error::Config(format!(
                "ONNX Runtime library {LIB_NAME} not found (looked in {}); {HOW}",
                candidates
                    .iter()
                    .filter_map(|p| p.parent().map(|d| d.display().to_string()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// Loads the library (once per process) and returns the shared ORT environment.
///
/// Later calls return the first environment whatever path they pass: ONNX Runtime can
/// only be loaded once into a process.
pub fn init(explicit: Option<&Path>) -> Result<&'static ort::environment::Environment> {
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    let path = resolve_library(explicit)?;
    let builder = ort::init_from(&path).map_err(|e| {
        Error::Config(format!(
            "cannot load ONNX Runtime from {}: {e}; use the library from the PyPI wheel onnxruntime==1.31.1 (scripts/fetch-onnxruntime.sh)",
            path.display()
        ))
    })?;
    let env = builder
        .with_name("modelgate")
        .with_telemetry(false)
        .build()
        .map_err(|e| Error::Config(format!("cannot create the ONNX Runtime environment: {e}")))?;
    Ok(ENVIRONMENT.get_or_init(|| env))
}

/// Creates a session for `model.onnx` with the given intra-op thread count.
pub fn create_session(
    env: &ort::environment::Environment,
    path: &Path,
    intra_op_threads: usize,
) -> Result<Session> {
    let fail = |e: String| Error::Config(format!("{}: {e}", path.display()));
    Session::builder(env)
        .map_err(|e| fail(e.to_string()))?
        .with_intra_threads(intra_op_threads)
        .map_err(|e| fail(e.to_string()))?
        .with_inter_threads(1)
        .map_err(|e| fail(e.to_string()))?
        // Spinning threads burn the cores other sessions and the network stack need.
        .with_config_entry("session.intra_op.allow_spinning", "0")
        .map_err(|e| fail(e.to_string()))?
        .commit_from_file(path)
        .map_err(|e| fail(e.to_string()))
}

/// The model's inputs and outputs as ONNX declares them.
pub fn interface(session: &Session) -> Result<(Vec<TensorSpec>, Vec<TensorSpec>)> {
    let spec = |o: &ort::value::Outlet| -> Result<TensorSpec> {
        match o.dtype() {
            ValueType::Tensor { ty, shape, .. } => {
                let dtype = DataType::from_ort(*ty).ok_or_else(|| {
                    Error::Config(format!(
                        "tensor '{}' has unsupported element type {ty}",
                        o.name()
                    ))
                })?;
                Ok(TensorSpec {
                    name: o.name().to_string(),
                    dtype,
                    shape: shape.iter().map(|&d| if d < 0 { -1 } else { d }).collect(),
                })
            }
            other => Err(Error::Config(format!(
                "'{}' is a {other}, only tensors are supported",
                o.name()
            ))),
        }
    };
    let inputs = session
        .inputs()
        .iter()
        .map(spec)
        .collect::<Result<Vec<_>>>()?;
    let outputs = session
        .outputs()
        .iter()
        .map(spec)
        .collect::<Result<Vec<_>>>()?;
    Ok((inputs, outputs))
}

/// One model input given as parts to concatenate along the first dimension: a batch of
/// requests becomes one input tensor with a single copy of each part.
pub struct InputParts<'a> {
    pub name: &'a str,
    pub dtype: DataType,
    pub shape: Vec<usize>,
    pub parts: Vec<&'a [u8]>,
}

/// Runs one request: inputs in the model's input order.
pub fn run(
    session: &mut Session,
    inputs: &[Tensor],
    output_specs: &[TensorSpec],
) -> Result<Vec<Tensor>> {
    let parts: Vec<InputParts<'_>> = inputs
        .iter()
        .map(|t| InputParts {
            name: &t.name,
            dtype: t.dtype,
            shape: t.shape.clone(),
            parts: vec![&t.data[..]],
        })
        .collect();
    run_parts(session, &parts, output_specs)
}

/// Runs one request or batch and returns every output in the model's output order. The
/// input parts are copied once into ORT-owned tensors (our buffers are not guaranteed
/// aligned) and each output is copied once out.
pub fn run_parts(
    session: &mut Session,
    inputs: &[InputParts<'_>],
    output_specs: &[TensorSpec],
) -> Result<Vec<Tensor>> {
    let allocator = Allocator::default();
    let mut values: Vec<(&str, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
    for t in inputs {
        let mut tensor = DynTensor::new(&allocator, t.dtype.to_ort(), t.shape.clone())
            .map_err(|e| Error::Inference(format!("allocating input '{}': {e}", t.name)))?;
        let size: usize = t.parts.iter().map(|p| p.len()).sum();
        let want = t.shape.iter().product::<usize>() * t.dtype.size().unwrap_or(0);
        if size != want {
            return Err(Error::Internal(format!(
                "input '{}': {size} bytes for a tensor of {want}",
                t.name
            )));
        }
        if size > 0 {
            let ptr = tensor.data_ptr_mut().cast::<u8>();
            if ptr.is_null() {
                return Err(Error::Inference(format!("input '{}': no buffer", t.name)));
            }
            let mut offset = 0;
            for part in &t.parts {
                // SAFETY: the tensor was allocated on the CPU for exactly this shape and dtype:
                // `want` bytes, and the parts add up to exactly `want` (checked above).
                unsafe {
                    std::ptr::copy_nonoverlapping(part.as_ptr(), ptr.add(offset), part.len())
                };
                offset += part.len();
            }
        }
        values.push((t.name, SessionInputValue::Owned(tensor.into_dyn())));
    }
    let outputs = session
        .run(values)
        .map_err(|e| Error::Inference(e.to_string()))?;
    let mut result = Vec::with_capacity(output_specs.len());
    for spec in output_specs {
        let value = outputs
            .get(&spec.name)
            .ok_or_else(|| Error::Inference(format!("model produced no output '{}'", spec.name)))?;
        let tensor = value
            .view()
            .downcast::<DynTensorValueType>()
            .map_err(|e| Error::Inference(format!("output '{}': {e}", spec.name)))?;
        let shape: Vec<usize> = tensor.shape().iter().map(|&d| d.max(0) as usize).collect();
        let count: usize = shape.iter().product();
        // Trust what ORT produced over the declared type: they only differ for a broken model.
        let dtype = DataType::from_ort(*tensor.data_type()).ok_or_else(|| {
            Error::Inference(format!("output '{}': unsupported element type", spec.name))
        })?;
        let size = dtype.size().ok_or_else(|| {
            Error::Inference(format!(
                "output '{}': BYTES outputs are not supported yet",
                spec.name
            ))
        })?;
        let len = count * size;
        let data = if len == 0 {
            bytes::Bytes::new()
        } else {
            let ptr = tensor.data_ptr().cast::<u8>();
            if ptr.is_null() {
                return Err(Error::Inference(format!(
                    "output '{}': no buffer",
                    spec.name
                )));
            }
            // SAFETY: ORT owns a CPU buffer of `count` elements of this dtype for the tensor's lifetime.
            bytes::Bytes::copy_from_slice(unsafe { std::slice::from_raw_parts(ptr, len) })
        };
        result.push(Tensor {
            name: spec.name.clone(),
            dtype,
            shape,
            data,
        });
    }
    Ok(result)
}

/// The fastest of three zero-filled single-row runs (dynamic dims as 1): what one row
/// costs this model on one thread. The session must be single-threaded.
pub fn single_row_cost(
    session: &mut Session,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> Result<std::time::Duration> {
    let tensors = crate::tensor::zeros(inputs, 1);
    let mut best = std::time::Duration::MAX;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        run(session, &tensors, outputs)?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

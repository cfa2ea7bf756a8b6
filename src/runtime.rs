//! ONNX Runtime: finding and loading the shared library, creating sessions, running them.
//!
//! `ort` is built with `load-dynamic`, so the library is opened at run time. If it were
//! missing, `ort` would panic at the first call; we resolve and load it ourselves first
//! and turn every failure into a one-line error that says how to get the library.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ort::memory::Allocator;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynTensor, DynTensorValueType, ValueType};

use crate::error::{Error, Result};
use crate::tensor::{DataType, Tensor, TensorSpec};

/// The ONNX file of a version folder (`<model>/<version>/model.onnx`).
pub const MODEL_FILE: &str = "model.onnx";

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
    check_library(&path)?;
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

/// Checks what can be checked before the library is mapped: a truncated file would be
/// mapped anyway and crash the process with SIGBUS ("Bus error", no message) on first
/// touch past its end, and ort reports a failed `dlopen` without the reason. So: the ELF
/// header (64-bit, little-endian, this machine's architecture, a shared object), the
/// file long enough for every segment and section its headers describe, then `dlopen`
/// ourselves to pass the loader's own message on.
pub fn check_library(path: &Path) -> Result<()> {
    let how =
        "use the library from the PyPI wheel onnxruntime==1.31.1 (scripts/fetch-onnxruntime.sh)";
    let bad = |why: String| {
        Error::Config(format!(
            "cannot load ONNX Runtime from {}: {why}; {how}",
            path.display()
        ))
    };
    // The ELF header and the program headers sit at the start: 64 KiB hold them.
    let mut head = Vec::new();
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    std::io::Read::take(file, 64 * 1024)
        .read_to_end(&mut head)
        .map_err(|e| bad(e.to_string()))?;
    elf_problem(&head, len).map_or(Ok(()), |why| Err(bad(why)))?;
    dlopen_check(path).map_err(bad)
}

/// What is wrong with an ELF shared object of `len` bytes whose first bytes are `data`.
fn elf_problem(data: &[u8], len: u64) -> Option<String> {
    const MACHINE: u16 = if cfg!(target_arch = "x86_64") {
        62
    } else if cfg!(target_arch = "aarch64") {
        183
    } else {
        0
    };
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    if data.len() < 64 || &data[..4] != b"\x7fELF" {
        return Some(format!(
            "not an ELF shared library ({len} bytes, no ELF header)"
        ));
    }
    if data[4] != 2 || data[5] != 1 {
        return Some("not a 64-bit little-endian ELF library".into());
    }
    if u16_at(16) != Some(3) {
        return Some("an ELF file, but not a shared library".into());
    }
    let machine = u16_at(18).unwrap_or(0);
    if MACHINE != 0 && machine != MACHINE {
        return Some(format!(
            "built for another architecture (ELF machine {machine})"
        ));
    }
    let (phoff, shoff) = (u64_at(32)?, u64_at(40)?);
    let (phentsize, phnum) = (u64::from(u16_at(54)?), u64::from(u16_at(56)?));
    let (shentsize, shnum) = (u64::from(u16_at(58)?), u64::from(u16_at(60)?));
    let mut need = phoff.saturating_add(phentsize.saturating_mul(phnum));
    need = need.max(shoff.saturating_add(shentsize.saturating_mul(shnum)));
    if need <= len {
        for i in 0..phnum {
            let h = usize::try_from(phoff + i * phentsize).ok()?;
            // PT_LOAD segments are what the loader maps (headers past the first 64 KiB,
            // which no real library has, are not looked at).
            if u32_at(h) == Some(1)
                && let (Some(off), Some(size)) = (u64_at(h + 8), u64_at(h + 32))
            {
                let end = off.saturating_add(size);
                need = need.max(end);
            }
        }
    }
    (need > len)
        .then(|| format!("the file is truncated: {len} bytes, its ELF headers describe {need}"))
}

/// Opens the library with the system loader and returns its message on failure.
#[allow(unsafe_code)] // libc / raw buffer calls, each with its SAFETY note
fn dlopen_check(path: &Path) -> std::result::Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| "the path contains a NUL byte".to_string())?;
    // SAFETY: `c` is a valid NUL-terminated path. A successful handle is left open on
    // purpose: ort opens the same library next (the loader counts references), and
    // closing ONNX Runtime's library is not safe once it ran its initialisers.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if !handle.is_null() {
        return Ok(());
    }
    // SAFETY: dlerror returns a thread-local, NUL-terminated message (or null) that
    // stays valid until the next dl* call on this thread; it is copied at once.
    let msg = unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "dlopen failed".to_string()
        } else {
            std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    };
    Err(msg)
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

/// Where the time of one run went, split as Triton's statistics split it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Phases {
    /// Copying the inputs into ORT's tensors (`compute_input`).
    pub input: Duration,
    /// `Session::run` (`compute_infer`).
    pub infer: Duration,
    /// Copying the outputs out of ORT, and splitting a batch's by request
    /// (`compute_output`).
    pub output: Duration,
}

impl Phases {
    /// The whole execution.
    pub fn total(&self) -> Duration {
        self.input + self.infer + self.output
    }
}

/// Runs one request or batch and returns every output in the model's output order. The
/// input parts are copied once into ORT-owned tensors (our buffers are not guaranteed
/// aligned) and each output is copied once out.
pub fn run_parts(
    session: &mut Session,
    inputs: &[InputParts<'_>],
    output_specs: &[TensorSpec],
) -> Result<Vec<Tensor>> {
    run_parts_timed(session, inputs, output_specs).map(|(outputs, _)| outputs)
}

/// [`run_parts`], also telling how long each phase took.
#[allow(unsafe_code)] // libc / raw buffer calls, each with its SAFETY note
pub fn run_parts_timed(
    session: &mut Session,
    inputs: &[InputParts<'_>],
    output_specs: &[TensorSpec],
) -> Result<(Vec<Tensor>, Phases)> {
    let started = Instant::now();
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
    let inputs_ready = Instant::now();
    let outputs = session
        .run(values)
        .map_err(|e| Error::Inference(e.to_string()))?;
    let ran = Instant::now();
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
    let phases = Phases {
        input: inputs_ready - started,
        infer: ran - inputs_ready,
        output: ran.elapsed(),
    };
    Ok((result, phases))
}

/// The fastest of several zero-filled single-row runs (dynamic dims as 1): what one row
/// costs this model on one thread. The session must be single-threaded.
pub fn single_row_cost(
    session: &mut Session,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> Result<std::time::Duration> {
    let tensors = crate::tensor::zeros(inputs, 1);
    // The first run warms the session up and is not counted. The best of several runs
    // is the cost without the noise of a busy machine; a light model gets up to 16
    // tries within 20 ms (a preempted try must not make it look heavy), a heavy one
    // stops after 3 so that loading it is not slowed down.
    run(session, &tensors, outputs)?;
    let started = std::time::Instant::now();
    let mut best = std::time::Duration::MAX;
    for i in 0..16 {
        let t = std::time::Instant::now();
        run(session, &tensors, outputs)?;
        best = best.min(t.elapsed());
        if i >= 2 && started.elapsed() > std::time::Duration::from_millis(20) {
            break;
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn library() -> Vec<u8> {
        std::fs::read(Path::new(CHECKOUT_LIB_DIR).join(LIB_NAME))
            .expect("scripts/fetch-onnxruntime.sh put the library in .onnxruntime/")
    }

    #[test]
    fn elf_checks_accept_the_real_library_and_refuse_broken_ones() {
        let lib = library();
        let len = lib.len() as u64;
        assert_eq!(elf_problem(&lib[..64 * 1024], len), None);
        // Cut anywhere past the headers: still described as longer than it is.
        for cut in [len / 2, len - 1, 70_000] {
            let why = elf_problem(&lib[..64 * 1024], cut).expect("truncated");
            assert!(why.contains("truncated"), "{why}");
        }
        let why = elf_problem(b"not a library", 13).expect("text");
        assert!(why.contains("no ELF header"), "{why}");
        let mut exe = lib[..64 * 1024].to_vec();
        exe[16] = 2; // ET_EXEC
        assert!(elf_problem(&exe, len).is_some_and(|w| w.contains("not a shared")));
        let mut other = lib[..64 * 1024].to_vec();
        other[18] = 40; // ARM
        assert!(elf_problem(&other, len).is_some_and(|w| w.contains("architecture")));
    }

    #[test]
    fn dlopen_failures_carry_the_loaders_message() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lib.so");
        std::fs::write(&p, b"\x7fELF").unwrap();
        let e = dlopen_check(&p).unwrap_err();
        assert!(e.contains("lib.so"), "{e}");
        assert_ne!(e, "dlopen failed");
    }
}

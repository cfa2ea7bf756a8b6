//! Preparing one version off to the side: check its files (completeness, checksum),
//! create its sessions and workers, check its interface, and warm it up. Only a version
//! that passes all of it is ever published.

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::settings::{DeclaredTensor, ModelSettings};
use super::{MODEL_FILE, ModelVersion, VersionStats, scan::Fingerprint};
use crate::batcher::{Submit, WorkerPool};
use crate::error::{Error, Result};
use crate::metrics;
use crate::tensor::{DataType, TensorSpec, zeros};

/// Loads, validates and warms up a version. Blocking; needs a tokio runtime context
/// (the batching task) but must not run on an async thread (it waits for warm-up).
pub fn load_version(
    model: &str,
    version: u64,
    dir: &Path,
    settings: &ModelSettings,
    fingerprint: Fingerprint,
    env: &ort::environment::Environment,
) -> Result<ModelVersion> {
    let started = Instant::now();
    if fingerprint.too_many_files() {
        return Err(Error::Config(format!(
            "{} holds more than {} files",
            dir.display(),
            super::scan::MAX_FILES_PER_VERSION
        )));
    }
    let path = dir.join(MODEL_FILE);
    if !path.exists() {
        return Err(Error::Config(format!("{} is missing", path.display())));
    }
    if !path.is_file() {
        return Err(Error::Config(format!(
            "{} is not a readable file",
            path.display()
        )));
    }
    verify_checksum(&path)?;
    // Before the sessions: a malformed model.toml fails the load at once, cheaply.
    let lineage = crate::lineage::Lineage::read(dir)?.map(std::sync::Arc::new);
    let label = format!("{model}-{version}");
    let version_str = version.to_string();
    let batch_metrics = crate::batcher::BatchMetrics::new(model, &version_str);
    let (pool, inputs, outputs) =
        WorkerPool::start(&label, &path, &settings.pool(), env, batch_metrics)?;
    if let Some(t) = inputs
        .iter()
        .chain(&outputs)
        .find(|t| t.dtype == DataType::Bytes)
    {
        return Err(Error::Config(format!(
            "tensor '{}' is of type BYTES (string), which is not supported yet",
            t.name
        )));
    }
    check_interface(settings, &inputs, &outputs)?;
    let drift = crate::drift::VersionDrift::load(model, version, dir, &inputs);
    let mut capture = crate::capture::VersionCapture::new(model, version, &inputs, &outputs);
    capture.reference = drift.profile.as_ref().and_then(|p| p.quality);
    let capture = std::sync::Arc::new(capture);
    let mv = ModelVersion {
        model: model.to_string(),
        version,
        path,
        inputs,
        outputs,
        settings: settings.clone(),
        pool,
        stats: VersionStats::default(),
        metrics: metrics::VersionMetrics::new(model, &version_str),
        counters: crate::routing::counters::Counters::default(),
        drift,
        capture,
        fingerprint,
        version_str,
        lineage,
    };
    metrics::record_load(model, started.elapsed());
    if settings.warmup {
        let t = Instant::now();
        warm_up(&mv)?;
        metrics::record_warmup(model, t.elapsed());
    }
    Ok(mv)
}

/// Verifies `model.onnx.sha256` (hex digest, optionally followed by a file name, as
/// `sha256sum` writes it) when the file is present.
fn verify_checksum(model: &Path) -> Result<()> {
    let sum_path = model.with_file_name(format!("{MODEL_FILE}.sha256"));
    let Ok(text) = std::fs::read_to_string(&sum_path) else {
        return Ok(());
    };
    let want = text
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut file = std::fs::File::open(model)
        .map_err(|e| Error::Config(format!("{}: {e}", model.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| Error::Config(format!("{}: {e}", model.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let got = hex::encode(hasher.finalize());
    if got != want {
        return Err(Error::Config(format!(
            "{} does not match {}: sha256 is {got}",
            model.display(),
            sum_path.display()
        )));
    }
    Ok(())
}

/// Checks a model's interface against the one config.toml declares, when it declares
/// one. Inputs: exactly the model's (every input declared, none missing; order free).
/// Outputs: at least these (every declared output exists; the model may have more, a
/// client asks for the ones it wants). Each declared tensor must have the model's
/// datatype and shape exactly, -1 standing for a dynamic dimension. The message names
/// every tensor that does not match.
pub fn check_interface(
    settings: &ModelSettings,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> Result<()> {
    let mut problems = Vec::new();
    if let Some(declared) = settings.input.as_deref() {
        compare("input", declared, inputs, &mut problems);
        for t in inputs {
            if !declared.iter().any(|d| d.name == t.name) {
                problems.push(format!(
                    "input '{}' ({}) of the model is not declared",
                    t.name,
                    describe(t.dtype.as_str(), &t.shape)
                ));
            }
        }
    }
    if let Some(declared) = settings.output.as_deref() {
        compare("output", declared, outputs, &mut problems);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "the model does not match the declared interface: {}",
            problems.join("; ")
        )))
    }
}

/// Every declared tensor exists in `actual` with its datatype and shape.
fn compare(kind: &str, declared: &[DeclaredTensor], actual: &[TensorSpec], out: &mut Vec<String>) {
    for d in declared {
        match actual.iter().find(|t| t.name == d.name) {
            None => out.push(format!(
                "{kind} '{}' is declared but the model has no such {kind} (its {kind}s: {})",
                d.name,
                actual
                    .iter()
                    .map(|t| format!("'{}' {}", t.name, describe(t.dtype.as_str(), &t.shape)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Some(t) if DataType::parse(&d.datatype) != Some(t.dtype) || d.shape != t.shape => {
                out.push(format!(
                    "{kind} '{}' is {} in the model, declared {}",
                    d.name,
                    describe(t.dtype.as_str(), &t.shape),
                    describe(&d.datatype, &d.shape)
                ));
            }
            Some(_) => {}
        }
    }
}

fn describe(datatype: &str, shape: &[i64]) -> String {
    format!("{datatype} {shape:?}")
}

/// Zero-filled runs through the real queue and workers, one per batch size the batcher
/// will use, so the first real request does not pay for ORT's lazy initialisation.
fn warm_up(mv: &ModelVersion) -> Result<()> {
    let sizes: Vec<usize> = if !mv.pool.batching() {
        vec![1]
    } else if !mv.settings.warmup_batch_sizes.is_empty() {
        mv.settings.warmup_batch_sizes.clone()
    } else {
        let mut s = vec![1];
        s.extend(&mv.settings.preferred_batch_sizes);
        s.push(mv.settings.max_batch_size);
        s.sort_unstable();
        s.dedup();
        s
    };
    for rows in sizes {
        let batching = mv.pool.batching();
        // Without batching the model's own dims rule: a dynamic first dim gets one row.
        let inputs = zeros(&mv.inputs, if batching { rows } else { 1 });
        // The highest priority, and not the default queue timeout meant for clients:
        // a warm-up run waits as long as the first runs take.
        let opts = Submit {
            outputs: None,
            timeout: Some(std::time::Duration::from_secs(600)),
            priority: 1,
            warmup: true,
        };
        mv.pool
            .submit(inputs, opts)?
            .blocking_answer()
            .map_err(|e| Error::Config(format!("warm-up with {rows} rows failed: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dtype: DataType, shape: &[i64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    fn declared(name: &str, datatype: &str, shape: &[i64]) -> DeclaredTensor {
        DeclaredTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn declared_inputs_are_exact_and_outputs_a_subset() {
        // iris: X; label and probabilities.
        let inputs = [spec("X", DataType::Fp32, &[-1, 4])];
        let outputs = [
            spec("label", DataType::Int64, &[-1]),
            spec("probabilities", DataType::Fp32, &[-1, 3]),
        ];
        let check = |input: Option<Vec<DeclaredTensor>>, output: Option<Vec<DeclaredTensor>>| {
            let s = ModelSettings {
                input,
                output,
                ..ModelSettings::default()
            };
            check_interface(&s, &inputs, &outputs).map_err(|e| e.to_string())
        };
        assert!(check(None, None).is_ok());
        assert!(check(Some(vec![declared("X", "FP32", &[-1, 4])]), None).is_ok());
        // Some outputs only: accepted.
        assert!(check(None, Some(vec![declared("label", "INT64", &[-1])])).is_ok());
        assert!(
            check(
                Some(vec![declared("X", "FP32", &[-1, 4])]),
                Some(vec![
                    declared("probabilities", "FP32", &[-1, 3]),
                    declared("label", "INT64", &[-1]),
                ])
            )
            .is_ok()
        );
        // Each mismatch names its tensor.
        for (input, output, needle) in [
            (
                Some(vec![]),
                None,
                "input 'X' (FP32 [-1, 4]) of the model is not declared",
            ),
            (
                Some(vec![declared("X", "FP64", &[-1, 4])]),
                None,
                "input 'X' is FP32 [-1, 4] in the model, declared FP64 [-1, 4]",
            ),
            (
                Some(vec![declared("X", "FP32", &[1, 4])]),
                None,
                "input 'X' is FP32 [-1, 4] in the model, declared FP32 [1, 4]",
            ),
            (
                Some(vec![
                    declared("X", "FP32", &[-1, 4]),
                    declared("Y", "FP32", &[-1]),
                ]),
                None,
                "input 'Y' is declared but the model has no such input",
            ),
            (
                None,
                Some(vec![declared("score", "FP32", &[-1])]),
                "output 'score' is declared but the model has no such output (its outputs: 'label' INT64 [-1], 'probabilities' FP32 [-1, 3])",
            ),
            (
                None,
                Some(vec![declared("label", "INT32", &[-1])]),
                "output 'label' is INT64 [-1] in the model, declared INT32 [-1]",
            ),
        ] {
            let e = check(input, output).unwrap_err();
            assert!(e.contains(needle), "{e}");
            assert!(e.contains("declared interface"), "{e}");
        }
    }
}

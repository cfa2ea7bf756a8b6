//! `modelgate profile`: a version's reference profile made from training data (a CSV or
//! `.npy` table), by running the version on it with ONNX Runtime and profiling its
//! features and predictions; with a label column, also its reference quality (accuracy
//! for classes, mean absolute error for scores) on that data.

use std::path::Path;

use super::features::Prediction;
use super::features::{feature_input, predictions_of};
use super::profile::{PROFILE_FILE, Profile, ReferenceQuality, build};
use crate::error::{Error, Result};
use crate::tensor::{DataType, Tensor};

/// A table of numbers read from a data file: rows x width, row-major, plus column names.
pub struct Table {
    pub names: Vec<String>,
    pub rows: usize,
    pub width: usize,
    pub values: Vec<f64>,
}

impl Table {
    /// Removes the column named `name` (or at 0-based index `name`) and returns its
    /// values.
    pub fn take_column(&mut self, name: &str) -> Result<Vec<f64>> {
        let c = self
            .names
            .iter()
            .position(|n| n == name)
            .or_else(|| name.parse::<usize>().ok().filter(|&i| i < self.width))
            .ok_or_else(|| {
                Error::Config(format!(
                    "--label-column {name}: no such column (the columns are {})",
                    self.names.join(", ")
                ))
            })?;
        if self.width < 2 {
            return Err(Error::Config(
                "--label-column: the data needs a feature column besides the label".into(),
            ));
        }
        let mut labels = Vec::with_capacity(self.rows);
        let mut rest = Vec::with_capacity(self.rows * (self.width - 1));
        for row in self.values.chunks_exact(self.width) {
            labels.push(row[c]);
            rest.extend(
                row.iter()
                    .enumerate()
                    .filter(|(i, _)| *i != c)
                    .map(|(_, v)| *v),
            );
        }
        self.names.remove(c);
        self.width -= 1;
        self.values = rest;
        Ok(labels)
    }
}

/// The quality of `predictions` against `labels` (row for row): accuracy for classes,
/// mean absolute error for scores.
pub fn reference_quality(predictions: &[Prediction], labels: &[f64]) -> Result<ReferenceQuality> {
    let rows = predictions.len().min(labels.len());
    if rows == 0 {
        return Err(Error::Config("--label-column: no labelled rows".into()));
    }
    let (mut correct, mut abs, mut sq, mut classes) = (0u64, 0.0f64, 0.0f64, 0usize);
    for (p, &l) in predictions.iter().zip(labels) {
        match *p {
            Prediction::Class(c) => {
                if l.fract() != 0.0 || !l.is_finite() {
                    return Err(Error::Config(format!(
                        "--label-column: {l} is not a class (the model predicts classes)"
                    )));
                }
                classes += 1;
                correct += u64::from(c as f64 == l);
            }
            Prediction::Score(v) => {
                abs += (v - l).abs();
                sq += (v - l) * (v - l);
            }
        }
    }
    let n = rows as f64;
    Ok(ReferenceQuality {
        rows: rows as u64,
        accuracy: (classes > 0).then(|| correct as f64 / n),
        mae: (classes == 0).then(|| abs / n),
        mae_var: (classes == 0).then(|| (sq / n - (abs / n).powi(2)).max(0.0)),
    })
}

/// Reads a CSV (optional header; numbers only) or a NumPy `.npy` file (2-D, float or int,
/// C order).
pub fn read_table(path: &Path) -> Result<Table> {
    let bad = |why: String| Error::Config(format!("{}: {why}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => read_npy(&bytes).map_err(bad),
        Some("csv") | Some("txt") => read_csv(&bytes).map_err(bad),
        _ => Err(bad("use a .csv or .npy file".into())),
    }
}

fn read_csv(bytes: &[u8]) -> std::result::Result<Table, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty()).peekable();
    let first: Vec<&str> = lines
        .peek()
        .ok_or("no rows")?
        .split(',')
        .map(str::trim)
        .collect();
    let header = first.iter().any(|f| f.parse::<f64>().is_err());
    let names: Vec<String> = if header {
        lines.next();
        first
            .iter()
            .map(|s| s.trim_matches('"').to_string())
            .collect()
    } else {
        (0..first.len()).map(|i| format!("x{i}")).collect()
    };
    let width = names.len();
    let mut values = Vec::new();
    let mut rows = 0;
    for (i, line) in lines.enumerate() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != width {
            return Err(format!(
                "row {} has {} fields, the first row {width}",
                i + 1,
                fields.len()
            ));
        }
        for f in fields {
            values.push(
                f.parse::<f64>()
                    .map_err(|_| format!("row {}: '{f}' is not a number", i + 1))?,
            );
        }
        rows += 1;
    }
    if rows == 0 {
        return Err("no data rows".into());
    }
    Ok(Table {
        names,
        rows,
        width,
        values,
    })
}

fn read_npy(bytes: &[u8]) -> std::result::Result<Table, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated .npy header")?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[i..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or("no descr in the .npy header")?;
    if field("fortran_order").is_some_and(|r| r.starts_with("True")) {
        return Err("Fortran-order arrays are not supported; save with C order".into());
    }
    let shape: Vec<usize> = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or("no shape in the .npy header")?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape entry '{s}'"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let (rows, width) = match shape[..] {
        [r, w] => (r, w),
        [r] => (r, 1),
        _ => return Err(format!("a 2-D array is needed, got shape {shape:?}")),
    };
    let (size, read): (usize, fn(&[u8]) -> f64) = match descr {
        "<f4" => (4, |b| {
            f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }),
        "<f8" => (8, |b| {
            f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
        }),
        "<i4" => (4, |b| {
            f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }),
        "<i8" => (8, |b| {
            i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f64
        }),
        other => return Err(format!("dtype {other} is not supported (f4, f8, i4, i8)")),
    };
    let count = rows.checked_mul(width).ok_or("shape overflows")?;
    let data = bytes.get(start + header_len..).unwrap_or_default();
    if data.len() != count.checked_mul(size).ok_or("shape overflows")? {
        return Err(format!(
            "data holds {} bytes, the shape needs {}",
            data.len(),
            count * size
        ));
    }
    Ok(Table {
        names: (0..width).map(|i| format!("x{i}")).collect(),
        rows,
        width,
        values: data.chunks_exact(size).map(read).collect(),
    })
}

/// Where `modelgate profile` finds the ground truth, when it is given one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Labels<'a> {
    /// The label column of the data (a header name or a 0-based index).
    pub column: Option<&'a str>,
    /// Held-out data with the same columns: the reference quality is measured on it
    /// rather than on the profiled data (which the model may have been trained on).
    pub validation: Option<&'a Path>,
}

/// `modelgate profile`: runs a version on a data file and writes its `profile.json`
/// (atomically). Returns where it was written and the profile.
pub fn make(
    env: &ort::environment::Environment,
    repository: &Path,
    model: &str,
    version: u64,
    data: &Path,
    bins: usize,
    labels: Labels<'_>,
) -> Result<(std::path::PathBuf, Profile)> {
    if !(2..=1000).contains(&bins) {
        return Err(Error::Config("--bins must be between 2 and 1000".into()));
    }
    if labels.validation.is_some() && labels.column.is_none() {
        return Err(Error::Config(
            "--validation-data needs --label-column".into(),
        ));
    }
    let vdir = repository.join(model).join(version.to_string());
    let onnx = vdir.join(crate::runtime::MODEL_FILE);
    if !onnx.is_file() {
        return Err(Error::Config(format!("{} is missing", onnx.display())));
    }
    let mut table = read_table(data)?;
    let truth = labels.column.map(|c| table.take_column(c)).transpose()?;
    let mut session = crate::runtime::create_session(env, &onnx, 0)?;
    let (inputs, outputs) = crate::runtime::interface(&session)?;
    let [spec] = &inputs[..] else {
        return Err(Error::Config(format!(
            "model '{model}' has {} inputs; a profile is made for a model with one 2-D input",
            inputs.len()
        )));
    };
    if feature_input(&inputs).is_none() {
        return Err(Error::Config(format!(
            "input '{}' is not a 2-D numeric tensor",
            spec.name
        )));
    }
    let output = outputs
        .first()
        .ok_or_else(|| Error::Config(format!("model '{model}' has no outputs")))?;
    let predictions = predict(&mut session, spec, &outputs, &mut table, data)?;
    let used = predictions.len();
    let mut p = build(
        model,
        version,
        &data
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        &spec.name,
        &table.names,
        used,
        &table.values[..used * table.width],
        &output.name,
        &predictions,
        bins,
    );
    p.quality = match (labels.validation, &truth, labels.column) {
        (Some(path), _, Some(column)) => {
            let mut held_out = read_table(path)?;
            let truth = held_out.take_column(column)?;
            let predicted = predict(&mut session, spec, &outputs, &mut held_out, path)?;
            Some(reference_quality(&predicted, &truth)?)
        }
        (None, Some(truth), _) => Some(reference_quality(&predictions, &truth[..used])?),
        _ => None,
    };
    let path = vdir.join(PROFILE_FILE);
    let text = serde_json::to_vec_pretty(&p).map_err(|e| Error::Internal(e.to_string()))?;
    crate::util::write_atomic(&path, &text)?;
    Ok((path, p))
}

/// Runs the version on every row of `table` (in the batches its input allows; a fixed
/// batch size leaves the last partial batch out) and returns the rows' predictions.
fn predict(
    session: &mut ort::session::Session,
    spec: &crate::tensor::TensorSpec,
    outputs: &[crate::tensor::TensorSpec],
    table: &mut Table,
    data: &Path,
) -> Result<Vec<Prediction>> {
    if spec.shape[1] >= 0 && spec.shape[1] as usize != table.width {
        return Err(Error::Config(format!(
            "{} has {} columns; input '{}' takes {}",
            data.display(),
            table.width,
            spec.name,
            spec.shape[1]
        )));
    }
    // Profile the values as the model (and the live requests) see them: "0.2" read as
    // an FP32 input is 0.2000000029..., which sits in another bin than 0.2 when the
    // data has ties at the bin edges.
    if spec.dtype == DataType::Fp32 {
        for v in &mut table.values {
            *v = f64::from(*v as f32);
        }
    }
    let chunk = if spec.shape[0] > 0 {
        spec.shape[0] as usize
    } else {
        256
    };
    let mut predictions = Vec::with_capacity(table.rows);
    let mut row = 0;
    while row + chunk <= table.rows || (spec.shape[0] < 0 && row < table.rows) {
        let n = chunk.min(table.rows - row);
        let values = &table.values[row * table.width..(row + n) * table.width];
        let t = tensor_of(&spec.name, spec.dtype, &[n, table.width], values)?;
        let out = crate::runtime::run(session, &[t], outputs)?;
        let first = out
            .first()
            .ok_or_else(|| Error::Internal("the model returned no outputs".into()))?;
        predictions.extend(predictions_of(first, usize::MAX).ok_or_else(|| {
            Error::Config(format!(
                "output '{}' is neither a class nor a score per row",
                first.name
            ))
        })?);
        row += n;
    }
    Ok(predictions)
}

/// A tensor of `dtype` holding `values` (converted).
fn tensor_of(name: &str, dtype: DataType, shape: &[usize], values: &[f64]) -> Result<Tensor> {
    let data: Vec<u8> = match dtype {
        DataType::Fp32 => values
            .iter()
            .flat_map(|&v| (v as f32).to_le_bytes())
            .collect(),
        DataType::Fp64 => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
        DataType::Int64 => values
            .iter()
            .flat_map(|&v| (v as i64).to_le_bytes())
            .collect(),
        DataType::Int32 => values
            .iter()
            .flat_map(|&v| (v as i32).to_le_bytes())
            .collect(),
        other => {
            return Err(Error::Config(format!(
                "input '{name}' is {}; profiles are made for FP32, FP64, INT64 and INT32 inputs",
                other.as_str()
            )));
        }
    };
    Ok(Tensor {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        data: bytes::Bytes::from(data),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_npy() {
        let t = read_csv(b"a,b\n1,2\n3,4.5\n").unwrap();
        assert_eq!((t.rows, t.width), (2, 2));
        assert_eq!(t.names, vec!["a", "b"]);
        assert_eq!(t.values, vec![1.0, 2.0, 3.0, 4.5]);
        assert!(read_csv(b"1,2\n3\n").is_err());
        assert!(read_csv(b"a,b\n").is_err());
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }";
        let mut npy = b"\x93NUMPY\x01\x00".to_vec();
        let padded = format!("{header:<118}\n");
        npy.extend_from_slice(&(padded.len() as u16).to_le_bytes());
        npy.extend_from_slice(padded.as_bytes());
        for v in [1.0f32, 2.0, 3.0, 4.0] {
            npy.extend_from_slice(&v.to_le_bytes());
        }
        let t = read_npy(&npy).unwrap();
        assert_eq!((t.rows, t.width), (2, 2));
        assert_eq!(t.values, vec![1.0, 2.0, 3.0, 4.0]);
        npy.pop();
        assert!(read_npy(&npy).is_err());
        assert!(read_npy(b"\x93NUMPY\x01\x00\xff\xff").is_err());
    }

    #[test]
    fn a_label_column_is_taken_out_and_measures_the_reference_quality() {
        let mut t = read_csv(b"a,label,b\n1,0,2\n3,1,4.5\n5,1,6\n").unwrap();
        assert_eq!(t.take_column("label").unwrap(), vec![0.0, 1.0, 1.0]);
        assert_eq!(
            (t.width, t.names.clone()),
            (2, vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(t.values, vec![1.0, 2.0, 3.0, 4.5, 5.0, 6.0]);
        // By index too; an unknown column is named in the error.
        assert_eq!(t.take_column("0").unwrap(), vec![1.0, 3.0, 5.0]);
        let e = t.take_column("species").unwrap_err().to_string();
        assert!(e.contains("no such column") && e.contains('b'), "{e}");
        let q = reference_quality(
            &[
                Prediction::Class(0),
                Prediction::Class(1),
                Prediction::Class(0),
            ],
            &[0.0, 1.0, 1.0],
        )
        .unwrap();
        assert_eq!((q.rows, q.mae), (3, None));
        assert!((q.accuracy.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        let q = reference_quality(
            &[Prediction::Score(1.0), Prediction::Score(3.0)],
            &[1.5, 2.0],
        )
        .unwrap();
        assert_eq!(
            (q.accuracy, q.mae, q.mae_var),
            (None, Some(0.75), Some(0.0625))
        );
        // A fractional label for a classifier is refused.
        assert!(reference_quality(&[Prediction::Class(1)], &[0.5]).is_err());
    }
}

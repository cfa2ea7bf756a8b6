//! Reference profiles (`<version>/profile.json`): what a version's inputs and predictions
//! looked like on its training data, and the extraction of the same values from live
//! requests.
//!
//! Features are the columns of the model's first 2-D numeric input; the prediction is
//! the first output read as a class (an integer or bool output, or the argmax of a float
//! output with several columns) or as a score (a float output with one value per row).
//! Each feature keeps quantile bins (for PSI), moments, and a sample of at most
//! [`SAMPLE_MAX`] values (for Kolmogorov-Smirnov).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::stats;
use crate::error::{Error, Result};
use crate::tensor::{DataType, Tensor, TensorSpec};

/// The profile file inside a version folder.
pub const PROFILE_FILE: &str = "profile.json";
/// Most reference values kept per feature for the KS test.
pub const SAMPLE_MAX: usize = 1000;
/// Largest profile file read.
const MAX_PROFILE_BYTES: u64 = 16 << 20;
/// Most features profiled (and tested).
pub const MAX_FEATURES: usize = 1024;

/// A version's reference profile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Format version (1).
    pub format: u32,
    pub model: String,
    pub version: u64,
    pub created_at: String,
    /// Where it came from: a data file's name, or `live` (the first live requests).
    pub source: String,
    /// Rows it was computed from.
    pub rows: u64,
    /// The input whose columns are the features.
    pub input: String,
    pub features: Vec<FeatureProfile>,
    pub prediction: Option<PredictionProfile>,
}

/// One feature (or a score prediction): bins, moments and a sample.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeatureProfile {
    pub name: String,
    /// Inner bin edges (sorted, distinct): bin i is (edges[i-1], edges[i]].
    pub edges: Vec<f64>,
    /// Share of the reference rows in each bin (edges.len() + 1 values).
    pub proportions: Vec<f64>,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    /// Up to SAMPLE_MAX reference values, evenly spaced through the data.
    pub sample: Vec<f64>,
}

/// The reference distribution of predictions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum PredictionProfile {
    /// Predicted classes and their shares.
    Classes {
        output: String,
        classes: Vec<i64>,
        proportions: Vec<f64>,
    },
    /// A score, profiled as a feature.
    Scores {
        output: String,
        profile: FeatureProfile,
    },
}

/// One row's prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Prediction {
    Class(i64),
    Score(f64),
}

/// Reads and checks `<version dir>/profile.json`; `None` when there is none.
pub fn load(version_dir: &Path) -> Result<Option<Profile>> {
    let path = version_dir.join(PROFILE_FILE);
    let bad = |why: String| Error::Config(format!("{}: {why}", path.display()));
    match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
        Ok(m) if m.len() > MAX_PROFILE_BYTES => {
            return Err(bad(format!("larger than {MAX_PROFILE_BYTES} bytes")));
        }
        Ok(_) => {}
    }
    let text = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    let profile: Profile = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    profile.validate().map_err(|e| bad(e.to_string()))?;
    Ok(Some(profile))
}

impl Profile {
    /// Checks the invariants the detector relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::Config(why));
        if self.format != 1 {
            return bad(format!("format {} is not supported (1 is)", self.format));
        }
        if self.features.is_empty() || self.features.len() > MAX_FEATURES {
            return bad(format!("needs 1 to {MAX_FEATURES} features"));
        }
        for f in &self.features {
            f.validate()?;
        }
        match &self.prediction {
            Some(PredictionProfile::Classes {
                classes,
                proportions,
                ..
            }) => {
                if classes.is_empty()
                    || classes.len() != proportions.len()
                    || classes.len() > 65_536
                {
                    return bad("prediction: classes and proportions must match".into());
                }
                check_proportions("prediction", proportions)?;
            }
            Some(PredictionProfile::Scores { profile, .. }) => profile.validate()?,
            None => {}
        }
        Ok(())
    }
}

fn check_proportions(what: &str, p: &[f64]) -> Result<()> {
    let sum: f64 = p.iter().sum();
    if p.iter().any(|x| !(0.0..=1.0).contains(x)) || (sum - 1.0).abs() > 1e-6 {
        return Err(Error::Config(format!(
            "{what}: proportions must be between 0 and 1 and sum to 1"
        )));
    }
    Ok(())
}

impl FeatureProfile {
    fn validate(&self) -> Result<()> {
        let what = format!("feature '{}'", self.name);
        let bad = |why: &str| Err(Error::Config(format!("{what}: {why}")));
        if self.edges.len() > 1000 || self.proportions.len() != self.edges.len() + 1 {
            return bad("needs at most 1000 edges and one proportion more than edges");
        }
        if self.edges.iter().any(|e| !e.is_finite()) || self.edges.windows(2).any(|w| w[0] >= w[1])
        {
            return bad("edges must be finite and strictly increasing");
        }
        if self.sample.len() > 100_000 || self.sample.iter().any(|v| !v.is_finite()) {
            return bad("sample must hold at most 100000 finite values");
        }
        if ![self.mean, self.std, self.min, self.max]
            .iter()
            .all(|v| v.is_finite())
        {
            return bad("moments must be finite");
        }
        check_proportions(&what, &self.proportions)
    }

    /// Profiles `values` into `bins` quantile bins.
    pub fn build(name: &str, values: &[f64], bins: usize) -> FeatureProfile {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let mut edges: Vec<f64> = (1..bins.max(1))
            .map(|k| quantile(&sorted, k as f64 / bins as f64))
            .collect();
        edges.dedup();
        let counts = stats::bin_counts(sorted.iter().copied(), &edges);
        let n = sorted.len().max(1) as f64;
        let mean = sorted.iter().sum::<f64>() / n;
        let var = sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let stride = sorted.len().div_ceil(SAMPLE_MAX).max(1);
        FeatureProfile {
            name: name.to_string(),
            proportions: stats::proportions(&counts),
            edges,
            mean,
            std: var.sqrt(),
            min: sorted.first().copied().unwrap_or(0.0),
            max: sorted.last().copied().unwrap_or(0.0),
            // Evenly spaced through the sorted values: a faithful picture of the ECDF.
            sample: sorted.iter().copied().step_by(stride).collect(),
        }
    }
}

/// The q-quantile of sorted values, linearly interpolated (numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Where the features of a request are: the first 2-D numeric input.
pub fn feature_input(specs: &[TensorSpec]) -> Option<usize> {
    specs
        .iter()
        .position(|s| s.shape.len() == 2 && s.dtype != DataType::Bytes)
}

/// Reads element `i` of a tensor as f64 (None for BYTES or out of range).
fn element(t: &Tensor, i: usize) -> Option<f64> {
    let size = t.dtype.size()?;
    let b = t.data.get(i * size..(i + 1) * size)?;
    let arr = |n: usize| -> [u8; 8] {
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(&b[..n]);
        a
    };
    Some(match t.dtype {
        DataType::Bool => f64::from(b[0] != 0),
        DataType::Uint8 => f64::from(b[0]),
        DataType::Int8 => f64::from(b[0] as i8),
        DataType::Uint16 => f64::from(u16::from_le_bytes([b[0], b[1]])),
        DataType::Int16 => f64::from(i16::from_le_bytes([b[0], b[1]])),
        DataType::Uint32 => f64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        DataType::Int32 => f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        DataType::Uint64 => u64::from_le_bytes(arr(8)) as f64,
        DataType::Int64 => i64::from_le_bytes(arr(8)) as f64,
        DataType::Fp16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
        DataType::Fp32 => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        DataType::Fp64 => f64::from_le_bytes(arr(8)),
        DataType::Bytes => return None,
    })
}

/// The features of a request, row-major (`rows x width`), from the input at `index`;
/// at most `max_rows` rows.
pub fn features_of(t: &Tensor, max_rows: usize) -> Option<(usize, usize, Vec<f64>)> {
    if t.shape.len() != 2 {
        return None;
    }
    let (rows, width) = (t.shape[0].min(max_rows), t.shape[1]);
    let values = (0..rows * width)
        .map(|i| element(t, i))
        .collect::<Option<Vec<f64>>>()?;
    Some((rows, width, values))
}

/// The predictions of a request, one per row, from its first output; at most `max_rows`.
pub fn predictions_of(t: &Tensor, max_rows: usize) -> Option<Vec<Prediction>> {
    let rows = t.shape.first().copied().unwrap_or(1).max(1);
    let count = t.element_count();
    if count == 0 || !count.is_multiple_of(rows) {
        return None;
    }
    let width = count / rows;
    let take = rows.min(max_rows);
    let float = matches!(t.dtype, DataType::Fp16 | DataType::Fp32 | DataType::Fp64);
    (0..take)
        .map(|r| {
            if !float {
                (width == 1).then(|| element(t, r).map(|v| Prediction::Class(v as i64)))?
            } else if width == 1 {
                element(t, r).map(Prediction::Score)
            } else {
                let mut best = (0usize, f64::NEG_INFINITY);
                for c in 0..width {
                    let v = element(t, r * width + c)?;
                    if v > best.1 {
                        best = (c, v);
                    }
                }
                Some(Prediction::Class(best.0 as i64))
            }
        })
        .collect()
}

/// Builds a profile from feature rows and predictions.
#[allow(clippy::too_many_arguments)]
pub fn build(
    model: &str,
    version: u64,
    source: &str,
    input: &str,
    names: &[String],
    rows: usize,
    features: &[f64],
    output: &str,
    predictions: &[Prediction],
    bins: usize,
) -> Profile {
    let width = names.len();
    let feature_profiles = names
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let column: Vec<f64> = (0..rows).map(|r| features[r * width + c]).collect();
            FeatureProfile::build(name, &column, bins)
        })
        .collect();
    let prediction = if predictions.is_empty() {
        None
    } else if predictions
        .iter()
        .all(|p| matches!(p, Prediction::Class(_)))
    {
        let mut counts: std::collections::BTreeMap<i64, u64> = Default::default();
        for p in predictions {
            if let Prediction::Class(c) = p {
                *counts.entry(*c).or_default() += 1;
            }
        }
        let total = predictions.len() as f64;
        Some(PredictionProfile::Classes {
            output: output.to_string(),
            classes: counts.keys().copied().collect(),
            proportions: counts.values().map(|&c| c as f64 / total).collect(),
        })
    } else {
        let scores: Vec<f64> = predictions
            .iter()
            .map(|p| match p {
                Prediction::Score(s) => *s,
                Prediction::Class(c) => *c as f64,
            })
            .collect();
        Some(PredictionProfile::Scores {
            output: output.to_string(),
            profile: FeatureProfile::build(output, &scores, bins),
        })
    };
    Profile {
        format: 1,
        model: model.to_string(),
        version,
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        source: source.to_string(),
        rows: rows as u64,
        input: input.to_string(),
        features: feature_profiles,
        prediction,
    }
}

/// A table of numbers read from a data file: rows x width, row-major, plus column names.
pub struct Table {
    pub names: Vec<String>,
    pub rows: usize,
    pub width: usize,
    pub values: Vec<f64>,
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

/// `modelgate profile`: runs a version on a data file and writes its `profile.json`
/// (atomically). Returns where it was written and the profile.
pub fn make(
    env: &ort::environment::Environment,
    repository: &Path,
    model: &str,
    version: u64,
    data: &Path,
    bins: usize,
) -> Result<(std::path::PathBuf, Profile)> {
    if !(2..=1000).contains(&bins) {
        return Err(Error::Config("--bins must be between 2 and 1000".into()));
    }
    let vdir = repository.join(model).join(version.to_string());
    let onnx = vdir.join(crate::registry::MODEL_FILE);
    if !onnx.is_file() {
        return Err(Error::Config(format!("{} is missing", onnx.display())));
    }
    let mut table = read_table(data)?;
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
    let output = outputs
        .first()
        .ok_or_else(|| Error::Config(format!("model '{model}' has no outputs")))?;
    let mut predictions = Vec::with_capacity(table.rows);
    let mut row = 0;
    while row + chunk <= table.rows || (spec.shape[0] < 0 && row < table.rows) {
        let n = chunk.min(table.rows - row);
        let values = &table.values[row * table.width..(row + n) * table.width];
        let t = tensor_of(&spec.name, spec.dtype, &[n, table.width], values)?;
        let out = crate::runtime::run(&mut session, &[t], &outputs)?;
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
    let used = row;
    let p = build(
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
    let path = vdir.join(PROFILE_FILE);
    let text = serde_json::to_vec_pretty(&p).map_err(|e| Error::Internal(e.to_string()))?;
    crate::routing::store::write_atomic(&path, &text)?;
    Ok((path, p))
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
    fn feature_profile_bins_and_sample() {
        let values: Vec<f64> = (0..5000).map(|i| f64::from(i % 100)).collect();
        let f = FeatureProfile::build("x", &values, 10);
        assert_eq!(f.edges.len(), 9);
        assert_eq!(f.proportions.len(), 10);
        assert!(
            f.proportions.iter().all(|p| (p - 0.1).abs() < 0.011),
            "{:?}",
            f.proportions
        );
        assert!(f.sample.len() <= SAMPLE_MAX);
        assert!((f.mean - 49.5).abs() < 1e-9);
        f.validate().unwrap();
        // Few distinct values: duplicate edges collapse.
        let f = FeatureProfile::build("y", &[1.0, 1.0, 1.0, 2.0], 10);
        assert!(f.edges.windows(2).all(|w| w[0] < w[1]));
        f.validate().unwrap();
    }

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
    fn predictions_from_outputs() {
        let labels = Tensor {
            name: "label".into(),
            dtype: DataType::Int64,
            shape: vec![2],
            data: bytes::Bytes::from(
                [2i64, 0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
        };
        assert_eq!(
            predictions_of(&labels, 10),
            Some(vec![Prediction::Class(2), Prediction::Class(0)])
        );
        let probs = Tensor {
            name: "p".into(),
            dtype: DataType::Fp32,
            shape: vec![1, 3],
            data: bytes::Bytes::from(
                [0.1f32, 0.7, 0.2]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
        };
        assert_eq!(predictions_of(&probs, 10), Some(vec![Prediction::Class(1)]));
        let x = Tensor {
            name: "x".into(),
            dtype: DataType::Fp32,
            shape: vec![2, 2],
            data: bytes::Bytes::from(
                [1f32, 2., 3., 4.]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
        };
        assert_eq!(features_of(&x, 1), Some((1, 2, vec![1.0, 2.0])));
    }
}

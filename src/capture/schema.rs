//! The Arrow schema of a version's capture dataset and of the feedback dataset, and
//! the conversion of buffered rows into record batches.
//!
//! One Parquet row per request. Metadata columns first (`id`, `time` UTC milliseconds,
//! `model`, `version`, `variant`, `routing_key`, `error`, `inference_us`, `total_us`),
//! then two columns per input and per output tensor: `<name>` holds the tensor's elements
//! flattened row-major as a list of its element type, `<name>__shape` its shape (a list
//! of int64), so that pandas, pyarrow, DuckDB and Spark read lists of numbers they know
//! and `np.reshape` restores the tensor. FP16 is stored as float32 (exact: every FP16
//! value is a float32 value, and DuckDB and Spark have no half floats). A tensor whose
//! name clashes with a metadata column or with an input is prefixed `input__` /
//! `output__`. An output the client did not ask for, and every output of a failed
//! request, is null.

use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Float32Builder, Float64Builder, Int8Builder, Int16Builder, Int32Builder,
    Int64Builder, ListBuilder, UInt8Builder, UInt16Builder, UInt32Builder, UInt64Builder,
};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow_schema::{DataType as Arrow, Field, Schema, TimeUnit};

use super::Record;
use crate::error::{Error, Result};
use crate::tensor::{DataType, Tensor, TensorSpec};

/// Metadata columns of a capture dataset, in order.
pub const META_COLUMNS: [&str; 9] = [
    "id",
    "time",
    "model",
    "version",
    "variant",
    "routing_key",
    "error",
    "inference_us",
    "total_us",
];

/// The Arrow element type a tensor's datatype is stored as.
pub fn element_type(d: DataType) -> Arrow {
    match d {
        DataType::Bool => Arrow::Boolean,
        DataType::Uint8 => Arrow::UInt8,
        DataType::Uint16 => Arrow::UInt16,
        DataType::Uint32 => Arrow::UInt32,
        DataType::Uint64 => Arrow::UInt64,
        DataType::Int8 => Arrow::Int8,
        DataType::Int16 => Arrow::Int16,
        DataType::Int32 => Arrow::Int32,
        DataType::Int64 => Arrow::Int64,
        DataType::Fp16 | DataType::Fp32 => Arrow::Float32,
        DataType::Fp64 => Arrow::Float64,
        // Not served (refused at decode); kept as bytes should it ever be.
        DataType::Bytes => Arrow::Binary,
    }
}

fn ts() -> Arrow {
    Arrow::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn list(t: Arrow) -> Arrow {
    Arrow::List(Arc::new(Field::new_list_field(t, true)))
}

/// The column names of a version's tensors: (inputs, outputs), clashes prefixed.
pub fn tensor_columns(inputs: &[TensorSpec], outputs: &[TensorSpec]) -> (Vec<String>, Vec<String>) {
    let taken = |n: &str| META_COLUMNS.contains(&n) || n.ends_with("__shape");
    let ins: Vec<String> = inputs
        .iter()
        .map(|s| {
            if taken(&s.name) {
                format!("input__{}", s.name)
            } else {
                s.name.clone()
            }
        })
        .collect();
    let outs = outputs
        .iter()
        .map(|s| {
            if taken(&s.name) || ins.contains(&s.name) {
                format!("output__{}", s.name)
            } else {
                s.name.clone()
            }
        })
        .collect();
    (ins, outs)
}

/// The schema of a version's capture dataset.
pub fn capture_schema(inputs: &[TensorSpec], outputs: &[TensorSpec]) -> Arc<Schema> {
    let mut fields = vec![
        Field::new("id", Arrow::Utf8, false),
        Field::new("time", ts(), false),
        Field::new("model", Arrow::Utf8, false),
        Field::new("version", Arrow::Int64, false),
        Field::new("variant", Arrow::Utf8, false),
        Field::new("routing_key", Arrow::Utf8, true),
        Field::new("error", Arrow::Utf8, true),
        Field::new("inference_us", Arrow::Int64, false),
        Field::new("total_us", Arrow::Int64, false),
    ];
    let (ins, outs) = tensor_columns(inputs, outputs);
    for (spec, name) in inputs.iter().zip(&ins).chain(outputs.iter().zip(&outs)) {
        fields.push(Field::new(name, list(element_type(spec.dtype)), true));
        fields.push(Field::new(
            format!("{name}__shape"),
            list(Arrow::Int64),
            true,
        ));
    }
    Arc::new(Schema::new(fields))
}

/// The part of a tensor that is kept: its first `max_rows` rows (0 = all), and the
/// shape of that part.
fn kept(t: &Tensor, max_rows: usize) -> (&[u8], Vec<usize>) {
    let mut shape = t.shape.clone();
    let Some(&rows) = shape.first() else {
        return (&t.data, shape);
    };
    if max_rows == 0 || rows <= max_rows || t.shape.len() < 2 {
        return (&t.data, shape);
    }
    let per_row = t.data.len() / rows.max(1);
    shape[0] = max_rows;
    (&t.data[..(per_row * max_rows).min(t.data.len())], shape)
}

macro_rules! list_column {
    ($builder:ty, $tensors:expr, $size:expr, $conv:expr) => {{
        let mut b = ListBuilder::new(<$builder>::new());
        for t in $tensors {
            match t {
                Some((data, _)) => {
                    for c in data.chunks_exact($size) {
                        b.values().append_value($conv(c));
                    }
                    b.append(true);
                }
                None => b.append(false),
            }
        }
        Arc::new(b.finish()) as ArrayRef
    }};
}

/// The values column of one tensor over the buffered records.
fn values_column(dtype: DataType, tensors: &[Option<(&[u8], Vec<usize>)>]) -> ArrayRef {
    let it = tensors.iter().map(|t| t.as_ref().map(|(d, s)| (*d, s)));
    match dtype {
        DataType::Bool => list_column!(BooleanBuilder, it, 1, |c: &[u8]| c[0] != 0),
        DataType::Uint8 => list_column!(UInt8Builder, it, 1, |c: &[u8]| c[0]),
        DataType::Int8 => list_column!(Int8Builder, it, 1, |c: &[u8]| c[0] as i8),
        DataType::Uint16 => {
            list_column!(UInt16Builder, it, 2, |c: &[u8]| u16::from_le_bytes([
                c[0], c[1]
            ]))
        }
        DataType::Int16 => {
            list_column!(Int16Builder, it, 2, |c: &[u8]| i16::from_le_bytes([
                c[0], c[1]
            ]))
        }
        DataType::Uint32 => list_column!(UInt32Builder, it, 4, |c: &[u8]| u32::from_le_bytes([
            c[0], c[1], c[2], c[3]
        ])),
        DataType::Int32 => list_column!(Int32Builder, it, 4, |c: &[u8]| i32::from_le_bytes([
            c[0], c[1], c[2], c[3]
        ])),
        DataType::Uint64 => list_column!(UInt64Builder, it, 8, |c: &[u8]| u64::from_le_bytes([
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
        ])),
        DataType::Int64 => list_column!(Int64Builder, it, 8, |c: &[u8]| i64::from_le_bytes([
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
        ])),
        DataType::Fp16 => list_column!(Float32Builder, it, 2, |c: &[u8]| half::f16::from_le_bytes(
            [c[0], c[1]]
        )
        .to_f32()),
        DataType::Fp32 => list_column!(Float32Builder, it, 4, |c: &[u8]| f32::from_le_bytes([
            c[0], c[1], c[2], c[3]
        ])),
        DataType::Fp64 => list_column!(Float64Builder, it, 8, |c: &[u8]| f64::from_le_bytes([
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
        ])),
        DataType::Bytes => {
            // Never served; an all-null column keeps the schema.
            let mut b = ListBuilder::new(arrow_array::builder::BinaryBuilder::new());
            for _ in tensors {
                b.append(false);
            }
            Arc::new(b.finish()) as ArrayRef
        }
    }
}

fn shape_column(tensors: &[Option<(&[u8], Vec<usize>)>]) -> ArrayRef {
    let mut b = ListBuilder::new(Int64Builder::new());
    for t in tensors {
        match t {
            Some((_, shape)) => {
                for &d in shape {
                    b.values()
                        .append_value(i64::try_from(d).unwrap_or(i64::MAX));
                }
                b.append(true);
            }
            None => b.append(false),
        }
    }
    Arc::new(b.finish())
}

/// The routing key as stored: hashed (SHA-256, the first 16 hex digits) unless the
/// model's settings keep it as sent.
pub fn stored_key(r: &Record) -> Option<String> {
    use sha2::Digest;
    r.routing_key.as_ref().map(|k| {
        if r.settings.hash_routing_key {
            hex::encode(&sha2::Sha256::digest(k.as_bytes())[..8])
        } else {
            k.clone()
        }
    })
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A record batch of buffered capture records of one version.
pub fn capture_batch(schema: &Arc<Schema>, records: &[Record]) -> Result<RecordBatch> {
    let Some(first) = records.first() else {
        return Ok(RecordBatch::new_empty(Arc::clone(schema)));
    };
    let v = &first.version;
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(records.iter().map(|r| &r.id))),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(records.iter().map(|r| int(r.time_ms)))
                .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter_values(
            records.iter().map(|r| &r.version.model),
        )),
        Arc::new(Int64Array::from_iter_values(
            records.iter().map(|r| int(r.version.version)),
        )),
        Arc::new(StringArray::from_iter_values(
            records.iter().map(|r| r.variant.as_str()),
        )),
        Arc::new(StringArray::from_iter(records.iter().map(stored_key))),
        Arc::new(StringArray::from_iter(
            records.iter().map(|r| r.error.as_deref()),
        )),
        Arc::new(Int64Array::from_iter_values(
            records.iter().map(|r| int(r.inference_us)),
        )),
        Arc::new(Int64Array::from_iter_values(
            records.iter().map(|r| int(r.total_us)),
        )),
    ];
    let specs = v
        .inputs
        .iter()
        .map(|s| (s, true))
        .chain(v.outputs.iter().map(|s| (s, false)));
    for (spec, is_input) in specs {
        let tensors: Vec<Option<(&[u8], Vec<usize>)>> = records
            .iter()
            .map(|r| {
                let pool = if is_input { &r.inputs } else { &r.outputs };
                pool.iter()
                    .find(|t| t.name == spec.name && t.dtype == spec.dtype)
                    .map(|t| kept(t, r.settings.max_rows_per_request))
            })
            .collect();
        cols.push(values_column(spec.dtype, &tensors));
        cols.push(shape_column(&tensors));
    }
    RecordBatch::try_new(Arc::clone(schema), cols)
        .map_err(|e| Error::Internal(format!("capture batch: {e}")))
}

/// One labelled row of the feedback dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackRow {
    pub id: String,
    /// When the feedback arrived (Unix ms).
    pub time_ms: u64,
    /// When the prediction was made (Unix ms).
    pub prediction_time_ms: u64,
    pub model: String,
    pub version: u64,
    pub variant: &'static str,
    /// The row of the request this label is for.
    pub row: u64,
    pub label: Option<i64>,
    pub value: Option<f64>,
    pub predicted_label: Option<i64>,
    pub predicted_value: Option<f64>,
}

/// The schema of a model's feedback dataset (`<dir>/<model>/feedback/`).
pub fn feedback_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("id", Arrow::Utf8, false),
        Field::new("time", ts(), false),
        Field::new("prediction_time", ts(), false),
        Field::new("model", Arrow::Utf8, false),
        Field::new("version", Arrow::Int64, false),
        Field::new("variant", Arrow::Utf8, false),
        Field::new("row", Arrow::Int64, false),
        Field::new("label", Arrow::Int64, true),
        Field::new("value", Arrow::Float64, true),
        Field::new("predicted_label", Arrow::Int64, true),
        Field::new("predicted_value", Arrow::Float64, true),
    ]))
}

/// A record batch of feedback rows.
pub fn feedback_batch(schema: &Arc<Schema>, rows: &[FeedbackRow]) -> Result<RecordBatch> {
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.id))),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| int(r.time_ms)))
                .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(
                rows.iter().map(|r| int(r.prediction_time_ms)),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.model))),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| int(r.version)),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.variant),
        )),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| int(r.row)),
        )),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.label))),
        Arc::new(arrow_array::Float64Array::from_iter(
            rows.iter().map(|r| r.value),
        )),
        Arc::new(Int64Array::from_iter(
            rows.iter().map(|r| r.predicted_label),
        )),
        Arc::new(arrow_array::Float64Array::from_iter(
            rows.iter().map(|r| r.predicted_value),
        )),
    ];
    RecordBatch::try_new(Arc::clone(schema), cols)
        .map_err(|e| Error::Internal(format!("feedback batch: {e}")))
}

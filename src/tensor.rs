//! Tensors as the protocols carry them, and the checks that keep bad ones out.
//!
//! A [`Tensor`] holds its elements as raw little-endian bytes (the OIP wire layout), so
//! gRPC `raw_input_contents` and HTTP binary data pass through without conversion and
//! ONNX Runtime gets them with one copy. JSON data is parsed straight into that byte
//! layout by a streaming visitor (no intermediate `serde_json::Value` tree).

use std::fmt;

use bytes::Bytes;
use serde::de::{DeserializeSeed, Error as _, SeqAccess, Visitor};

use crate::error::{Error, Result};

#[cfg(target_endian = "big")]
compile_error!("modelgate assumes a little-endian target: OIP raw tensors are little-endian");

/// Element types of the Open Inference Protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    /// Variable-length bytes: named so that it can be refused clearly (not served yet).
    Bytes,
}

impl DataType {
    /// All types, for tests and tables.
    pub const ALL: [DataType; 13] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// Parses the OIP datatype string ("FP32", "INT64", ...).
    pub fn parse(s: &str) -> Option<DataType> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// Parses a datatype and refuses what cannot be served, naming the tensor.
    pub fn parse_supported(s: &str, tensor: &str) -> Result<DataType> {
        match DataType::parse(s) {
            Some(DataType::Bytes) => Err(Error::invalid(format!(
                "input '{tensor}': datatype BYTES is not supported yet"
            ))),
            Some(d) => Ok(d),
            None => Err(Error::invalid(format!(
                "input '{tensor}': unknown datatype '{s}'"
            ))),
        }
    }

    /// The OIP name.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Triton's model-config name (`TYPE_FP32`) and enum value in model_config.proto.
    pub fn triton_type(self) -> (&'static str, i32) {
        match self {
            DataType::Bool => ("TYPE_BOOL", 1),
            DataType::Uint8 => ("TYPE_UINT8", 2),
            DataType::Uint16 => ("TYPE_UINT16", 3),
            DataType::Uint32 => ("TYPE_UINT32", 4),
            DataType::Uint64 => ("TYPE_UINT64", 5),
            DataType::Int8 => ("TYPE_INT8", 6),
            DataType::Int16 => ("TYPE_INT16", 7),
            DataType::Int32 => ("TYPE_INT32", 8),
            DataType::Int64 => ("TYPE_INT64", 9),
            DataType::Fp16 => ("TYPE_FP16", 10),
            DataType::Fp32 => ("TYPE_FP32", 11),
            DataType::Fp64 => ("TYPE_FP64", 12),
            DataType::Bytes => ("TYPE_STRING", 13),
        }
    }

    /// Bytes per element; `None` for variable-length BYTES.
    pub fn size(self) -> Option<usize> {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => Some(1),
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 => Some(2),
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => Some(4),
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => Some(8),
            DataType::Bytes => None,
        }
    }

    /// The ONNX Runtime element type, if ONNX Runtime has one we serve.
    pub fn from_ort(t: ort::value::TensorElementType) -> Option<DataType> {
        use ort::value::TensorElementType as T;
        Some(match t {
            T::Bool => DataType::Bool,
            T::Uint8 => DataType::Uint8,
            T::Uint16 => DataType::Uint16,
            T::Uint32 => DataType::Uint32,
            T::Uint64 => DataType::Uint64,
            T::Int8 => DataType::Int8,
            T::Int16 => DataType::Int16,
            T::Int32 => DataType::Int32,
            T::Int64 => DataType::Int64,
            T::Float16 => DataType::Fp16,
            T::Float32 => DataType::Fp32,
            T::Float64 => DataType::Fp64,
            T::String => DataType::Bytes,
            _ => return None,
        })
    }

    /// The ONNX Runtime element type.
    pub fn to_ort(self) -> ort::value::TensorElementType {
        use ort::value::TensorElementType as T;
        match self {
            DataType::Bool => T::Bool,
            DataType::Uint8 => T::Uint8,
            DataType::Uint16 => T::Uint16,
            DataType::Uint32 => T::Uint32,
            DataType::Uint64 => T::Uint64,
            DataType::Int8 => T::Int8,
            DataType::Int16 => T::Int16,
            DataType::Int32 => T::Int32,
            DataType::Int64 => T::Int64,
            DataType::Fp16 => T::Float16,
            DataType::Fp32 => T::Float32,
            DataType::Fp64 => T::Float64,
            DataType::Bytes => T::String,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A model's declared input or output: name, type and shape (-1 for a dynamic dim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    /// True when the first dimension is dynamic: the model takes any number of rows.
    pub fn has_batch_dim(&self) -> bool {
        self.shape.first() == Some(&-1)
    }
}

/// A tensor with its elements as raw little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<usize>,
    pub data: Bytes,
}

impl Tensor {
    /// Builds a request tensor from raw little-endian bytes, checking the shape and that
    /// the byte count is exactly what the shape and datatype need.
    pub fn from_raw(name: String, dtype: DataType, shape: &[i64], data: Bytes) -> Result<Tensor> {
        let (dims, count) = checked_shape(&name, shape)?;
        let need = byte_len(&name, dtype, count)?;
        if data.len() != need {
            return Err(Error::invalid(format!(
                "input '{name}': {} bytes of data but shape {shape:?} of {dtype} needs {need}",
                data.len()
            )));
        }
        Ok(Tensor {
            name,
            dtype,
            shape: dims,
            data,
        })
    }

    /// Number of elements.
    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Zero-filled tensors for a model's inputs (warm-up, cost probes): a dynamic first
/// dimension becomes `rows`, any other dynamic dimension 1.
pub fn zeros(specs: &[TensorSpec], rows: usize) -> Vec<Tensor> {
    specs
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec
                .shape
                .iter()
                .enumerate()
                .map(|(d, &n)| match (d, n) {
                    (0, n) if n < 0 => rows,
                    (_, n) if n < 0 => 1,
                    (_, n) => n as usize,
                })
                .collect();
            let len = shape.iter().product::<usize>() * spec.dtype.size().unwrap_or(0);
            Tensor {
                name: spec.name.clone(),
                dtype: spec.dtype,
                shape,
                data: Bytes::from(vec![0u8; len]),
            }
        })
        .collect()
}

/// Checks a request's shape: no negative dims, and the element count must not overflow.
/// Returns the shape as `usize` and the element count.
pub fn checked_shape(name: &str, shape: &[i64]) -> Result<(Vec<usize>, usize)> {
    let mut dims = Vec::with_capacity(shape.len());
    let mut count: usize = 1;
    for &d in shape {
        let d = usize::try_from(d).map_err(|_| {
            Error::invalid(format!(
                "input '{name}': shape {shape:?} has a negative dimension"
            ))
        })?;
        count = count.checked_mul(d).ok_or_else(|| {
            Error::invalid(format!(
                "input '{name}': shape {shape:?} has too many elements"
            ))
        })?;
        dims.push(d);
    }
    Ok((dims, count))
}

/// Byte size of `count` elements of `dtype`, refusing overflow.
pub fn byte_len(name: &str, dtype: DataType, count: usize) -> Result<usize> {
    let size = dtype.size().ok_or_else(|| {
        Error::invalid(format!(
            "input '{name}': datatype BYTES is not supported yet"
        ))
    })?;
    count
        .checked_mul(size)
        .ok_or_else(|| Error::invalid(format!("input '{name}': tensor is too large")))
}

/// Checks that a request tensor fits the model's declared input (type, rank, fixed dims).
pub fn check_against_spec(spec: &TensorSpec, dtype: DataType, shape: &[usize]) -> Result<()> {
    if spec.dtype != dtype {
        return Err(Error::invalid(format!(
            "input '{}': datatype {} does not match the model's {}",
            spec.name, dtype, spec.dtype
        )));
    }
    let fits = spec.shape.len() == shape.len()
        && spec
            .shape
            .iter()
            .zip(shape)
            .all(|(&want, &got)| want < 0 || usize::try_from(want).ok() == Some(got));
    if !fits {
        return Err(Error::invalid(format!(
            "input '{}': shape {:?} does not fit the model's {:?}",
            spec.name, shape, spec.shape
        )));
    }
    Ok(())
}

/// Appends typed values to a raw little-endian buffer; used by the typed gRPC contents.
pub fn extend_le<T: Copy, const N: usize>(
    out: &mut Vec<u8>,
    values: impl IntoIterator<Item = T>,
    to_bytes: impl Fn(T) -> [u8; N],
) {
    for v in values {
        out.extend_from_slice(&to_bytes(v));
    }
}

/// Parses OIP JSON `data` (flat or nested arrays) of `dtype` into raw little-endian bytes.
///
/// `expected` is the element count the shape implies; the buffer is reserved for it up
/// front (bounded, since the body size is bounded) and the count is checked at the end.
pub fn parse_json_data(name: &str, dtype: DataType, raw: &str, expected: usize) -> Result<Vec<u8>> {
    let size = dtype.size().ok_or_else(|| {
        Error::invalid(format!(
            "input '{name}': datatype BYTES is not supported yet"
        ))
    })?;
    // A JSON number is at least 2 bytes with its comma: never reserve more than the text can hold.
    let mut out = Vec::with_capacity(expected.min(raw.len() / 2 + 1).saturating_mul(size));
    let mut de = serde_json::Deserializer::from_str(raw);
    ElementSeed {
        dtype,
        out: &mut out,
        depth: 0,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end())
    .map_err(|e| Error::invalid(format!("input '{name}': bad data: {e}")))?;
    let got = out.len() / size;
    if got != expected {
        return Err(Error::invalid(format!(
            "input '{name}': data has {got} elements but the shape needs {expected}"
        )));
    }
    Ok(out)
}

/// Nesting deeper than this is refused: no tensor has that many dims, and it bounds recursion.
const MAX_JSON_DEPTH: usize = 32;

/// Streaming visitor writing JSON scalars (at any nesting) as raw bytes of one dtype.
struct ElementSeed<'a> {
    dtype: DataType,
    out: &'a mut Vec<u8>,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ElementSeed<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl ElementSeed<'_> {
    fn push_int<E: serde::de::Error>(&mut self, v: i128) -> std::result::Result<(), E> {
        let out = &mut *self.out;
        let range = || E::custom(format!("{v} is out of range for {}", self.dtype));
        match self.dtype {
            DataType::Uint8 => out.push(u8::try_from(v).map_err(|_| range())?),
            DataType::Uint16 => {
                out.extend_from_slice(&u16::try_from(v).map_err(|_| range())?.to_le_bytes())
            }
            DataType::Uint32 => {
                out.extend_from_slice(&u32::try_from(v).map_err(|_| range())?.to_le_bytes())
            }
            DataType::Uint64 => {
                out.extend_from_slice(&u64::try_from(v).map_err(|_| range())?.to_le_bytes())
            }
            DataType::Int8 => {
                out.extend_from_slice(&i8::try_from(v).map_err(|_| range())?.to_le_bytes())
            }
            DataType::Int16 => {
                out.extend_from_slice(&i16::try_from(v).map_err(|_| range())?.to_le_bytes())
            }
            DataType::Int32 => {
                out.extend_from_slice(&i32::try_from(v).map_err(|_| range())?.to_le_bytes())
            }
            DataType::Int64 => {
                out.extend_from_slice(&i64::try_from(v).map_err(|_| range())?.to_le_bytes())
            }
            // Integers are valid JSON for float tensors (`[1, 2.5]`).
            DataType::Fp16 | DataType::Fp32 | DataType::Fp64 => return self.push_float(v as f64),
            DataType::Bool => {
                return Err(E::custom(format!(
                    "expected true or false for BOOL, got {v}"
                )));
            }
            DataType::Bytes => return Err(E::custom("BYTES is not supported")),
        }
        Ok(())
    }

    fn push_float<E: serde::de::Error>(&mut self, v: f64) -> std::result::Result<(), E> {
        match self.dtype {
            DataType::Fp16 => self
                .out
                .extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
            DataType::Fp32 => self.out.extend_from_slice(&(v as f32).to_le_bytes()),
            DataType::Fp64 => self.out.extend_from_slice(&v.to_le_bytes()),
            other => {
                return Err(E::custom(format!(
                    "expected an integer for {other}, got {v}"
                )));
            }
        }
        Ok(())
    }
}

impl<'de> Visitor<'de> for ElementSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an array of {} values", self.dtype)
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> std::result::Result<(), E> {
        if self.dtype != DataType::Bool {
            return Err(E::custom(format!(
                "expected a number for {}, got {v}",
                self.dtype
            )));
        }
        self.out.push(u8::from(v));
        Ok(())
    }

    fn visit_i64<E: serde::de::Error>(mut self, v: i64) -> std::result::Result<(), E> {
        self.push_int(i128::from(v))
    }

    fn visit_u64<E: serde::de::Error>(mut self, v: u64) -> std::result::Result<(), E> {
        self.push_int(i128::from(v))
    }

    fn visit_f64<E: serde::de::Error>(mut self, v: f64) -> std::result::Result<(), E> {
        self.push_float(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        if self.depth >= MAX_JSON_DEPTH {
            return Err(A::Error::custom("data is nested too deeply"));
        }
        let (dtype, depth) = (self.dtype, self.depth + 1);
        while seq
            .next_element_seed(ElementSeed {
                dtype,
                out: &mut *self.out,
                depth,
            })?
            .is_some()
        {}
        Ok(())
    }
}

/// Writes raw little-endian elements of `dtype` as a flat JSON array into `out`.
pub fn write_json_data(out: &mut Vec<u8>, dtype: DataType, data: &[u8]) -> Result<()> {
    use serde::ser::{SerializeSeq, Serializer};
    fn chunks<const N: usize>(data: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        data.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
    }
    let mut ser = serde_json::Serializer::new(&mut *out);
    let n = dtype.size().map(|s| data.len() / s);
    let mut seq = ser
        .serialize_seq(n)
        .map_err(|e| Error::Internal(format!("encoding output: {e}")))?;
    let r: std::result::Result<(), serde_json::Error> =
        (|| {
            match dtype {
                DataType::Bool => data
                    .iter()
                    .try_for_each(|&b| seq.serialize_element(&(b != 0))),
                DataType::Uint8 => data.iter().try_for_each(|b| seq.serialize_element(b)),
                DataType::Int8 => data
                    .iter()
                    .try_for_each(|&b| seq.serialize_element(&(b as i8))),
                DataType::Uint16 => chunks::<2>(data)
                    .try_for_each(|c| seq.serialize_element(&u16::from_le_bytes(c))),
                DataType::Int16 => chunks::<2>(data)
                    .try_for_each(|c| seq.serialize_element(&i16::from_le_bytes(c))),
                DataType::Uint32 => chunks::<4>(data)
                    .try_for_each(|c| seq.serialize_element(&u32::from_le_bytes(c))),
                DataType::Int32 => chunks::<4>(data)
                    .try_for_each(|c| seq.serialize_element(&i32::from_le_bytes(c))),
                DataType::Uint64 => chunks::<8>(data)
                    .try_for_each(|c| seq.serialize_element(&u64::from_le_bytes(c))),
                DataType::Int64 => chunks::<8>(data)
                    .try_for_each(|c| seq.serialize_element(&i64::from_le_bytes(c))),
                DataType::Fp16 => chunks::<2>(data)
                    .try_for_each(|c| seq.serialize_element(&half::f16::from_le_bytes(c).to_f32())),
                DataType::Fp32 => chunks::<4>(data)
                    .try_for_each(|c| seq.serialize_element(&f32::from_le_bytes(c))),
                DataType::Fp64 => chunks::<8>(data)
                    .try_for_each(|c| seq.serialize_element(&f64::from_le_bytes(c))),
                DataType::Bytes => Err(serde_json::Error::custom(
                    "BYTES outputs are not supported yet",
                )),
            }?;
            Ok(())
        })();
    r.and_then(|()| seq.end())
        .map_err(|e| Error::Internal(format!("encoding output: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.as_str()), Some(d));
            assert_eq!(DataType::from_ort(d.to_ort()), Some(d));
        }
        assert_eq!(DataType::parse("FLOAT"), None);
        assert!(DataType::parse_supported("BYTES", "x").is_err());
    }

    #[test]
    fn shapes_are_checked() {
        assert_eq!(checked_shape("x", &[2, 3]).unwrap(), (vec![2, 3], 6));
        assert!(checked_shape("x", &[2, -1]).is_err());
        let e = checked_shape("x", &[1 << 40, 1 << 40]).unwrap_err();
        assert!(e.to_string().contains("too many elements"), "{e}");
        assert_eq!(checked_shape("x", &[]).unwrap(), (vec![], 1));
    }

    #[test]
    fn spec_check_names_the_problem() {
        let spec = TensorSpec {
            name: "X".into(),
            dtype: DataType::Fp32,
            shape: vec![-1, 4],
        };
        assert!(check_against_spec(&spec, DataType::Fp32, &[7, 4]).is_ok());
        let e = check_against_spec(&spec, DataType::Fp64, &[7, 4]).unwrap_err();
        assert!(e.to_string().contains("FP64"), "{e}");
        assert!(check_against_spec(&spec, DataType::Fp32, &[7, 5]).is_err());
        assert!(check_against_spec(&spec, DataType::Fp32, &[28]).is_err());
    }

    #[test]
    fn json_data_flat_and_nested() {
        let flat = parse_json_data("x", DataType::Fp32, "[1, 2.5, -3, 4]", 4).unwrap();
        let nested = parse_json_data("x", DataType::Fp32, "[[1, 2.5], [-3, 4]]", 4).unwrap();
        assert_eq!(flat, nested);
        let v: Vec<f32> = flat
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(v, vec![1.0, 2.5, -3.0, 4.0]);
        let b = parse_json_data("x", DataType::Bool, "[true, false]", 2).unwrap();
        assert_eq!(b, vec![1, 0]);
        let i = parse_json_data("x", DataType::Int64, "[-1, 9007199254740993]", 2).unwrap();
        assert_eq!(
            i64::from_le_bytes(i[8..].try_into().unwrap()),
            9007199254740993
        );
    }

    #[test]
    fn json_data_errors() {
        for (dt, raw, n, want) in [
            (DataType::Int8, "[300]", 1, "out of range"),
            (DataType::Uint8, "[-1]", 1, "out of range"),
            (DataType::Int32, "[1.5]", 1, "expected an integer"),
            (DataType::Fp32, "[true]", 1, "expected a number"),
            (DataType::Fp32, "[1, 2]", 3, "needs 3"),
            (DataType::Fp32, "[1, \"a\"]", 2, "bad data"),
            (DataType::Fp32, "[1, 2", 2, "bad data"),
            (DataType::Bytes, "[\"a\"]", 1, "BYTES"),
        ] {
            let e = parse_json_data("x", dt, raw, n).unwrap_err().to_string();
            assert!(e.contains(want), "{raw}: {e}");
        }
        let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        assert!(parse_json_data("x", DataType::Fp32, &deep, 1).is_err());
    }

    #[test]
    fn json_output_encoding() {
        let mut out = Vec::new();
        let data: Vec<u8> = [0.5f32, -1.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        write_json_data(&mut out, DataType::Fp32, &data).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "[0.5,-1.0]");
        let mut out = Vec::new();
        write_json_data(&mut out, DataType::Int64, &7i64.to_le_bytes()).unwrap();
        assert_eq!(out, b"[7]");
        let mut out = Vec::new();
        write_json_data(&mut out, DataType::Bool, &[1, 0]).unwrap();
        assert_eq!(out, b"[true,false]");
    }
}

//! The request path's side of drift detection: where a model's features are (its first
//! 2-D numeric input), and the feature rows and predictions of one request as plain
//! numbers. Nothing here allocates more than the sample it returns.

use crate::tensor::{DataType, Tensor, TensorSpec};

/// One row's prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Prediction {
    Class(i64),
    Score(f64),
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

#[cfg(test)]
mod tests {
    use super::*;

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

//! How much two answers to the same request agree.
//!
//! Outputs are matched by name. A classifier's outputs are compared per row: integer
//! and bool outputs (labels) must be equal, float outputs with several columns (scores,
//! probabilities) must have the same argmax. Float outputs of a regressor (one value per
//! row) have no label, so their mean absolute difference is the measure; it is summed
//! over every float output, classifier scores included.

use crate::tensor::{DataType, Tensor};

/// The outcome of comparing one candidate answer with a reference answer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Comparison {
    /// Rows compared.
    pub rows: u64,
    /// Rows whose label or argmax differs (classifier outputs only).
    pub disagreed_rows: u64,
    /// True when some output had labels or argmax to compare (a classifier).
    pub classifier: bool,
    /// Sum of absolute differences over every float value compared.
    pub abs_diff_sum: f64,
    /// Float values compared.
    pub values: u64,
    /// Outputs that could not be compared (missing, other type or shape).
    pub mismatched_outputs: u64,
}

/// Compares `candidate` with `reference`, output by output.
pub fn compare(reference: &[Tensor], candidate: &[Tensor]) -> Comparison {
    let mut c = Comparison::default();
    let mut row_disagrees: Vec<bool> = Vec::new();
    for r in reference {
        let Some(t) = candidate.iter().find(|t| t.name == r.name) else {
            c.mismatched_outputs += 1;
            continue;
        };
        if t.dtype != r.dtype || t.shape != r.shape {
            c.mismatched_outputs += 1;
            continue;
        }
        let rows = r.shape.first().copied().unwrap_or(1).max(1);
        let count = r.element_count();
        if count == 0 || !count.is_multiple_of(rows) {
            continue;
        }
        let width = count / rows;
        if row_disagrees.len() < rows {
            row_disagrees.resize(rows, false);
        }
        match (floats(r), floats(t)) {
            (Some(a), Some(b)) => {
                for (x, y) in a.iter().zip(&b) {
                    let d = (x - y).abs();
                    // NaN against NaN agrees; NaN against a number is as far as it gets.
                    if d.is_finite() {
                        c.abs_diff_sum += d;
                    } else if !(x.is_nan() && y.is_nan()) {
                        c.abs_diff_sum += f64::from(f32::MAX);
                    }
                }
                c.values += a.len() as u64;
                if width > 1 {
                    c.classifier = true;
                    for (row, flag) in row_disagrees.iter_mut().enumerate().take(rows) {
                        let span = row * width..(row + 1) * width;
                        if argmax(&a[span.clone()]) != argmax(&b[span]) {
                            *flag = true;
                        }
                    }
                }
            }
            _ => {
                // Labels (integers, bools): a row agrees when its bytes are equal.
                c.classifier = true;
                let row_bytes = r.data.len() / rows;
                for (row, flag) in row_disagrees.iter_mut().enumerate().take(rows) {
                    let span = row * row_bytes..(row + 1) * row_bytes;
                    if r.data.get(span.clone()) != t.data.get(span) {
                        *flag = true;
                    }
                }
            }
        }
    }
    c.rows = row_disagrees.len() as u64;
    if c.classifier {
        c.disagreed_rows = row_disagrees.iter().filter(|&&d| d).count() as u64;
    }
    c
}

/// The values of a float tensor as f64; `None` for other types.
fn floats(t: &Tensor) -> Option<Vec<f64>> {
    let d = &t.data;
    Some(match t.dtype {
        DataType::Fp32 => d
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        DataType::Fp64 => d
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect(),
        DataType::Fp16 => d
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        _ => return None,
    })
}

/// Index of the largest value (the first on ties; NaN never wins).
fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn f32t(name: &str, shape: &[usize], v: &[f32]) -> Tensor {
        Tensor {
            name: name.into(),
            dtype: DataType::Fp32,
            shape: shape.to_vec(),
            data: Bytes::from(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()),
        }
    }

    fn i64t(name: &str, v: &[i64]) -> Tensor {
        Tensor {
            name: name.into(),
            dtype: DataType::Int64,
            shape: vec![v.len()],
            data: Bytes::from(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()),
        }
    }

    #[test]
    fn labels_and_argmax() {
        let reference = [
            i64t("label", &[0, 1, 2, 1]),
            f32t("scores", &[4, 2], &[0.9, 0.1, 0.2, 0.8, 0.5, 0.4, 0.3, 0.7]),
        ];
        let candidate = [
            i64t("label", &[0, 1, 1, 1]),
            f32t("scores", &[4, 2], &[0.8, 0.2, 0.2, 0.8, 0.5, 0.4, 0.6, 0.4]),
        ];
        let c = compare(&reference, &candidate);
        assert!(c.classifier);
        assert_eq!(c.rows, 4);
        // Row 2 differs by label, row 3 by argmax.
        assert_eq!(c.disagreed_rows, 2);
        assert_eq!(c.values, 8);
        assert!((c.abs_diff_sum - (0.1 + 0.1 + 0.3 + 0.3)).abs() < 1e-6);
        assert_eq!(c.mismatched_outputs, 0);
    }

    #[test]
    fn regressor_mean_absolute_difference() {
        let c = compare(
            &[f32t("y", &[3], &[1.0, 2.0, 3.0])],
            &[f32t("y", &[3], &[1.5, 2.0, 2.0])],
        );
        assert!(!c.classifier);
        assert_eq!(c.disagreed_rows, 0);
        assert_eq!(c.rows, 3);
        assert!((c.abs_diff_sum / c.values as f64 - 0.5).abs() < 1e-9);
    }

    #[test]
    fn mismatched_outputs_are_counted_not_compared() {
        let c = compare(
            &[f32t("y", &[2], &[1.0, 2.0]), f32t("z", &[1], &[0.0])],
            &[f32t("y", &[2, 1], &[1.0, 2.0])],
        );
        assert_eq!(c.mismatched_outputs, 2);
        assert_eq!(c.values, 0);
    }
}

//! Request payloads: the model's declared inputs, random tensors that fit them (or a
//! request read from a file), and the three wire forms built from them once, before
//! the run: a gRPC `ModelInferRequest` with `raw_input_contents`, an OIP JSON body, and
//! a Triton binary-extension body (JSON header + raw bytes).
//!
//! Building everything up front keeps the per-request cost of the generator to a
//! refcount bump on shared `Bytes` (HTTP) or a shallow clone (gRPC).

use std::path::Path;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use modelgate::proto as pb;
use modelgate::tensor::{DataType, checked_shape, parse_json_data, write_json_data};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// A tensor as model metadata declares it (-1 for a dynamic dimension).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TensorDesc {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

/// What the model takes and gives, from its metadata.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ModelInfo {
    pub inputs: Vec<TensorDesc>,
    #[serde(default)]
    pub outputs: Vec<TensorDesc>,
}

impl From<pb::ModelMetadataResponse> for ModelInfo {
    fn from(m: pb::ModelMetadataResponse) -> Self {
        let conv = |ts: Vec<pb::model_metadata_response::TensorMetadata>| {
            ts.into_iter()
                .map(|t| TensorDesc {
                    name: t.name,
                    datatype: t.datatype,
                    shape: t.shape,
                })
                .collect()
        };
        ModelInfo {
            inputs: conv(m.inputs),
            outputs: conv(m.outputs),
        }
    }
}

/// One input tensor ready to send: concrete shape and raw little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawInput {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<i64>,
    pub data: Bytes,
}

/// The request every load-generating client sends, in protocol-neutral form.
#[derive(Debug, Clone)]
pub struct Payload {
    pub inputs: Vec<RawInput>,
    /// Outputs the request names (empty: let the server return all of them).
    pub requested_outputs: Vec<String>,
    /// Every output the model declares; the binary form asks for each as binary.
    pub model_outputs: Vec<String>,
    /// Rows per request (the first dimension of the first input), for rows/s.
    pub rows: u64,
    /// The input file's own bytes, sent unchanged as the JSON body.
    pub file_body: Option<Bytes>,
}

/// Replaces a dynamic first dimension by `rows` and every other dynamic one by 1.
pub fn concrete_shape(shape: &[i64], rows: usize) -> Vec<i64> {
    shape
        .iter()
        .enumerate()
        .map(|(i, &d)| match (i, d < 0) {
            (0, true) => i64::try_from(rows).unwrap_or(i64::MAX),
            (_, true) => 1,
            _ => d,
        })
        .collect()
}

/// `count` random elements of `dtype` as raw little-endian bytes. Floats are uniform in
/// [-1, 1); integers are small and non-negative (0..8) so index-like inputs (embedding
/// lookups, one-hot positions) stay in range; BOOL is 0 or 1.
pub fn random_bytes(dtype: DataType, count: usize, rng: &mut fastrand::Rng) -> Result<Vec<u8>> {
    let size = dtype
        .size()
        .with_context(|| format!("datatype {dtype} has no fixed size and is not supported"))?;
    let mut out = Vec::with_capacity(count.saturating_mul(size));
    let unit = |rng: &mut fastrand::Rng| rng.f64() * 2.0 - 1.0;
    for _ in 0..count {
        match dtype {
            DataType::Bool => out.push(u8::from(rng.bool())),
            DataType::Uint8 | DataType::Int8 => out.push(rng.u8(0..8)),
            DataType::Uint16 | DataType::Int16 => {
                out.extend_from_slice(&rng.u16(0..8).to_le_bytes())
            }
            DataType::Uint32 | DataType::Int32 => {
                out.extend_from_slice(&rng.u32(0..8).to_le_bytes())
            }
            DataType::Uint64 | DataType::Int64 => {
                out.extend_from_slice(&rng.u64(0..8).to_le_bytes())
            }
            DataType::Fp16 => out.extend_from_slice(&half::f16::from_f64(unit(rng)).to_le_bytes()),
            DataType::Fp32 => out.extend_from_slice(&(unit(rng) as f32).to_le_bytes()),
            DataType::Fp64 => out.extend_from_slice(&unit(rng).to_le_bytes()),
            DataType::Bytes => bail!("datatype BYTES is not supported"),
        }
    }
    Ok(out)
}

/// Random inputs for every input the model declares, with `rows` rows.
pub fn random_payload(info: &ModelInfo, rows: usize, seed: u64) -> Result<Payload> {
    if info.inputs.is_empty() {
        bail!("the model's metadata lists no inputs");
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut inputs = Vec::with_capacity(info.inputs.len());
    for desc in &info.inputs {
        let dtype = DataType::parse(&desc.datatype).with_context(|| {
            format!("input '{}': unknown datatype {}", desc.name, desc.datatype)
        })?;
        let shape = concrete_shape(&desc.shape, rows);
        let (_, count) = checked_shape(&desc.name, &shape).map_err(anyhow::Error::msg)?;
        let data = random_bytes(dtype, count, &mut rng)
            .with_context(|| format!("input '{}'", desc.name))?;
        inputs.push(RawInput {
            name: desc.name.clone(),
            dtype,
            shape,
            data: Bytes::from(data),
        });
    }
    Ok(Payload {
        rows: rows_of(&inputs),
        inputs,
        requested_outputs: Vec::new(),
        model_outputs: info.outputs.iter().map(|o| o.name.clone()).collect(),
        file_body: None,
    })
}

fn rows_of(inputs: &[RawInput]) -> u64 {
    inputs
        .first()
        .and_then(|t| t.shape.first())
        .map_or(1, |&d| u64::try_from(d).unwrap_or(0))
}

#[derive(Deserialize)]
struct FileRequest<'a> {
    #[serde(borrow)]
    inputs: Vec<FileInput<'a>>,
    #[serde(default)]
    outputs: Vec<FileOutput>,
}

#[derive(Deserialize)]
struct FileInput<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
struct FileOutput {
    name: String,
}

/// Reads an OIP JSON request body (`{"inputs":[{"name","shape","datatype","data"}]}`).
/// The JSON form sends the file unchanged; the raw forms get its data as bytes, parsed
/// by modelgate's own JSON tensor parser.
pub fn file_payload(text: &str, model_outputs: Vec<String>) -> Result<Payload> {
    let req: FileRequest<'_> =
        serde_json::from_str(text).context("the input file is not an OIP JSON request")?;
    if req.inputs.is_empty() {
        bail!("the input file has no inputs");
    }
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for input in req.inputs {
        let dtype = DataType::parse(&input.datatype).with_context(|| {
            format!(
                "input '{}': unknown datatype {}",
                input.name, input.datatype
            )
        })?;
        let (_, count) = checked_shape(&input.name, &input.shape).map_err(anyhow::Error::msg)?;
        let data = parse_json_data(&input.name, dtype, input.data.get(), count)
            .map_err(anyhow::Error::msg)?;
        inputs.push(RawInput {
            name: input.name,
            dtype,
            shape: input.shape,
            data: Bytes::from(data),
        });
    }
    Ok(Payload {
        rows: rows_of(&inputs),
        inputs,
        requested_outputs: req.outputs.into_iter().map(|o| o.name).collect(),
        model_outputs,
        file_body: Some(Bytes::copy_from_slice(text.as_bytes())),
    })
}

/// Loads `--input-file`.
pub fn load_file(path: &Path, model_outputs: Vec<String>) -> Result<Payload> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the input file {}", path.display()))?;
    file_payload(&text, model_outputs).with_context(|| path.display().to_string())
}

/// The gRPC request: tensor descriptions plus `raw_input_contents`.
pub fn grpc_request(p: &Payload, model: &str, version: Option<&str>) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: model.to_string(),
        model_version: version.unwrap_or_default().to_string(),
        inputs: p
            .inputs
            .iter()
            .map(|t| pb::model_infer_request::InferInputTensor {
                name: t.name.clone(),
                datatype: t.dtype.as_str().to_string(),
                shape: t.shape.clone(),
                ..Default::default()
            })
            .collect(),
        outputs: p
            .requested_outputs
            .iter()
            .map(|o| pb::model_infer_request::InferRequestedOutputTensor {
                name: o.clone(),
                ..Default::default()
            })
            .collect(),
        raw_input_contents: p.inputs.iter().map(|t| t.data.clone()).collect(),
        ..Default::default()
    }
}

/// The OIP JSON body: the input file as it is, or the generated tensors as flat `data`
/// arrays (outputs come back as JSON, all of them unless the payload names some).
pub fn json_body(p: &Payload) -> Result<Bytes> {
    if let Some(body) = &p.file_body {
        return Ok(body.clone());
    }
    let mut body =
        Vec::with_capacity(64 + p.inputs.iter().map(|t| t.data.len() * 12).sum::<usize>());
    body.extend_from_slice(b"{\"inputs\":[");
    for (i, t) in p.inputs.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"name\":");
        serde_json::to_writer(&mut body, &t.name)?;
        body.extend_from_slice(b",\"shape\":");
        serde_json::to_writer(&mut body, &t.shape)?;
        body.extend_from_slice(b",\"datatype\":");
        serde_json::to_writer(&mut body, t.dtype.as_str())?;
        body.extend_from_slice(b",\"data\":");
        write_json_data(&mut body, t.dtype, &t.data).map_err(anyhow::Error::msg)?;
        body.push(b'}');
    }
    body.push(b']');
    if !p.requested_outputs.is_empty() {
        body.extend_from_slice(b",\"outputs\":");
        let outs: Vec<Value> = p
            .requested_outputs
            .iter()
            .map(|o| json!({ "name": o }))
            .collect();
        serde_json::to_writer(&mut body, &outs)?;
    }
    body.push(b'}');
    Ok(Bytes::from(body))
}

/// Triton's binary tensor extension: a JSON header describing each input with
/// `parameters.binary_data_size` and asking for every output with `binary_data: true`,
/// followed by the inputs' raw bytes in order. Returns the body and the header length
/// (the `Inference-Header-Content-Length` value).
pub fn binary_body(p: &Payload) -> Result<(Bytes, usize)> {
    let inputs: Vec<Value> = p
        .inputs
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "shape": t.shape,
                "datatype": t.dtype.as_str(),
                "parameters": { "binary_data_size": t.data.len() },
            })
        })
        .collect();
    let outputs = if p.requested_outputs.is_empty() {
        &p.model_outputs
    } else {
        &p.requested_outputs
    };
    let mut head = json!({ "inputs": inputs });
    if outputs.is_empty() {
        // Output names unknown: ask for all outputs in binary at the request level.
        head["parameters"] = json!({ "binary_data_output": true });
    } else {
        head["outputs"] = outputs
            .iter()
            .map(|o| json!({ "name": o, "parameters": { "binary_data": true } }))
            .collect();
    }
    let head = serde_json::to_vec(&head)?;
    let header_len = head.len();
    let total = header_len + p.inputs.iter().map(|t| t.data.len()).sum::<usize>();
    let mut body = Vec::with_capacity(total);
    body.extend_from_slice(&head);
    for t in &p.inputs {
        body.extend_from_slice(&t.data);
    }
    Ok((Bytes::from(body), header_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelgate::api::http::{HEADER_CONTENT_LENGTH, decode_infer};

    fn desc(name: &str, dt: &str, shape: &[i64]) -> TensorDesc {
        TensorDesc {
            name: name.into(),
            datatype: dt.into(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn dynamic_dims_become_rows_then_one() {
        assert_eq!(concrete_shape(&[-1, 16], 8), vec![8, 16]);
        assert_eq!(concrete_shape(&[-1, -1, 3], 4), vec![4, 1, 3]);
        assert_eq!(concrete_shape(&[2, -1], 4), vec![2, 1]);
        assert_eq!(concrete_shape(&[], 4), Vec::<i64>::new());
    }

    #[test]
    fn random_inputs_have_the_right_shape_and_byte_size() {
        let info = ModelInfo {
            inputs: vec![
                desc("a", "FP32", &[-1, 16]),
                desc("b", "INT64", &[-1, 2, -1]),
                desc("c", "FP16", &[-1]),
                desc("d", "BOOL", &[-1, 3]),
                desc("e", "UINT8", &[5]),
                desc("f", "FP64", &[-1, 2]),
            ],
            outputs: vec![desc("y", "FP32", &[-1, 10])],
        };
        let p = random_payload(&info, 3, 7).unwrap();
        let got: Vec<(Vec<i64>, usize)> = p
            .inputs
            .iter()
            .map(|t| (t.shape.clone(), t.data.len()))
            .collect();
        assert_eq!(
            got,
            vec![
                (vec![3, 16], 3 * 16 * 4),
                (vec![3, 2, 1], 3 * 2 * 8),
                (vec![3], 3 * 2),
                (vec![3, 3], 9),
                (vec![5], 5),
                (vec![3, 2], 3 * 2 * 8),
            ]
        );
        assert_eq!(p.rows, 3);
        assert_eq!(p.model_outputs, vec!["y".to_string()]);
        // Values are in the documented ranges.
        assert!(p.inputs[0].data.chunks(4).all(|c| {
            let v = f32::from_le_bytes(c.try_into().unwrap());
            (-1.0..1.0).contains(&v)
        }));
        assert!(
            p.inputs[1]
                .data
                .chunks(8)
                .all(|c| { (0..8).contains(&i64::from_le_bytes(c.try_into().unwrap())) })
        );
        assert!(p.inputs[3].data.iter().all(|&b| b <= 1));
        // Seeded: the same seed gives the same payload, another seed does not.
        assert_eq!(random_payload(&info, 3, 7).unwrap().inputs, p.inputs);
        assert_ne!(random_payload(&info, 3, 8).unwrap().inputs[0], p.inputs[0]);
    }

    #[test]
    fn bytes_inputs_are_refused() {
        let info = ModelInfo {
            inputs: vec![desc("s", "BYTES", &[-1])],
            outputs: vec![],
        };
        let e = random_payload(&info, 1, 1).unwrap_err();
        assert!(format!("{e:#}").contains("BYTES"), "{e:#}");
    }

    fn mlp_payload() -> Payload {
        let info = ModelInfo {
            inputs: vec![desc("input", "FP32", &[-1, 16]), desc("k", "INT32", &[-1])],
            outputs: vec![desc("out1", "FP32", &[-1, 4]), desc("out2", "INT64", &[-1])],
        };
        random_payload(&info, 2, 42).unwrap()
    }

    /// The JSON and binary bodies must carry exactly the raw bytes the gRPC form sends:
    /// decode both with modelgate's own HTTP decoder and compare.
    #[test]
    fn json_and_binary_bodies_decode_to_the_same_tensors() {
        let p = mlp_payload();
        let raw: Vec<Bytes> = p.inputs.iter().map(|t| t.data.clone()).collect();

        let (req, _) = decode_infer(
            "m".into(),
            None,
            &http::HeaderMap::new(),
            json_body(&p).unwrap(),
        )
        .unwrap();
        let from_json: Vec<Bytes> = req.inputs.iter().map(|t| t.data.clone()).collect();
        assert_eq!(from_json, raw);
        assert!(req.outputs.is_empty());

        let (body, header_len) = binary_body(&p).unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert(HEADER_CONTENT_LENGTH, header_len.into());
        let (req, _) = decode_infer("m".into(), None, &headers, body.clone()).unwrap();
        let from_binary: Vec<Bytes> = req.inputs.iter().map(|t| t.data.clone()).collect();
        assert_eq!(from_binary, raw);
        assert_eq!(req.outputs, vec!["out1".to_string(), "out2".to_string()]);
        assert_eq!(req.inputs[0].shape, vec![2, 16]);

        // Framing: header, then the inputs back to back, nothing else.
        let head: Value = serde_json::from_slice(&body[..header_len]).unwrap();
        assert_eq!(
            head["inputs"][0]["parameters"]["binary_data_size"],
            2 * 16 * 4
        );
        assert_eq!(head["inputs"][1]["parameters"]["binary_data_size"], 2 * 4);
        assert_eq!(head["outputs"][1]["parameters"]["binary_data"], true);
        assert_eq!(body.len(), header_len + 2 * 16 * 4 + 2 * 4);
        assert_eq!(&body[header_len..header_len + 128], &raw[0][..]);
        assert_eq!(&body[header_len + 128..], &raw[1][..]);
    }

    #[test]
    fn binary_body_without_output_names_asks_for_all_outputs() {
        let mut p = mlp_payload();
        p.model_outputs.clear();
        let (body, header_len) = binary_body(&p).unwrap();
        let head: Value = serde_json::from_slice(&body[..header_len]).unwrap();
        assert_eq!(head["parameters"]["binary_data_output"], true);
        assert!(head.get("outputs").is_none());
    }

    #[test]
    fn grpc_request_carries_raw_contents() {
        let p = mlp_payload();
        let r = grpc_request(&p, "mlp", Some("1"));
        assert_eq!(r.model_name, "mlp");
        assert_eq!(r.model_version, "1");
        assert_eq!(r.inputs.len(), 2);
        assert_eq!(r.inputs[1].datatype, "INT32");
        assert_eq!(r.raw_input_contents[0].len(), 128);
        assert!(r.inputs.iter().all(|i| i.contents.is_none()));
        // modelgate's own decoder accepts it.
        let req = modelgate::api::grpc::decode_infer(r).unwrap();
        assert_eq!(req.inputs[0].shape, vec![2, 16]);
    }

    #[test]
    fn input_file_is_parsed_and_kept_verbatim() {
        let text = r#"{"inputs":[{"name":"X","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4.5]]}],
                       "outputs":[{"name":"label"}]}"#;
        let p = file_payload(text, vec!["label".into(), "probabilities".into()]).unwrap();
        assert_eq!(p.rows, 2);
        assert_eq!(p.requested_outputs, vec!["label".to_string()]);
        let v: Vec<f32> = p.inputs[0]
            .data
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(v, vec![1.0, 2.0, 3.0, 4.5]);
        assert_eq!(json_body(&p).unwrap(), text.as_bytes());
        // The wrong element count is caught when the file is read, not by the server.
        let bad = r#"{"inputs":[{"name":"X","shape":[2,2],"datatype":"FP32","data":[1,2,3]}]}"#;
        assert!(file_payload(bad, vec![]).is_err());
        assert!(file_payload("{\"inputs\":[]}", vec![]).is_err());
    }
}

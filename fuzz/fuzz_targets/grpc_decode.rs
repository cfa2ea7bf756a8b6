//! Protobuf ModelInferRequest bytes into tensors: decode or a clear error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = modelgate::proto::ModelInferRequest::decode(data)
        && let Ok(r) = modelgate::api::grpc::decode_infer(req)
    {
        for t in &r.inputs {
            assert_eq!(t.data.len(), t.element_count() * t.dtype.size().unwrap_or(1));
        }
    }
});

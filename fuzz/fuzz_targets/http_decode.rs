//! HTTP inference requests (JSON, or a JSON head plus binary tensors): decode or a
//! clear error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose the binary-extension head length, if any.
    let (head_len, body) = match data {
        [a, b, rest @ ..] => (Some(usize::from(*a) << 8 | usize::from(*b)), rest),
        _ => (None, data),
    };
    let mut headers = axum::http::HeaderMap::new();
    if let Some(n) = head_len.filter(|n| n % 2 == 0) {
        headers.insert(modelgate::api::http::HEADER_CONTENT_LENGTH, (n / 2).into());
    }
    if let Ok((req, _)) = modelgate::api::http::decode_infer(
        "m".into(),
        None,
        &headers,
        bytes::Bytes::copy_from_slice(body),
    ) {
        for t in &req.inputs {
            assert_eq!(t.data.len(), t.element_count() * t.dtype.size().unwrap_or(1));
        }
    }
});

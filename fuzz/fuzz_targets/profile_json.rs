//! profile.json: parse and validate, or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = serde_json::from_slice::<modelgate::drift::profile::Profile>(data) {
        let _ = p.validate();
    }
});

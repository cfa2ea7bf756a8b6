//! routing.toml: parse and validate, or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(spec) = toml::from_str::<modelgate::routing::TrafficSpec>(text)
    {
        let _ = spec.validate();
    }
});

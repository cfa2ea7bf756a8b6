//! Server config.toml and a model's config.toml: parse and validate, or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = toml::from_str::<modelgate::config::Config>(text) {
        let _ = c.limits.validate();
        let _ = c.drift.validate();
    }
    if let Ok(f) = modelgate::config::ModelConfigFile::parse(text) {
        let _ = f.resolve(&modelgate::config::ModelSettings::default());
        let _ = f.traffic();
        let _ = f.drift();
    }
});

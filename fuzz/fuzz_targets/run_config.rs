//! Run configs (TOML): any text gives a resolved config or a clear error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = toml::from_str::<prelu::run::TrainConfig>(text) {
        let _ = cfg.resolve();
    }
});

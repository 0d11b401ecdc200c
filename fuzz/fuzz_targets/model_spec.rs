//! Model specs (JSON): any text gives a model or a clear error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(spec) = serde_json::from_str::<prelu::model::ModelSpec>(text) {
        if spec.validate().is_ok() && spec.param_estimate() <= 1 << 20 {
            let _ = prelu::model::Model::new(&spec, 0, &prelu::Device::Cpu);
        }
    }
});

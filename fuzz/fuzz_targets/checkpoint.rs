//! Checkpoints and imported state dicts (safetensors): any bytes give a model
//! or a clear error, including shapes that do not match the spec, wrong
//! dtypes and huge declared sizes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prelu::model::{Arch, Model, ModelSpec};

fuzz_target!(|data: &[u8]| {
    let Ok((tensors, meta)) = prelu::store::checkpoint::parse_safetensors(data) else { return };
    // The checkpoint's own spec, when it has one that validates and is small.
    if let Some(spec) = meta.get(prelu::store::checkpoint::SPEC_KEY).and_then(|s| serde_json::from_str::<ModelSpec>(s).ok()) {
        if spec.validate().is_ok() {
            // The checks `load_model` makes before building anything.
            let fits = prelu::store::checkpoint::check_tensors(&spec, &tensors).is_ok();
            if fits && spec.param_estimate() <= 1 << 20 {
                if let Ok(m) = Model::new(&spec, 0, &candle_core_device()) {
                    let _ = m.load_state_dict(&tensors);
                }
            }
        }
    }
    // And a fixed small model, as an imported state dict would be loaded.
    let spec = ModelSpec::new(Arch::Mlp { hidden: vec![4] }, prelu::Activation::PRelu { shared: false }, [1, 2, 2], 3);
    if let Ok(m) = Model::new(&spec, 0, &candle_core_device()) {
        let _ = m.load_state_dict(&tensors);
    }
});

fn candle_core_device() -> prelu::Device {
    prelu::Device::Cpu
}

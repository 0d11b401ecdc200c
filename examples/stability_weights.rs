//! Stability of a given set of weights: per layer and per channel, the forward
//! variance factor `chi_i = g_i^2 (1 + a_i^2) / 2`, the negative-path optimal
//! slope and the measured backward gain, for a checkpoint you pass (a
//! `prelu` checkpoint, a run folder, an ONNX file, or a safetensors state dict
//! with `PRELU_SPEC=spec.json`) or, without an argument, for a 4-layer PReLU
//! MLP whose slopes are set by hand to both signs.
//!
//! `cargo run --release --example stability_weights [CHECKPOINT]` (seconds).

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{Device, Tensor};
use prelu::model::{Arch, Model, ModelSpec};
use prelu::Activation;

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let model = match std::env::args_os().nth(1).map(PathBuf::from) {
        Some(path) => {
            let spec = std::env::var_os("PRELU_SPEC").map(PathBuf::from);
            prelu::store::checkpoint::load_model_with_spec(&path, spec.as_deref())?.model
        }
        None => {
            let spec = ModelSpec::new(
                Arch::Mlp {
                    hidden: vec![64, 64, 64],
                },
                Activation::PRelu { shared: false },
                [1, 28, 28],
                10,
            );
            let m = Model::new(&spec, 3, &dev)?;
            // Slopes as a trained net may have them: a third |x|-like (-1),
            // a third ReLU-like (0), a third steeper than 1 (1.3).
            let mut sd = m.state_dict()?;
            for (name, t) in sd.iter_mut() {
                if name.starts_with("act.") {
                    let n = t.elem_count();
                    let v: Vec<f32> = (0..n).map(|c| [-1.0, 0.0, 1.3][c % 3]).collect();
                    *t = Tensor::new(v, &dev)?;
                }
            }
            m.load_state_dict(&sd)?;
            m
        }
    };
    let data = prelu::data::mnist_small()?;
    let batch = data.test.take(256);
    let (x, y) = batch.batches(256).next().expect("256 test images")?;
    let layers = prelu::analyses::stability::model_layers(&model, &x, &y, 4.0)?;
    println!(
        "{:<8} {:>4} {:>22} {:>4} {:>7} {:>7} {:>20} {:>11} {:>9}",
        "layer", "ch", "slope mean [min, max]", "a<0", "gain", "a*", "chi mean [min, max]", "chi(mean a)", "bwd gain"
    );
    for l in &layers {
        println!(
            "{:<8} {:>4} {:>7.3} [{:>6.3}, {:>5.3}] {:>4} {:>7.3} {:>7.3} {:>6.3} [{:.3}, {:.3}] {:>11.3} {:>9}",
            l.layer,
            l.channels,
            l.slope,
            l.slope_min,
            l.slope_max,
            l.slopes_negative,
            l.weight_gain,
            l.a_star,
            l.chi,
            l.chi_min,
            l.chi_max,
            l.chi_from_mean_slope,
            l.empirical_gain.map_or("-".into(), |g| format!("{g:.3}"))
        );
        if let Some(w) = &l.warning {
            println!("         warning: {w}");
        }
    }
    // The scalar-chain view of the same depth: gain of the negative path.
    let gains: Vec<f64> = layers.iter().map(|l| l.weight_gain).collect();
    let c = prelu::analyses::stability::chain(&gains, 0.25, 1e-3, 1e3);
    println!(
        "negative path with a = 0.25 through these weight gains: gain {:.3e}, a* = {:.3}",
        c.gain, c.a_star
    );
    Ok(())
}

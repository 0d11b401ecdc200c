//! The sentinel in your own training loop: a candle-nn MLP whose two PReLU
//! layers are watched through `Sentinel::from_sites`. The forward pass applies
//! each activation through the sentinel (it counts while it computes), the
//! loop hands it the gradients, and each epoch ends with per-layer reports and
//! alarms.
//!
//! The second layer starts as a "pretrained" layer would: slopes of both
//! signs (every fourth channel -1, an |x|-like unit; some 0, ReLU-like; some
//! 1.5), so its report shows the slope classes and the invertibility alarm
//! names the channels.
//!
//! `cargo run --release --example sentinel_loop` (a few seconds).

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, Optimizer, VarBuilder, VarMap, SGD};
use prelu::analyses::sentinel::ActivationSite;
use prelu::analyses::sentinel::Sentinel;
use prelu::analyses::sentinel::SentinelConfig;
use prelu::nn::init::kaiming_normal;
use prelu::prelu_layer;
use prelu::FanMode;
use prelu::PReLU;
use rand::rngs::StdRng;
use rand::SeedableRng;

struct Mlp {
    fc1: Linear,
    act1: PReLU,
    fc2: Linear,
    act2: PReLU,
    out: Linear,
}

/// A linear layer with He init for the activation after it (slope `a0`;
/// `a0 = 1` for none), sampled from the seeded `rng`: candle's own generator
/// cannot be seeded on the CPU, so `he_prelu_init` (a `candle_nn::Init`)
/// would give other numbers at each run.
fn linear(inp: usize, out: usize, a0: f64, rng: &mut StdRng, vb: VarBuilder) -> Result<Linear> {
    let init = kaiming_normal(&[out, inp], a0, FanMode::FanIn, DType::F32, &Device::Cpu, rng)?;
    let w = vb.get_with_hints((out, inp), "weight", candle_nn::Init::Const(0.0))?;
    // The var map's variable behind `w`: set it in place.
    candle_core::Var::from_tensor(&w)?.set(&init)?;
    let b = vb.get_with_hints(out, "bias", candle_nn::Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
}

impl Mlp {
    /// The forward pass with each activation applied by the sentinel.
    fn forward(&self, x: &Tensor, s: &Sentinel) -> candle_core::Result<Tensor> {
        let h = s.forward(0, &self.fc1.forward(x)?)?;
        let h = s.forward(1, &self.fc2.forward(&h)?)?;
        self.out.forward(&h)
    }
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let data = prelu::data::mnist_small()?;
    let train = data.train.take(3000);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let mut rng = StdRng::seed_from_u64(1);
    let m = Mlp {
        fc1: linear(784, 64, 0.25, &mut rng, vb.pp("fc1"))?,
        act1: prelu_layer(Some(64), vb.pp("act1"))?,
        fc2: linear(64, 32, 0.25, &mut rng, vb.pp("fc2"))?,
        act2: prelu_layer(Some(32), vb.pp("act2"))?,
        out: linear(32, 10, 1.0, &mut rng, vb.pp("out"))?,
    };
    // Slopes of both signs, set in place (the var map's variable is the layer's).
    let slopes: Vec<f32> = (0..32)
        .map(|c| match c % 8 {
            0 | 4 => -1.0,
            1 => 0.0,
            2 => 1.5,
            3 => 1.0,
            _ => 0.25,
        })
        .collect();
    m.act2.param().set(&Tensor::new(slopes, &dev)?)?;

    let mut sentinel = Sentinel::from_sites(
        vec![
            ActivationSite::prelu("act1", &m.act1, 64).with_weight(&var(&varmap, "fc1.weight")?),
            ActivationSite::prelu("act2", &m.act2, 32).with_weight(&var(&varmap, "fc2.weight")?),
        ],
        SentinelConfig::default(),
    )?;
    let mut opt = SGD::new(varmap.all_vars(), 0.05)?;
    for epoch in 1..=2 {
        let mut loss_sum = 0.0;
        let mut batches = 0;
        for b in train.batches(100) {
            let (x, y) = b?;
            let loss = candle_nn::loss::cross_entropy(&m.forward(&x, &sentinel)?, &y)?;
            let grads = loss.backward()?;
            sentinel.after_backward(&grads)?;
            opt.step(&grads)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            batches += 1;
        }
        let (layers, alarms) = sentinel.close_epoch(epoch)?;
        println!("epoch {epoch}: mean loss {:.4}", loss_sum / batches as f64);
        for l in &layers {
            let c = &l.slope_classes;
            println!(
                "  {} ({}): negative inputs {:.1}%, dead {}, stuck {}, idle {}; slopes: {} negative, {} ~0, {} ~1, {} > 1, {} <= 0; |grad W| {:.3e}",
                l.layer,
                l.kind,
                100.0 * l.negative_share,
                l.dead.len(),
                l.stuck.len(),
                l.idle.len(),
                c.negative.len(),
                c.near_zero.len(),
                c.near_one.len(),
                c.above_one.len(),
                c.non_invertible.len(),
                l.weight_grad_norm.unwrap_or(f64::NAN)
            );
        }
        for a in &alarms {
            println!("  alarm [{}] epoch {}: {}", a.kind, a.epoch, a.message);
        }
    }
    Ok(())
}

/// A variable of the var map by name (the `Var` behind a candle-nn layer's tensor).
fn var(varmap: &VarMap, name: &str) -> Result<candle_core::Var> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("var map lock poisoned"))?;
    data.get(name)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no variable `{name}` in the var map"))
}

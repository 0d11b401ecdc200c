//! PReLU in your own candle model: a 784-128-64-10 MLP written with
//! candle-nn, its PReLU layers from a `VarBuilder` (`prelu::prelu_layer`), its
//! weights from He-PReLU init as a `candle_nn::Init`, trained for one epoch on
//! 4,000 images of the built-in MNIST subset.
//!
//! `cargo run --release --example own_model` (a few seconds). Candle samples
//! `candle_nn::Init` with its own generator, which cannot be seeded on the
//! CPU, so the numbers differ a little from run to run; the `sentinel_loop`
//! example shows seeded init with `prelu::nn::init::kaiming_normal`.

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, Optimizer, VarBuilder, VarMap, SGD};
use prelu::he_prelu_init;
use prelu::prelu_layer;
use prelu::FanMode;
use prelu::PReLU;

/// A linear layer whose weights suit the PReLU(0.25) that follows it.
fn linear(inp: usize, out: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints((out, inp), "weight", he_prelu_init(0.25, FanMode::FanIn))?;
    let b = vb.get_with_hints(out, "bias", candle_nn::Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
}

struct Mlp {
    fc1: Linear,
    act1: PReLU,
    fc2: Linear,
    act2: PReLU,
    out: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(784, 128, vb.pp("fc1"))?,
            act1: prelu_layer(Some(128), vb.pp("act1"))?, // nn.PReLU(128)
            fc2: linear(128, 64, vb.pp("fc2"))?,
            act2: prelu_layer(None, vb.pp("act2"))?, // nn.PReLU(): one shared slope
            out: candle_nn::linear(64, 10, vb.pp("out"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.act1.forward(&self.fc1.forward(x)?)?;
        let h = self.act2.forward(&self.fc2.forward(&h)?)?;
        self.out.forward(&h)
    }
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let data = prelu::data::mnist_small()?;
    let (train, test) = (data.train.take(4000), data.test.take(1000));
    let varmap = VarMap::new();
    let model = Mlp::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    // Plain SGD has no weight decay, so the slopes are not pulled towards 0.
    let mut opt = SGD::new(varmap.all_vars(), 0.05)?;
    let order = prelu::run::epoch_order(train.len(), 7, 0);
    let shuffled = prelu::data::Dataset {
        images: order
            .iter()
            .flat_map(|&i| train.images[i * 784..(i + 1) * 784].iter().copied())
            .collect(),
        labels: order.iter().map(|&i| train.labels[i]).collect(),
        ..train
    };
    let mut last = 0.0;
    for (step, b) in shuffled.batches(64).enumerate() {
        let (x, y) = b?;
        let loss = candle_nn::loss::cross_entropy(&model.forward(&x)?, &y)?;
        opt.backward_step(&loss)?;
        last = loss.to_scalar::<f32>()?;
        if step % 20 == 0 {
            println!("step {step:>3}: loss {last:.4}");
        }
    }
    let (mut correct, mut n) = (0usize, 0usize);
    for b in test.batches(500) {
        let (x, y) = b?;
        let pred = model.forward(&x)?.argmax(1)?;
        correct += pred.eq(&y)?.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? as usize;
        n += y.dim(0)?;
    }
    let a1 = model.act1.slope()?.to_vec1::<f32>()?;
    let mean = a1.iter().sum::<f32>() / a1.len() as f32;
    let (lo, hi) = a1.iter().fold((f32::MAX, f32::MIN), |(l, h), &a| (l.min(a), h.max(a)));
    println!(
        "last batch loss {last:.4}; test accuracy {:.4} on {n} images",
        correct as f64 / n as f64
    );
    println!(
        "act1 slopes: mean {mean:.3} in [{lo:.3}, {hi:.3}]; act2 slope {:.3}",
        model.act2.slope()?.to_vec1::<f32>()?[0]
    );
    println!("parameters in the var map: {}", varmap.data().lock().unwrap().len());
    Ok(())
}

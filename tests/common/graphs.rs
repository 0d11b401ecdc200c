//! Random layer graphs for property tests (the fused step in tests/graph.rs,
//! the canonical form in tests/symmetry.rs), and the node helpers they use.

use prelu::graph::{Graph, Node, Op, Padding, Pair, INPUT};
use prelu::Activation;
use rand::{Rng, SeedableRng};

/// Classes of the random graphs' main head.
pub const CLASSES: usize = 5;

/// BatchNorm's eps in the random graphs: large enough that a channel of
/// near-constant values over a batch of six (after heavy pooling) does not
/// turn f32 rounding into gradient noise (`gamma / sqrt(var + eps)`).
pub const BN_EPS: f64 = 1e-2;

/// What [`random_graph`] draws. Each test file keeps its own options so that
/// a seed gives the same graph as before the generator was shared (the
/// fixed proptest seeds and the seeds of past failures stay meaningful).
pub struct GraphGen {
    /// The activations drawn from (uniformly).
    pub acts: &'static [Activation],
    /// Probability that the graph has BatchNorm after every conv/linear layer.
    pub batch_norm: f64,
    /// Most blocks (conv, residual or pool), at least one.
    pub max_blocks: usize,
    /// Sometimes a max- or avg-pool between a conv and its activation.
    pub pool_before_act: bool,
    /// Residual blocks with BatchNorm after the second conv too and an
    /// activation of their own after the add (else the inner one again).
    pub full_residual: bool,
    /// Sometimes a feature map as a further head.
    pub map_head: bool,
    /// Probability of a hidden linear layer before the head.
    pub hidden: f64,
    /// Probability of a second head on the flattened features.
    pub aux_head: f64,
}

/// The graphs of tests/graph.rs (fused step against autograd).
pub const FUSED_GRAPHS: GraphGen = GraphGen {
    acts: &[
        Activation::Relu,
        Activation::LeakyRelu(0.1),
        Activation::PRelu { shared: false },
        Activation::PRelu { shared: true },
    ],
    batch_norm: 0.5,
    max_blocks: 3,
    pool_before_act: false,
    full_residual: false,
    map_head: false,
    hidden: 0.5,
    aux_head: 0.3,
};

/// The graphs of tests/symmetry.rs (canonical form): also Leaky ReLU with a
/// negative slope, pools between conv and activation, up to three heads.
pub const SYMMETRY_GRAPHS: GraphGen = GraphGen {
    acts: &[
        Activation::Relu,
        Activation::LeakyRelu(0.1),
        Activation::LeakyRelu(-1.5),
        Activation::PRelu { shared: false },
        Activation::PRelu { shared: false },
        Activation::PRelu { shared: true },
    ],
    batch_norm: 0.6,
    max_blocks: 4,
    pool_before_act: true,
    full_residual: true,
    map_head: true,
    hidden: 0.6,
    aux_head: 0.4,
};

pub fn node(name: String, from: &str, op: Op) -> Node {
    Node {
        name,
        inputs: vec![from.to_string()],
        op,
    }
}

pub fn bn_op() -> Op {
    Op::BatchNorm {
        eps: BN_EPS,
        momentum: 0.1,
    }
}

/// A random graph on a random small input: stages of conv blocks (any
/// kernel, stride, padding, dilation, bias), residual blocks, pools; then
/// global pooling or flatten, an optional hidden linear layer, the head
/// ([`CLASSES`] outputs), and sometimes further heads, as `o` says.
pub fn random_graph(seed: u64, o: &GraphGen) -> (Graph, [usize; 3]) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let input = [
        rng.random_range(1..=2),
        rng.random_range(5..=8),
        rng.random_range(5..=8),
    ];
    let mut g = Graph {
        nodes: vec![],
        outputs: vec![],
    };
    let acts = o.acts;
    let mut n = 0;
    let mut name = |p: &str| {
        n += 1;
        format!("{p}{n}")
    };
    // Pushes a node if the graph still resolves; returns its name.
    let push = |g: &mut Graph, node: Node| -> Option<String> {
        g.nodes.push(node);
        if g.resolve(input).is_ok() {
            Some(g.nodes.last().unwrap().name.clone())
        } else {
            g.nodes.pop();
            None
        }
    };
    let mut x = INPUT.to_string();
    let mut channels = input[0];
    let bn = rng.random_bool(o.batch_norm);
    let mut map_head = None;
    for _ in 0..rng.random_range(1..=o.max_blocks) {
        match rng.random_range(0..3) {
            0 => {
                let k = rng.random_range(1..=3);
                let padding = match rng.random_range(0..3) {
                    0 => Padding::uniform(rng.random_range(0..=k / 2)),
                    1 => Padding::Explicit([0, 1, 1, 0]),
                    _ => Padding::SameUpper,
                };
                let out = rng.random_range(2..=4);
                let conv = Node {
                    name: name("conv"),
                    inputs: vec![x.clone()],
                    op: Op::Conv2d {
                        out_channels: out,
                        kernel: Pair::both(k),
                        stride: Pair([rng.random_range(1..=2), rng.random_range(1..=2)]),
                        padding,
                        dilation: Pair::both(rng.random_range(1..=2)),
                        bias: rng.random_bool(0.5),
                    },
                };
                let Some(mut y) = push(&mut g, conv) else { continue };
                channels = out;
                if bn {
                    y = push(&mut g, node(name("bn"), &y, bn_op())).unwrap();
                }
                if o.pool_before_act && rng.random_bool(0.3) {
                    let op = if rng.random_bool(0.5) {
                        Op::MaxPool {
                            kernel: Pair::both(2),
                            stride: Some(Pair::both(1)),
                            padding: Padding::default(),
                            ceil_mode: false,
                        }
                    } else {
                        Op::AvgPool {
                            kernel: Pair::both(2),
                            stride: Some(Pair::both(1)),
                            padding: Padding::uniform(1),
                            ceil_mode: false,
                            count_include_pad: rng.random_bool(0.5),
                        }
                    };
                    if let Some(p) = push(&mut g, node(name("prepool"), &y, op)) {
                        y = p;
                    }
                }
                let act = acts[rng.random_range(0..acts.len())];
                x = push(&mut g, node(name("act"), &y, Op::Act { act })).unwrap();
            }
            1 => {
                // conv-[bn]-act-conv-[bn] + x, then act.
                let conv = |name: String, from: &str| node(name, from, Op::conv(channels, 3, 1, 1, !bn));
                let mut y = push(&mut g, conv(name("rconv"), &x)).unwrap();
                if bn {
                    y = push(&mut g, node(name("rbn"), &y, bn_op())).unwrap();
                }
                let mut act = acts[rng.random_range(0..acts.len())];
                y = push(&mut g, node(name("ract"), &y, Op::Act { act })).unwrap();
                y = push(&mut g, conv(name("rconv"), &y)).unwrap();
                if bn && o.full_residual {
                    y = push(&mut g, node(name("rbn"), &y, bn_op())).unwrap();
                }
                let add = Node {
                    name: name("add"),
                    inputs: vec![y, x.clone()],
                    op: Op::Add,
                };
                let s = push(&mut g, add).unwrap();
                if o.full_residual {
                    act = acts[rng.random_range(0..acts.len())];
                }
                x = push(&mut g, node(name("ract"), &s, Op::Act { act })).unwrap();
            }
            _ => {
                let k = rng.random_range(2..=3);
                let stride = Some(Pair::both(rng.random_range(1..=2)));
                let padding = Padding::uniform(rng.random_range(0..=1));
                let ceil_mode = rng.random_bool(0.5);
                let op = if rng.random_bool(0.5) {
                    Op::MaxPool {
                        kernel: Pair::both(k),
                        stride,
                        padding,
                        ceil_mode,
                    }
                } else {
                    Op::AvgPool {
                        kernel: Pair::both(k),
                        stride,
                        padding,
                        ceil_mode,
                        count_include_pad: rng.random_bool(0.5),
                    }
                };
                if let Some(y) = push(&mut g, node(name("pool"), &x, op)) {
                    x = y;
                }
            }
        }
        if o.map_head && x != INPUT && map_head.is_none() && rng.random_bool(0.2) {
            map_head = Some(x.clone());
        }
    }
    if rng.random_bool(0.5) {
        x = push(&mut g, node(name("gap"), &x, Op::GlobalAvgPool)).unwrap();
    }
    let flat = push(&mut g, node(name("flat"), &x, Op::Flatten)).unwrap();
    x = flat.clone();
    if rng.random_bool(o.hidden) {
        let lin = Op::Linear {
            out_features: 6,
            bias: true,
        };
        x = push(&mut g, node(name("fc"), &x, lin)).unwrap();
        if bn {
            x = push(&mut g, node(name("bn"), &x, bn_op())).unwrap();
        }
        let act = acts[rng.random_range(0..acts.len())];
        x = push(&mut g, node(name("act"), &x, Op::Act { act })).unwrap();
    }
    let head = Op::Linear {
        out_features: CLASSES,
        bias: true,
    };
    let head = push(&mut g, node(name("head"), &x, head)).unwrap();
    g.outputs = vec![head];
    if rng.random_bool(o.aux_head) {
        let aux = Op::Linear {
            out_features: 3,
            bias: true,
        };
        let aux = push(&mut g, node(name("aux"), &flat, aux)).unwrap();
        g.outputs.push(aux);
    }
    if let Some(h) = map_head {
        g.outputs.push(h);
    }
    (g, input)
}

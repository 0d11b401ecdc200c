//! The sentinel's rules, apart from how the statistics are counted: the
//! thresholds ([`SentinelConfig`]), one layer's epoch in plain numbers
//! ([`EpochCounts`]), what a layer's report says ([`LayerReport`],
//! [`SlopeClasses`]) and the alarms ([`Alarm`], [`AlarmKind`]), carried from
//! epoch to epoch by [`SentinelRules`]. [`crate::analyses::sentinel`]
//! counts on this crate's models; the Python package counts inside a
//! PyTorch training loop; both close their epochs here.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

/// Alarm thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SentinelConfig {
    /// Alarm when more than this share of a layer's units is dead (ReLU,
    /// Leaky ReLU) or stuck (PReLU: dead and |slope| < `stuck_slope`).
    pub dead_share: f64,
    /// A slope is idle in an epoch when its negative share is below this...
    pub idle_share: f64,
    /// ...(or its gradient is exactly zero) for this many epochs in a row.
    pub idle_epochs: usize,
    /// Alarm when first-to-last layer weight-gradient norm ratio leaves
    /// `[1/grad_ratio, grad_ratio]`.
    pub grad_ratio: f64,
    /// |slope| below this makes a never-positive PReLU unit stuck.
    pub stuck_slope: f64,
    /// Width of the bands around 0 (ReLU-like, `|a| < slope_tol`) and 1
    /// (linear, foldable, `|a - 1| < slope_tol`) in the slope classes of a
    /// [`LayerReport`].
    pub slope_tol: f64,
}

impl Default for SentinelConfig {
    fn default() -> Self {
        Self {
            dead_share: 0.2,
            idle_share: 0.005,
            idle_epochs: 2,
            grad_ratio: 1e3,
            stuck_slope: 0.01,
            slope_tol: 0.05,
        }
    }
}

impl SentinelConfig {
    /// Checks every threshold (the `[alarms]` table of a run config).
    pub fn validate(&self) -> crate::error::Result<()> {
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        if !unit(self.dead_share) {
            crate::error::fail!("alarms: dead_share must be in [0, 1], got {}", self.dead_share);
        }
        if !unit(self.idle_share) {
            crate::error::fail!("alarms: idle_share must be in [0, 1], got {}", self.idle_share);
        }
        if self.idle_epochs == 0 || self.idle_epochs > 1_000_000 {
            crate::error::fail!("alarms: idle_epochs must be in 1..=1000000, got {}", self.idle_epochs);
        }
        if !(self.grad_ratio >= 1.0) || !self.grad_ratio.is_finite() {
            crate::error::fail!(
                "alarms: grad_ratio must be a finite number >= 1, got {}",
                self.grad_ratio
            );
        }
        if !(self.stuck_slope >= 0.0) || !self.stuck_slope.is_finite() {
            crate::error::fail!(
                "alarms: stuck_slope must be a finite number >= 0, got {}",
                self.stuck_slope
            );
        }
        if !(self.slope_tol >= 0.0) || !(self.slope_tol < 0.5) {
            crate::error::fail!("alarms: slope_tol must be in [0, 0.5), got {}", self.slope_tol);
        }
        Ok(())
    }
}

/// One activation layer's statistics over an epoch (or a diagnose pass).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerReport {
    pub layer: String,
    /// `relu`, `leaky:A`, `prelu` or `prelu-shared`.
    pub kind: String,
    pub channels: usize,
    /// Share of negative inputs over the whole layer.
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub negative_share: f64,
    /// Share of negative inputs per channel.
    #[serde(deserialize_with = "crate::json::nulls_as_nan")]
    pub negative_share_per_channel: Vec<f64>,
    /// Channels never positive (ReLU: no gradient at all).
    pub dead: Vec<usize>,
    /// Channels never negative (the unit acted as the identity).
    pub linear: Vec<usize>,
    /// PReLU channels never positive whose |slope| < `stuck_slope`.
    pub stuck: Vec<usize>,
    /// PReLU slopes idle for `idle_epochs` epochs in a row.
    pub idle: Vec<usize>,
    /// Slope values (PReLU), one per slope parameter.
    #[serde(deserialize_with = "crate::json::nulls_as_nan")]
    pub slopes: Vec<f64>,
    /// The slopes sorted by sign and size (PReLU; indices into `slopes`, i.e.
    /// channels, or `[0]` for a shared slope). Absent from runs written
    /// before the classes existed.
    #[serde(default)]
    pub slope_classes: SlopeClasses,
    /// Mean |d loss / d slope| per slope over the steps.
    #[serde(deserialize_with = "crate::json::nulls_as_nan")]
    pub slope_grad: Vec<f64>,
    /// Mean L2 norm of the gradient of the weight layer feeding this activation.
    pub weight_grad_norm: Option<f64>,
    /// Mean L2 norm of the slope gradient.
    pub slope_grad_norm: Option<f64>,
    /// Mean and variance of the layer's outputs.
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub act_mean: f64,
    #[serde(deserialize_with = "crate::json::null_as_nan")]
    pub act_var: f64,
}

impl LayerReport {
    /// One line on the slopes of a PReLU layer by class, e.g. `act.1 slopes
    /// (64): 12 < 0 (non-monotone), 3 ~ 0 (ReLU-like), 2 ~ 1 (linear), 1 > 1;
    /// not invertible at 15: 0, 3, ...`.
    pub fn slope_classes_line(&self) -> String {
        let c = &self.slope_classes;
        format!(
            "{} slopes ({}): {} < 0 (non-monotone), {} ~ 0 (ReLU-like), {} ~ 1 (linear), {} > 1; {}",
            self.layer,
            self.slopes.len(),
            c.negative.len(),
            c.near_zero.len(),
            c.near_one.len(),
            c.above_one.len(),
            if c.non_invertible.is_empty() {
                "invertible".to_string()
            } else {
                format!(
                    "not invertible at {}: {}",
                    c.non_invertible.len(),
                    channel_list(&c.non_invertible, 16)
                )
            }
        )
    }
}

/// Trained slopes take any sign: a net trained without constraint has many
/// negative slopes (`|x|`-like, non-monotone units) and some above 1. The
/// classes overlap where the bands do (`non_invertible` holds every `a <= 0`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SlopeClasses {
    /// `a < -slope_tol`: the unit is non-monotone (`|x|`-like for `a = -1`).
    pub negative: Vec<usize>,
    /// `|a| < slope_tol`: ReLU-like.
    pub near_zero: Vec<usize>,
    /// `|a - 1| < slope_tol`: the unit is (nearly) the identity and can be
    /// folded into the next layer.
    pub near_one: Vec<usize>,
    /// `a > 1 + slope_tol`: the negative side is steeper than the positive.
    pub above_one: Vec<usize>,
    /// `a <= 0` or NaN: the layer is not invertible at these channels.
    pub non_invertible: Vec<usize>,
}

impl SlopeClasses {
    /// Sorts `slopes` into the classes with band width `tol`.
    pub fn of(slopes: &[f64], tol: f64) -> Self {
        let pick = |f: &dyn Fn(f64) -> bool| -> Vec<usize> {
            slopes
                .iter()
                .enumerate()
                .filter(|&(_, &a)| f(a))
                .map(|(i, _)| i)
                .collect()
        };
        Self {
            negative: pick(&|a| a < -tol),
            near_zero: pick(&|a| a.abs() < tol),
            near_one: pick(&|a| (a - 1.0).abs() < tol),
            above_one: pick(&|a| a > 1.0 + tol),
            non_invertible: pick(&|a| !(a > 0.0)),
        }
    }
}

/// What an [`Alarm`] is about. Written in `metrics.jsonl` and `--json` output
/// as its kebab-case name (`dead-units`, ...), as before it was an enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlarmKind {
    /// Too many dead (ReLU) or stuck (PReLU) units in a layer.
    DeadUnits,
    /// Slopes that have not learned for `idle_epochs` epochs.
    IdleSlope,
    /// First-to-last weight-gradient ratio below `1 / grad_ratio`.
    VanishingGradient,
    /// First-to-last weight-gradient ratio above `grad_ratio`.
    ExplodingGradient,
    /// Slopes `<= 0`: the layer is not invertible at those channels.
    NonPositiveSlope,
    /// NaN or infinity in activations, slopes or gradients.
    NonFinite,
}

impl AlarmKind {
    /// Every kind, in declaration order.
    pub const ALL: [AlarmKind; 6] = [
        AlarmKind::DeadUnits,
        AlarmKind::IdleSlope,
        AlarmKind::VanishingGradient,
        AlarmKind::ExplodingGradient,
        AlarmKind::NonPositiveSlope,
        AlarmKind::NonFinite,
    ];

    /// The kebab-case name (`dead-units`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            AlarmKind::DeadUnits => "dead-units",
            AlarmKind::IdleSlope => "idle-slope",
            AlarmKind::VanishingGradient => "vanishing-gradient",
            AlarmKind::ExplodingGradient => "exploding-gradient",
            AlarmKind::NonPositiveSlope => "non-positive-slope",
            AlarmKind::NonFinite => "non-finite",
        }
    }
}

impl std::fmt::Display for AlarmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AlarmKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        AlarmKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown alarm kind `{s}`"))
    }
}

impl PartialEq<str> for AlarmKind {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for AlarmKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// An alarm, raised once per layer and kind (non-positive slopes: once per
/// channel, so a channel that turns negative later raises a new alarm).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Alarm {
    pub epoch: usize,
    pub layer: String,
    pub kind: AlarmKind,
    pub message: String,
    /// The channels (slope indices) the alarm is about, where it is about
    /// some channels of the layer (non-positive slopes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<usize>,
}

/// What has been raised: `(layer, kind, channel)`, channel `None` for a
/// layer-wide alarm.
type RaisedKey = (String, AlarmKind, Option<usize>);

/// A slope for a message: 3 decimals, or 2 significant digits when tiny.
fn short_num(v: f64) -> String {
    if v != 0.0 && v.abs() < 5e-4 {
        format!("{v:.1e}")
    } else {
        format!("{v:.3}")
    }
}

/// `0, 4, 7` (the first `max`, then `and N more`).
pub fn channel_list(c: &[usize], max: usize) -> String {
    let mut s: Vec<String> = c.iter().take(max).map(|i| i.to_string()).collect();
    if c.len() > max {
        s.push(format!("and {} more", c.len() - max));
    }
    s.join(", ")
}

/// One activation layer's counts over an epoch, in plain numbers: what the
/// sentinel's rules read, whoever counted them (this crate's fused kernels,
/// or the Python package's hooks inside a PyTorch training loop).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EpochCounts {
    /// Inputs `x < 0`, per channel.
    pub negative: Vec<u64>,
    /// Whether each channel saw an input `x > 0`.
    pub positive: Vec<bool>,
    /// Inputs seen, all channels together.
    pub count: u64,
    /// Sum and sum of squares of the outputs.
    pub out_sum: f64,
    pub out_sum_sq: f64,
    /// The slopes at the end of the epoch (PReLU; empty otherwise).
    pub slopes: Vec<f64>,
    /// Per slope, the sum over the counted steps of |d loss / d slope|.
    pub slope_abs: Vec<f64>,
    /// The sum of the slope gradient's L2 norms (`None`: no slope gradient watched).
    pub slope_norm_sum: Option<f64>,
    /// The steps whose slope gradients are in `slope_abs`.
    pub slope_steps: u64,
    /// The sum of the feeding weight's gradient L2 norms (`None`: no feeding weight).
    pub weight_norm_sum: Option<f64>,
    /// The steps whose weight gradients are in `weight_norm_sum`.
    pub weight_steps: u64,
}

impl EpochCounts {
    /// Refuses counts whose lengths disagree (they may come from Python).
    fn check(&self, layer: &str) -> crate::error::Result<()> {
        if self.positive.len() != self.negative.len() {
            crate::error::fail!(
                "sentinel: layer `{layer}` has {} negative counts but {} positive flags",
                self.negative.len(),
                self.positive.len()
            );
        }
        if self.slope_abs.len() != self.slopes.len() {
            crate::error::fail!(
                "sentinel: layer `{layer}` has {} slopes but {} slope gradients",
                self.slopes.len(),
                self.slope_abs.len()
            );
        }
        let channels = self.negative.len();
        if self.slopes.len() > 1 && self.slopes.len() != channels {
            crate::error::fail!(
                "sentinel: layer `{layer}` has {} slopes but {channels} channels",
                self.slopes.len()
            );
        }
        Ok(())
    }
}

/// One layer as the rules follow it from epoch to epoch.
#[derive(Clone, Debug)]
struct RuleLayer {
    name: String,
    /// `relu`, `leaky:A`, `prelu` or `prelu-shared`.
    kind: String,
    /// Per slope, the epochs in a row it has been idle.
    idle_streak: Vec<usize>,
}

/// The sentinel's rules: an epoch's [`EpochCounts`] per layer in, the
/// [`LayerReport`]s and the alarms raised for the first time out. They keep
/// what carries over epochs (idle streaks, what was raised), so the same
/// rules serve this crate's training loop and a foreign one (the Python
/// package's `prelu.torch.Sentinel`).
#[derive(Clone, Debug)]
pub struct SentinelRules {
    cfg: SentinelConfig,
    layers: Vec<RuleLayer>,
    raised: HashSet<RaisedKey>,
}

impl SentinelRules {
    /// Rules over the layers `(name, kind)`, in depth order.
    pub fn new(layers: impl IntoIterator<Item = (String, String)>, cfg: SentinelConfig) -> Self {
        let layers = layers
            .into_iter()
            .map(|(name, kind)| RuleLayer {
                name,
                kind,
                idle_streak: Vec::new(),
            })
            .collect();
        Self {
            cfg,
            layers,
            raised: HashSet::new(),
        }
    }

    /// The alarm thresholds.
    pub fn config(&self) -> &SentinelConfig {
        &self.cfg
    }

    /// Records an alarm as already raised (an alarm from before a resume), so
    /// it is not raised again.
    pub fn mark_raised(&mut self, a: &Alarm) {
        if a.channels.is_empty() {
            self.raised.insert((a.layer.clone(), a.kind, None));
        }
        for &c in &a.channels {
            self.raised.insert((a.layer.clone(), a.kind, Some(c)));
        }
    }

    /// Closes epoch `epoch` on one [`EpochCounts`] per layer: the layer
    /// reports and the alarms raised for the first time.
    pub fn close_epoch(
        &mut self,
        epoch: usize,
        counts: &[EpochCounts],
    ) -> crate::error::Result<(Vec<LayerReport>, Vec<Alarm>)> {
        if counts.len() != self.layers.len() {
            crate::error::fail!(
                "sentinel: {} layers' counts for {} layers",
                counts.len(),
                self.layers.len()
            );
        }
        let mut new = EpochAlarms {
            epoch,
            cfg: self.cfg,
            raised: &mut self.raised,
            alarms: Vec::new(),
        };
        let mut reports = Vec::new();
        for (l, st) in self.layers.iter_mut().zip(counts) {
            st.check(&l.name)?;
            let r = l.report(st, &self.cfg);
            new.check_layer(&r, st.count > 0);
            reports.push(r);
        }
        new.gradient_flow(&reports);
        Ok((reports, new.alarms))
    }
}

impl RuleLayer {
    /// The layer's report on an epoch's counts; advances the idle streaks.
    fn report(&mut self, st: &EpochCounts, cfg: &SentinelConfig) -> LayerReport {
        let channels = st.negative.len();
        if self.idle_streak.len() != channels.max(1) {
            self.idle_streak = vec![0; channels.max(1)];
        }
        let per_channel = (st.count / channels.max(1) as u64).max(1) as f64;
        let share: Vec<f64> = st.negative.iter().map(|&n| n as f64 / per_channel).collect();
        let seen = st.count > 0;
        let dead: Vec<usize> = (0..channels).filter(|&c| seen && !st.positive[c]).collect();
        let linear: Vec<usize> = (0..channels).filter(|&c| seen && st.negative[c] == 0).collect();
        let mean_of = |sum: f64, steps: u64| (steps > 0).then(|| sum / steps as f64);
        let slope_grad: Vec<f64> = st.slope_abs.iter().map(|s| s / st.slope_steps.max(1) as f64).collect();
        let idle = self.idle_slopes(&share, st.slopes.len(), &slope_grad, st.slope_steps > 0, cfg);
        let n = st.count.max(1) as f64;
        let mean = st.out_sum / n;
        LayerReport {
            layer: self.name.clone(),
            kind: self.kind.clone(),
            channels,
            negative_share: st.negative.iter().sum::<u64>() as f64 / n,
            negative_share_per_channel: share,
            stuck: stuck_channels(&dead, &st.slopes, cfg.stuck_slope),
            dead,
            linear,
            idle,
            slope_classes: SlopeClasses::of(&st.slopes, cfg.slope_tol),
            slopes: st.slopes.clone(),
            slope_grad,
            weight_grad_norm: st.weight_norm_sum.and_then(|s| mean_of(s, st.weight_steps)),
            slope_grad_norm: st.slope_norm_sum.and_then(|s| mean_of(s, st.slope_steps)),
            act_mean: mean,
            act_var: st.out_sum_sq / n - mean * mean,
        }
    }

    /// Idle slopes: a per-channel slope with too few negative inputs (`share`,
    /// per channel) or a zero gradient (`stepped`: gradients were counted),
    /// epoch after epoch; a shared slope by the layer's mean share. Advances
    /// the idle streaks.
    fn idle_slopes(
        &mut self,
        share: &[f64],
        n_slopes: usize,
        slope_grad: &[f64],
        stepped: bool,
        cfg: &SentinelConfig,
    ) -> Vec<usize> {
        let channels = share.len();
        let mut idle = Vec::new();
        let mut advance = |c: usize, quiet: bool, idle: &mut Vec<usize>| {
            self.idle_streak[c] = if quiet { self.idle_streak[c] + 1 } else { 0 };
            if self.idle_streak[c] >= cfg.idle_epochs {
                idle.push(c);
            }
        };
        if n_slopes == channels && channels > 0 {
            for c in 0..channels {
                let quiet = share[c] < cfg.idle_share || (stepped && slope_grad[c] == 0.0);
                advance(c, quiet, &mut idle);
            }
        } else if n_slopes == 1 {
            let total_share = share.iter().sum::<f64>() / channels.max(1) as f64;
            let quiet = total_share < cfg.idle_share || (stepped && slope_grad[0] == 0.0);
            advance(0, quiet, &mut idle);
        }
        idle
    }
}

/// The dead channels whose |slope| is below `stuck_slope` (none without
/// slopes; a shared slope counts for every channel).
fn stuck_channels(dead: &[usize], slopes: &[f64], stuck_slope: f64) -> Vec<usize> {
    if slopes.is_empty() {
        return vec![];
    }
    let slope_of = |c: usize| {
        if slopes.len() == 1 {
            slopes[0]
        } else {
            slopes.get(c).copied().unwrap_or(0.0)
        }
    };
    dead.iter()
        .copied()
        .filter(|&c| slope_of(c).abs() < stuck_slope)
        .collect()
}

/// The message of a non-positive-slope alarm about the channels `new` of
/// report `r`.
fn non_positive_message(r: &LayerReport, new: &[usize], slope_tol: f64) -> String {
    let shown: Vec<String> = new.iter().take(8).map(|&c| short_num(r.slopes[c])).collect();
    let what = if r.slopes.len() == 1 {
        "the shared slope".to_string()
    } else {
        format!("channel(s) {}", channel_list(new, 16))
    };
    let neg = new.iter().filter(|c| r.slope_classes.negative.contains(c)).count();
    format!(
        "{}: slope(s) <= 0 at {what} (a = {}{}); {} of {} slopes are now <= 0: the layer is \
         not invertible there{}",
        r.layer,
        shown.join(", "),
        if new.len() > 8 { ", ..." } else { "" },
        r.slope_classes.non_invertible.len(),
        r.slopes.len(),
        if neg > 0 {
            format!("; {neg} clearly negative (< -{slope_tol}): non-monotone, |x|-like units")
        } else {
            String::new()
        }
    )
}

/// The alarms raised while an epoch closes; each is raised once per run.
struct EpochAlarms<'a> {
    epoch: usize,
    cfg: SentinelConfig,
    /// What this run has raised so far.
    raised: &'a mut HashSet<RaisedKey>,
    /// The alarms raised for the first time, in order.
    alarms: Vec<Alarm>,
}

impl EpochAlarms<'_> {
    /// Raises a layer-wide alarm unless it was raised before.
    fn raise(&mut self, layer: &str, kind: AlarmKind, message: String) {
        if self.raised.insert((layer.to_string(), kind, None)) {
            self.alarms.push(Alarm {
                epoch: self.epoch,
                layer: layer.into(),
                kind,
                message,
                channels: vec![],
            });
        }
    }

    /// Every alarm about one layer's report (`seen`: the layer saw inputs).
    fn check_layer(&mut self, r: &LayerReport, seen: bool) {
        self.dead_units(r, seen);
        self.idle_slopes(r);
        self.non_positive_slopes(r);
        self.non_finite(r);
    }

    /// Too many dead (ReLU) or stuck (PReLU) units.
    fn dead_units(&mut self, r: &LayerReport, seen: bool) {
        let is_prelu = !r.slopes.is_empty();
        let (bad, channels) = (if is_prelu { r.stuck.len() } else { r.dead.len() }, r.channels);
        if seen && channels > 0 && bad as f64 / channels as f64 > self.cfg.dead_share {
            let what = if is_prelu {
                format!("stuck (never positive, |slope| < {})", self.cfg.stuck_slope)
            } else {
                "dead (never positive)".to_string()
            };
            let message = format!(
                "{}: {} of {} units ({:.1}%) are {what}",
                r.layer,
                bad,
                channels,
                100.0 * bad as f64 / channels as f64
            );
            self.raise(&r.layer, AlarmKind::DeadUnits, message);
        }
    }

    /// Slopes idle for `idle_epochs` epochs in a row.
    fn idle_slopes(&mut self, r: &LayerReport) {
        if r.idle.is_empty() {
            return;
        }
        let message = format!(
            "{}: {} slope(s) idle {} (negative share < {}% or zero gradient)",
            r.layer,
            r.idle.len(),
            match self.cfg.idle_epochs {
                1 => "on this pass".to_string(),
                n => format!("for {n} epochs in a row"),
            },
            100.0 * self.cfg.idle_share
        );
        self.raise(&r.layer, AlarmKind::IdleSlope, message);
    }

    /// Non-positive slopes, per channel: a channel raises once, and one
    /// alarm lists the channels newly found <= 0 in this epoch. A layer-wide
    /// alarm read back from an older run covers every channel.
    fn non_positive_slopes(&mut self, r: &LayerReport) {
        let layer_wide = (r.layer.clone(), AlarmKind::NonPositiveSlope, None);
        if self.raised.contains(&layer_wide) {
            return;
        }
        let new: Vec<usize> = r
            .slope_classes
            .non_invertible
            .iter()
            .copied()
            .filter(|&c| {
                self.raised
                    .insert((r.layer.clone(), AlarmKind::NonPositiveSlope, Some(c)))
            })
            .collect();
        if new.is_empty() {
            return;
        }
        self.alarms.push(Alarm {
            epoch: self.epoch,
            layer: r.layer.clone(),
            kind: AlarmKind::NonPositiveSlope,
            message: non_positive_message(r, &new, self.cfg.slope_tol),
            channels: new,
        });
    }

    /// NaN or infinity in the activations, slopes or gradients.
    fn non_finite(&mut self, r: &LayerReport) {
        let finite = r.act_mean.is_finite()
            && r.act_var.is_finite()
            && r.weight_grad_norm.is_none_or(f64::is_finite)
            && r.slopes.iter().all(|a| a.is_finite());
        if !finite {
            let message = format!("{}: NaN or infinity in activations, slopes or gradients", r.layer);
            self.raise(&r.layer, AlarmKind::NonFinite, message);
        }
    }

    /// The first-to-last layer weight-gradient norm ratio outside
    /// `[1/grad_ratio, grad_ratio]`.
    fn gradient_flow(&mut self, reports: &[LayerReport]) {
        let norms: Vec<f64> = reports.iter().filter_map(|r| r.weight_grad_norm).collect();
        let (Some(&first), Some(&last)) = (norms.first(), norms.last()) else {
            return;
        };
        if norms.len() >= 2 && last > 0.0 {
            let ratio = first / last;
            if ratio < 1.0 / self.cfg.grad_ratio {
                let message = format!(
                    "first-layer gradient norm is {ratio:.2e} x the last layer's: gradients vanish towards the input"
                );
                self.raise("model", AlarmKind::VanishingGradient, message);
            } else if ratio > self.cfg.grad_ratio {
                let message = format!(
                    "first-layer gradient norm is {ratio:.2e} x the last layer's: gradients explode towards the input"
                );
                self.raise("model", AlarmKind::ExplodingGradient, message);
            }
        }
    }
}

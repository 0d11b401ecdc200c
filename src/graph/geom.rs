//! Geometry of the layer graph: sizes and paddings as written in graph files
//! ([`Pair`], [`Padding`]) and the windows of a convolution or pooling on one
//! map ([`ConvGeom`], [`PoolGeom`]), with their validation.

use std::fmt;

use candle_core::{bail, Result};
use serde::de::{self, SeqAccess, Unexpected, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A per-sample tensor shape: channels, rows, cols (flat features are `[f, 1, 1]`).
pub type Shape = [usize; 3];

/// The largest kernel side (and stride, dilation) a graph may ask for.
pub const MAX_KERNEL: usize = 64;

/// Two sizes (rows, cols); written as one number or `[h, w]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pair(pub [usize; 2]);

impl Pair {
    pub fn both(v: usize) -> Self {
        Pair([v, v])
    }
    pub fn h(&self) -> usize {
        self.0[0]
    }
    pub fn w(&self) -> usize {
        self.0[1]
    }
}

impl Serialize for Pair {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.0[0] == self.0[1] {
            s.serialize_u64(self.0[0] as u64)
        } else {
            self.0.serialize(s)
        }
    }
}

/// A size from an unsigned number of a graph file.
fn size_u64<E: de::Error>(v: u64, exp: &dyn de::Expected) -> std::result::Result<usize, E> {
    usize::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), exp))
}

/// A size from a signed number of a graph file (refused when negative).
fn size_i64<E: de::Error>(v: i64, exp: &dyn de::Expected) -> std::result::Result<usize, E> {
    u64::try_from(v)
        .map_err(|_| E::invalid_value(Unexpected::Signed(v), exp))
        .and_then(|v| size_u64(v, exp))
}

/// A size as written in a graph file: a whole number `>= 0`.
struct Size(usize);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size (a whole number >= 0)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Size, E> {
                size_u64(v, &self).map(Size)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Size, E> {
                size_i64(v, &self).map(Size)
            }
        }
        d.deserialize_any(V)
    }
}

/// The sizes of a sequence, refused unless their number is one of `lens`
/// (ascending).
fn sizes<'de, A: SeqAccess<'de>>(
    mut seq: A,
    lens: &[usize],
    exp: &dyn de::Expected,
) -> std::result::Result<Vec<usize>, A::Error> {
    let most = lens.last().copied().unwrap_or(0);
    let mut v = Vec::new();
    while let Some(Size(s)) = seq.next_element()? {
        if v.len() == most {
            return Err(de::Error::invalid_length(most + 1, exp));
        }
        v.push(s);
    }
    if !lens.contains(&v.len()) {
        return Err(de::Error::invalid_length(v.len(), exp));
    }
    Ok(v)
}

impl<'de> Deserialize<'de> for Pair {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Pair;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size (a whole number >= 0) or [h, w]")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Pair, E> {
                size_u64(v, &self).map(Pair::both)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Pair, E> {
                size_i64(v, &self).map(Pair::both)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> std::result::Result<Pair, A::Error> {
                let v = sizes(seq, &[2], &self)?;
                Ok(Pair([v[0], v[1]]))
            }
        }
        d.deserialize_any(V)
    }
}

/// Zero padding of a convolution or pooling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// `[top, left, bottom, right]`.
    Explicit([usize; 4]),
    /// Output size `ceil(input / stride)`, the extra row/column at the end
    /// (TensorFlow's and ONNX's `SAME_UPPER`).
    SameUpper,
    /// Like `SameUpper`, the extra row/column at the start (`SAME_LOWER`).
    SameLower,
}

impl Padding {
    pub fn uniform(p: usize) -> Self {
        Padding::Explicit([p; 4])
    }

    /// `[top, left, bottom, right]` for an input of `h x w`.
    pub fn resolve(&self, h: usize, w: usize, k: Pair, s: Pair, d: Pair) -> [usize; 4] {
        match *self {
            Padding::Explicit(p) => p,
            Padding::SameUpper | Padding::SameLower => {
                let total = |n: usize, k: usize, s: usize, d: usize| {
                    let out = n.div_ceil(s.max(1));
                    ((out.saturating_sub(1)) * s + d * (k.saturating_sub(1)) + 1).saturating_sub(n)
                };
                let th = total(h, k.h(), s.h(), d.h());
                let tw = total(w, k.w(), s.w(), d.w());
                if *self == Padding::SameUpper {
                    [th / 2, tw / 2, th - th / 2, tw - tw / 2]
                } else {
                    [th - th / 2, tw - tw / 2, th / 2, tw / 2]
                }
            }
        }
    }
}

impl Serialize for Padding {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Padding::Explicit(p) if p.iter().all(|&v| v == p[0]) => s.serialize_u64(p[0] as u64),
            Padding::Explicit(p) => p.serialize(s),
            Padding::SameUpper => s.serialize_str("same"),
            Padding::SameLower => s.serialize_str("same-lower"),
        }
    }
}

/// What a padding is written as, for errors.
const PADDING_FORMS: &str =
    "a padding: a size (a whole number >= 0), [h, w], [top, left, bottom, right], \"same\", \"same-lower\" or \"valid\"";

impl<'de> Deserialize<'de> for Padding {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Padding;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(PADDING_FORMS)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Padding, E> {
                size_u64(v, &self).map(Padding::uniform)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Padding, E> {
                size_i64(v, &self).map(Padding::uniform)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> std::result::Result<Padding, A::Error> {
                let v = sizes(seq, &[2, 4], &self)?;
                Ok(match v[..] {
                    [h, w] => Padding::Explicit([h, w, h, w]),
                    _ => Padding::Explicit([v[0], v[1], v[2], v[3]]),
                })
            }
            fn visit_str<E: de::Error>(self, n: &str) -> std::result::Result<Padding, E> {
                match n.to_ascii_lowercase().as_str() {
                    "same" | "same-upper" | "same_upper" => Ok(Padding::SameUpper),
                    "same-lower" | "same_lower" => Ok(Padding::SameLower),
                    "valid" => Ok(Padding::Explicit([0; 4])),
                    _ => Err(E::invalid_value(Unexpected::Str(n), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl Default for Padding {
    fn default() -> Self {
        Padding::Explicit([0; 4])
    }
}

/// Geometry of a pooling window on one `h x w` map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    /// Padding at the top and left (the bottom/right padding only shows in the output size).
    pub pt: usize,
    pub pl: usize,
    pub pb: usize,
    pub pr: usize,
    pub ho: usize,
    pub wo: usize,
    pub count_include_pad: bool,
}

/// Output size of a window sweep (PyTorch's rule, including ceil mode's "the
/// last window must start inside the input or the left padding").
fn window_out(n: usize, p0: usize, p1: usize, k: usize, s: usize, d: usize, ceil: bool) -> Option<usize> {
    let span = d * (k - 1) + 1;
    let total = n + p0 + p1;
    if total < span || s == 0 {
        return None;
    }
    let mut out = if ceil {
        (total - span).div_ceil(s) + 1
    } else {
        (total - span) / s + 1
    };
    if ceil && (out - 1) * s >= n + p0 {
        out -= 1;
    }
    Some(out)
}

impl PoolGeom {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shape: Shape,
        kernel: Pair,
        stride: Option<Pair>,
        padding: Padding,
        ceil_mode: bool,
        count_include_pad: bool,
    ) -> Result<Self> {
        let [c, h, w] = shape;
        let s = stride.unwrap_or(kernel);
        let [pt, pl, pb, pr] = padding.resolve(h, w, kernel, s, Pair::both(1));
        if kernel.h() == 0 || kernel.w() == 0 || s.h() == 0 || s.w() == 0 {
            bail!("pool: kernel {:?} and stride {:?} must be > 0", kernel.0, s.0);
        }
        if kernel.h() > MAX_KERNEL || kernel.w() > MAX_KERNEL || pt.max(pb) >= kernel.h() || pl.max(pr) >= kernel.w() {
            bail!(
                "pool: kernel {:?} with padding [{pt}, {pl}, {pb}, {pr}] out of range (kernel at most {MAX_KERNEL}, padding below the kernel)",
                kernel.0
            );
        }
        let ho = window_out(h, pt, pb, kernel.h(), s.h(), 1, ceil_mode);
        let wo = window_out(w, pl, pr, kernel.w(), s.w(), 1, ceil_mode);
        let (Some(ho), Some(wo)) = (ho, wo) else {
            bail!("pool: kernel {:?} does not fit a {h}x{w} map", kernel.0);
        };
        Ok(Self {
            c,
            h,
            w,
            kh: kernel.h(),
            kw: kernel.w(),
            sh: s.h(),
            sw: s.w(),
            pt,
            pl,
            pb,
            pr,
            ho,
            wo,
            count_include_pad,
        })
    }
}

/// Geometry of a convolution on one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub dh: usize,
    pub dw: usize,
    /// Padding at the top and left.
    pub pt: usize,
    pub pl: usize,
    pub ho: usize,
    pub wo: usize,
}

impl ConvGeom {
    /// A stride-1 square-kernel convolution with uniform padding.
    pub fn simple(cin: usize, cout: usize, h: usize, w: usize, k: usize, pad: usize) -> Result<Self> {
        Self::new(
            cin,
            cout,
            h,
            w,
            Pair::both(k),
            Pair::both(1),
            Padding::uniform(pad),
            Pair::both(1),
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cin: usize,
        cout: usize,
        h: usize,
        w: usize,
        kernel: Pair,
        stride: Pair,
        padding: Padding,
        dilation: Pair,
    ) -> Result<Self> {
        let [pt, pl, pb, pr] = padding.resolve(h, w, kernel, stride, dilation);
        let bad = |v: usize| v == 0 || v > MAX_KERNEL;
        if bad(kernel.h())
            || bad(kernel.w())
            || bad(stride.h())
            || bad(stride.w())
            || bad(dilation.h())
            || bad(dilation.w())
        {
            bail!(
                "conv: kernel {:?}, stride {:?} and dilation {:?} must be in 1..={MAX_KERNEL}",
                kernel.0,
                stride.0,
                dilation.0
            );
        }
        if [pt, pl, pb, pr].iter().any(|&p| p > MAX_KERNEL * MAX_KERNEL) {
            bail!("conv: padding [{pt}, {pl}, {pb}, {pr}] out of range");
        }
        let ho = window_out(h, pt, pb, kernel.h(), stride.h(), dilation.h(), false);
        let wo = window_out(w, pl, pr, kernel.w(), stride.w(), dilation.w(), false);
        let (Some(ho), Some(wo)) = (ho, wo) else {
            bail!(
                "conv: kernel {:?} (dilation {:?}) with padding [{pt}, {pl}, {pb}, {pr}] does not fit a {h}x{w} input",
                kernel.0,
                dilation.0
            );
        };
        Ok(Self {
            cin,
            cout,
            h,
            w,
            kh: kernel.h(),
            kw: kernel.w(),
            sh: stride.h(),
            sw: stride.w(),
            dh: dilation.h(),
            dw: dilation.w(),
            pt,
            pl,
            ho,
            wo,
        })
    }

    /// Rows of the column matrix: `C_in kh kw`.
    pub fn rows(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// Output pixels per channel.
    pub fn pixels(&self) -> usize {
        self.ho * self.wo
    }

    /// Multiply-adds of the forward pass per sample.
    pub fn macs(&self) -> usize {
        self.rows() * self.cout * self.pixels()
    }
}

//! PReLU as an invertible map (normalising flows, analysis).
//!
//! `y = PReLU_a(x)` is a bijection of the reals iff every slope `a > 0`; then
//! `x = y > 0 ? y : y / a` and `|det J| = prod over x <= 0 of a` per sample.
//! With `a <= 0` the negative half-line is folded onto (or collapsed to) the
//! non-negative one, so there is no inverse and these functions return
//! [`InvertError::NotInvertible`] instead of producing NaNs or wrong numbers.
//!
//! Convention at `x == 0`: the derivative is taken as `a` (as in the backward
//! pass), so `x == 0` counts on the negative side of the log-determinant.

use candle_core::{DType, Tensor};
use thiserror::Error;

use crate::nn::ops::SlopeAxis;

/// Why a PReLU could not be inverted.
#[derive(Debug, Error)]
pub enum InvertError {
    /// Some slope is `<= 0` (or NaN), so the map is not one-to-one.
    #[error("PReLU is not invertible: slope {index} is {value} (every slope must be > 0)")]
    NotInvertible { index: usize, value: f64 },
    /// Shapes, dtypes or the device did not fit.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Whether a PReLU with slope `a` is invertible: `a > 0` (false for NaN).
pub fn slope_invertible(a: f64) -> bool {
    a > 0.0
}

/// Checks that every slope is `> 0`.
pub fn check_invertible(slope: &Tensor) -> Result<(), InvertError> {
    let v = slope.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    match v.iter().position(|&a| !slope_invertible(a)) {
        Some(index) => Err(InvertError::NotInvertible { index, value: v[index] }),
        None => Ok(()),
    }
}

/// `x` such that `PReLU_slope(x) = y`; an error if any slope is `<= 0`.
///
/// Uses the fused kernel with slope `1/a`, which is exact up to the rounding
/// of `1/a` (relative error <= 2 ulp against `y / a`).
pub fn prelu_inverse(y: &Tensor, slope: &Tensor, axis: SlopeAxis) -> Result<Tensor, InvertError> {
    check_invertible(slope)?;
    Ok(crate::nn::ops::prelu(y, &slope.recip()?, axis)?)
}

/// `log |det dPReLU(x)/dx|` per sample (dim 0 indexes samples): the sum of
/// `ln a` over the sample's elements with `x <= 0`. Differentiable in `slope`.
/// For rank-1 input each element is its own sample.
pub fn log_abs_det_jacobian(x: &Tensor, slope: &Tensor, axis: SlopeAxis) -> Result<Tensor, InvertError> {
    check_invertible(slope)?;
    let a = crate::nn::ops::broadcast_slope(x, slope, axis)?;
    let neg = x.le(0.0)?.to_dtype(x.dtype())?;
    let terms = neg.broadcast_mul(&a.log()?)?;
    let n = x.dims().first().copied().unwrap_or(1);
    Ok(terms.reshape((n, ()))?.sum(1)?)
}

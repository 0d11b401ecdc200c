//! In-place access to candle tensors' f32 storage: a copy-free read
//! ([`with_f32`], [`as_f32`]) and an in-place update ([`update_in_place`]),
//! for optimiser steps and the fused step's parameters without fresh tensors.

use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor};

/// A contiguous f32 slice of a tensor's storage (the guard must be alive).
pub fn as_f32<'a>(s: &'a Storage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let Storage::Cpu(CpuStorage::F32(v)) = s else {
        bail!("fused step: `{what}` must be an f32 tensor on the CPU");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("fused step: `{what}` is not contiguous");
    };
    Ok(&v[a..b])
}

/// A function that updates a tensor's values in place.
pub type Update<'a> = dyn FnMut(&mut [f32]) + Send + 'a;

/// Applies `f` to a tensor's storage in place (a candle in-place op), for
/// optimiser updates without fresh tensors. The tensor must be a contiguous
/// f32 CPU tensor.
pub fn update_in_place(t: &Tensor, f: &mut Update<'_>) -> Result<()> {
    struct Op<'a, 'b>(std::sync::Mutex<&'a mut Update<'b>>);
    impl candle_core::InplaceOp1 for Op<'_, '_> {
        fn name(&self) -> &'static str {
            "update-in-place"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
            let CpuStorage::F32(v) = s else {
                bail!("in-place update: only f32 tensors");
            };
            let Some((a, b)) = l.contiguous_offsets() else {
                bail!("in-place update: the tensor is not contiguous");
            };
            let mut f = self
                .0
                .lock()
                .map_err(|_| candle_core::Error::Msg("in-place update: poisoned".into()))?;
            (*f)(&mut v[a..b]);
            Ok(())
        }
    }
    t.inplace_op1(&Op(std::sync::Mutex::new(f)))
}

/// A contiguous f32 copy-free read of a tensor, passed to `f`.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    Ok(f(as_f32(&s, l, "tensor")?))
}

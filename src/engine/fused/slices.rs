//! Small helpers on the step's buffers: parallel copy and sum, and two
//! distinct entries of a vector borrowed mutably at once.

use rayon::prelude::*;

use crate::kernels;

/// `dst = src`, in parallel chunks.
pub(super) fn par_copy(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(kernels::CHUNK)
        .zip(src.par_chunks(kernels::CHUNK))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// `dst += src`, in parallel chunks.
pub(super) fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(kernels::CHUNK)
        .zip(src.par_chunks(kernels::CHUNK))
        .for_each(|(d, s)| {
            for (d, s) in d.iter_mut().zip(s) {
                *d += s;
            }
        });
}

/// Two distinct mutable entries of a vector.
pub(super) fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert_ne!(a, b);
    if a < b {
        let (x, y) = v.split_at_mut(b);
        (&mut x[a], &mut y[0])
    } else {
        let (x, y) = v.split_at_mut(a);
        (&mut y[0], &mut x[b])
    }
}

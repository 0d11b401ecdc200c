//! Loss and accuracy from logits: the one place they are computed (training,
//! evaluation, the sentinel's diagnose pass, attacks, sculpting).

use candle_core::{DType, Tensor};

/// The mean cross-entropy of a batch of logits (a scalar tensor, ready for
/// `backward`) and the number of rows whose argmax is the label: the one
/// place loss and accuracy are computed from logits (training, evaluation,
/// the sentinel's diagnose pass, attacks).
pub fn loss_and_correct(logits: &Tensor, y: &Tensor) -> candle_core::Result<(Tensor, usize)> {
    let loss = candle_nn::loss::cross_entropy(logits, y)?;
    let correct = logits
        .argmax(1)?
        .eq(y)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as usize;
    Ok((loss, correct))
}

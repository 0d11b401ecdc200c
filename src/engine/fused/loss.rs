//! Softmax cross-entropy and its gradient in one pass over the logits.

use super::dense::transpose;

/// Loss and accuracy of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutput {
    /// Mean cross-entropy over the batch.
    pub loss: f64,
    /// Samples whose largest logit is the label.
    pub correct: usize,
}

/// Mean cross-entropy of feature-major `logits` (`[classes, batch]`) against
/// `labels`, its gradient into `dlogits` (same layout), and the number of
/// correct argmaxes; `rows` is scratch for the sample-major copy.
pub(super) fn softmax_xent(
    logits_fm: &[f32],
    labels: &[u32],
    classes: usize,
    dlogits_fm: &mut [f32],
    rows: &mut Vec<f32>,
) -> StepOutput {
    let n = labels.len();
    rows.resize(2 * n * classes, 0.0);
    let (logits, dlogits) = rows.split_at_mut(n * classes);
    transpose(logits_fm, classes, n, logits);
    let out = softmax_xent_rows(logits, labels, classes, dlogits);
    transpose(dlogits, n, classes, dlogits_fm);
    out
}

/// [`softmax_xent`] on sample-major rows.
fn softmax_xent_rows(logits: &[f32], labels: &[u32], classes: usize, dlogits: &mut [f32]) -> StepOutput {
    let batch = labels.len() as f32;
    let mut loss = 0.0f64;
    let mut correct = 0;
    for ((row, d), &y) in logits
        .chunks_exact(classes)
        .zip(dlogits.chunks_exact_mut(classes))
        .zip(labels)
    {
        let (mut best, mut arg) = (f32::NEG_INFINITY, 0usize);
        for (j, &v) in row.iter().enumerate() {
            if v > best {
                best = v;
                arg = j;
            }
        }
        correct += (arg == y as usize) as usize;
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0f32;
        for (dj, &v) in d.iter_mut().zip(row) {
            let e = (v - max).exp();
            *dj = e;
            sum += e;
        }
        let lse = max + sum.ln();
        loss += (lse - row[y as usize]) as f64;
        let inv = 1.0 / (sum * batch);
        for dj in d.iter_mut() {
            *dj *= inv;
        }
        d[y as usize] -= 1.0 / batch;
    }
    StepOutput {
        loss: loss / labels.len() as f64,
        correct,
    }
}

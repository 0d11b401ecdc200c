//! The analyses of a model: the diagnostic sentinel (live in training, and
//! [`diagnose`] over a data set), depth [`stability`], adversarial [`attack`]s
//! and gradient masking, exact [`symmetry`] and the canonical form, and the
//! network [`sculpt`]or.

pub mod attack;
pub mod diagnose;
pub mod sculpt;
pub mod sentinel;
pub mod stability;
pub mod symmetry;

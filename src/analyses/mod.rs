//! The analyses of a model: the diagnostic sentinel (live in training, and
//! [`diagnose`] over a data set), depth [`stability`], adversarial [`attack`]s
//! and gradient masking, exact [`symmetry`] and the canonical form, the
//! network [`sculpt`]or, and the learned [`slopes`] profile by depth.

pub mod attack;
pub mod diagnose;
pub mod sculpt;
pub mod sentinel;
pub mod sentinel_rules;
pub mod slopes;
pub mod stability;
pub mod symmetry;

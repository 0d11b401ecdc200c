//! Layers and differentiable ops on candle tensors: the PReLU op with its
//! fused kernels ([`ops`]), the activation layers ([`activation`]), He init
//! for PReLU ([`init`]), the inverse ([`invert`]), convolution and pooling
//! ([`conv`], [`pool`]), the loss ([`loss`]) and in-place tensor access
//! ([`inplace`]).

pub mod activation;
pub mod conv;
pub mod init;
pub mod inplace;
pub mod invert;
pub mod loss;
pub mod ops;
pub mod pool;

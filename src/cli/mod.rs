//! The binary's commands, one module per command family. Each module holds
//! its clap argument struct, calls the library, and prints a result type
//! either as JSON (`--json`) or through its `Display`. The argument groups
//! shared by several commands (data, JSON, checkpoint spec) live in [`common`].

pub mod attack;
pub mod bench;
pub mod common;
pub mod files;
pub mod inspect;
pub mod symmetry;
pub mod train;

pub use common::{error_message, SpecArg};

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

pub use common::SpecArg;
/// The text of an error for people (the library's, so Python raises the same).
pub use prelu::error::message as error_message;

//! The library's error type, [`Error`], and [`Result`]. The public entry
//! points (training, loading a checkpoint, thread setup) return it, so a
//! caller can tell the cases it may handle apart (a run folder that is
//! taken, a data set that is missing, a tensor error) from the rest. Inside,
//! most code still uses `anyhow` for context; [`Error::Other`] carries that
//! chain. Messages speak of the library's own terms, never of CLI flags:
//! the command line adds its flags when it reports them.

use std::path::PathBuf;

/// What went wrong in a library call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A data set could not be found or read (names the file).
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A new run was asked for in a folder that already holds one.
    #[error("{} already holds a run (or other files); resume it, replace it, or choose another folder", dir.display())]
    RunExists { dir: PathBuf },
    /// A resumed run was asked to stop before the epochs it has done.
    #[error("{} has already trained {done} epochs; {asked} epochs would shorten it (nothing was changed)", dir.display())]
    WouldShorten { dir: PathBuf, done: usize, asked: usize },
    /// A value out of range (the message names it).
    #[error("{0}")]
    Invalid(String),
    /// Anything else, with its chain of context.
    #[error("{0:#}")]
    Other(anyhow::Error),
}

/// `Result` with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<anyhow::Error> for Error {
    /// Keeps a typed error that travelled inside an `anyhow::Error` (when no
    /// context was added on the way) typed.
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<Error>() {
            Ok(e) => e,
            Err(e) => match e.downcast::<crate::data::DataError>() {
                Ok(d) => Error::Data(d),
                Err(e) => match e.downcast::<candle_core::Error>() {
                    Ok(c) => Error::Candle(c),
                    Err(e) => Error::Other(e),
                },
            },
        }
    }
}

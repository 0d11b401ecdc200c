//! The library's error type, [`Error`], and [`Result`]. The library's
//! entry points (training, studies, reports, diagnostics, stability,
//! symmetry and sculpting, thread setup) return it, so a caller can tell
//! the cases it may handle apart (a run folder that is taken, a file or
//! folder that is missing, a data set that is missing, a value out of range,
//! a tensor error) from the rest. Inside, code may use `anyhow` for context;
//! [`Error::Other`] carries that chain. The building blocks that compose
//! with candle (the op, the layers, the model's forward pass, the layer
//! graph) return candle's `Result`, which `?` converts into [`Error`].
//! Messages speak of the library's own terms, never of CLI flags: the
//! command line adds its flags when it reports them.

use std::path::PathBuf;

/// What went wrong reading a data set; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not an IDX file (magic {magic:#010x}; expected 0x00000801 for labels or 0x00000803 for images)")]
    BadMagic { path: String, magic: u32 },
    #[error("{path}: unsupported IDX element type {code:#04x} (only unsigned bytes, 0x08, are supported)")]
    BadType { path: String, code: u8 },
    #[error("{path}: truncated: {what}")]
    Truncated { path: String, what: String },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
    #[error("images ({images}) and labels ({labels}) disagree: {what}")]
    Mismatch {
        images: String,
        labels: String,
        what: String,
    },
    #[error("data set `{name}` not found; looked in: {looked}. Pass --data-dir DIR, set PRELU_DATA, or use `mnist-small` (built in){hint}")]
    NotFound { name: String, looked: String, hint: String },
    #[error("unknown data set `{0}`; expected mnist, fashion-mnist or mnist-small")]
    UnknownSet(String),
}

/// Why a user file could not be read; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not a regular file (a {kind}); prelu reads user files only from regular files")]
    NotRegular { path: String, kind: &'static str },
    #[error("{path}: over the {cap}-byte cap for this kind of file (set PRELU_MAX_FILE_BYTES to change it)")]
    TooLarge { path: String, cap: u64 },
    #[error("{path}: a symbolic link to nothing (dangling); refusing to treat it as missing")]
    Dangling { path: String },
}

impl ReadError {
    /// True when nothing at all is at the path (not even a dangling link).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// What went wrong in a library call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A data set could not be found or read (names the file).
    #[error(transparent)]
    Data(#[from] crate::error::DataError),
    /// A user file could not be read (names the file).
    #[error(transparent)]
    Read(#[from] crate::error::ReadError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A new run was asked for in a folder that already holds one.
    #[error("{} already holds a run (or other files); resume it, replace it, or choose another folder", dir.display())]
    RunExists { dir: PathBuf },
    /// A resumed run was asked to stop before the epochs it has done.
    #[error("{} has already trained {done} epochs; {asked} epochs would shorten it (nothing was changed)", dir.display())]
    WouldShorten { dir: PathBuf, done: usize, asked: usize },
    /// Training diverged: the loss or a pre-activation became NaN or
    /// infinite (the message says where and which checkpoint is kept). A
    /// study records such a run as diverged rather than failing.
    #[error("{0}")]
    Diverged(String),
    /// A file or folder the call needs is not there.
    #[error("{}: {what} does not exist", path.display())]
    NotFound { path: PathBuf, what: &'static str },
    /// A value out of range, or a file that does not hold what it should
    /// (the message names it).
    #[error("{0}")]
    Invalid(String),
    /// Anything else, with its chain of context.
    #[error("{0:#}")]
    Other(anyhow::Error),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Other(e.into())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Other(e.into())
    }
}

impl Error {
    /// The text for people (what the CLI prints and the Python package
    /// raises): the message chain, each part once, without the backtrace
    /// candle attaches when `RUST_BACKTRACE` is set.
    pub fn message(&self) -> String {
        match self {
            Error::Candle(c) => candle_message(c),
            Error::Other(a) => message(a),
            other => other.to_string(),
        }
    }
}

/// [`Error::message`] of any error chain: the causes joined by `: `.
pub fn message(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = match (
            cause.downcast_ref::<candle_core::Error>(),
            cause.downcast_ref::<Error>(),
        ) {
            (Some(c), _) => candle_message(c),
            (_, Some(p)) => p.message(),
            _ => cause.to_string(),
        };
        // anyhow's chain repeats a transparent source's text; keep it once.
        if parts.last().is_none_or(|l| !l.ends_with(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        candle_core::Error::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        other => {
            let s = other.to_string();
            // Any other variant that carries a backtrace prints it after a newline.
            s.split("\nstack backtrace:")
                .next()
                .unwrap_or(&s)
                .trim_end()
                .to_string()
        }
    }
}

/// `Result` with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<anyhow::Error> for Error {
    /// Keeps a typed error that travelled inside an `anyhow::Error` typed,
    /// when no context was added on the way (a context's text is kept, in
    /// [`Error::Other`]).
    fn from(e: anyhow::Error) -> Self {
        match bare::<Error>(e) {
            Ok(e) => e,
            Err(e) => match bare::<crate::error::DataError>(e) {
                Ok(d) => Error::Data(d),
                Err(e) => match bare::<candle_core::Error>(e) {
                    Ok(c) => Error::Candle(c),
                    Err(e) => match bare::<crate::error::ReadError>(e) {
                        Ok(r) => Error::Read(r),
                        Err(e) => Error::Other(e),
                    },
                },
            },
        }
    }
}

/// The `T` inside `e` when `e` is just that error: anyhow also finds the
/// error under a context, whose text would be lost.
fn bare<T>(e: anyhow::Error) -> std::result::Result<T, anyhow::Error>
where
    T: std::fmt::Display + std::fmt::Debug + Send + Sync + 'static,
{
    match e.downcast_ref::<T>() {
        Some(t) if t.to_string() == e.to_string() => e.downcast::<T>(),
        _ => Err(e),
    }
}

/// `return Err(Error::Invalid(format!(...)))`: the library's `bail!`.
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Invalid(format!($($arg)*)))
    };
}
pub(crate) use fail;

//! Library errors as Python exceptions: the message chain, without the
//! backtrace candle attaches when `RUST_BACKTRACE` is set (as the CLI
//! prints them).

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::PyErr;

create_exception!(
    _prelu,
    PreluError,
    PyValueError,
    "An error of the prelu library (a file it cannot read, an op the graph cannot hold, data that does not fit)."
);

/// A library error as a `PreluError`.
pub fn py_err(e: prelu::Error) -> PyErr {
    PreluError::new_err(message(&e))
}

/// An error of another kind (JSON) as a `PreluError`.
pub fn other(e: impl std::fmt::Display) -> PyErr {
    PreluError::new_err(e.to_string())
}

fn message(e: &prelu::Error) -> String {
    match e {
        prelu::Error::Candle(c) => candle_message(c),
        prelu::Error::Other(a) => chain_message(a),
        other => other.to_string(),
    }
}

/// An anyhow chain's messages joined by `: `, each once.
fn chain_message(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = match (
            cause.downcast_ref::<candle_core::Error>(),
            cause.downcast_ref::<prelu::Error>(),
        ) {
            (Some(c), _) => candle_message(c),
            (_, Some(p)) => message(p),
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

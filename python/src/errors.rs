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
    PreluError::new_err(e.message())
}

/// An error of another kind (JSON) as a `PreluError`.
pub fn other(e: impl std::fmt::Display) -> PyErr {
    PreluError::new_err(e.to_string())
}

//! The `reptrace.Error` family of exceptions and the mapping from the Rust
//! crates' errors to them. Each carries the one-line message the CLI prints.
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    _reptrace,
    Error,
    PyException,
    "Base class of every reptrace error."
);
create_exception!(
    _reptrace,
    RecordError,
    Error,
    "Recording failed: the run stays readable up to its last commit."
);
create_exception!(
    _reptrace,
    AnalysisError,
    Error,
    "Opening, querying, attributing or verifying a run failed."
);
create_exception!(
    _reptrace,
    InvalidInput,
    Error,
    "An argument is not valid (a name, a length, a value)."
);

/// A recorder error as a Python exception.
pub fn record(e: reptrace_record::Error) -> PyErr {
    use reptrace_record::Error as E;
    let message = e.to_string();
    match e {
        E::Length { .. }
        | E::UnknownLayer { .. }
        | E::Setting { .. }
        | E::Model { .. }
        | E::Missing { .. }
        | E::NotEmpty { .. }
        | E::StepOrder { .. }
        | E::Invalid { .. }
        | E::Weights { .. } => InvalidInput::new_err(message),
        _ => RecordError::new_err(message),
    }
}

/// An analyzer error as a Python exception.
pub fn analysis(e: reptrace_analyze::Error) -> PyErr {
    use reptrace_analyze::Error as E;
    let message = e.to_string();
    match e {
        E::BadOption { .. }
        | E::UnknownLayer { .. }
        | E::UnknownProbe { .. }
        | E::Param { .. }
        | E::Refused(_) => InvalidInput::new_err(message),
        _ => AnalysisError::new_err(message),
    }
}

/// A format error (manifest, names) as a Python exception.
pub fn format(e: reptrace_format::Error) -> PyErr {
    AnalysisError::new_err(e.to_string())
}

/// An invalid argument, named.
pub fn invalid(message: impl Into<String>) -> PyErr {
    InvalidInput::new_err(message.into())
}

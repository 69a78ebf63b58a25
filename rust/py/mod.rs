//! Python bindings: the only place that knows about pyo3. Each submodule wraps one
//! area of the core; errors cross into Python through `to_py_err` alone.

use pyo3::prelude::*;

use crate::Error;

mod data;
mod gguf;

/// Converts a core error into the matching `backpropagate.errors` exception.
///
/// The Python side owns the hierarchy (`errors.from_code`), so codes, hints and
/// exit statuses live in one catalog.
pub(crate) fn to_py_err(err: Error) -> PyErr {
    Python::attach(|py| {
        let built = py
            .import("backpropagate.errors")
            .and_then(|m| m.getattr("from_code"))
            .and_then(|f| f.call1((err.code(), err.to_string())));
        match built {
            Ok(exc) => PyErr::from_value(exc),
            Err(import_failure) => import_failure,
        }
    })
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", crate::VERSION)?;
    data::register(m)?;
    gguf::register(m)?;
    Ok(())
}

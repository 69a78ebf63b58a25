//! Bindings of the GGUF writer: one call converts a model folder (and adapter) to GGUF.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::to_py_err;
use crate::gguf::{convert, ConvertOptions, OutType};

/// Converts a Hugging Face folder to GGUF; returns a dict describing what was written.
#[pyfunction]
#[pyo3(signature = (model_dir, output, quantization, adapter_dir=None, force=false, llama_cpp_lib=None, name=None, tokenizer_dir=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn convert_to_gguf<'py>(
    py: Python<'py>,
    model_dir: PathBuf,
    output: PathBuf,
    quantization: &str,
    adapter_dir: Option<PathBuf>,
    force: bool,
    llama_cpp_lib: Option<PathBuf>,
    name: Option<String>,
    tokenizer_dir: Option<PathBuf>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let out_type = OutType::parse(quantization).map_err(to_py_err)?;
    let opts = ConvertOptions {
        model_dir,
        adapter_dir,
        output,
        out_type,
        force,
        llama_cpp_lib,
        name,
        tokenizer_dir,
    };
    let report = py
        .detach(|| {
            convert(&opts, &|done, total| {
                if let Some(cb) = &progress {
                    Python::attach(|py| {
                        let _ = cb.call1(py, (done, total));
                    });
                }
            })
        })
        .map_err(to_py_err)?;
    let d = PyDict::new(py);
    d.set_item("path", report.path)?;
    d.set_item("bytes", report.bytes)?;
    d.set_item("tensors", report.tensors)?;
    d.set_item("types", report.types)?;
    d.set_item("source_bytes", report.source_bytes)?;
    d.set_item("seconds", report.seconds)?;
    Ok(d)
}

/// Quantization names the writer accepts.
#[pyfunction]
fn gguf_quantizations() -> Vec<&'static str> {
    OutType::NAMES.to_vec()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(convert_to_gguf, m)?)?;
    m.add_function(wrap_pyfunction!(gguf_quantizations, m)?)?;
    Ok(())
}

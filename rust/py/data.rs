//! Bindings of the data engine: whole files in, numpy arrays out (no copies), the GIL
//! released while Rust works.

use std::path::{Path, PathBuf};

use numpy::IntoPyArray;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::to_py_err;
use crate::data::bad::BadRow;
use crate::data::cache::{self, Meta};
use crate::data::config::Settings;
use crate::data::detect::detect;
use crate::data::model::{ModelAssets, ModelFiles};
use crate::data::prepare::{self as pipeline, Prepared};
use crate::data::read::{load_file, parse_object, FileBytes, Record};
use crate::data::template::{json_to_value, template_message, ChatTemplate};
use crate::{Error, Result};

/// What `prepare` did, handed to Python.
enum Outcome {
    /// Built now (and written to the cache when one is given).
    Built {
        prepared: Box<Prepared>,
        cache_dir: Option<PathBuf>,
        cache: &'static str,
        cache_error: Option<String>,
        refusal: Option<(&'static str, String)>,
    },
    /// Loaded from a verified cache entry.
    Cached { dir: PathBuf, meta: Box<Meta> },
}

fn source_bytes(source: &str, data: Option<Vec<u8>>) -> Result<FileBytes> {
    match data {
        Some(bytes) => Ok(FileBytes::Owned(bytes)),
        None => load_file(Path::new(source)),
    }
}

fn run_prepare(
    source: &str,
    model_dir: &str,
    settings: &Settings,
    cache_root: Option<&str>,
    data: Option<Vec<u8>>,
    strict: bool,
    tokenizer_json: Option<&str>,
) -> Result<Outcome> {
    let bytes = source_bytes(source, data)?;
    let files = ModelFiles::read(Path::new(model_dir), tokenizer_json.map(Path::new))?;
    let key = cache_root.map(|root| {
        (
            Path::new(root),
            cache::cache_key(&bytes, files.fingerprint, settings),
        )
    });
    let mut cache_state = "off";
    if let Some((root, key)) = &key {
        let dir = root.join(key);
        cache_state = "miss";
        if dir.exists() {
            match cache::verify(&dir) {
                Ok(meta) => {
                    return Ok(Outcome::Cached {
                        dir,
                        meta: Box::new(meta),
                    })
                }
                Err(Error::CacheCorrupt(_)) => {
                    std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                    cache_state = "rebuilt";
                }
                Err(e) => return Err(e),
            }
        }
    }
    let model = ModelAssets::build(&files, settings.chat_template.as_deref())?;
    let prepared = if strict {
        pipeline::prepare(source, &bytes, &model, settings)?
    } else {
        pipeline::build(source, &bytes, &model, settings)?
    };
    let refusal = pipeline::refusal(source, &prepared.stats, settings.skip_invalid)
        .map(|e| (e.code(), e.to_string()));
    let (cache_dir, cache_error) = match &key {
        Some((root, key)) if strict => match cache::write(root, key, &prepared) {
            Ok(dir) => (Some(dir), None),
            Err(e) => (None, Some(e.to_string())),
        },
        _ => (None, None),
    };
    Ok(Outcome::Built {
        prepared: Box::new(prepared),
        cache_dir,
        cache: cache_state,
        cache_error,
        refusal,
    })
}

/// Prepares a dataset file for training.
///
/// Returns a dict: `kind`, `max_seq_length`, `stats_json`, `cache` ("off", "miss",
/// "rebuilt" or "hit"), `cache_dir`, and, when built now, the arrays (a cache hit leaves
/// them on disk for numpy to memory-map) and `refusal`: the (code, message) a strict run
/// refuses the file with, or None. `tokenizer_json` replaces the folder's tokenizer.json
/// (one converted from a SentencePiece `tokenizer.model`).
#[pyfunction]
#[pyo3(signature = (source, model_dir, settings_json, cache_root=None, data=None, strict=true, tokenizer_json=None))]
#[allow(clippy::too_many_arguments)]
fn prepare_dataset<'py>(
    py: Python<'py>,
    source: &str,
    model_dir: &str,
    settings_json: &str,
    cache_root: Option<&str>,
    data: Option<Vec<u8>>,
    strict: bool,
    tokenizer_json: Option<&str>,
) -> PyResult<Bound<'py, PyDict>> {
    let settings = Settings::from_json(settings_json).map_err(to_py_err)?;
    let outcome = py
        .detach(|| {
            run_prepare(
                source,
                model_dir,
                &settings,
                cache_root,
                data,
                strict,
                tokenizer_json,
            )
        })
        .map_err(to_py_err)?;
    let out = PyDict::new(py);
    match outcome {
        Outcome::Cached { dir, meta } => {
            out.set_item("kind", &meta.kind)?;
            out.set_item("max_seq_length", meta.max_seq_length)?;
            out.set_item(
                "stats_json",
                serde_json::to_string(&meta.stats).unwrap_or_default(),
            )?;
            out.set_item("cache", "hit")?;
            out.set_item("cache_dir", dir.display().to_string())?;
        }
        Outcome::Built {
            prepared,
            cache_dir,
            cache,
            cache_error,
            refusal,
        } => {
            let p = *prepared;
            out.set_item("kind", p.kind.name())?;
            out.set_item("max_seq_length", p.max_seq_length)?;
            out.set_item(
                "stats_json",
                serde_json::to_string(&p.stats).unwrap_or_default(),
            )?;
            out.set_item("cache", cache)?;
            out.set_item("cache_dir", cache_dir.map(|d| d.display().to_string()))?;
            out.set_item("cache_error", cache_error)?;
            out.set_item("refusal", refusal)?;
            out.set_item("input_ids", p.input_ids.into_pyarray(py))?;
            out.set_item("labels", p.labels.into_pyarray(py))?;
            out.set_item("sample_offsets", p.sample_offsets.into_pyarray(py))?;
            out.set_item("pack_offsets", p.pack_offsets.into_pyarray(py))?;
            out.set_item("pack_samples", p.pack_samples.into_pyarray(py))?;
            out.set_item("pair_id", p.pair_id.into_pyarray(py))?;
            out.set_item("chosen", p.chosen.into_pyarray(py))?;
            out.set_item("kto_label", p.kto_label.into_pyarray(py))?;
        }
    }
    Ok(out)
}

/// Checks a cache entry folder; returns its metadata as JSON (STATE_CACHE_CORRUPT otherwise).
#[pyfunction]
fn verify_dataset_cache(py: Python<'_>, entry: &str) -> PyResult<String> {
    let meta = py
        .detach(|| cache::verify(Path::new(entry)))
        .map_err(to_py_err)?;
    Ok(serde_json::to_string(&meta).unwrap_or_default())
}

/// Renders a chat template the way preparation does (for tests, `validate` and debugging).
///
/// `messages_json` is a JSON list of messages; `globals_json` a JSON object of
/// special-token strings (bos_token, eos_token, ...).
#[pyfunction]
#[pyo3(signature = (template, messages_json, add_generation_prompt=false, globals_json="{}"))]
fn render_chat_template(
    template: &str,
    messages_json: &str,
    add_generation_prompt: bool,
    globals_json: &str,
) -> PyResult<String> {
    let bad = |what: &str, e: serde_json::Error| to_py_err(Error::Config(format!("{what}: {e}")));
    let messages: Vec<serde_json::Value> =
        serde_json::from_str(messages_json).map_err(|e| bad("messages_json", e))?;
    let globals: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(globals_json).map_err(|e| bad("globals_json", e))?;
    let globals: Vec<(String, String)> = globals
        .into_iter()
        .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
        .collect();
    let tpl = ChatTemplate::new(template, &globals).map_err(to_py_err)?;
    let values: Vec<minijinja::Value> = messages
        .into_iter()
        .map(|m| match m {
            serde_json::Value::Object(map) => template_message(map),
            other => json_to_value(&other),
        })
        .collect();
    tpl.render(&values, add_generation_prompt)
        .map_err(|e| to_py_err(Error::TemplateRender(e)))
}

/// Detects the shape of one JSONL row; returns the normalised row as JSON.
///
/// Raises INPUT_DATASET_PARSE_FAILED (not a JSON object) or
/// INPUT_DATASET_VALIDATION_FAILED (no known shape, wrong field types).
#[pyfunction]
fn detect_row(line: &str) -> PyResult<String> {
    let rec = Record {
        line: 1,
        bytes: line.as_bytes(),
    };
    let bad = |b: BadRow| to_py_err(b.cause.error(b.message));
    let row = parse_object(&rec).map_err(bad)?;
    let det = detect(&row).map_err(bad)?;
    Ok(det.to_json().to_string())
}

/// Best-fit-decreasing packing of `lengths` into rows of `capacity`: (row offsets, items).
#[pyfunction]
fn pack_bfd(
    py: Python<'_>,
    lengths: Vec<usize>,
    capacity: usize,
) -> PyResult<(Vec<usize>, Vec<usize>)> {
    if let Some(&too_long) = lengths.iter().find(|&&l| l > capacity) {
        return Err(to_py_err(Error::Config(format!(
            "an item of {too_long} tokens does not fit a row of {capacity}"
        ))));
    }
    let p = py.detach(|| crate::data::pack::pack_bfd(&lengths, capacity));
    Ok((p.offsets, p.items))
}

/// Scans a dataset without a model (for `backprop validate`): returns the scan as JSON
/// (stats, trace tag structure, characters per sample, and the refusal training would
/// give as `[code, message]` or null).
#[pyfunction]
#[pyo3(signature = (source, max_errors=20, data=None, skip_invalid=false))]
fn scan_dataset(
    py: Python<'_>,
    source: &str,
    max_errors: usize,
    data: Option<Vec<u8>>,
    skip_invalid: bool,
) -> PyResult<String> {
    let found = py
        .detach(|| {
            let bytes = source_bytes(source, data)?;
            crate::data::scan::scan(source, &bytes, max_errors, skip_invalid)
        })
        .map_err(to_py_err)?;
    Ok(serde_json::to_string(&found).unwrap_or_default())
}

/// Token ids and their byte ranges.
type IdsAndOffsets = (Vec<u32>, Vec<(usize, usize)>);

/// A model's tokenizer as preparation uses it (fast BPE where proven, else `tokenizers`).
#[pyclass(name = "DataTokenizer", module = "backpropagate._core", frozen)]
struct DataTokenizer {
    model: ModelAssets,
}

#[pymethods]
impl DataTokenizer {
    /// Loads the tokenizer files of `model_dir`; `fast=False` keeps the `tokenizers` crate;
    /// `tokenizer_json` replaces the folder's tokenizer.json.
    #[new]
    #[pyo3(signature = (model_dir, fast=true, tokenizer_json=None))]
    fn new(
        py: Python<'_>,
        model_dir: &str,
        fast: bool,
        tokenizer_json: Option<&str>,
    ) -> PyResult<Self> {
        let mut model = py
            .detach(|| ModelAssets::load(Path::new(model_dir), tokenizer_json.map(Path::new)))
            .map_err(to_py_err)?;
        if !fast {
            model.tokenizer.disable_fast_bpe().map_err(to_py_err)?;
        }
        Ok(DataTokenizer { model })
    }

    /// Whether the fast byte-level BPE encoder is in use.
    #[getter]
    fn fast_bpe(&self) -> bool {
        self.model.tokenizer.has_fast_bpe()
    }

    /// Token ids and byte offsets of `text` (special-token strings matched, none added).
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<IdsAndOffsets> {
        let enc = py
            .detach(|| self.model.tokenizer.encode(text))
            .map_err(|e| to_py_err(Error::TokenizerLoad(e)))?;
        Ok((
            enc.ids,
            enc.offsets.into_iter().map(|r| (r.start, r.end)).collect(),
        ))
    }

    /// Ids of `text` as a raw-text training sample: the tokenizer's own special tokens
    /// around it (BOS, ...), then EOS.
    fn encode_document(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.detach(|| self.model.tokenizer.encode_document(text))
            .map_err(|e| to_py_err(Error::TokenizerLoad(e)))
    }

    /// Encodes many texts in parallel; returns the id lists.
    fn encode_batch(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        use rayon::prelude::*;
        py.detach(|| {
            texts
                .par_iter()
                .map(|t| self.model.tokenizer.encode(t).map(|e| e.ids))
                .collect::<std::result::Result<Vec<_>, _>>()
        })
        .map_err(|e| to_py_err(Error::TokenizerLoad(e)))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DataTokenizer>()?;
    m.add_function(wrap_pyfunction!(detect_row, m)?)?;
    m.add_function(wrap_pyfunction!(pack_bfd, m)?)?;
    m.add_function(wrap_pyfunction!(scan_dataset, m)?)?;
    m.add_function(wrap_pyfunction!(render_chat_template, m)?)?;
    m.add_function(wrap_pyfunction!(prepare_dataset, m)?)?;
    m.add_function(wrap_pyfunction!(verify_dataset_cache, m)?)?;
    Ok(())
}

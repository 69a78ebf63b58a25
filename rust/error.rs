//! The one error type of the core. Each variant carries a stable code that the
//! Python side maps onto its `BackpropagateError` hierarchy at a single point.

use std::path::PathBuf;

/// Result alias used across the core.
pub type Result<T> = std::result::Result<T, Error>;

/// Errors of the core; `code()` gives the stable code shown to users.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the user gave could not be read: missing, a directory, permission denied, ...
    #[error("{path}: {}", read_failure(.source))]
    Input {
        /// The file involved.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
    /// A file of our own (cache, export) could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
    /// A setting is out of range or inconsistent.
    #[error("{0}")]
    Config(String),
    /// Dataset rows that are not JSON objects (malformed JSON, invalid UTF-8, not an object).
    #[error("{0}")]
    DatasetParse(String),
    /// Dataset rows of no known shape, or with fields of the wrong type.
    #[error("{0}")]
    DatasetValidation(String),
    /// A dataset file in an encoding other than UTF-8 (UTF-16 or UTF-32 byte-order mark).
    #[error("{0}")]
    DatasetEncoding(String),
    /// Nothing usable is left in a dataset.
    #[error("{0}")]
    DatasetEmpty(String),
    /// A chat template failed to compile or to render a row.
    #[error("{0}")]
    TemplateRender(String),
    /// A tokenizer (or its config) could not be loaded.
    #[error("{0}")]
    TokenizerLoad(String),
    /// Chat-shaped rows for a model with no chat template (and none chosen).
    #[error("{0}")]
    ChatTemplateMissing(String),
    /// A dataset cache entry is unreadable or inconsistent.
    #[error("{0}")]
    CacheCorrupt(String),
    /// A model folder is missing files or holds something unreadable.
    #[error("{0}")]
    Model(String),
    /// A model whose architecture (or part of it) llama.cpp's GGUF cannot hold.
    #[error("{0}")]
    UnsupportedArchitecture(String),
    /// A LoRA adapter folder that cannot be merged into its base.
    #[error("{0}")]
    Adapter(String),
    /// llama.cpp's library (for quantization kernels) is missing or unusable.
    #[error("{0}")]
    LlamaCppUnavailable(String),
    /// The output exists and overwriting was not asked for.
    #[error("{}: already exists", .0.display())]
    OutputExists(PathBuf),
    /// An export failed while writing; nothing appeared under the final name.
    #[error("{0}")]
    Export(String),
}

impl Error {
    /// Stable code, identical to the Python catalog's (`python/backpropagate/errors.py`).
    pub fn code(&self) -> &'static str {
        match self {
            Error::Input { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                "INPUT_FILE_NOT_FOUND"
            }
            Error::Input { .. } => "INPUT_FILE_UNREADABLE",
            Error::Io { .. } => "RUNTIME_IO_FAILED",
            Error::Config(_) => "CONFIG_INVALID_SETTING",
            Error::DatasetParse(_) => "INPUT_DATASET_PARSE_FAILED",
            Error::DatasetValidation(_) => "INPUT_DATASET_VALIDATION_FAILED",
            Error::DatasetEncoding(_) => "INPUT_DATASET_ENCODING_UNSUPPORTED",
            Error::DatasetEmpty(_) => "INPUT_DATASET_EMPTY",
            Error::TemplateRender(_) => "INPUT_TEMPLATE_RENDER_FAILED",
            Error::TokenizerLoad(_) => "INPUT_TOKENIZER_LOAD_FAILED",
            Error::ChatTemplateMissing(_) => "INPUT_CHAT_TEMPLATE_MISSING",
            Error::CacheCorrupt(_) => "STATE_CACHE_CORRUPT",
            Error::Model(_) => "INPUT_MODEL_LOAD_FAILED",
            Error::UnsupportedArchitecture(_) => "INPUT_UNSUPPORTED_ARCHITECTURE",
            Error::Adapter(_) => "INPUT_ADAPTER_INVALID",
            Error::LlamaCppUnavailable(_) => "DEP_LLAMA_CPP_UNAVAILABLE",
            Error::OutputExists(_) => "STATE_OUTPUT_EXISTS",
            Error::Export(_) => "RUNTIME_GGUF_EXPORT_FAILED",
        }
    }

    /// Wraps the failure to read a file the user gave (dataset, model file) with its path.
    pub fn input(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Input {
            path: path.into(),
            source,
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// What went wrong reading a file, in words a user acts on.
fn read_failure(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound => "no such file".into(),
        ErrorKind::PermissionDenied => "permission denied: this user may not read it".into(),
        ErrorKind::IsADirectory => "is a directory, not a file".into(),
        _ => format!("cannot be read: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_has_input_code() {
        let e = Error::input(
            "x.jsonl",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert_eq!(e.code(), "INPUT_FILE_NOT_FOUND");
        assert_eq!(e.to_string(), "x.jsonl: no such file");
    }

    #[test]
    fn unreadable_input_has_its_own_code() {
        use std::io::ErrorKind;
        for (kind, words) in [
            (ErrorKind::PermissionDenied, "permission denied"),
            (ErrorKind::IsADirectory, "is a directory"),
            (ErrorKind::InvalidData, "cannot be read"),
        ] {
            let e = Error::input("x.jsonl", std::io::Error::from(kind));
            assert_eq!(e.code(), "INPUT_FILE_UNREADABLE");
            assert!(e.to_string().starts_with("x.jsonl: "), "{e}");
            assert!(e.to_string().contains(words), "{e}");
        }
        let own = Error::io("cache", std::io::Error::from(ErrorKind::PermissionDenied));
        assert_eq!(own.code(), "RUNTIME_IO_FAILED");
    }
}

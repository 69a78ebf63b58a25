//! A model's tokenizer files: tokenizer, chat template and special tokens, plus a
//! fingerprint of the files for the dataset cache key.

use std::path::Path;

use serde_json::Value as Json;
use xxhash_rust::xxh3::Xxh3;

use super::template::{strftime, uses_clock, ChatTemplate, CHATML_TEMPLATE};
use super::tokenize::TextTokenizer;
use crate::{Error, Result};

/// Files read from a model folder, in fingerprint order.
const FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

/// Special-token fields transformers hands to chat templates.
const SPECIAL_FIELDS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
];

/// Everything preparation needs from a model folder.
pub struct ModelAssets {
    /// The tokenizer.
    pub tokenizer: TextTokenizer,
    /// The chat template (the model's own, or ChatML when it has none).
    pub template: ChatTemplate,
    /// Whether the ChatML default stands in for a missing template.
    pub default_template: bool,
    /// Hash of the tokenizer files (part of the dataset cache key).
    pub fingerprint: u128,
}

/// A model folder's tokenizer files, read and fingerprinted but not built (cheap: a
/// cache hit needs nothing more).
pub struct ModelFiles {
    dir: std::path::PathBuf,
    files: Vec<Option<Vec<u8>>>,
    config: Json,
    template_source: Option<String>,
    /// Hash of the files, plus today's date for templates that print it (the cache key part).
    pub fingerprint: u128,
}

impl ModelFiles {
    /// Reads the tokenizer files of the model folder `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<Option<Vec<u8>>> {
            match std::fs::read(dir.join(name)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::input(dir.join(name), e)),
            }
        };
        let files: Vec<Option<Vec<u8>>> = FILES.iter().map(|f| read(f)).collect::<Result<_>>()?;
        if files[0].is_none() {
            return Err(Error::TokenizerLoad(format!(
                "{}: no tokenizer.json in this folder",
                dir.display()
            )));
        }
        let mut hasher = Xxh3::new();
        for (name, bytes) in FILES.iter().zip(&files) {
            hasher.update(name.as_bytes());
            match bytes {
                Some(b) => {
                    hasher.update(&(b.len() as u64).to_le_bytes());
                    hasher.update(b);
                }
                None => hasher.update(b"-"),
            }
        }
        let config = parse_json(files[1].as_deref(), dir, "tokenizer_config.json")?;
        let template_source = match &files[2] {
            Some(b) => Some(String::from_utf8(b.clone()).map_err(|_| {
                Error::TemplateRender(format!(
                    "{}/chat_template.jinja is not UTF-8",
                    dir.display()
                ))
            })?),
            None => template_of(&config),
        };
        if template_source.as_deref().is_some_and(uses_clock) {
            // The rendering holds today's date, so a cached dataset is valid for today only.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            hasher.update(strftime("%Y-%m-%d", now).as_bytes());
        }
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            files,
            config,
            template_source,
            fingerprint: hasher.digest128(),
        })
    }
}

impl ModelAssets {
    /// Reads and builds the tokenizer and template of the model folder `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::build(&ModelFiles::read(dir)?)
    }

    /// Builds the tokenizer and template from files already read.
    pub fn build(files: &ModelFiles) -> Result<Self> {
        let dir = &files.dir;
        let origin = dir.display().to_string();
        let tokenizer_json = files.files[0].as_deref().unwrap_or_default();
        let special_map = parse_json(files.files[3].as_deref(), dir, "special_tokens_map.json")?;
        let globals = special_tokens(&files.config, &special_map);
        let eos = globals
            .iter()
            .find(|(k, _)| k == "eos_token")
            .map(|(_, v)| v.as_str());
        let tokenizer = TextTokenizer::from_bytes(tokenizer_json, &files.config, eos, &origin)?;
        let default_template = files.template_source.is_none();
        let source = files.template_source.as_deref().unwrap_or(CHATML_TEMPLATE);
        let template = ChatTemplate::new(source, &globals)
            .map_err(|e| Error::TemplateRender(format!("{origin}: {e}")))?;
        Ok(ModelAssets {
            tokenizer,
            template,
            default_template,
            fingerprint: files.fingerprint,
        })
    }
}

fn parse_json(bytes: Option<&[u8]>, dir: &Path, name: &str) -> Result<Json> {
    match bytes {
        None => Ok(Json::Null),
        Some(b) => serde_json::from_slice(b)
            .map_err(|e| Error::TokenizerLoad(format!("{}: {e}", dir.join(name).display()))),
    }
}

/// A special token's text: a plain string or an AddedToken object's `content`.
fn token_text(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// The special-token strings templates may use; tokenizer_config first, then special_tokens_map.
fn special_tokens(config: &Json, special_map: &Json) -> Vec<(String, String)> {
    SPECIAL_FIELDS
        .iter()
        .filter_map(|field| {
            config
                .get(field)
                .and_then(token_text)
                .or_else(|| special_map.get(field).and_then(token_text))
                .map(|t| (field.to_string(), t))
        })
        .collect()
}

/// The default chat template of a tokenizer_config: a string, or a list of named ones.
fn template_of(config: &Json) -> Option<String> {
    match config.get("chat_template")? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some(name))
            };
            named("default")
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Json::as_str)
                .map(str::to_string)
        }
        _ => None,
    }
}

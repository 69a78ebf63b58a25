//! A model's tokenizer files: tokenizer, chat template and special tokens, plus a
//! fingerprint of the files for the dataset cache key.

use std::path::Path;

use serde_json::Value as Json;
use xxhash_rust::xxh3::Xxh3;

use super::template::{builtin, strftime, uses_clock, ChatTemplate};
use super::tokenize::TextTokenizer;
use crate::{Error, Result};

/// Files read from a model folder, in fingerprint order (config.json for its
/// `model_type`, which decides how transformers loads the tokenizer).
const FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "config.json",
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
    /// The chat template: the one chosen, else the model's own; None when neither exists.
    pub template: Option<ChatTemplate>,
    /// Where the template comes from: `model`, a built-in name, `file`, or `none`.
    pub template_origin: String,
    /// Each marker of a chosen built-in template with the number of tokens the model's
    /// vocabulary makes of it (1: a single token, as it should be).
    pub template_markers: Vec<(String, usize)>,
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
    /// Reads the tokenizer files of the model folder `dir`; `tokenizer_json` replaces
    /// its tokenizer.json (one converted from a SentencePiece `tokenizer.model`).
    pub fn read(dir: &Path, tokenizer_json: Option<&Path>) -> Result<Self> {
        let read = |name: &str| -> Result<Option<Vec<u8>>> {
            let path = match tokenizer_json {
                Some(p) if name == FILES[0] => p.to_path_buf(),
                _ => dir.join(name),
            };
            match std::fs::read(&path) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::input(path, e)),
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
    /// Reads and builds the tokenizer and the model's own template of the folder `dir`.
    pub fn load(dir: &Path, tokenizer_json: Option<&Path>) -> Result<Self> {
        Self::build(&ModelFiles::read(dir, tokenizer_json)?, None)
    }

    /// Builds the tokenizer and template from files already read; `chosen` is the
    /// user's template (a built-in name or Jinja source), else the model's own is used.
    pub fn build(files: &ModelFiles, chosen: Option<&str>) -> Result<Self> {
        let dir = &files.dir;
        let origin = dir.display().to_string();
        let tokenizer_json = files.files[0].as_deref().unwrap_or_default();
        let special_map = parse_json(files.files[3].as_deref(), dir, "special_tokens_map.json")?;
        let globals = special_tokens(&files.config, &special_map);
        let model_config = parse_json(files.files[4].as_deref(), dir, "config.json")?;
        let special = |name: &str| {
            globals
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let tokenizer = TextTokenizer::from_bytes(
            tokenizer_json,
            &files.config,
            &model_config,
            (special("bos_token"), special("eos_token")),
            &origin,
        )?;
        let (source, template_origin, markers) = match chosen {
            Some(name) => match builtin(name) {
                Some(b) => (Some(b.source), b.name, b.markers),
                None => (Some(name), "file", &[][..]),
            },
            None => match files.template_source.as_deref() {
                Some(s) => (Some(s), "model", &[][..]),
                None => (None, "none", &[][..]),
            },
        };
        let template = source
            .map(|s| ChatTemplate::new(s, &globals))
            .transpose()
            .map_err(|e| Error::TemplateRender(format!("{origin}: {e}")))?;
        let template_markers = markers
            .iter()
            .map(|m| {
                Ok((
                    m.to_string(),
                    tokenizer.count(m).map_err(Error::TokenizerLoad)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(ModelAssets {
            tokenizer,
            template,
            template_origin: template_origin.to_string(),
            template_markers,
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

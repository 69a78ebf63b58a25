//! Tokenizer metadata for llama.cpp, read from a Hugging Face `tokenizer.json`.
//!
//! Two vocabulary kinds cover the supported families: byte-level BPE (`gpt2` in GGUF:
//! Llama 3, Qwen2/3, SmolLM) with its merges, and SentencePiece-style BPE with byte
//! fallback (`llama` in GGUF: Mistral, Phi-3) with scores. The pre-tokenizer name is
//! chosen from the tokenizer's own split rules, never from a hash list, so a locally
//! trained tokenizer with a family's rules exports as well as the original.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value as Json;

use super::types::Value;
use crate::{Error, Result};

// llama.cpp's token types (`enum llama_token_type`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// Split regex of Llama 3's tokenizer (also SmolLM3's).
pub const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Split regex of Qwen2's tokenizer (also Qwen2.5 and Qwen3).
pub const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Split regex of Qwen3.5's tokenizer: Qwen2's, with combining marks (`\p{M}`) kept inside words.
pub const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Split regex of o200k_base (GPT-4o, Phi-4-mini): cased words keep their contractions, digits go in threes.
pub const O200K_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);

pub(crate) fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Model(format!("{}: not valid JSON ({e})", path.display())))
}

fn token_content(v: &Json) -> Option<&str> {
    match v {
        Json::String(s) => Some(s),
        Json::Object(o) => o.get("content").and_then(Json::as_str),
        _ => None,
    }
}

/// Collects the pre-tokenizer steps (flattening `Sequence`).
fn pre_steps(pre: &Json) -> Vec<&Json> {
    match pre.get("type").and_then(Json::as_str) {
        Some("Sequence") => pre
            .get("pretokenizers")
            .and_then(Json::as_array)
            .map(|a| a.iter().flat_map(pre_steps).collect())
            .unwrap_or_default(),
        Some(_) => vec![pre],
        None => vec![],
    }
}

/// Chooses `tokenizer.ggml.pre` from the split rules of a byte-level BPE tokenizer.
pub fn pre_tokenizer_name(tok: &Json, arch: &str) -> Result<&'static str> {
    let pre = tok.get("pre_tokenizer").unwrap_or(&Json::Null);
    let steps = pre_steps(pre);
    let kinds: Vec<&str> = steps
        .iter()
        .filter_map(|s| s.get("type").and_then(Json::as_str))
        .collect();
    let regex = steps.iter().find_map(|s| {
        (s.get("type").and_then(Json::as_str) == Some("Split"))
            .then(|| {
                s.get("pattern")
                    .and_then(|p| p.get("Regex"))
                    .and_then(Json::as_str)
            })
            .flatten()
    });
    let byte_level_regex = steps.iter().any(|s| {
        s.get("type").and_then(Json::as_str) == Some("ByteLevel")
            && s.get("use_regex").and_then(Json::as_bool).unwrap_or(true)
    });
    let name = match (regex, kinds.as_slice()) {
        (Some(r), _) if r == LLAMA3_SPLIT => {
            if arch == "smollm3" {
                "smaug-bpe"
            } else {
                "llama-bpe"
            }
        }
        (Some(r), _) if r == QWEN2_SPLIT => "qwen2",
        (Some(r), _) if r == QWEN35_SPLIT => "qwen35",
        (Some(r), _) if r == O200K_SPLIT => "gpt-4o",
        (None, ["Digits", "ByteLevel"]) if byte_level_regex => "smollm",
        (None, ["ByteLevel"]) if byte_level_regex => "gpt-2",
        _ => {
            return Err(Error::Model(format!(
            "tokenizer.json: pre-tokenizer {} matches none of the families llama.cpp knows here \
                 (Llama 3, Qwen2, Qwen3.5, GPT-4o, SmolLM, GPT-2 byte-level)",
            serde_json::to_string(pre).unwrap_or_default()
        )))
        }
    };
    Ok(name)
}

/// Whether the tokenizer is SentencePiece-style (byte fallback, `▁` for spaces).
fn is_sentencepiece(tok: &Json) -> bool {
    tok.pointer("/model/byte_fallback").and_then(Json::as_bool) == Some(true)
}

/// Whether SentencePiece input gets a leading `▁` (Prepend normalizer or Metaspace).
fn adds_space_prefix(tok: &Json) -> bool {
    let normalizer = tok.get("normalizer").unwrap_or(&Json::Null);
    let text = serde_json::to_string(normalizer).unwrap_or_default();
    if text.contains("\"Prepend\"") {
        return true;
    }
    let pre = tok.get("pre_tokenizer").unwrap_or(&Json::Null);
    pre_steps(pre).iter().any(|s| {
        s.get("type").and_then(Json::as_str) == Some("Metaspace")
            && s.get("prepend_scheme").and_then(Json::as_str) != Some("never")
    })
}

fn looks_special(text: &str) -> bool {
    (text.starts_with("<|") && text.ends_with("|>")) || matches!(text, "<pad>" | "<mask>")
}

fn is_byte_token(text: &str) -> bool {
    text.len() == 6
        && text.starts_with("<0x")
        && text.ends_with('>')
        && text[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

fn merges_of(tok: &Json) -> Vec<String> {
    tok.pointer("/model/merges")
        .and_then(Json::as_array)
        .map(|merges| {
            merges
                .iter()
                .filter_map(|m| match m {
                    Json::String(s) => Some(s.clone()),
                    Json::Array(pair) => {
                        let a = pair.first()?.as_str()?;
                        let b = pair.get(1)?.as_str()?;
                        Some(format!("{a} {b}"))
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Reads the chat template: `chat_template.jinja` first, then `tokenizer_config.json`.
pub fn chat_template(dir: &Path, tok_config: &Json) -> Result<Option<String>> {
    let file = dir.join("chat_template.jinja");
    if file.exists() {
        return std::fs::read_to_string(&file)
            .map(Some)
            .map_err(|e| Error::io(&file, e));
    }
    Ok(match tok_config.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .or_else(|| named.first())
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(str::to_string),
        _ => None,
    })
}

/// Whether the post-processor's single-sequence template starts (or ends) with `token`.
fn template_adds(tok: &Json, token: &str, at_start: bool) -> Option<bool> {
    fn find_template(p: &Json) -> Option<&Json> {
        match p.get("type").and_then(Json::as_str)? {
            "TemplateProcessing" => Some(p),
            "Sequence" => p
                .get("processors")?
                .as_array()?
                .iter()
                .find_map(find_template),
            _ => None,
        }
    }
    let template = find_template(tok.get("post_processor")?)?;
    let single = template.get("single")?.as_array()?;
    let piece = if at_start {
        single.first()
    } else {
        single.last()
    }?;
    let id = piece.pointer("/SpecialToken/id").and_then(Json::as_str);
    Some(id == Some(token))
}

/// Builds every `tokenizer.*` key for the model in `dir`, sized to `vocab_size` rows.
pub fn tokenizer_metadata(
    dir: &Path,
    arch: &str,
    vocab_size: usize,
    config: &Json,
) -> Result<Vec<(String, Value)>> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(Error::Model(format!(
            "{}: missing; GGUF export needs the model's tokenizer.json",
            tok_path.display()
        )));
    }
    let tok = read_json(&tok_path)?;
    let cfg_path = dir.join("tokenizer_config.json");
    let tok_config = if cfg_path.exists() {
        read_json(&cfg_path)?
    } else {
        Json::Object(Default::default())
    };
    let spm = is_sentencepiece(&tok);

    // id -> (text, special) from the model vocabulary and the added tokens.
    let mut by_id: HashMap<usize, (String, Option<bool>)> = HashMap::new();
    if let Some(vocab) = tok.pointer("/model/vocab").and_then(Json::as_object) {
        for (text, id) in vocab {
            if let Some(id) = id.as_u64() {
                by_id.insert(id as usize, (text.clone(), None));
            }
        }
    } else {
        return Err(Error::Model(format!(
            "{}: model.vocab missing; only BPE tokenizers are supported",
            tok_path.display()
        )));
    }
    let added = tok
        .get("added_tokens")
        .and_then(Json::as_array)
        .cloned()
        .unwrap_or_default();
    for a in &added {
        if let (Some(id), Some(text)) = (
            a.get("id").and_then(Json::as_u64),
            a.get("content").and_then(Json::as_str),
        ) {
            let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
            by_id.insert(id as usize, (text.to_string(), Some(special)));
        }
    }
    let max_id = by_id.keys().copied().max().unwrap_or(0);
    if max_id >= vocab_size {
        return Err(Error::Model(format!(
            "{}: token id {max_id} does not fit the model's vocab_size {vocab_size}",
            tok_path.display()
        )));
    }

    let merges = merges_of(&tok);
    // SentencePiece scores: a token made by merge number k scores -k, so llama.cpp's
    // highest-score-first bigram merging applies merges in the tokenizer's rank order.
    let mut merge_rank: HashMap<String, usize> = HashMap::new();
    if spm {
        for (rank, m) in merges.iter().enumerate() {
            if let Some((a, b)) = m.split_once(' ') {
                merge_rank.entry(format!("{a}{b}")).or_insert(rank);
            }
        }
    }
    let unk = tok.pointer("/model/unk_token").and_then(Json::as_str);

    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    let mut scores = Vec::with_capacity(if spm { vocab_size } else { 0 });
    for id in 0..vocab_size {
        let Some((text, special)) = by_id.get(&id) else {
            tokens.push(format!("[PAD{id}]"));
            types.push(UNUSED);
            scores.push(-10000.0);
            continue;
        };
        let ty = match special {
            Some(true) if Some(text.as_str()) == unk => UNKNOWN,
            Some(true) => CONTROL,
            Some(false) if looks_special(text) => CONTROL,
            Some(false) => USER_DEFINED,
            None if spm && Some(text.as_str()) == unk => UNKNOWN,
            None if spm && is_byte_token(text) => BYTE,
            None => NORMAL,
        };
        let score = match ty {
            NORMAL => merge_rank.get(text).map_or(-1e9, |&r| -(r as f32)),
            USER_DEFINED => -1000.0,
            _ => 0.0,
        };
        tokens.push(text.clone());
        types.push(ty);
        scores.push(score);
    }

    let mut kvs: Vec<(String, Value)> = Vec::new();
    let mut put = |k: &str, v: Value| kvs.push((k.to_string(), v));
    if spm {
        put("tokenizer.ggml.model", Value::Str("llama".into()));
        put("tokenizer.ggml.pre", Value::Str("default".into()));
    } else {
        put("tokenizer.ggml.model", Value::Str("gpt2".into()));
        put(
            "tokenizer.ggml.pre",
            Value::Str(pre_tokenizer_name(&tok, arch)?.into()),
        );
    }
    put("tokenizer.ggml.tokens", Value::ArrStr(tokens));
    if spm {
        put("tokenizer.ggml.scores", Value::ArrF32(scores));
    }
    put("tokenizer.ggml.token_type", Value::ArrI32(types));
    if !spm {
        put("tokenizer.ggml.merges", Value::ArrStr(merges));
    }

    // Special tokens: the tokenizer config names them, config.json has ids as fallback.
    let id_of = |text: &str| -> Option<u32> {
        added
            .iter()
            .find(|a| a.get("content").and_then(Json::as_str) == Some(text))
            .and_then(|a| a.get("id").and_then(Json::as_u64))
            .or_else(|| {
                tok.pointer("/model/vocab")
                    .and_then(|v| v.get(text))
                    .and_then(Json::as_u64)
            })
            .map(|id| id as u32)
    };
    let special = |kind: &str| -> Option<(u32, String)> {
        let named = tok_config
            .get(format!("{kind}_token"))
            .and_then(token_content)
            .and_then(|t| id_of(t).map(|id| (id, t.to_string())));
        named.or_else(|| {
            let id = match config.get(format!("{kind}_token_id")) {
                Some(Json::Array(ids)) => ids.first().and_then(Json::as_u64),
                Some(v) => v.as_u64(),
                None => None,
            }? as u32;
            Some((
                id,
                by_id
                    .get(&(id as usize))
                    .map(|t| t.0.clone())
                    .unwrap_or_default(),
            ))
        })
    };
    let bos = special("bos");
    let eos = special("eos");
    let unk_id = special("unk");
    let pad = special("pad");
    for (key, found) in [
        ("bos", &bos),
        ("eos", &eos),
        ("unknown", &unk_id),
        ("padding", &pad),
    ] {
        if let Some((id, _)) = found {
            kvs.push((format!("tokenizer.ggml.{key}_token_id"), Value::U32(*id)));
        }
    }
    let flag = |key: &str| tok_config.get(key).and_then(Json::as_bool);
    let add_bos = flag("add_bos_token")
        .or_else(|| bos.as_ref().and_then(|(_, t)| template_adds(&tok, t, true)))
        .unwrap_or(false);
    let add_eos = flag("add_eos_token")
        .or_else(|| {
            eos.as_ref()
                .and_then(|(_, t)| template_adds(&tok, t, false))
        })
        .unwrap_or(false);
    kvs.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    kvs.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(add_eos)));
    if spm {
        kvs.push((
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(adds_space_prefix(&tok)),
        ));
    }
    if let Some(template) = chat_template(dir, &tok_config)? {
        kvs.push(("tokenizer.chat_template".into(), Value::Str(template)));
    }
    Ok(kvs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_pre(pre: Json) -> Json {
        serde_json::json!({ "pre_tokenizer": pre })
    }

    #[test]
    fn pre_tokenizer_follows_split_rules() {
        let split = |r: &str| {
            with_pre(serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated"},
                {"type": "ByteLevel", "use_regex": false}]}))
        };
        assert_eq!(
            pre_tokenizer_name(&split(LLAMA3_SPLIT), "llama").unwrap(),
            "llama-bpe"
        );
        assert_eq!(
            pre_tokenizer_name(&split(LLAMA3_SPLIT), "smollm3").unwrap(),
            "smaug-bpe"
        );
        assert_eq!(
            pre_tokenizer_name(&split(QWEN2_SPLIT), "qwen3").unwrap(),
            "qwen2"
        );
        assert_eq!(
            pre_tokenizer_name(&split(QWEN35_SPLIT), "qwen35").unwrap(),
            "qwen35"
        );
        assert_eq!(
            pre_tokenizer_name(&split(O200K_SPLIT), "phi3").unwrap(),
            "gpt-4o"
        );
        let smol = with_pre(serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, {"type": "ByteLevel", "use_regex": true}]}));
        assert_eq!(pre_tokenizer_name(&smol, "llama").unwrap(), "smollm");
        let err = pre_tokenizer_name(&split("\\s+"), "llama").unwrap_err();
        assert_eq!(err.code(), "INPUT_MODEL_LOAD_FAILED");
    }

    #[test]
    fn byte_tokens_are_recognised() {
        assert!(is_byte_token("<0x0A>"));
        assert!(!is_byte_token("<0xZZ>"));
        assert!(!is_byte_token("<s>"));
    }
}

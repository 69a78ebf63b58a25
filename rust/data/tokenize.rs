//! Tokenization of rendered text into ids with byte offsets.
//!
//! The `tokenizers` crate reads every `tokenizer.json` and is the reference. A fast
//! byte-level BPE (`bpe.rs`) takes over where it is proven identical; anything it does
//! not cover (SentencePiece, Unigram, WordPiece, unusual normalizers) stays on the crate.

use std::ops::Range;

use serde_json::Value as Json;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{NormalizerWrapper, Tokenizer};

use crate::{Error, Result};

/// Token ids with the byte range of the text each came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoded {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Byte range in the input of each token.
    pub offsets: Vec<Range<usize>>,
}

/// The tokenizer of one model.
pub struct TextTokenizer {
    hf: Tokenizer,
    eos_id: Option<u32>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` bytes with the model's `tokenizer_config.json` (Null when
    /// absent); `eos` is the end-of-sequence token text, if known.
    pub fn from_bytes(json: &[u8], config: &Json, eos: Option<&str>, origin: &str) -> Result<Self> {
        let load_err = |e: &dyn std::fmt::Display| {
            Error::TokenizerLoad(format!("{origin}: cannot load tokenizer.json: {e}"))
        };
        let mut hf = Tokenizer::from_bytes(json).map_err(|e| load_err(&e))?;
        hf.with_truncation(None).map_err(|e| load_err(&e))?;
        hf.with_padding(None);
        if is_sentencepiece_llama_class(config) {
            as_transformers_llama_tokenizer(&mut hf, config).map_err(|e| load_err(&e))?;
        }
        let eos_id = eos.and_then(|t| hf.token_to_id(t));
        Ok(TextTokenizer { hf, eos_id })
    }

    /// Id of a token text, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.hf.token_to_id(token)
    }

    /// The end-of-sequence id, if the model names one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Encodes text as it is, special-token strings in it included, adding nothing.
    pub fn encode(&self, text: &str) -> std::result::Result<Encoded, String> {
        let enc = self.hf.encode(text, false).map_err(|e| e.to_string())?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().iter().map(|&(s, e)| s..e).collect(),
        })
    }

    /// Number of tokens of `text` (no special tokens added).
    pub fn count(&self, text: &str) -> std::result::Result<usize, String> {
        Ok(self.encode(text)?.ids.len())
    }

    /// A raw-text training sample: the tokenizer's own special tokens (e.g. BOS), then the
    /// text, then EOS so the model learns where documents end.
    pub fn encode_document(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        let enc = self.hf.encode(text, true).map_err(|e| e.to_string())?;
        let mut ids = enc.get_ids().to_vec();
        if let Some(eos) = self.eos_id {
            if ids.last() != Some(&eos) {
                ids.push(eos);
            }
        }
        Ok(ids)
    }
}

/// Whether transformers loads this tokenizer as its SentencePiece-style `LlamaTokenizer`
/// (Llama 2, Mistral, Mixtral, Phi-3, ...), which rebuilds the pipeline around the vocab.
fn is_sentencepiece_llama_class(config: &Json) -> bool {
    matches!(
        config.get("tokenizer_class").and_then(Json::as_str),
        Some("LlamaTokenizer" | "LlamaTokenizerFast")
    )
}

/// Applies what transformers' `LlamaTokenizer` does on load: no normalizer, a Metaspace
/// pre-tokenizer whose prefix space goes on every segment (`legacy`) or only the first,
/// and BOS / EOS from `add_bos_token` / `add_eos_token`. Without this, special tokens in a
/// rendered template would get a stray prefix space that transformers does not produce.
fn as_transformers_llama_tokenizer(hf: &mut Tokenizer, config: &Json) -> tokenizers::Result<()> {
    let flag =
        |name: &str, default: bool| config.get(name).and_then(Json::as_bool).unwrap_or(default);
    let scheme = match (flag("add_prefix_space", true), flag("legacy", false)) {
        (false, _) => PrependScheme::Never,
        (true, true) => PrependScheme::Always,
        (true, false) => PrependScheme::First,
    };
    hf.with_normalizer(None::<NormalizerWrapper>)?;
    hf.with_pre_tokenizer(Some(Metaspace::new('\u{2581}', scheme, false)));
    let token = |name: &str| {
        config.get(name).and_then(|v| match v {
            Json::String(s) => Some(s.clone()),
            Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
            _ => None,
        })
    };
    let mut single = Vec::new();
    let mut specials = Vec::new();
    for (flag_name, default, token_name, before) in [
        ("add_bos_token", true, "bos_token", true),
        ("add_eos_token", false, "eos_token", false),
    ] {
        if let Some(t) = token(token_name).filter(|_| flag(flag_name, default)) {
            if let Some(id) = hf.token_to_id(&t) {
                specials.push((t.clone(), id));
                if before {
                    single.insert(0, t)
                } else {
                    single.push(t)
                }
            }
        }
    }
    let at = single
        .iter()
        .position(|t| Some(t) == token("eos_token").as_ref())
        .filter(|_| flag("add_eos_token", false));
    single.insert(at.unwrap_or(single.len()), "$A".to_string());
    let processor = TemplateProcessing::builder()
        .try_single(single.join(" "))
        .map_err(|e| format!("post-processor: {e}"))?
        .special_tokens(specials)
        .build()
        .map_err(|e| format!("post-processor: {e}"))?;
    hf.with_post_processor(Some(processor));
    Ok(())
}

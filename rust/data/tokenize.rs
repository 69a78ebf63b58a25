//! Tokenization of rendered text into ids with byte offsets.
//!
//! The `tokenizers` crate reads every `tokenizer.json` and is the reference. A fast
//! byte-level BPE (`bpe.rs`) takes over where it is proven identical; anything it does
//! not cover (SentencePiece, Unigram, WordPiece, unusual normalizers) stays on the crate.

use std::ops::Range;
use std::sync::OnceLock;

use serde_json::Value as Json;

use super::bpe::FastBpe;
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
///
/// With the fast encoder, the `tokenizers` crate is only built when some text needs it
/// (building it for a large vocabulary costs about a second).
pub struct TextTokenizer {
    json: Vec<u8>,
    config: Json,
    origin: String,
    hf: OnceLock<std::result::Result<Tokenizer, String>>,
    fast: Option<FastBpe>,
    /// Special tokens the post-processor puts around one sequence (for raw text).
    affixes: Option<(Vec<u32>, Vec<u32>)>,
    eos_id: Option<u32>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` bytes with the model's `tokenizer_config.json` (Null when
    /// absent); `eos` is the end-of-sequence token text, if known.
    pub fn from_bytes(json: &[u8], config: &Json, eos: Option<&str>, origin: &str) -> Result<Self> {
        // Only the post-processor is read here (the rest is skipped, not built).
        let post: PostProcessorOnly = serde_json::from_slice(json).map_err(|e| {
            Error::TokenizerLoad(format!("{origin}: cannot load tokenizer.json: {e}"))
        })?;
        let llama_class = is_sentencepiece_llama_class(config, json);
        let fast = if llama_class {
            None
        } else {
            FastBpe::from_bytes(json)
        };
        let mut tok = TextTokenizer {
            json: json.to_vec(),
            config: config.clone(),
            origin: origin.to_string(),
            hf: OnceLock::new(),
            affixes: fast
                .as_ref()
                .and_then(|_| sequence_affixes(&post.post_processor)),
            fast,
            eos_id: None,
        };
        if tok.fast.is_none() {
            tok.hf().map_err(Error::TokenizerLoad)?;
        }
        tok.eos_id = eos.and_then(|t| tok.token_id(t));
        Ok(tok)
    }

    /// The `tokenizers` crate's tokenizer, built on first use.
    fn hf(&self) -> std::result::Result<&Tokenizer, String> {
        self.hf
            .get_or_init(|| {
                let err = |e: &dyn std::fmt::Display| {
                    format!("{}: cannot load tokenizer.json: {e}", self.origin)
                };
                let mut hf = Tokenizer::from_bytes(&self.json).map_err(|e| err(&e))?;
                hf.with_truncation(None).map_err(|e| err(&e))?;
                hf.with_padding(None);
                if is_sentencepiece_llama_class(&self.config, &self.json) {
                    as_transformers_llama_tokenizer(&mut hf, &self.config).map_err(|e| err(&e))?;
                }
                Ok(hf)
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Whether the fast byte-level BPE encodes (else the `tokenizers` crate does).
    pub fn has_fast_bpe(&self) -> bool {
        self.fast.is_some()
    }

    /// Turns the fast encoder off (for parity tests and benchmarks against the crate).
    pub fn disable_fast_bpe(&mut self) -> Result<()> {
        self.fast = None;
        self.affixes = None;
        self.hf().map(|_| ()).map_err(Error::TokenizerLoad)
    }

    /// Id of a token text, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.fast {
            Some(f) => f.token_id(token),
            None => self.hf().ok()?.token_to_id(token),
        }
    }

    /// The end-of-sequence id, if the model names one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Encodes text as it is, special-token strings in it included, adding nothing.
    pub fn encode(&self, text: &str) -> std::result::Result<Encoded, String> {
        let mut out = Encoded::default();
        if let Some(fast) = &self.fast {
            if fast.encode(text, &mut out.ids, &mut out.offsets) {
                return Ok(out);
            }
        }
        let enc = self.hf()?.encode(text, false).map_err(|e| e.to_string())?;
        out.ids = enc.get_ids().to_vec();
        out.offsets = enc.get_offsets().iter().map(|&(s, e)| s..e).collect();
        Ok(out)
    }

    /// Number of tokens of `text` (no special tokens added).
    pub fn count(&self, text: &str) -> std::result::Result<usize, String> {
        Ok(self.encode(text)?.ids.len())
    }

    /// A raw-text training sample: the tokenizer's own special tokens (e.g. BOS), then the
    /// text, then EOS so the model learns where documents end.
    pub fn encode_document(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        let mut ids = match (&self.fast, &self.affixes) {
            (Some(fast), Some((prefix, suffix))) => {
                let mut ids = prefix.clone();
                let mut offsets = Vec::new();
                if fast.encode(text, &mut ids, &mut offsets) {
                    ids.extend_from_slice(suffix);
                    Some(ids)
                } else {
                    None
                }
            }
            _ => None,
        }
        .map_or_else(
            || {
                Ok::<_, String>(
                    self.hf()?
                        .encode(text, true)
                        .map_err(|e| e.to_string())?
                        .get_ids()
                        .to_vec(),
                )
            },
            Ok,
        )?;
        if let Some(eos) = self.eos_id {
            if ids.last() != Some(&eos) {
                ids.push(eos);
            }
        }
        Ok(ids)
    }
}

/// The post-processor of a tokenizer.json.
#[derive(serde::Deserialize)]
struct PostProcessorOnly {
    #[serde(default)]
    post_processor: Json,
}

/// The special tokens a tokenizer.json's post-processor adds around one sequence, when
/// it is one the fast path understands (none, ByteLevel, TemplateProcessing, or a
/// Sequence of those).
fn sequence_affixes(post_processor: &Json) -> Option<(Vec<u32>, Vec<u32>)> {
    fn walk(p: &Json, out: &mut (Vec<u32>, Vec<u32>)) -> Option<()> {
        if p.is_null() {
            return Some(());
        }
        match p.get("type")?.as_str()? {
            "ByteLevel" => Some(()),
            "Sequence" => p
                .get("processors")?
                .as_array()?
                .iter()
                .try_for_each(|q| walk(q, out)),
            "TemplateProcessing" => {
                let mut after = false;
                for piece in p.get("single")?.as_array()? {
                    if piece.get("Sequence").is_some() {
                        after = true;
                        continue;
                    }
                    let name = piece.get("SpecialToken")?.get("id")?.as_str()?;
                    let ids = p.get("special_tokens")?.get(name)?.get("ids")?.as_array()?;
                    let side = if after { &mut out.1 } else { &mut out.0 };
                    for id in ids {
                        side.push(u32::try_from(id.as_u64()?).ok()?);
                    }
                }
                Some(())
            }
            _ => None,
        }
    }
    let mut out = (Vec::new(), Vec::new());
    walk(post_processor, &mut out)?;
    Some(out)
}

/// Whether transformers loads this tokenizer as its SentencePiece-style `LlamaTokenizer`
/// (Llama 2, Mistral, Mixtral, Phi-3, ...), which rebuilds the pipeline around the vocab.
/// Like transformers, a tokenizer.json that is byte-level keeps its own pipeline even when
/// the config names `LlamaTokenizer` (many Llama 3 derivatives do).
fn is_sentencepiece_llama_class(config: &Json, tokenizer_json: &[u8]) -> bool {
    let class = config
        .get("tokenizer_class")
        .and_then(Json::as_str)
        .unwrap_or_default();
    class.trim_end_matches("Fast") == "LlamaTokenizer"
        && memchr::memmem::find(tokenizer_json, b"\"ByteLevel\"").is_none()
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

//! Tokenization of rendered text into ids with byte offsets.
//!
//! The `tokenizers` crate reads every `tokenizer.json` and is the reference. A fast
//! byte-level BPE (`bpe.rs`) takes over where it is proven identical; anything it does
//! not cover (SentencePiece, Unigram, WordPiece, unusual normalizers) stays on the crate.

use std::ops::Range;
use std::sync::OnceLock;

use serde_json::Value as Json;

use super::bpe::FastBpe;
use super::tokenizer_class::{self, Pipeline};
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
    pipeline: Pipeline,
    /// BOS / EOS transformers adds around a sequence, when it overrides the file's own.
    bos_eos: Option<(bool, bool)>,
    bos: Option<String>,
    eos: Option<String>,
    hf: OnceLock<std::result::Result<Tokenizer, String>>,
    fast: Option<FastBpe>,
    /// Special tokens the post-processor puts around one sequence (for raw text).
    affixes: Option<(Vec<u32>, Vec<u32>)>,
    eos_id: Option<u32>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` bytes the way transformers does for this folder, given its
    /// `tokenizer_config.json` and `config.json` (Null when absent) and the BOS / EOS token
    /// texts, if known.
    pub fn from_bytes(
        json: &[u8],
        config: &Json,
        model_config: &Json,
        specials: (Option<&str>, Option<&str>),
        origin: &str,
    ) -> Result<Self> {
        // Only the post-processor is read here (the rest is skipped, not built).
        let post: PostProcessorOnly = serde_json::from_slice(json).map_err(|e| {
            Error::TokenizerLoad(format!("{origin}: cannot load tokenizer.json: {e}"))
        })?;
        let pipeline = tokenizer_class::pipeline(config, model_config, json);
        let json = tokenizer_class::as_loaded(pipeline, json, config).map_err(|e| {
            Error::TokenizerLoad(format!("{origin}: cannot load tokenizer.json: {e}"))
        })?;
        let fast = match pipeline {
            Pipeline::SentencePieceLlama => None,
            _ => FastBpe::from_bytes(&json),
        };
        let mut tok = TextTokenizer {
            json: json.to_vec(),
            config: config.clone(),
            origin: origin.to_string(),
            pipeline,
            bos_eos: tokenizer_class::bos_eos(pipeline, config, !post.post_processor.is_null()),
            bos: specials.0.map(str::to_string),
            eos: specials.1.map(str::to_string),
            hf: OnceLock::new(),
            affixes: None,
            fast,
            eos_id: None,
        };
        if let Some(fast) = &tok.fast {
            tok.affixes = match tok.bos_eos {
                Some(flags) => Some(tok.flag_affixes(flags, |t| fast.token_id(t))),
                None => sequence_affixes(&post.post_processor),
            };
        } else {
            tok.hf().map_err(Error::TokenizerLoad)?;
        }
        tok.eos_id = specials.1.and_then(|t| tok.token_id(t));
        Ok(tok)
    }

    /// The BOS / EOS ids transformers adds around one sequence for `(add_bos, add_eos)`
    /// (a token the vocabulary lacks is left out, as transformers does).
    fn flag_affixes(
        &self,
        (add_bos, add_eos): (bool, bool),
        id: impl Fn(&str) -> Option<u32>,
    ) -> (Vec<u32>, Vec<u32>) {
        let pick = |on: bool, token: &Option<String>| {
            token
                .as_deref()
                .filter(|_| on)
                .and_then(&id)
                .into_iter()
                .collect()
        };
        (pick(add_bos, &self.bos), pick(add_eos, &self.eos))
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
                if self.pipeline == Pipeline::SentencePieceLlama {
                    as_transformers_llama_pipeline(&mut hf, &self.config).map_err(|e| err(&e))?;
                }
                if let Some(flags) = self.bos_eos {
                    let (prefix, suffix) = self.flag_affixes(flags, |t| hf.token_to_id(t));
                    with_affixes(&mut hf, &prefix, &suffix).map_err(|e| err(&e))?;
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

/// Applies what transformers' `LlamaTokenizer` does to the pipeline on load: no
/// normalizer, and a Metaspace pre-tokenizer whose prefix space goes on every segment
/// (`legacy`) or only the first. Without this, special tokens in a rendered template would
/// get a stray prefix space that transformers does not produce.
fn as_transformers_llama_pipeline(hf: &mut Tokenizer, config: &Json) -> tokenizers::Result<()> {
    let flag =
        |name: &str, default: bool| config.get(name).and_then(Json::as_bool).unwrap_or(default);
    let scheme = match (flag("add_prefix_space", true), flag("legacy", false)) {
        (false, _) => PrependScheme::Never,
        (true, true) => PrependScheme::Always,
        (true, false) => PrependScheme::First,
    };
    hf.with_normalizer(None::<NormalizerWrapper>)?;
    hf.with_pre_tokenizer(Some(Metaspace::new('\u{2581}', scheme, false)));
    Ok(())
}

/// Replaces the post-processor with one putting `prefix` before and `suffix` after a
/// sequence (transformers' `update_post_processor`).
fn with_affixes(hf: &mut Tokenizer, prefix: &[u32], suffix: &[u32]) -> tokenizers::Result<()> {
    let mut single = Vec::new();
    let mut specials = Vec::new();
    for (i, &id) in prefix.iter().chain(suffix).enumerate() {
        let text = hf
            .id_to_token(id)
            .ok_or_else(|| format!("post-processor: no token {id}"))?;
        if i == prefix.len() {
            single.push("$A".to_string());
        }
        single.push(text.clone());
        specials.push((text, id));
    }
    if suffix.is_empty() {
        single.push("$A".to_string());
    }
    let processor = TemplateProcessing::builder()
        .try_single(single.join(" "))
        .map_err(|e| format!("post-processor: {e}"))?
        .special_tokens(specials)
        .build()
        .map_err(|e| format!("post-processor: {e}"))?;
    hf.with_post_processor(Some(processor));
    Ok(())
}

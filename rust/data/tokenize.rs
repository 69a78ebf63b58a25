//! Tokenization of rendered text into ids with byte offsets.
//!
//! The `tokenizers` crate reads every `tokenizer.json` and is the reference. A fast
//! byte-level BPE (`bpe.rs`) takes over where it is proven identical; anything it does
//! not cover (SentencePiece, Unigram, WordPiece, unusual normalizers) stays on the crate.

use std::ops::Range;

use tokenizers::Tokenizer;

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
    /// Loads `tokenizer.json` bytes; `eos` is the end-of-sequence token text, if known.
    pub fn from_bytes(json: &[u8], eos: Option<&str>, origin: &str) -> Result<Self> {
        let mut hf = Tokenizer::from_bytes(json).map_err(|e| {
            Error::TokenizerLoad(format!("{origin}: cannot load tokenizer.json: {e}"))
        })?;
        hf.with_truncation(None)
            .map_err(|e| Error::TokenizerLoad(format!("{origin}: {e}")))?;
        hf.with_padding(None);
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

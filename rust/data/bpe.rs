//! A fast byte-level BPE encoder, token-identical to the `tokenizers` crate for the
//! tokenizer.json shapes it accepts (Llama 3, Qwen2, GPT-2/SmolLM families).
//!
//! Text is split on added tokens (Aho-Corasick, leftmost-longest, like `tokenizers`),
//! each gap is cut by a hand-written pre-tokenizer (`pretokenize`), and each piece is
//! merged by rank, with a per-thread cache of piece -> ids (most words repeat). Anything
//! outside these shapes returns `None` at load, and the caller keeps the `tokenizers`
//! crate; text that is not NFC for an NFC tokenizer makes `encode` return `None`.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BinaryHeap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use aho_corasick::{AhoCorasick, MatchKind};
use rustc_hash::FxHashMap;
use serde::Deserialize;
use serde_json::Value as Json;

use super::pretokenize::{split, Pattern, LLAMA3_REGEX, QWEN2_REGEX};

/// The parts of a tokenizer.json the encoder reads.
#[derive(Deserialize)]
struct TokenizerFile<'a> {
    #[serde(borrow)]
    model: ModelFile<'a>,
    #[serde(default)]
    normalizer: Json,
    #[serde(default)]
    pre_tokenizer: Json,
    #[serde(default)]
    added_tokens: Json,
}

/// A BPE model section (other model types do not parse into it).
#[derive(Deserialize)]
struct ModelFile<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    byte_fallback: Option<bool>,
    dropout: Option<f64>,
    #[serde(borrow)]
    continuing_subword_prefix: Option<Cow<'a, str>>,
    #[serde(borrow)]
    end_of_word_suffix: Option<Cow<'a, str>>,
    ignore_merges: Option<bool>,
    #[serde(borrow)]
    vocab: FxHashMap<Cow<'a, str>, u32>,
    #[serde(borrow)]
    merges: Vec<Merge<'a>>,
}

/// One merge, written as `"a b"` or `["a", "b"]`.
struct Merge<'a>(Cow<'a, str>, Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Merge<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Merge<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a merge: \"a b\" or [a, b]")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> std::result::Result<Self::Value, E> {
                let (a, b) = v
                    .split_once(' ')
                    .ok_or_else(|| E::custom("merge without a space"))?;
                Ok(Merge(Cow::Borrowed(a), Cow::Borrowed(b)))
            }
            fn visit_str<E: serde::de::Error>(
                self,
                v: &str,
            ) -> std::result::Result<Self::Value, E> {
                let (a, b) = v
                    .split_once(' ')
                    .ok_or_else(|| E::custom("merge without a space"))?;
                Ok(Merge(Cow::Owned(a.to_string()), Cow::Owned(b.to_string())))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let a: Cow<'de, str> = seq
                    .next_element()?
                    .ok_or_else(|| serde::de::Error::invalid_length(0, &self))?;
                let b: Cow<'de, str> = seq
                    .next_element()?
                    .ok_or_else(|| serde::de::Error::invalid_length(1, &self))?;
                Ok(Merge(a, b))
            }
        }
        d.deserialize_any(V)
    }
}

/// Added tokens matched in one pass (those of one `normalized` flag).
struct AddedSet {
    matcher: AhoCorasick,
    ids: Vec<u32>,
}

/// The encoder of one tokenizer.
pub struct FastBpe {
    pattern: Pattern,
    nfc: bool,
    ignore_merges: bool,
    byte_ids: [u32; 256],
    vocab: FxHashMap<Vec<u8>, u32>,
    merges: FxHashMap<u64, (u32, u32)>,
    token_len: Vec<u32>,
    added: Vec<AddedSet>,
    added_ids: FxHashMap<String, u32>,
    byte_chars: ByteLevelChars,
    instance: u64,
}

/// Marks a byte the vocabulary has no token for.
const NO_ID: u32 = u32::MAX;

static INSTANCES: AtomicU64 = AtomicU64::new(1);

/// Cache bound: past this many words the per-thread cache starts over.
const CACHE_WORDS: usize = 1 << 18;

/// Word -> ids cache of one thread, tagged with the encoder it belongs to.
type WordCache = (u64, FxHashMap<Box<[u8]>, Box<[u32]>>);

thread_local! {
    static CACHE: RefCell<WordCache> = RefCell::new((0, FxHashMap::default()));
}

/// GPT-2's reversible byte <-> printable char map, char -> byte direction: index by
/// code point (all mapped chars are below U+0144); `None` for chars outside the map.
struct ByteLevelChars([Option<u8>; 0x144]);

impl ByteLevelChars {
    fn new() -> Self {
        let printable = |b: u32| {
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
        };
        let mut map = [None; 0x144];
        let mut extra = 0;
        for b in 0..=255u32 {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            map[c as usize] = Some(b as u8);
        }
        ByteLevelChars(map)
    }

    fn bytes(&self, token: &str) -> Option<Vec<u8>> {
        token
            .chars()
            .map(|c| self.0.get(c as usize).copied().flatten())
            .collect()
    }
}

fn pair_key(a: u32, b: u32) -> u64 {
    (u64::from(a) << 32) | u64::from(b)
}

impl FastBpe {
    /// Builds the encoder from tokenizer.json bytes, or `None` when its shape is outside
    /// what this encoder reproduces exactly.
    pub fn from_bytes(json: &[u8]) -> Option<Self> {
        // A typed, borrowing parse: several times faster than a generic JSON tree for the
        // 100k+ vocabulary and merges; any other model shape fails here and returns None.
        let file: TokenizerFile<'_> = serde_json::from_slice(json).ok()?;
        let model = &file.model;
        let empty = |v: &Option<Cow<'_, str>>| v.as_deref().unwrap_or_default().is_empty();
        if model.kind.as_deref() != Some("BPE")
            || model.byte_fallback.unwrap_or(false)
            || model.dropout.is_some()
            || !empty(&model.continuing_subword_prefix)
            || !empty(&model.end_of_word_suffix)
        {
            return None;
        }
        let nfc = match &file.normalizer {
            Json::Null => false,
            n if n.get("type")?.as_str()? == "NFC" => true,
            _ => return None,
        };
        let pattern = pattern_of(&file.pre_tokenizer)?;
        let to_byte = ByteLevelChars::new();
        let mut vocab = FxHashMap::default();
        let mut token_len = Vec::new();
        for (tok, &id) in &model.vocab {
            let Some(bytes) = to_byte.bytes(tok) else {
                continue;
            };
            if token_len.len() <= id as usize {
                token_len.resize(id as usize + 1, 0);
            }
            token_len[id as usize] = bytes.len() as u32;
            vocab.insert(bytes, id);
        }
        // Some vocabularies lack bytes that never occur in their training text; a word
        // holding one goes to the general tokenizer (`NO_ID`).
        let mut byte_ids = [NO_ID; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            if let Some(&id) = vocab.get(&vec![b as u8]) {
                *slot = id;
            }
        }
        let mut merges = FxHashMap::default();
        let mut joined = String::new();
        for (rank, Merge(a, b)) in model.merges.iter().enumerate() {
            let (Some(&ia), Some(&ib)) = (model.vocab.get(a.as_ref()), model.vocab.get(b.as_ref()))
            else {
                continue;
            };
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            let Some(&merged) = model.vocab.get(joined.as_str()) else {
                continue;
            };
            merges
                .entry(pair_key(ia, ib))
                .or_insert((rank as u32, merged));
        }
        let added = added_sets(&file.added_tokens, &mut token_len)?;
        let added_ids = file
            .added_tokens
            .as_array()?
            .iter()
            .filter_map(|t| {
                Some((
                    t.get("content")?.as_str()?.to_string(),
                    u32::try_from(t.get("id")?.as_u64()?).ok()?,
                ))
            })
            .collect();
        Some(FastBpe {
            pattern,
            nfc,
            ignore_merges: model.ignore_merges.unwrap_or(false),
            byte_ids,
            vocab,
            merges,
            token_len,
            added,
            added_ids,
            byte_chars: to_byte,
            instance: INSTANCES.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Id of a token given as text: an added token, or a vocabulary entry.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        if let Some(&id) = self.added_ids.get(token) {
            return Some(id);
        }
        self.vocab.get(&self.byte_chars.bytes(token)?).copied()
    }

    /// Encodes `text` (no special tokens added), appending ids and byte ranges; `false`
    /// when the text needs the general tokenizer (non-NFC text for an NFC tokenizer).
    pub fn encode(&self, text: &str, ids: &mut Vec<u32>, offsets: &mut Vec<Range<usize>>) -> bool {
        if self.nfc
            && !text.is_ascii()
            && unicode_normalization::is_nfc_quick(text.chars())
                != unicode_normalization::IsNormalized::Yes
        {
            return false;
        }
        let mut segments: Vec<(Range<usize>, Option<u32>)> = vec![(0..text.len(), None)];
        for set in &self.added {
            segments = split_added(text, segments, set);
        }
        let mut pieces = Vec::new();
        let (ids_before, offsets_before) = (ids.len(), offsets.len());
        let done = CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.0 != self.instance || cache.1.len() > CACHE_WORDS {
                cache.0 = self.instance;
                cache.1.clear();
            }
            for (range, added) in segments {
                if let Some(id) = added {
                    ids.push(id);
                    offsets.push(range);
                    continue;
                }
                pieces.clear();
                split(self.pattern, &text[range.clone()], &mut pieces);
                for p in &pieces {
                    let start = range.start + p.start;
                    let word = &text.as_bytes()[start..range.start + p.end];
                    let first = ids.len();
                    match cache.1.get(word) {
                        Some(cached) => ids.extend_from_slice(cached),
                        None => {
                            if !self.encode_word(word, ids) {
                                return false;
                            }
                            cache.1.insert(word.into(), ids[first..].into());
                        }
                    }
                    let mut at = start;
                    for &id in &ids[first..] {
                        let len = self.token_len[id as usize] as usize;
                        offsets.push(at..at + len);
                        at += len;
                    }
                }
            }
            true
        });
        if !done {
            ids.truncate(ids_before);
            offsets.truncate(offsets_before);
        }
        done
    }

    /// BPE of one piece: merges by rank, lowest first, leftmost on ties; `false` when
    /// the piece holds a byte the vocabulary lacks.
    fn encode_word(&self, word: &[u8], out: &mut Vec<u32>) -> bool {
        if self.ignore_merges {
            if let Some(&id) = self.vocab.get(word) {
                out.push(id);
                return true;
            }
        }
        let mut sym: Vec<u32> = word.iter().map(|&b| self.byte_ids[b as usize]).collect();
        if sym.contains(&NO_ID) {
            return false;
        }
        if sym.len() > 48 {
            self.merge_long(sym, out);
            return true;
        }
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..sym.len().saturating_sub(1) {
                if let Some(&(rank, merged)) = self.merges.get(&pair_key(sym[i], sym[i + 1])) {
                    if best.is_none_or(|(r, _, _)| rank < r) {
                        best = Some((rank, i, merged));
                    }
                }
            }
            let Some((_, i, merged)) = best else { break };
            sym[i] = merged;
            sym.remove(i + 1);
        }
        out.extend_from_slice(&sym);
        true
    }

    /// The same merge order for long pieces, with a heap and a linked list.
    fn merge_long(&self, mut sym: Vec<u32>, out: &mut Vec<u32>) {
        let n = sym.len();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<std::cmp::Reverse<(u32, usize, u32, u32)>>,
                    sym: &[u32],
                    i: usize,
                    j: usize| {
            if let Some(&(rank, merged)) = self.merges.get(&pair_key(sym[i], sym[j])) {
                heap.push(std::cmp::Reverse((rank, i, sym[j], merged)));
            }
        };
        for i in 0..n - 1 {
            push(&mut heap, &sym, i, i + 1);
        }
        while let Some(std::cmp::Reverse((_, i, right, merged))) = heap.pop() {
            let j = next[i];
            // Stale entries: the left symbol merged away, or its right neighbour changed.
            if !alive[i]
                || j >= n
                || sym[j] != right
                || self.merges.get(&pair_key(sym[i], sym[j])).map(|m| m.1) != Some(merged)
            {
                continue;
            }
            sym[i] = merged;
            alive[j] = false;
            next[i] = next[j];
            if next[j] < n {
                prev[next[j]] = i;
            }
            if prev[i] < n {
                push(&mut heap, &sym, prev[i], i);
            }
            if next[i] < n {
                push(&mut heap, &sym, i, next[i]);
            }
        }
        let mut i = 0;
        while i < n {
            out.push(sym[i]);
            i = next[i];
        }
    }
}

/// The split pattern of a supported pre_tokenizer.
fn pattern_of(pre: &Json) -> Option<Pattern> {
    let kind = pre.get("type")?.as_str()?;
    let byte_level = |p: &Json, regex: bool| {
        p.get("type").and_then(Json::as_str) == Some("ByteLevel")
            && !p
                .get("add_prefix_space")
                .and_then(Json::as_bool)
                .unwrap_or(true)
            && p.get("use_regex").and_then(Json::as_bool).unwrap_or(true) == regex
    };
    if kind == "ByteLevel" {
        return byte_level(pre, true).then_some(Pattern::Gpt2 { digits: false });
    }
    if kind != "Sequence" {
        return None;
    }
    let parts = pre.get("pretokenizers")?.as_array()?;
    match parts.as_slice() {
        [s, b] if s.get("type")?.as_str()? == "Split" && byte_level(b, false) => {
            if s.get("behavior")?.as_str()? != "Isolated" || s.get("invert")?.as_bool()? {
                return None;
            }
            match s.get("pattern")?.get("Regex")?.as_str()? {
                LLAMA3_REGEX => Some(Pattern::Llama3),
                QWEN2_REGEX => Some(Pattern::Qwen2),
                _ => None,
            }
        }
        [d, b] if d.get("type")?.as_str()? == "Digits" && byte_level(b, true) => d
            .get("individual_digits")?
            .as_bool()?
            .then_some(Pattern::Gpt2 { digits: true }),
        _ => None,
    }
}

/// Added tokens as matchers: unnormalized ones first, then normalized ones, like
/// `tokenizers` does. Flags that change matching (lstrip, rstrip, single_word) are not
/// reproduced, so their presence keeps the general tokenizer.
fn added_sets(list: &Json, token_len: &mut Vec<u32>) -> Option<Vec<AddedSet>> {
    let mut groups: [(Vec<String>, Vec<u32>); 2] = Default::default();
    for t in list.as_array()? {
        let flag = |k: &str| t.get(k).and_then(Json::as_bool).unwrap_or(false);
        if flag("lstrip") || flag("rstrip") || flag("single_word") {
            return None;
        }
        let content = t.get("content")?.as_str()?;
        let id = u32::try_from(t.get("id")?.as_u64()?).ok()?;
        if content.is_empty() {
            continue;
        }
        if token_len.len() <= id as usize {
            token_len.resize(id as usize + 1, 0);
        }
        token_len[id as usize] = content.len() as u32;
        let group = &mut groups[usize::from(flag("normalized"))];
        group.0.push(content.to_string());
        group.1.push(id);
    }
    groups
        .into_iter()
        .filter(|g| !g.0.is_empty())
        .map(|(contents, ids)| {
            let matcher = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&contents)
                .ok()?;
            Some(AddedSet { matcher, ids })
        })
        .collect()
}

/// Splits the plain segments further on the added tokens of `set`.
fn split_added(
    text: &str,
    segments: Vec<(Range<usize>, Option<u32>)>,
    set: &AddedSet,
) -> Vec<(Range<usize>, Option<u32>)> {
    let mut out = Vec::with_capacity(segments.len());
    for (range, added) in segments {
        if added.is_some() {
            out.push((range, added));
            continue;
        }
        let mut at = range.start;
        for m in set.matcher.find_iter(&text[range.clone()]) {
            let (s, e) = (range.start + m.start(), range.start + m.end());
            if s > at {
                out.push((at..s, None));
            }
            out.push((s..e, Some(set.ids[m.pattern().as_usize()])));
            at = e;
        }
        if at < range.end {
            out.push((at..range.end, None));
        }
    }
    out
}

//! Hand-written pre-tokenizers for the split patterns of byte-level BPE families.
//!
//! They cut text exactly where the families' regexes cut it (leftmost-first
//! alternation, greedy runs, the `\s+(?!\S)` look-ahead), without a regex engine:
//!
//! * Llama 3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//!   ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
//! * Qwen2: the same with `\p{N}` (one digit per piece).
//! * GPT-2 (ByteLevel's own regex): `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
//!   ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, optionally after splitting every digit off
//!   (the `Digits(individual_digits)` pre-tokenizer, as SmolLM uses).

use std::ops::Range;
use std::sync::LazyLock;

/// Which split pattern a tokenizer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Llama 3's regex (numbers in groups of up to three).
    Llama3,
    /// Qwen2's regex (single digits).
    Qwen2,
    /// GPT-2's regex; `digits` splits each digit off first.
    Gpt2 {
        /// Whether a Digits(individual_digits) pre-tokenizer runs first.
        digits: bool,
    },
}

/// The regex strings this module implements, as tokenizer.json files spell them.
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex.
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Character classes the patterns distinguish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cls {
    /// `\p{L}`
    Letter,
    /// `\p{N}`
    Number,
    /// The space character (the patterns' literal `' '`).
    Space,
    /// `\r` or `\n`.
    Newline,
    /// Any other `\s`.
    White,
    /// Anything else.
    Other,
}

impl Cls {
    fn is_space(self) -> bool {
        matches!(self, Cls::Space | Cls::Newline | Cls::White)
    }
}

/// `\p{L}` as regex-syntax defines it (the tables Rust regex engines use).
static LETTERS: LazyLock<Vec<(u32, u32)>> = LazyLock::new(|| {
    let hir = regex_syntax::parse(r"\p{L}").expect("\\p{L} parses");
    match hir.kind() {
        regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(cls)) => cls
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        _ => unreachable!("\\p{{L}} is a Unicode class"),
    }
});

const ASCII: [Cls; 128] = {
    let mut t = [Cls::Other; 128];
    let mut i = 0;
    while i < 128 {
        let c = i as u8;
        t[i] = if c.is_ascii_alphabetic() {
            Cls::Letter
        } else if c.is_ascii_digit() {
            Cls::Number
        } else if c == b' ' {
            Cls::Space
        } else if c == b'\r' || c == b'\n' {
            Cls::Newline
        } else if c == b'\t' || c == 0x0B || c == 0x0C {
            Cls::White
        } else {
            Cls::Other
        };
        i += 1;
    }
    t
};

fn classify(c: char) -> Cls {
    if (c as u32) < 128 {
        return ASCII[c as usize];
    }
    if c.is_whitespace() {
        Cls::White
    } else if is_letter(c) {
        Cls::Letter
    } else if c.is_numeric() {
        Cls::Number
    } else {
        Cls::Other
    }
}

fn is_letter(c: char) -> bool {
    let c = c as u32;
    let table = &*LETTERS;
    let i = table.partition_point(|&(_, end)| end < c);
    i < table.len() && table[i].0 <= c
}

/// Text scanned by byte position: ASCII bytes are classified by table, other
/// characters are decoded where they occur (no per-text allocation).
struct Text<'a> {
    s: &'a str,
}

impl Text<'_> {
    /// Class and byte length of the character at `i` (a char boundary below `len`).
    #[inline(always)]
    fn at(&self, i: usize) -> (Cls, usize) {
        let b = self.s.as_bytes()[i];
        if b < 128 {
            return (ASCII[b as usize], 1);
        }
        self.at_non_ascii(i)
    }

    #[cold]
    #[inline(never)]
    fn at_non_ascii(&self, i: usize) -> (Cls, usize) {
        let c = self.s[i..].chars().next().expect("char boundary");
        (classify(c), c.len_utf8())
    }

    #[inline]
    fn cls(&self, i: usize, end: usize) -> Option<Cls> {
        (i < end).then(|| self.at(i).0)
    }

    /// End of the run of characters from `i` (below `end`) whose class satisfies `pred`,
    /// stopping after `max` characters.
    #[inline]
    fn run(&self, mut i: usize, end: usize, max: usize, pred: impl Fn(Cls) -> bool) -> usize {
        let mut n = 0;
        while i < end && n < max {
            let (c, len) = self.at(i);
            if !pred(c) {
                break;
            }
            i += len;
            n += 1;
        }
        i
    }

    /// Start of the character that ends at `i`.
    fn prev(&self, mut i: usize) -> usize {
        i -= 1;
        while !self.s.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// Byte ranges of the pieces `pattern` cuts `text` into (they tile the text).
pub fn split(pattern: Pattern, text: &str, out: &mut Vec<Range<usize>>) {
    let t = Text { s: text };
    let n = text.len();
    let mut i = 0;
    match pattern {
        Pattern::Llama3 | Pattern::Qwen2 => {
            let max_digits = if pattern == Pattern::Llama3 { 3 } else { 1 };
            while i < n {
                let e = llama3_at(&t, i, n, max_digits);
                out.push(i..e);
                i = e;
            }
        }
        Pattern::Gpt2 { digits } => {
            while i < n {
                let (c, len) = t.at(i);
                if digits && c == Cls::Number {
                    out.push(i..i + len);
                    i += len;
                    continue;
                }
                // With Digits first, each digit-free run is matched as its own text.
                let end = if digits {
                    t.run(i, n, usize::MAX, |c| c != Cls::Number)
                } else {
                    n
                };
                while i < end {
                    let e = gpt2_at(&t, i, end);
                    out.push(i..e);
                    i = e;
                }
            }
        }
    }
}

fn contraction(t: &Text<'_>, i: usize, n: usize, fold: bool) -> Option<usize> {
    let bytes = t.s.as_bytes();
    if bytes[i] != b'\'' || i + 1 >= n {
        return None;
    }
    // The letters of the contractions are ASCII, except LATIN SMALL LETTER LONG S, which
    // case-insensitive matching folds to 's'.
    let low = |j: usize| -> Option<(u8, usize)> {
        if j >= n {
            return None;
        }
        let b = bytes[j];
        if b < 128 {
            return Some((if fold { b.to_ascii_lowercase() } else { b }, 1));
        }
        (fold && t.s[j..].starts_with('\u{17F}')).then_some((b's', 2))
    };
    let (c1, l1) = low(i + 1)?;
    if matches!(c1, b's' | b't' | b'm' | b'd') {
        return Some(i + 1 + l1);
    }
    let (c2, l2) = low(i + 1 + l1)?;
    if matches!((c1, c2), (b'r', b'e') | (b'v', b'e') | (b'l', b'l')) {
        return Some(i + 1 + l1 + l2);
    }
    None
}

/// End (byte) of the Llama 3 / Qwen2 piece that starts at `i`.
fn llama3_at(t: &Text<'_>, i: usize, n: usize, max_digits: usize) -> usize {
    if let Some(e) = contraction(t, i, n, true) {
        return e;
    }
    let (k, len) = t.at(i);
    let letter = |c| c == Cls::Letter;
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if !matches!(k, Cls::Newline | Cls::Letter | Cls::Number)
        && t.cls(i + len, n) == Some(Cls::Letter)
    {
        return t.run(i + len, n, usize::MAX, letter);
    }
    if k == Cls::Letter {
        return t.run(i, n, usize::MAX, letter);
    }
    // \p{N}{1,max}
    if k == Cls::Number {
        return t.run(i, n, max_digits, |c| c == Cls::Number);
    }
    // ' '?[^\s\p{L}\p{N}]+[\r\n]*
    let j = if k == Cls::Space && t.cls(i + 1, n) == Some(Cls::Other) {
        i + 1
    } else {
        i
    };
    if t.at(j).0 == Cls::Other {
        let e = t.run(j, n, usize::MAX, |c| c == Cls::Other);
        return t.run(e, n, usize::MAX, |c| c == Cls::Newline);
    }
    whitespace_at(t, i, n, true)
}

/// End of the whitespace piece at `i`: `\s*[\r\n]+` (when `newlines`), `\s+(?!\S)`, `\s+`.
fn whitespace_at(t: &Text<'_>, i: usize, n: usize, newlines: bool) -> usize {
    let w_end = t.run(i, n, usize::MAX, Cls::is_space);
    if newlines {
        // Newlines are ASCII, and no byte of a multi-byte character looks like one.
        if let Some(last) = t.s.as_bytes()[i..w_end]
            .iter()
            .rposition(|&b| b == b'\n' || b == b'\r')
        {
            return i + last + 1;
        }
    }
    if w_end == n {
        return w_end;
    }
    let last = t.prev(w_end);
    if last > i {
        last
    } else {
        w_end
    }
}

/// End (byte) of the GPT-2 piece that starts at `i`, matching within `..n`.
fn gpt2_at(t: &Text<'_>, i: usize, n: usize) -> usize {
    if let Some(e) = contraction(t, i, n, false) {
        return e;
    }
    let space = t.s.as_bytes()[i] == b' ';
    for want in [Cls::Letter, Cls::Number, Cls::Other] {
        let j = if space && t.cls(i + 1, n) == Some(want) {
            i + 1
        } else {
            i
        };
        if t.at(j).0 == want {
            return t.run(j, n, usize::MAX, |c| c == want);
        }
    }
    whitespace_at(t, i, n, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(p: Pattern, text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        split(p, text, &mut out);
        out.into_iter().map(|r| &text[r]).collect()
    }

    #[test]
    fn llama3_cuts_like_its_regex() {
        assert_eq!(
            pieces(Pattern::Llama3, "Hello, world! I'm 12345 years\n\n  old  "),
            vec![
                "Hello", ",", " world", "!", " I", "'m", " ", "123", "45", " years", "\n\n", " ",
                " old", "  "
            ]
        );
        assert_eq!(
            pieces(Pattern::Llama3, "(x) ...\n\tfoo"),
            vec!["(x", ")", " ...\n", "\tfoo"]
        );
        assert_eq!(pieces(Pattern::Qwen2, "a 12"), vec!["a", " ", "1", "2"]);
        assert_eq!(
            pieces(Pattern::Llama3, "WE'LL héllo"),
            vec!["WE", "'LL", " héllo"]
        );
    }

    #[test]
    fn gpt2_cuts_like_its_regex() {
        assert_eq!(
            pieces(Pattern::Gpt2 { digits: false }, "Hello  world 42!? 'S"),
            vec!["Hello", " ", " world", " 42", "!?", " '", "S"]
        );
        assert_eq!(
            pieces(Pattern::Gpt2 { digits: true }, "ab 42x"),
            vec!["ab", " ", "4", "2", "x"]
        );
    }

    #[test]
    fn letter_table_follows_unicode() {
        assert!(is_letter('é') && is_letter('中') && is_letter('ß'));
        assert!(!is_letter('\u{301}') && !is_letter('1') && !is_letter('٣'));
    }
}

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

/// A text decoded once: each char, its class and byte offset.
struct Chars {
    chars: Vec<char>,
    cls: Vec<Cls>,
    byte: Vec<usize>,
}

impl Chars {
    fn new(text: &str) -> Self {
        let n = text.len();
        let mut out = Chars {
            chars: Vec::with_capacity(n),
            cls: Vec::with_capacity(n),
            byte: Vec::with_capacity(n + 1),
        };
        for (b, c) in text.char_indices() {
            out.chars.push(c);
            out.cls.push(classify(c));
            out.byte.push(b);
        }
        out.byte.push(n);
        out
    }

    fn run(&self, from: usize, end: usize, pred: impl Fn(Cls) -> bool) -> usize {
        let mut j = from;
        while j < end && pred(self.cls[j]) {
            j += 1;
        }
        j
    }
}

/// Byte ranges of the pieces `pattern` cuts `text` into (they tile the text).
pub fn split(pattern: Pattern, text: &str, out: &mut Vec<Range<usize>>) {
    let cs = Chars::new(text);
    let n = cs.chars.len();
    let mut push = |a: usize, b: usize| out.push(cs.byte[a]..cs.byte[b]);
    match pattern {
        Pattern::Llama3 | Pattern::Qwen2 => {
            let max_digits = if pattern == Pattern::Llama3 { 3 } else { 1 };
            let mut i = 0;
            while i < n {
                let e = llama3_at(&cs, i, n, max_digits);
                push(i, e);
                i = e;
            }
        }
        Pattern::Gpt2 { digits } => {
            let mut i = 0;
            while i < n {
                if digits && cs.cls[i] == Cls::Number {
                    push(i, i + 1);
                    i += 1;
                    continue;
                }
                // With Digits first, each digit-free run is matched as its own text.
                let end = if digits {
                    cs.run(i, n, |c| c != Cls::Number)
                } else {
                    n
                };
                while i < end {
                    let e = gpt2_at(&cs, i, end);
                    push(i, e);
                    i = e;
                }
            }
        }
    }
}

fn contraction(cs: &Chars, i: usize, n: usize, fold: bool) -> Option<usize> {
    if cs.chars[i] != '\'' || i + 1 >= n {
        return None;
    }
    let low = |c: char| {
        if !fold {
            c
        } else if c == '\u{17F}' {
            's' // LATIN SMALL LETTER LONG S folds to 's'
        } else {
            c.to_ascii_lowercase()
        }
    };
    let c1 = low(cs.chars[i + 1]);
    if matches!(c1, 's' | 't' | 'm' | 'd') {
        return Some(i + 2);
    }
    if i + 2 < n {
        let c2 = low(cs.chars[i + 2]);
        if matches!((c1, c2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
            return Some(i + 3);
        }
    }
    None
}

/// End (char index) of the Llama 3 / Qwen2 piece that starts at `i`.
fn llama3_at(cs: &Chars, i: usize, n: usize, max_digits: usize) -> usize {
    if let Some(e) = contraction(cs, i, n, true) {
        return e;
    }
    let k = cs.cls[i];
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if !matches!(k, Cls::Newline | Cls::Letter | Cls::Number)
        && i + 1 < n
        && cs.cls[i + 1] == Cls::Letter
    {
        return cs.run(i + 1, n, |c| c == Cls::Letter);
    }
    if k == Cls::Letter {
        return cs.run(i, n, |c| c == Cls::Letter);
    }
    // \p{N}{1,max}
    if k == Cls::Number {
        return cs.run(i, n.min(i + max_digits), |c| c == Cls::Number);
    }
    // ' '?[^\s\p{L}\p{N}]+[\r\n]*
    let j = if k == Cls::Space && i + 1 < n && cs.cls[i + 1] == Cls::Other {
        i + 1
    } else {
        i
    };
    if cs.cls[j] == Cls::Other {
        let e = cs.run(j, n, |c| c == Cls::Other);
        return cs.run(e, n, |c| c == Cls::Newline);
    }
    whitespace_at(cs, i, n, true)
}

/// End of the whitespace piece at `i`: `\s*[\r\n]+` (when `newlines`), `\s+(?!\S)`, `\s+`.
fn whitespace_at(cs: &Chars, i: usize, n: usize, newlines: bool) -> usize {
    let w_end = cs.run(i, n, Cls::is_space);
    if newlines {
        if let Some(last) = (i..w_end).rev().find(|&j| cs.cls[j] == Cls::Newline) {
            return last + 1;
        }
    }
    if w_end == n || w_end - i < 2 {
        w_end
    } else {
        w_end - 1
    }
}

/// End (char index) of the GPT-2 piece that starts at `i`, matching within `..n`.
fn gpt2_at(cs: &Chars, i: usize, n: usize) -> usize {
    if let Some(e) = contraction(cs, i, n, false) {
        return e;
    }
    for want in [Cls::Letter, Cls::Number, Cls::Other] {
        let j = if cs.chars[i] == ' ' && i + 1 < n && cs.cls[i + 1] == want {
            i + 1
        } else {
            i
        };
        if cs.cls[j] == want {
            return cs.run(j, n, |c| c == want);
        }
    }
    whitespace_at(cs, i, n, false)
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

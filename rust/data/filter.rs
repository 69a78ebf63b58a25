//! Reasoning-trace filter: `<think>…</think>` stays plain text in the sample; rows whose
//! trace is missing, empty, unbalanced, or outside a token band are dropped and counted.

use std::ops::Range;

/// Opening tag of a reasoning trace.
pub const OPEN: &str = "<think>";
/// Closing tag of a reasoning trace.
pub const CLOSE: &str = "</think>";

/// Why a text's trace is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceProblem {
    /// No trace, or a span with only whitespace inside.
    Empty,
    /// Tags nested, unclosed, or closed without opening.
    Unbalanced,
}

impl TraceProblem {
    /// Reason name in the dropped counts.
    pub fn reason(self) -> &'static str {
        match self {
            TraceProblem::Empty => "trace_empty",
            TraceProblem::Unbalanced => "trace_unbalanced",
        }
    }
}

/// Byte ranges of the insides of every `<think>…</think>` span of `text`.
pub fn trace_spans(text: &str) -> std::result::Result<Vec<Range<usize>>, TraceProblem> {
    let mut spans = Vec::new();
    let mut open_at: Option<usize> = None;
    let mut pos = 0;
    while let Some(rel) = text[pos..].find('<') {
        let at = pos + rel;
        let rest = &text[at..];
        if rest.starts_with(OPEN) {
            if open_at.is_some() {
                return Err(TraceProblem::Unbalanced);
            }
            open_at = Some(at + OPEN.len());
            pos = at + OPEN.len();
        } else if rest.starts_with(CLOSE) {
            let start = open_at.take().ok_or(TraceProblem::Unbalanced)?;
            spans.push(start..at);
            pos = at + CLOSE.len();
        } else {
            pos = at + 1;
        }
    }
    if open_at.is_some() {
        return Err(TraceProblem::Unbalanced);
    }
    if spans.is_empty() || spans.iter().any(|s| text[s.clone()].trim().is_empty()) {
        return Err(TraceProblem::Empty);
    }
    Ok(spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_problems() {
        let t = "<think>a b</think>x<think> c</think>";
        let s = trace_spans(t).unwrap();
        assert_eq!(
            s.iter().map(|r| &t[r.clone()]).collect::<Vec<_>>(),
            vec!["a b", " c"]
        );
        assert_eq!(trace_spans("no trace"), Err(TraceProblem::Empty));
        assert_eq!(trace_spans("<think> \n</think>x"), Err(TraceProblem::Empty));
        assert_eq!(trace_spans("<think>a"), Err(TraceProblem::Unbalanced));
        assert_eq!(trace_spans("a</think>"), Err(TraceProblem::Unbalanced));
        assert_eq!(
            trace_spans("<think><think>a</think></think>"),
            Err(TraceProblem::Unbalanced)
        );
    }
}

//! A model-free pass over a dataset for `backprop validate`: formats, bad rows with line
//! numbers, the structure of reasoning traces, and text lengths, with no tokenizer.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::detect::Spec;
use super::filter::{trace_spans, TraceProblem, CLOSE, OPEN};
use super::prepare::{
    completion_texts, detect_record, records_of, refusal, Detection, KindGuard, CHUNK,
};
use super::stats::Stats;
use crate::Result;

/// How the `<think>` tags of samples look, before any token band is applied.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceShape {
    /// Samples whose completion holds a `<think>` or `</think>` tag.
    pub with_tags: usize,
    /// ... with balanced, non-empty traces.
    pub balanced: usize,
    /// ... with nested, unclosed or stray tags.
    pub unbalanced: usize,
    /// ... with only empty traces.
    pub empty: usize,
}

/// What a scan found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Scan {
    /// Rows read, formats, bad rows (with file:line).
    pub stats: Stats,
    /// Trace tag structure over samples.
    pub traces: TraceShape,
    /// Characters of message text per sample (a preference pair gives two).
    pub lengths: Vec<u32>,
    /// Code and message of the error training would refuse the file with, if any.
    pub refusal: Option<(String, String)>,
}

/// Scans `data` (the bytes of file `name`); a file mixing kinds, or in UTF-16/32, is an
/// error. Bad rows are listed, and the refusal they cause unless `skip_invalid`.
pub fn scan(name: &str, data: &[u8], max_errors: usize, skip_invalid: bool) -> Result<Scan> {
    let records = records_of(name, data)?;
    let mut out = Scan::default();
    let mut kinds = KindGuard::new(name);
    for chunk in records.chunks(CHUNK) {
        let detected: Vec<Detection> = chunk.par_iter().map(detect_record).collect();
        kinds.check(chunk, &detected)?;
        for (rec, d) in chunk.iter().zip(detected) {
            let stats = &mut out.stats;
            stats.rows_read += 1;
            match d {
                Ok(det) => {
                    stats.rows_used += 1;
                    *stats.formats.entry(det.format.name().into()).or_default() += 1;
                    for spec in &det.specs {
                        out.lengths.push(chars_of(spec));
                        trace_shape(spec, &mut out.traces);
                    }
                }
                Err(bad) => stats.bad_row(name, rec.line, bad, max_errors)?,
            }
        }
    }
    out.stats.kind = kinds.kind().name().to_string();
    out.stats.samples = out.lengths.len();
    out.refusal = refusal(name, &out.stats, skip_invalid).map(|e| (e.code().into(), e.to_string()));
    Ok(out)
}

fn chars_of(spec: &Spec) -> u32 {
    let n = match spec {
        Spec::Chat { messages, .. } => messages.iter().map(|m| m.content.chars().count()).sum(),
        Spec::Raw { text } => text.chars().count(),
    };
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn trace_shape(spec: &Spec, shape: &mut TraceShape) {
    let texts = completion_texts(spec);
    if !texts.iter().any(|t| t.contains(OPEN) || t.contains(CLOSE)) {
        return;
    }
    shape.with_tags += 1;
    let results: Vec<_> = texts.iter().map(|t| trace_spans(t)).collect();
    if results.contains(&Err(TraceProblem::Unbalanced)) {
        shape.unbalanced += 1;
    } else if results.iter().any(|r| r.is_ok()) {
        shape.balanced += 1;
    } else {
        shape.empty += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_counts_formats_errors_and_traces() {
        let data = b"{\"text\": \"abc\"}\n{oops\n{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, \
            {\"role\": \"assistant\", \"content\": \"<think>x</think>yes\"}]}\n";
        let s = scan("d.jsonl", data, 5, false).unwrap();
        assert_eq!(s.stats.rows_read, 3);
        assert_eq!(
            s.stats.errors,
            vec!["d.jsonl:2: malformed JSON: key must be a string at column 2"]
        );
        assert_eq!(s.lengths, vec![3, 1 + 19]);
        assert_eq!(s.traces.balanced, 1);
        assert_eq!(s.stats.formats.get("messages"), Some(&1));
        assert_eq!(s.stats.dropped_lines["parse_error"], vec![2]);
    }

    #[test]
    fn utf16_files_are_refused_whole() {
        let text = "{\"text\": \"abc\"}\n{\"text\": \"d\"}\n";
        let le: Vec<u8> = "\u{feff}"
            .chars()
            .chain(text.chars())
            .flat_map(|c| (c as u16).to_le_bytes())
            .collect();
        let err = scan("d.jsonl", &le, 5, true).unwrap_err();
        assert_eq!(err.code(), "INPUT_DATASET_ENCODING_UNSUPPORTED");
        assert!(err.to_string().contains("UTF-16 LE"), "{err}");
        // A Latin-1 line among UTF-8 ones is one bad line.
        let latin1 = b"{\"text\": \"caf\xe9\"}\n{\"text\": \"ok\"}\n";
        let s = scan("d.jsonl", latin1, 5, false).unwrap();
        assert_eq!((s.stats.rows_used, s.stats.dropped["encoding"]), (1, 1));
        let (code, message) = s.refusal.unwrap();
        assert_eq!(code, "INPUT_DATASET_PARSE_FAILED");
        assert!(message.contains("d.jsonl:1: invalid UTF-8"), "{message}");
        assert_eq!(scan("d.jsonl", latin1, 5, true).unwrap().refusal, None);
        let (code, _) = scan("d.jsonl", b"\n \n", 5, true).unwrap().refusal.unwrap();
        assert_eq!(code, "INPUT_DATASET_EMPTY");
    }
}

//! What a preparation run read, used and dropped (and why): nothing is dropped silently.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::bad::{BadRow, Cause};
use crate::Result;

/// Lengths of reasoning traces (in tokens) over the samples kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceStats {
    /// Samples whose traces passed the filter.
    pub samples: usize,
    /// `<think>` spans in them.
    pub spans: usize,
    /// Trace tokens, summed.
    pub tokens: usize,
    /// Fewest trace tokens of one sample.
    pub min_tokens: usize,
    /// Most trace tokens of one sample.
    pub max_tokens: usize,
}

impl TraceStats {
    /// Adds one kept sample with `spans` spans of `tokens` trace tokens in all.
    pub fn add(&mut self, spans: usize, tokens: usize) {
        self.min_tokens = if self.samples == 0 {
            tokens
        } else {
            self.min_tokens.min(tokens)
        };
        self.max_tokens = self.max_tokens.max(tokens);
        self.samples += 1;
        self.spans += spans;
        self.tokens += tokens;
    }
}

/// Counts of one run (`PreparedDataset.stats` on the Python side).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Training kind: sft, preference or kto.
    pub kind: String,
    /// Non-blank lines (or array elements) read.
    pub rows_read: usize,
    /// Rows that gave samples.
    pub rows_used: usize,
    /// Rows not used, by reason.
    pub dropped: BTreeMap<String, usize>,
    /// The first lines (up to `max_errors`) of the rows dropped, by reason.
    #[serde(default)]
    pub dropped_lines: BTreeMap<String, Vec<usize>>,
    /// Valid rows by detected format.
    pub formats: BTreeMap<String, usize>,
    /// Tokens over all samples.
    pub tokens: usize,
    /// Tokens that carry a loss.
    pub label_tokens: usize,
    /// Samples (a preference pair counts two).
    pub samples: usize,
    /// Packed rows.
    pub rows: usize,
    /// Samples cut to max_seq_length.
    pub truncated: usize,
    /// Rows used whose chat template left out (the text of) a system message.
    #[serde(default)]
    pub system_left_out: usize,
    /// Share of row capacity holding tokens.
    pub fill: f64,
    /// Where the chat template came from: `model`, a built-in name, `file`, or `none`.
    pub chat_template: String,
    /// Each marker of a chosen built-in template with the number of tokens it becomes.
    pub template_markers: Vec<(String, usize)>,
    /// Trace statistics (when the reasoning-trace filter is on).
    pub trace: Option<TraceStats>,
    /// The first bad rows as `file:line: message`.
    pub errors: Vec<String>,
    /// Number of bad rows in all.
    pub errors_total: usize,
    /// Cause and line of the first bad row (it decides the error code of a refusal).
    #[serde(skip)]
    pub first_bad: Option<(Cause, usize)>,
}

impl Stats {
    /// Counts one row dropped for `reason` at `line`, keeping the first `keep` lines.
    pub fn drop_row(&mut self, reason: &str, line: usize, keep: usize) {
        *self.dropped.entry(reason.to_string()).or_default() += 1;
        let lines = self.dropped_lines.entry(reason.to_string()).or_default();
        if lines.len() < keep {
            lines.push(line);
        }
    }

    /// Counts one bad row of file `name` and lists the first `keep` as `file:line: message`.
    ///
    /// A file whose first bad row is UTF-16/32 text (a byte-order mark, NUL bytes) is in
    /// another encoding altogether: that is an error at once, whatever `skip_invalid` says.
    pub fn bad_row(&mut self, name: &str, line: usize, bad: BadRow, keep: usize) -> Result<()> {
        if let (None, Cause::WideEncoding(encoding)) = (self.first_bad, bad.cause) {
            return Err(bad.cause.error(format!(
                "{name}: the file is {encoding}, not UTF-8 (line {line}, its first bad line: {}); \
                 only UTF-8 is read",
                bad.message
            )));
        }
        self.first_bad.get_or_insert((bad.cause, line));
        self.errors_total += 1;
        self.drop_row(bad.cause.reason(), line, keep);
        if self.errors.len() < keep {
            self.errors.push(format!("{name}:{line}: {}", bad.message));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_rows_keep_reasons_and_lines() {
        let mut s = Stats::default();
        for line in [2, 5, 9] {
            let bad = BadRow::new(Cause::Malformed, "malformed JSON");
            s.bad_row("d.jsonl", line, bad, 2).unwrap();
        }
        s.drop_row("overlong", 7, 2);
        assert_eq!(s.dropped["parse_error"], 3);
        assert_eq!(s.dropped_lines["parse_error"], vec![2, 5]);
        assert_eq!(s.dropped_lines["overlong"], vec![7]);
        assert_eq!(
            s.errors,
            vec!["d.jsonl:2: malformed JSON", "d.jsonl:5: malformed JSON"]
        );
        assert_eq!(
            (s.errors_total, s.first_bad),
            (3, Some((Cause::Malformed, 2)))
        );
    }

    #[test]
    fn a_byte_order_mark_on_the_first_bad_line_refuses_the_file() {
        let bom = || BadRow::new(Cause::WideEncoding("UTF-16 LE"), "mark");
        let err = Stats::default()
            .bad_row("d.jsonl", 1, bom(), 5)
            .unwrap_err();
        assert_eq!(err.code(), "INPUT_DATASET_ENCODING_UNSUPPORTED");
        assert!(
            err.to_string().contains("d.jsonl: the file is UTF-16 LE"),
            "{err}"
        );
        assert!(err.to_string().contains("line 1"), "{err}");
        // After an earlier bad line, a stray mark is one more bad line.
        let mut s = Stats::default();
        s.bad_row("d.jsonl", 1, BadRow::new(Cause::InvalidUtf8, "x"), 5)
            .unwrap();
        s.bad_row("d.jsonl", 2, bom(), 5).unwrap();
        assert_eq!(s.dropped["encoding"], 2);
    }
}

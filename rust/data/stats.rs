//! What a preparation run read, used and dropped (and why): nothing is dropped silently.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
    /// Share of row capacity holding tokens.
    pub fill: f64,
    /// Whether the ChatML default stood in for a missing chat template.
    pub default_template: bool,
    /// Trace statistics (when the reasoning-trace filter is on).
    pub trace: Option<TraceStats>,
    /// The first bad rows as `file:line: message`.
    pub errors: Vec<String>,
    /// Number of bad rows in all.
    pub errors_total: usize,
}

impl Stats {
    /// Counts one dropped row under `reason`.
    pub fn drop_row(&mut self, reason: &str) {
        *self.dropped.entry(reason.to_string()).or_default() += 1;
    }
}

//! Settings of one preparation run, as the Python `DataConfig` sends them (JSON).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which tokens carry a loss in chat rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainOn {
    /// Only the assistant's turns (the default).
    Assistant,
    /// Every token of the rendering.
    All,
}

/// What happens to a sample longer than `max_seq_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlong {
    /// Keep the first `max_seq_length` tokens.
    Truncate,
    /// Drop the row (counted under `overlong`).
    Drop,
}

/// Settings of one preparation run; every field changes the cache key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Token budget of one packed row (and the cap of one sample).
    pub max_seq_length: usize,
    /// Which tokens of chat rows carry a loss.
    pub train_on: TrainOn,
    /// Truncate or drop samples longer than `max_seq_length`.
    pub overlong: Overlong,
    /// Skip bad rows (counted) instead of refusing the file.
    pub skip_invalid: bool,
    /// Filter rows by their `<think>` traces.
    pub reasoning_trace: bool,
    /// Fewest trace tokens a row may have (summed over its spans).
    pub trace_min_tokens: usize,
    /// Most trace tokens a row may have (summed over its spans).
    pub trace_max_tokens: usize,
    /// Best-fit-decreasing packing; false gives one sample (or pair) per row.
    pub pack: bool,
    /// How many bad rows an error message lists.
    #[serde(default = "default_max_errors")]
    pub max_errors: usize,
    /// The chat template chosen by the user: a built-in name (`chatml`, `llama3`) or
    /// Jinja source; None keeps the model's own.
    #[serde(default)]
    pub chat_template: Option<String>,
}

fn default_max_errors() -> usize {
    20
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_seq_length: 2048,
            train_on: TrainOn::Assistant,
            overlong: Overlong::Truncate,
            skip_invalid: false,
            reasoning_trace: false,
            trace_min_tokens: 8,
            trace_max_tokens: 8192,
            pack: true,
            max_errors: default_max_errors(),
            chat_template: None,
        }
    }
}

impl Settings {
    /// Parses and checks settings sent as JSON.
    pub fn from_json(text: &str) -> Result<Self> {
        let settings: Settings =
            serde_json::from_str(text).map_err(|e| Error::Config(format!("data settings: {e}")))?;
        settings.check()?;
        Ok(settings)
    }

    /// Refuses settings that cannot work.
    pub fn check(&self) -> Result<()> {
        if self.max_seq_length < 2 {
            return Err(Error::Config(format!(
                "max_seq_length must be at least 2, got {}",
                self.max_seq_length
            )));
        }
        if self.trace_min_tokens > self.trace_max_tokens {
            return Err(Error::Config(format!(
                "trace_min_tokens ({}) is larger than trace_max_tokens ({})",
                self.trace_min_tokens, self.trace_max_tokens
            )));
        }
        Ok(())
    }
}

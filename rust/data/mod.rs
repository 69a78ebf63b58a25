//! The data engine: from JSONL rows to packed, masked token arrays.
//!
//! `prepare::prepare` runs the whole pipeline; each step lives in its own module so the
//! Python reference (`backpropagate/data/reference.py`) can mirror it one to one.

pub mod bad;
pub mod bpe;
pub mod cache;
pub mod config;
pub mod detect;
pub mod filter;
pub mod mask;
pub mod model;
pub mod pack;
pub mod prepare;
pub mod pretokenize;
pub mod read;
pub mod scan;
pub mod stats;
pub mod template;
pub mod tokenize;
pub mod tokenizer_class;

/// Label of tokens that carry no loss (PyTorch's cross-entropy default).
pub const IGNORE_INDEX: i32 = -100;

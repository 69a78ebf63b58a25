//! Throughput-critical data side of backpropagate: dataset reading, templating,
//! tokenization, masking, packing, caching and GGUF writing.
//!
//! The core is plain Rust with no Python types; `py` is the one thin binding layer,
//! compiled only with the `python` feature (maturin turns it on).

pub mod data;
pub mod error;
pub mod gguf;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};

/// Version of the core, kept equal to the Python package's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

//! GGUF export: streams Hugging Face safetensors (and a LoRA adapter merged on the fly)
//! into a GGUF file that llama.cpp loads, in float types or llama.cpp's quantization mixes.

pub mod atomic;
pub mod config;
pub mod convert;
pub mod kquants;
pub mod lora;
pub mod mapping;
pub mod quant;
pub mod safetensors;
pub mod tokenizer;
pub mod types;
pub mod writer;

pub use convert::{convert, ConvertOptions, ConvertReport};
pub use types::{GgmlType, OutType};

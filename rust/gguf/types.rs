//! GGUF value and tensor types, and the output types users can ask for.

use crate::{Error, Result};

/// Tensor element types of ggml that the writer produces (ids are ggml's `enum ggml_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q2K = 10,
    Q3K = 11,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    IQ4NL = 20,
    IQ4XS = 23,
    BF16 = 30,
}

impl GgmlType {
    /// Elements per block (1 for plain floats).
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 | GgmlType::IQ4NL => {
                32
            }
            GgmlType::Q2K
            | GgmlType::Q3K
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
            | GgmlType::IQ4XS => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 | GgmlType::IQ4NL => 18,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2K => 84,
            GgmlType::Q3K => 110,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
            GgmlType::IQ4XS => 136,
        }
    }

    /// Bytes of one row of `n` elements; `None` when `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        (n % self.block_size() == 0).then(|| n / self.block_size() * self.block_bytes())
    }

    /// Whether the type is a block quantization.
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// ggml's name of the type (as llama.cpp prints it).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::BF16 => "bf16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q2K => "q2_K",
            GgmlType::Q3K => "q3_K",
            GgmlType::Q4K => "q4_K",
            GgmlType::Q5K => "q5_K",
            GgmlType::Q6K => "q6_K",
            GgmlType::IQ4NL => "iq4_nl",
            GgmlType::IQ4XS => "iq4_xs",
        }
    }
}

/// What the user asks for: a plain float type or one of llama.cpp's quantization mixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4KM,
    Q5KM,
    Q6K,
    Q4_0,
    Q5_0,
    Q3KM,
    Q2K,
    IQ4NL,
    IQ4XS,
}

impl OutType {
    /// All accepted names, in the order the help text lists them.
    pub const NAMES: [&'static str; 13] = [
        "f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k", "q4_0", "q5_0", "q3_k_m", "q2_k",
        "iq4_nl", "iq4_xs",
    ];

    /// Parses a user-facing name such as `q4_k_m` (case-insensitive).
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "f32" => OutType::F32,
            "f16" => OutType::F16,
            "bf16" => OutType::BF16,
            "q8_0" => OutType::Q8_0,
            "q4_k_m" => OutType::Q4KM,
            "q5_k_m" => OutType::Q5KM,
            "q6_k" => OutType::Q6K,
            "q4_0" => OutType::Q4_0,
            "q5_0" => OutType::Q5_0,
            "q3_k_m" => OutType::Q3KM,
            "q2_k" => OutType::Q2K,
            "iq4_nl" => OutType::IQ4NL,
            "iq4_xs" => OutType::IQ4XS,
            other => {
                return Err(Error::Config(format!(
                    "quantization {other:?} is not supported; choose one of {}",
                    Self::NAMES.join(", ")
                )))
            }
        })
    }

    /// The type most 2-D weights get (llama.cpp's `llama_ftype_get_default_type`).
    pub fn default_type(self) -> GgmlType {
        match self {
            OutType::F32 => GgmlType::F32,
            OutType::F16 => GgmlType::F16,
            OutType::BF16 => GgmlType::BF16,
            OutType::Q8_0 => GgmlType::Q8_0,
            OutType::Q4KM => GgmlType::Q4K,
            OutType::Q5KM => GgmlType::Q5K,
            OutType::Q6K => GgmlType::Q6K,
            OutType::Q4_0 => GgmlType::Q4_0,
            OutType::Q5_0 => GgmlType::Q5_0,
            OutType::Q3KM => GgmlType::Q3K,
            OutType::Q2K => GgmlType::Q2K,
            OutType::IQ4NL => GgmlType::IQ4NL,
            OutType::IQ4XS => GgmlType::IQ4XS,
        }
    }

    /// Value of `general.file_type` (llama.cpp's `enum llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            OutType::F32 => 0,
            OutType::F16 => 1,
            OutType::Q8_0 => 7,
            OutType::Q4KM => 15,
            OutType::Q5KM => 17,
            OutType::Q6K => 18,
            OutType::BF16 => 32,
            OutType::Q4_0 => 2,
            OutType::Q5_0 => 8,
            OutType::Q2K => 10,
            OutType::Q3KM => 12,
            OutType::IQ4NL => 25,
            OutType::IQ4XS => 30,
        }
    }
}

/// A metadata value with its exact GGUF type (llama.cpp checks types strictly).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    ArrStr(Vec<String>),
    ArrI32(Vec<i32>),
    ArrF32(Vec<f32>),
}

impl Value {
    /// GGUF's id of the value type (for arrays: of the array itself).
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U32(_) => 4,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::ArrStr(_) | Value::ArrI32(_) | Value::ArrF32(_) => 9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_bytes_need_whole_blocks() {
        assert_eq!(GgmlType::Q4K.row_bytes(512), Some(288));
        assert_eq!(GgmlType::Q4K.row_bytes(64), None);
        assert_eq!(GgmlType::Q8_0.row_bytes(64), Some(68));
        assert_eq!(GgmlType::BF16.row_bytes(3), Some(6));
    }

    #[test]
    fn out_types_parse_and_reject() {
        assert_eq!(OutType::parse("Q4_K_M").unwrap(), OutType::Q4KM);
        assert_eq!(OutType::parse("IQ4_XS").unwrap().file_type(), 30);
        let err = OutType::parse("q3_k").unwrap_err();
        assert_eq!(err.code(), "CONFIG_INVALID_SETTING");
        assert!(err.to_string().contains("q4_k_m"));
    }
}

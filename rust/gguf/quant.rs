//! Encoding f32 rows into GGUF tensor types, and llama.cpp's per-tensor type choice.
//!
//! Q4_K and Q6_K, nearly all of a k-quant mix's work, are computed by `kquants` (bit for bit
//! llama.cpp's reference quantizers, several groups at a time). The other block types use
//! llama.cpp's own kernel, `ggml_quantize_chunk`, loaded from an installed llama.cpp library
//! (the `xllamacpp` wheel ships one), so their bytes are llama.cpp's by construction. The mix rules (which tensor gets which type in
//! `q4_k_m` etc.) follow `llama_tensor_get_type` in llama.cpp's `llama-quant.cpp`.

use std::ffi::c_void;
use std::path::Path;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::kquants;
use super::types::{GgmlType, OutType};
use crate::{Error, Result};

type QuantizeChunk =
    unsafe extern "C" fn(i32, *const f32, *mut c_void, i64, i64, i64, *const f32) -> usize;

/// llama.cpp's quantization kernels, loaded from a shared library.
pub struct Kernels {
    quantize: QuantizeChunk,
    _lib: libloading::Library,
}

impl Kernels {
    /// Loads `ggml_quantize_chunk` from the library at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let unavailable =
            |why: String| Error::LlamaCppUnavailable(format!("{}: {why}", path.display()));
        // SAFETY: loading runs the library's initialisers; llama.cpp's are plain C++ statics.
        let lib =
            unsafe { libloading::Library::new(path) }.map_err(|e| unavailable(e.to_string()))?;
        // SAFETY: the signature is ggml's public `ggml_quantize_chunk` declaration.
        let quantize = unsafe { lib.get::<QuantizeChunk>(b"ggml_quantize_chunk\0") }
            .map(|s| *s)
            .map_err(|e| unavailable(e.to_string()))?;
        Ok(Self {
            quantize,
            _lib: lib,
        })
    }

    /// Quantizes whole rows of `src` (each `n_per_row` long) into `dst`.
    pub fn quantize(&self, ty: GgmlType, src: &[f32], n_per_row: usize, dst: &mut [u8]) {
        let rows = src.len() / n_per_row;
        let row_bytes = ty.row_bytes(n_per_row).expect("rows are whole blocks");
        assert_eq!(
            dst.len(),
            rows * row_bytes,
            "destination sized for the rows"
        );
        // SAFETY: src holds rows * n_per_row floats and dst rows * row_bytes bytes, which is
        // exactly what ggml_quantize_chunk reads and writes; no importance matrix is passed.
        let written = unsafe {
            (self.quantize)(
                ty as i32,
                src.as_ptr(),
                dst.as_mut_ptr().cast(),
                0,
                rows as i64,
                n_per_row as i64,
                std::ptr::null(),
            )
        };
        assert_eq!(
            written,
            dst.len(),
            "ggml_quantize_chunk wrote an unexpected size"
        );
    }
}

/// Whether encoding `ty` needs llama.cpp's kernels: Q4_K and Q6_K are computed here.
pub fn needs_kernels(ty: GgmlType) -> bool {
    ty.is_quantized() && !matches!(ty, GgmlType::Q4K | GgmlType::Q6K)
}

/// Encodes rows of f32 (each `n_per_row` long) as `ty` into `dst`.
pub fn encode(
    ty: GgmlType,
    src: &[f32],
    n_per_row: usize,
    kernels: Option<&Kernels>,
    dst: &mut [u8],
) -> Result<()> {
    match ty {
        GgmlType::F32 => {
            for (d, x) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&x.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            // Slice conversion uses the CPU's F16C instructions where available.
            let mut half = vec![f16::ZERO; src.len()];
            half.convert_from_f32_slice(src);
            for (d, h) in dst.chunks_exact_mut(2).zip(half) {
                d.copy_from_slice(&h.to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            let mut half = vec![bf16::ZERO; src.len()];
            half.convert_from_f32_slice(src);
            for (d, h) in dst.chunks_exact_mut(2).zip(half) {
                d.copy_from_slice(&h.to_le_bytes());
            }
        }
        GgmlType::Q4K => kquants::quantize_q4_k(src, dst),
        GgmlType::Q6K => kquants::quantize_q6_k(src, dst),
        _ => {
            let k = kernels.ok_or_else(|| {
                Error::LlamaCppUnavailable(format!(
                    "{} needs llama.cpp's quantization kernels and none were loaded",
                    ty.name()
                ))
            })?;
            k.quantize(ty, src, n_per_row, dst);
        }
    }
    Ok(())
}

/// Tensor roles that llama.cpp's mix rules tell apart (`tensor_get_category`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    Output,
    TokenEmbd,
    AttnV,
    AttnOutput,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    if name == "output.weight" {
        Category::Output
    } else if name == "token_embd.weight" {
        Category::TokenEmbd
    } else if name.contains("attn_qkv.weight") || name.contains("attn_v.weight") {
        Category::AttnV
    } else if name.contains("attn_output.weight") {
        Category::AttnOutput
    } else if name.contains("ffn_down") {
        Category::FfnDown
    } else {
        Category::Other
    }
}

/// Whether llama.cpp quantizes this tensor at all (`tensor_allows_quantization`).
fn allows_quantization(name: &str, n_dims: usize) -> bool {
    // Recurrent layers' small conv kernels stay f32, as llama.cpp's converter and quantizer keep them.
    n_dims >= 2
        && name.ends_with("weight")
        && !name.contains("_norm.weight")
        && !name.contains("ssm_conv1d.")
}

fn use_more_bits(i_layer: usize, n_layers: usize) -> bool {
    let (i, n) = (i_layer as i64, n_layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// llama.cpp's `tensor_type_fallback`: a type whose blocks fit rows of `ne0` elements.
fn fallback(ty: GgmlType, ne0: usize) -> GgmlType {
    if ne0 % ty.block_size() == 0 {
        return ty;
    }
    let smaller = match ty {
        GgmlType::IQ4XS => GgmlType::IQ4NL,
        GgmlType::Q2K | GgmlType::Q3K => GgmlType::Q4_0,
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        other => other,
    };
    if ne0 % smaller.block_size() == 0 {
        smaller
    } else {
        GgmlType::F16
    }
}

/// The model facts llama.cpp's mix rules look at.
#[derive(Clone, Copy, Debug)]
pub struct MixContext {
    /// Transformer blocks (`n_ffn_down` of a dense model).
    pub layers: usize,
    /// Query heads per key/value head (`n_gqa`).
    pub gqa: usize,
    /// llama.cpp's 70B special case (80-layer llama) for `attn_v`.
    pub seventy_b: bool,
}

/// The output's type (and the tied embeddings'): Q6_K, or Q8_0 for rows that are not
/// whole blocks of the default type.
fn output_type(default: GgmlType, ne0: usize) -> GgmlType {
    if ne0 % default.block_size() != 0 {
        GgmlType::Q8_0
    } else if default != GgmlType::Q8_0 {
        GgmlType::Q6K
    } else {
        default
    }
}

/// `attn_v`'s type in llama.cpp's `llama_tensor_get_type_impl`, for the `i`-th of `n`.
fn attn_v_type(out: OutType, ty: GgmlType, i: usize, n: usize, ctx: MixContext) -> GgmlType {
    let ty = match out {
        OutType::Q2K if ctx.gqa >= 4 => GgmlType::Q4K,
        OutType::Q2K => GgmlType::Q3K,
        OutType::Q3KM if i < 2 => GgmlType::Q5K,
        OutType::Q3KM => GgmlType::Q4K,
        OutType::IQ4NL | OutType::IQ4XS if ctx.gqa >= 4 => GgmlType::Q5K,
        OutType::Q4KM | OutType::Q5KM if use_more_bits(i, n) => GgmlType::Q6K,
        _ => ty,
    };
    if ctx.seventy_b && matches!(ty, GgmlType::Q3K | GgmlType::Q4K) {
        GgmlType::Q5K
    } else {
        ty
    }
}

/// `ffn_down`'s type in llama.cpp's `llama_tensor_get_type_impl`, for layer `i` of `n`.
fn ffn_down_type(out: OutType, ty: GgmlType, i: usize, n: usize) -> GgmlType {
    match out {
        OutType::Q2K => GgmlType::Q3K,
        OutType::Q3KM if i < n / 16 => GgmlType::Q5K,
        OutType::Q3KM => GgmlType::Q4K,
        OutType::Q4KM | OutType::Q5KM if use_more_bits(i, n) => GgmlType::Q6K,
        OutType::IQ4NL | OutType::IQ4XS if i < n / 8 => GgmlType::Q5K,
        _ => ty,
    }
}

/// Chooses each tensor's type as llama.cpp does for `out` (without an importance
/// matrix), given tensors in file order as `(name, ne)`.
pub fn choose_types(
    out: OutType,
    tensors: &[(String, Vec<u64>)],
    ctx: MixContext,
) -> Vec<GgmlType> {
    let default = out.default_type();
    let quantized = default.is_quantized();
    let tied = !tensors.iter().any(|(n, _)| n == "output.weight");
    let n_attn_v = tensors
        .iter()
        .filter(|(n, _)| category(n) == Category::AttnV)
        .count();
    let (mut i_attn_v, mut i_ffn_down) = (0usize, 0usize);
    tensors
        .iter()
        .map(|(name, ne)| {
            if !allows_quantization(name, ne.len()) {
                return GgmlType::F32;
            }
            if !quantized {
                return default;
            }
            let ne0 = ne[0] as usize;
            let ty = match category(name) {
                Category::Output => output_type(default, ne0),
                Category::TokenEmbd if tied => output_type(default, ne0),
                Category::AttnV => {
                    i_attn_v += 1;
                    attn_v_type(out, default, i_attn_v - 1, n_attn_v, ctx)
                }
                Category::FfnDown => {
                    i_ffn_down += 1;
                    ffn_down_type(out, default, i_ffn_down - 1, ctx.layers)
                }
                Category::AttnOutput => match out {
                    OutType::Q2K => GgmlType::Q3K,
                    OutType::Q3KM => GgmlType::Q4K,
                    _ => default,
                },
                _ => default,
            };
            fallback(ty, ne0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(layers: usize) -> MixContext {
        MixContext {
            layers,
            gqa: 4,
            seventy_b: false,
        }
    }

    fn model(layers: usize, hidden: u64, with_output: bool) -> Vec<(String, Vec<u64>)> {
        let mut t = vec![("output_norm.weight".to_string(), vec![hidden])];
        if with_output {
            t.push(("output.weight".into(), vec![hidden, 1000]));
        }
        t.push(("token_embd.weight".into(), vec![hidden, 1000]));
        for i in 0..layers {
            for (n, ne) in [
                ("attn_k.weight", vec![hidden, hidden / 4]),
                ("attn_norm.weight", vec![hidden]),
                ("attn_q.weight", vec![hidden, hidden]),
                ("attn_v.weight", vec![hidden, hidden / 4]),
                ("attn_output.weight", vec![hidden, hidden]),
                ("ffn_down.weight", vec![4 * hidden, hidden]),
            ] {
                t.push((format!("blk.{i}.{n}"), ne));
            }
        }
        t
    }

    #[test]
    fn q4_k_m_mix_follows_llama_cpp() {
        let t = model(8, 256, true);
        let types = choose_types(OutType::Q4KM, &t, ctx(8));
        let of = |n: &str| types[t.iter().position(|(x, _)| x == n).unwrap()];
        assert_eq!(of("output_norm.weight"), GgmlType::F32);
        assert_eq!(of("output.weight"), GgmlType::Q6K);
        assert_eq!(of("token_embd.weight"), GgmlType::Q4K);
        // use_more_bits(i, 8) holds for layers 0, 3, 6 and 7.
        let v: Vec<GgmlType> = (0..8)
            .map(|i| of(&format!("blk.{i}.attn_v.weight")))
            .collect();
        let q6 = GgmlType::Q6K;
        let q4 = GgmlType::Q4K;
        assert_eq!(v, vec![q6, q4, q4, q6, q4, q4, q6, q6]);
        assert_eq!(of("blk.3.ffn_down.weight"), q6);
        assert_eq!(of("blk.2.attn_q.weight"), q4);
    }

    #[test]
    fn tied_embeddings_get_output_type_and_narrow_rows_fall_back() {
        let t = model(2, 64, false);
        let types = choose_types(OutType::Q4KM, &t, ctx(2));
        let of = |n: &str| types[t.iter().position(|(x, _)| x == n).unwrap()];
        assert_eq!(of("token_embd.weight"), GgmlType::Q8_0);
        assert_eq!(of("blk.1.attn_q.weight"), GgmlType::Q5_0);
        assert_eq!(of("blk.0.attn_v.weight"), GgmlType::Q5_0);
        assert_eq!(of("blk.1.attn_v.weight"), GgmlType::Q8_0);
        let q5 = choose_types(OutType::Q5KM, &t, ctx(2));
        assert_eq!(
            q5[t.iter()
                .position(|(x, _)| x == "blk.1.attn_q.weight")
                .unwrap()],
            GgmlType::Q5_1
        );
    }

    #[test]
    fn low_bit_mixes_follow_llama_cpp() {
        let t = model(16, 256, true);
        let of = |types: &[GgmlType], n: &str| types[t.iter().position(|(x, _)| x == n).unwrap()];
        let q3 = choose_types(OutType::Q3KM, &t, ctx(16));
        assert_eq!(of(&q3, "blk.0.attn_v.weight"), GgmlType::Q5K);
        assert_eq!(of(&q3, "blk.2.attn_v.weight"), GgmlType::Q4K);
        assert_eq!(of(&q3, "blk.0.ffn_down.weight"), GgmlType::Q5K);
        assert_eq!(of(&q3, "blk.1.ffn_down.weight"), GgmlType::Q4K);
        assert_eq!(of(&q3, "blk.1.attn_output.weight"), GgmlType::Q4K);
        assert_eq!(of(&q3, "blk.1.attn_q.weight"), GgmlType::Q3K);
        let q2 = choose_types(OutType::Q2K, &t, ctx(16));
        assert_eq!(of(&q2, "blk.5.attn_v.weight"), GgmlType::Q4K);
        assert_eq!(of(&q2, "blk.5.ffn_down.weight"), GgmlType::Q3K);
        assert_eq!(of(&q2, "output.weight"), GgmlType::Q6K);
        let iq = choose_types(OutType::IQ4XS, &t, ctx(16));
        assert_eq!(of(&iq, "blk.1.ffn_down.weight"), GgmlType::Q5K);
        assert_eq!(of(&iq, "blk.2.ffn_down.weight"), GgmlType::IQ4XS);
        // Rows of 64 are not whole 256-blocks: q2_k falls back to q4_0, iq4_xs to iq4_nl.
        let narrow = model(2, 64, false);
        let q2n = choose_types(OutType::Q2K, &narrow, ctx(2));
        assert_eq!(
            q2n[narrow
                .iter()
                .position(|(x, _)| x == "blk.1.attn_q.weight")
                .unwrap()],
            GgmlType::Q4_0
        );
        let iqn = choose_types(OutType::IQ4XS, &narrow, ctx(2));
        assert_eq!(
            iqn[narrow
                .iter()
                .position(|(x, _)| x == "blk.1.attn_q.weight")
                .unwrap()],
            GgmlType::IQ4NL
        );
    }

    #[test]
    fn float_outputs_keep_norms_f32() {
        let t = model(1, 64, true);
        let types = choose_types(OutType::BF16, &t, ctx(1));
        assert_eq!(types[0], GgmlType::F32);
        assert_eq!(types[1], GgmlType::BF16);
    }

    #[test]
    fn half_encodings_round_to_nearest_even() {
        let mut out = [0u8; 4];
        encode(GgmlType::BF16, &[1.0, 1.0 + 1.0 / 256.0], 2, None, &mut out).unwrap();
        assert_eq!(out, [0x80, 0x3f, 0x80, 0x3f]);
        let err = encode(GgmlType::Q8_0, &[0.0; 32], 32, None, &mut [0u8; 34]).unwrap_err();
        assert_eq!(err.code(), "DEP_LLAMA_CPP_UNAVAILABLE");
    }
}

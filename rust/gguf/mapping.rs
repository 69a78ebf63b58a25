//! Hugging Face tensor names to llama.cpp's, with the row permutation of Q/K where the
//! architecture's llama.cpp implementation expects it (`llama`, `smollm3`), and Gemma's
//! norm convention (transformers scales by `1 + weight`, llama.cpp by `weight`).

use crate::{Error, Result};

/// How one GGUF tensor is produced from a Hugging Face tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapped {
    /// llama.cpp's tensor name.
    pub name: String,
    /// Heads to permute the rows over (rotary halves interleaved), if any.
    pub permute_heads: Option<usize>,
    /// Added to every value (1 for Gemma's RMSNorm weights, else 0).
    pub shift: f32,
}

/// Gemma 3's four norms per layer, where llama.cpp names them differently from the table.
const GEMMA_NORMS: [(&str, &str); 4] = [
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
];

fn layer_part<'a>(arch: &str, rest: &'a str) -> Option<(&'static str, &'a str)> {
    const TABLE: [(&str, &str); 13] = [
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.qkv_proj", "attn_qkv"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("mlp.gate_up_proj", "ffn_up"),
    ];
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let gemma = if arch == "gemma3" {
        &GEMMA_NORMS[..]
    } else {
        &[]
    };
    gemma
        .iter()
        .chain(TABLE.iter())
        .find(|(hf, _)| *hf == module)
        .map(|(_, gg)| (*gg, kind))
}

/// Maps one tensor name. `Ok(None)` means the tensor is not part of the GGUF
/// (rotary caches, the image tower of a multimodal Gemma 3); unknown names are an error
/// rather than silently dropped weights.
pub fn map_name(arch: &str, hf: &str, heads: usize, kv_heads: usize) -> Result<Option<Mapped>> {
    let shift = if arch == "gemma3" && hf.ends_with("norm.weight") {
        1.0
    } else {
        0.0
    };
    let plain = |n: &str| {
        Ok(Some(Mapped {
            name: n.to_string(),
            permute_heads: None,
            shift,
        }))
    };
    let image = ["vision_tower.", "multi_modal_projector."];
    if image
        .iter()
        .any(|p| hf.starts_with(p) || hf.strip_prefix("model.").is_some_and(|r| r.starts_with(p)))
    {
        return Ok(None);
    }
    // A multimodal model's text tower is the plain text model under another prefix: its
    // published checkpoints write `language_model.model.`, transformers 5 `model.language_model.`.
    let text = ["model.language_model.", "language_model.model."]
        .iter()
        .find_map(|p| hf.strip_prefix(p))
        .map(|r| format!("model.{r}"))
        .or_else(|| hf.strip_prefix("language_model.").map(str::to_string));
    let hf = text.as_deref().unwrap_or(hf);
    match hf {
        "model.embed_tokens.weight" => return plain("token_embd.weight"),
        "model.norm.weight" => return plain("output_norm.weight"),
        "lm_head.weight" => return plain("output.weight"),
        _ => {}
    }
    if hf.ends_with("rotary_emb.inv_freq") {
        return Ok(None);
    }
    let unknown = || {
        Error::UnsupportedArchitecture(format!(
            "tensor {hf} has no place in llama.cpp's {arch} architecture"
        ))
    };
    let rest = hf.strip_prefix("model.layers.").ok_or_else(unknown)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(unknown)?;
    let layer: usize = layer.parse().map_err(|_| unknown())?;
    let (part, kind) = layer_part(arch, rest).ok_or_else(unknown)?;
    let permuted = matches!(arch, "llama" | "smollm3");
    let permute_heads = match part {
        "attn_q" if permuted => Some(heads),
        "attn_k" if permuted => Some(kv_heads),
        _ => None,
    };
    Ok(Some(Mapped {
        name: format!("blk.{layer}.{part}.{kind}"),
        permute_heads,
        shift,
    }))
}

/// Source row of output row `out` after llama.cpp's Q/K permutation over `heads` heads:
/// each head's two rotary halves are interleaved pairwise.
pub fn permuted_row(out: usize, rows: usize, heads: usize) -> usize {
    let head_rows = rows / heads;
    let half = head_rows / 2;
    let (h, within) = (out / head_rows, out % head_rows);
    let (i, j) = (within / 2, within % 2);
    h * head_rows + j * half + i
}

/// llama.cpp's order of tensors (`weight_name_comparer`): layer number, then name.
pub fn llama_cpp_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn layer(n: &str) -> i64 {
        n.strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse().ok())
            .unwrap_or(-1)
    }
    layer(a).cmp(&layer(b)).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_per_architecture() {
        let m = map_name("llama", "model.layers.3.self_attn.k_proj.weight", 8, 2)
            .unwrap()
            .unwrap();
        assert_eq!(
            m,
            Mapped {
                name: "blk.3.attn_k.weight".into(),
                permute_heads: Some(2),
                shift: 0.0
            }
        );
        let q = map_name("qwen2", "model.layers.0.self_attn.q_proj.bias", 8, 2)
            .unwrap()
            .unwrap();
        assert_eq!(
            q,
            Mapped {
                name: "blk.0.attn_q.bias".into(),
                permute_heads: None,
                shift: 0.0
            }
        );
        let phi = map_name("phi3", "model.layers.1.mlp.gate_up_proj.weight", 8, 8)
            .unwrap()
            .unwrap();
        assert_eq!(phi.name, "blk.1.ffn_up.weight");
        assert!(map_name(
            "llama",
            "model.layers.0.self_attn.rotary_emb.inv_freq",
            8,
            8
        )
        .unwrap()
        .is_none());
        let err =
            map_name("llama", "model.layers.0.block_sparse_moe.gate.weight", 8, 8).unwrap_err();
        assert_eq!(err.code(), "INPUT_UNSUPPORTED_ARCHITECTURE");
    }

    #[test]
    fn gemma3_norms_are_renamed_and_shifted() {
        let map = |hf: &str| map_name("gemma3", hf, 4, 1).unwrap();
        let ffn = map("model.layers.2.pre_feedforward_layernorm.weight").unwrap();
        assert_eq!(
            (ffn.name.as_str(), ffn.shift),
            ("blk.2.ffn_norm.weight", 1.0)
        );
        let post = map("model.language_model.layers.0.post_attention_layernorm.weight").unwrap();
        assert_eq!(post.name, "blk.0.post_attention_norm.weight");
        assert_eq!(
            map("model.layers.1.self_attn.k_norm.weight").unwrap().shift,
            1.0
        );
        assert_eq!(map("model.language_model.norm.weight").unwrap().shift, 1.0);
        let q = map("model.layers.1.self_attn.q_proj.weight").unwrap();
        assert_eq!((q.permute_heads, q.shift), (None, 0.0));
        assert!(map("model.vision_tower.vision_model.post_layernorm.weight").is_none());
        assert!(map("multi_modal_projector.mm_soft_emb_norm.weight").is_none());
        let published = map("language_model.model.layers.3.post_feedforward_layernorm.weight");
        assert_eq!(published.unwrap().name, "blk.3.post_ffw_norm.weight");
        assert_eq!(
            map("language_model.lm_head.weight").unwrap().name,
            "output.weight"
        );
        let llama = map_name(
            "llama",
            "model.layers.0.post_attention_layernorm.weight",
            4,
            1,
        );
        assert_eq!(llama.unwrap().unwrap().name, "blk.0.ffn_norm.weight");
    }

    #[test]
    fn permutation_matches_reshape_swapaxes() {
        // numpy: w.reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)
        let (rows, heads) = (8, 2);
        let got: Vec<usize> = (0..rows).map(|o| permuted_row(o, rows, heads)).collect();
        assert_eq!(got, vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn order_is_layer_then_name() {
        let mut v = vec![
            "blk.10.attn_q.weight",
            "output.weight",
            "blk.2.ffn_up.weight",
            "blk.2.attn_k.weight",
            "token_embd.weight",
        ];
        v.sort_by(|a, b| llama_cpp_order(a, b));
        assert_eq!(
            v,
            vec![
                "output.weight",
                "token_embd.weight",
                "blk.2.attn_k.weight",
                "blk.2.ffn_up.weight",
                "blk.10.attn_q.weight"
            ]
        );
    }
}

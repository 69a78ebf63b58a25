//! Hugging Face tensor names to llama.cpp's, with the row permutation of Q/K where the
//! architecture's llama.cpp implementation expects it (`llama`, `smollm3`), and Gemma's
//! norm convention (transformers scales by `1 + weight`, llama.cpp by `weight`), shared by
//! Qwen3.5, whose linear-attention layers also store `A` as its log and group value heads by
//! key head where llama.cpp tiles them.

use super::config::LinearHeads;
use crate::{Error, Result};

/// How one GGUF tensor is produced from a Hugging Face tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapped {
    /// llama.cpp's tensor name.
    pub name: String,
    /// Heads to permute the rows over (rotary halves interleaved), if any.
    pub permute_heads: Option<usize>,
    /// Added to every value (1 for Gemma's and Qwen3.5's RMSNorm weights, else 0).
    pub shift: f32,
    /// Each value `x` written as `-exp(x)` (Qwen3.5's `A_log` to llama.cpp's `ssm_a`).
    pub neg_exp: bool,
    /// Value heads to move from grouped to tiled order, if any.
    pub reorder: Option<HeadReorder>,
}

/// Which axis of a 2-D tensor a [`HeadReorder`] permutes (elements for a 1-D tensor).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Axis {
    Rows,
    Columns,
}

/// Qwen3.5's value heads, stored grouped by key head (`[k0v0, k0v1, k1v0, k1v1]`), as
/// llama.cpp's qwen35 broadcasts them: tiled (`[k0v0, k1v0, k0v1, k1v1]`). Indices before
/// `offset` (the query and key parts of the fused projection) stay in place.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadReorder {
    pub axis: Axis,
    pub offset: usize,
    pub k_heads: usize,
    pub v_per_k: usize,
    /// Indices per value head (1 for per-head scalars such as `A_log`).
    pub head_dim: usize,
}

impl HeadReorder {
    /// Source index of output index `out`.
    pub fn source(&self, out: usize) -> usize {
        let Some(o) = out.checked_sub(self.offset) else {
            return out;
        };
        let (d, k) = (self.head_dim, self.k_heads);
        let (j, g, i) = (o / (k * d), o / d % k, o % d);
        self.offset + g * self.v_per_k * d + j * d + i
    }
}

/// Qwen3.5's linear-attention tensors and its post-attention norm, by name after the layer number.
fn qwen35_part(rest: &str) -> Option<&'static str> {
    Some(match rest {
        "linear_attn.A_log" => "ssm_a",
        "linear_attn.dt_bias" => "ssm_dt.bias",
        "linear_attn.conv1d.weight" => "ssm_conv1d.weight",
        "linear_attn.in_proj_qkv.weight" => "attn_qkv.weight",
        "linear_attn.in_proj_z.weight" => "attn_gate.weight",
        "linear_attn.in_proj_a.weight" => "ssm_alpha.weight",
        "linear_attn.in_proj_b.weight" => "ssm_beta.weight",
        "linear_attn.norm.weight" => "ssm_norm.weight",
        "linear_attn.out_proj.weight" => "ssm_out.weight",
        "post_attention_layernorm.weight" => "post_attention_norm.weight",
        _ => return None,
    })
}

/// The value-head reorder of one Qwen3.5 tensor (llama.cpp's converter's), when key and
/// value head counts differ.
fn qwen35_reorder(rest: &str, linear: LinearHeads) -> Option<HeadReorder> {
    if linear.k_heads == linear.v_heads {
        return None;
    }
    let key_dims = linear.k_heads * linear.head_dim;
    let (axis, offset, head_dim) = match rest {
        "linear_attn.in_proj_qkv.weight" | "linear_attn.conv1d.weight" => {
            (Axis::Rows, 2 * key_dims, linear.head_dim)
        }
        "linear_attn.in_proj_z.weight" => (Axis::Rows, 0, linear.head_dim),
        "linear_attn.in_proj_a.weight"
        | "linear_attn.in_proj_b.weight"
        | "linear_attn.A_log"
        | "linear_attn.dt_bias" => (Axis::Rows, 0, 1),
        "linear_attn.out_proj.weight" => (Axis::Columns, 0, linear.head_dim),
        _ => return None,
    };
    Some(HeadReorder {
        axis,
        offset,
        k_heads: linear.k_heads,
        v_per_k: linear.v_heads / linear.k_heads,
        head_dim,
    })
}

/// Gemma 2's and 3's four norms per layer, where llama.cpp names them differently from the table.
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
    let gemma = if arch == "gemma2" || arch == "gemma3" {
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
/// (rotary caches, the image tower of a multimodal Gemma 3 or Qwen3.5, Qwen3.5's
/// multi-token-prediction head); unknown names are an error rather than silently dropped weights.
pub fn map_name(
    arch: &str,
    hf: &str,
    heads: usize,
    kv_heads: usize,
    linear: Option<LinearHeads>,
) -> Result<Option<Mapped>> {
    let one_plus = match arch {
        "gemma2" | "gemma3" => true,
        "qwen35" => !hf.ends_with("linear_attn.norm.weight"), // the gated norm scales by weight
        _ => false,
    };
    let shift = if one_plus && hf.ends_with("norm.weight") {
        1.0
    } else {
        0.0
    };
    let plain = |n: &str| {
        Ok(Some(Mapped {
            name: n.to_string(),
            permute_heads: None,
            shift,
            neg_exp: false,
            reorder: None,
        }))
    };
    let image = ["vision_tower.", "multi_modal_projector.", "visual.", "mtp."];
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
    if let Some(part) = linear.and_then(|_| qwen35_part(rest)) {
        return Ok(Some(Mapped {
            name: format!("blk.{layer}.{part}"),
            permute_heads: None,
            shift,
            neg_exp: rest == "linear_attn.A_log",
            reorder: linear.and_then(|l| qwen35_reorder(rest, l)),
        }));
    }
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
        neg_exp: false,
        reorder: None,
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
        let m = map_name(
            "llama",
            "model.layers.3.self_attn.k_proj.weight",
            8,
            2,
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            m,
            Mapped {
                name: "blk.3.attn_k.weight".into(),
                permute_heads: Some(2),
                shift: 0.0,
                neg_exp: false,
                reorder: None
            }
        );
        let q = map_name("qwen2", "model.layers.0.self_attn.q_proj.bias", 8, 2, None)
            .unwrap()
            .unwrap();
        assert_eq!(
            q,
            Mapped {
                name: "blk.0.attn_q.bias".into(),
                permute_heads: None,
                shift: 0.0,
                neg_exp: false,
                reorder: None
            }
        );
        let phi = map_name("phi3", "model.layers.1.mlp.gate_up_proj.weight", 8, 8, None)
            .unwrap()
            .unwrap();
        assert_eq!(phi.name, "blk.1.ffn_up.weight");
        assert!(map_name(
            "llama",
            "model.layers.0.self_attn.rotary_emb.inv_freq",
            8,
            8,
            None
        )
        .unwrap()
        .is_none());
        let err = map_name(
            "llama",
            "model.layers.0.block_sparse_moe.gate.weight",
            8,
            8,
            None,
        )
        .unwrap_err();
        assert_eq!(err.code(), "INPUT_UNSUPPORTED_ARCHITECTURE");
    }

    #[test]
    fn gemma3_norms_are_renamed_and_shifted() {
        let map = |hf: &str| map_name("gemma3", hf, 4, 1, None).unwrap();
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
            None,
        );
        assert_eq!(llama.unwrap().unwrap().name, "blk.0.ffn_norm.weight");
    }

    #[test]
    fn qwen35_linear_attention_is_renamed_and_value_heads_tiled() {
        let linear = LinearHeads {
            k_heads: 2,
            v_heads: 4,
            head_dim: 3,
        };
        let map = |hf: &str| map_name("qwen35", hf, 4, 2, Some(linear)).unwrap();
        let a = map("model.language_model.layers.0.linear_attn.A_log").unwrap();
        assert_eq!((a.name.as_str(), a.neg_exp), ("blk.0.ssm_a", true));
        // numpy: a.reshape(k_heads, v_per_k).swapaxes(0, 1).reshape(-1)
        let order: Vec<usize> = (0..4).map(|o| a.reorder.unwrap().source(o)).collect();
        assert_eq!(order, vec![0, 2, 1, 3]);
        let qkv = map("model.layers.1.linear_attn.in_proj_qkv.weight").unwrap();
        let r = qkv.reorder.unwrap();
        assert_eq!(
            (qkv.name.as_str(), r.axis),
            ("blk.1.attn_qkv.weight", Axis::Rows)
        );
        assert_eq!(r.source(5), 5); // query and key rows stay
        assert_eq!(r.source(12 + 3), 12 + 6); // tiled head 1 is key head 1's first value head
        let out = map("model.layers.2.linear_attn.out_proj.weight").unwrap();
        assert_eq!(out.reorder.unwrap().axis, Axis::Columns);
        let gated = map("model.layers.2.linear_attn.norm.weight").unwrap();
        assert_eq!(
            (gated.name.as_str(), gated.shift),
            ("blk.2.ssm_norm.weight", 0.0)
        );
        let post = map("model.layers.3.post_attention_layernorm.weight").unwrap();
        assert_eq!(
            (post.name.as_str(), post.shift),
            ("blk.3.post_attention_norm.weight", 1.0)
        );
        assert_eq!(
            map("model.layers.3.self_attn.q_norm.weight").unwrap().shift,
            1.0
        );
        assert_eq!(
            map("model.layers.3.self_attn.q_proj.weight")
                .unwrap()
                .reorder,
            None
        );
        assert!(map("model.visual.blocks.0.attn.qkv.weight").is_none());
        assert!(map("mtp.layers.0.mlp.up_proj.weight").is_none());
        let same = LinearHeads {
            v_heads: 2,
            ..linear
        };
        let dt = map_name(
            "qwen35",
            "model.layers.0.linear_attn.dt_bias",
            4,
            2,
            Some(same),
        );
        assert_eq!(dt.unwrap().unwrap().reorder, None);
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

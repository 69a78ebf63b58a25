//! Model hyperparameters from `config.json`, as the GGUF keys llama.cpp reads.
//!
//! transformers 5 files `rope_theta` and rope scaling under `rope_parameters` (per layer
//! type for Gemma 3); older configs keep `rope_theta` and `rope_scaling` at the top level.
//! Both forms are read. A multimodal config's `text_config` is read as the model's own.

use serde_json::Value as Json;

use super::types::Value;
use crate::{Error, Result};

/// Architectures the writer supports, by their GGUF name.
pub const ARCHITECTURES: [&str; 8] = [
    "llama", "qwen2", "qwen3", "phi3", "smollm3", "gemma2", "gemma3", "qwen35",
];

/// What the tensor mapping and metadata need to know about a model.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// GGUF architecture name (`llama` also for Mistral).
    pub arch: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub tied_embeddings: bool,
    /// Gated DeltaNet head layout of Qwen3.5's linear-attention layers.
    pub linear: Option<LinearHeads>,
    raw: Json,
}

/// Head counts and sizes of a Gated DeltaNet layer (`linear_*` config fields).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearHeads {
    pub k_heads: usize,
    pub v_heads: usize,
    /// Key and value head size (llama.cpp's qwen35 requires them equal).
    pub head_dim: usize,
}

fn arch_of(config: &Json) -> Option<&'static str> {
    let class = config
        .get("architectures")
        .and_then(Json::as_array)
        .and_then(|a| a.first())
        .and_then(Json::as_str)
        .unwrap_or("");
    let model_type = config
        .get("model_type")
        .and_then(Json::as_str)
        .unwrap_or("");
    Some(match (class, model_type) {
        ("LlamaForCausalLM" | "MistralForCausalLM", _) | (_, "llama" | "mistral") => "llama",
        ("Qwen2ForCausalLM", _) | (_, "qwen2") => "qwen2",
        ("Qwen3ForCausalLM", _) | (_, "qwen3") => "qwen3",
        ("Phi3ForCausalLM", _) | (_, "phi3") => "phi3",
        ("SmolLM3ForCausalLM", _) | (_, "smollm3") => "smollm3",
        ("Gemma2ForCausalLM", _) | (_, "gemma2") => "gemma2",
        ("Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration", _)
        | (_, "gemma3" | "gemma3_text") => "gemma3",
        ("Qwen3_5ForCausalLM" | "Qwen3_5ForConditionalGeneration", _)
        | (_, "qwen3_5" | "qwen3_5_text") => "qwen35",
        _ => return None,
    })
}

impl ModelConfig {
    /// Reads the parts of `config.json` that shape the export.
    pub fn from_json(mut config: Json) -> Result<Self> {
        if let Some(Json::Object(text)) = config.get("text_config").cloned() {
            for (k, v) in text {
                if k != "architectures" && k != "model_type" {
                    config[k] = v;
                }
            }
        }
        let arch = arch_of(&config).ok_or_else(|| {
            Error::UnsupportedArchitecture(format!(
                "config.json: architecture {} (model_type {}) cannot be exported to GGUF; supported: {}",
                config.get("architectures").map(|a| a.to_string()).unwrap_or_default(),
                config.get("model_type").map(|a| a.to_string()).unwrap_or_default(),
                "Llama 3.x, Mistral, Qwen2/2.5, Qwen3, Phi-3, SmolLM3, Gemma 2, Gemma 3, Qwen3.5"
            ))
        })?;
        let get = |key: &str| -> Result<usize> {
            config
                .get(key)
                .and_then(Json::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| Error::Model(format!("config.json: missing integer field {key:?}")))
        };
        let hidden = get("hidden_size")?;
        let heads = get("num_attention_heads")?;
        let kv_heads = get("num_key_value_heads").unwrap_or(heads);
        let head_dim = config
            .get("head_dim")
            .and_then(Json::as_u64)
            .map_or(hidden / heads, |v| v as usize);
        let linear = if arch == "qwen35" {
            let (k_dim, v_dim) = (get("linear_key_head_dim")?, get("linear_value_head_dim")?);
            if k_dim != v_dim {
                return Err(Error::UnsupportedArchitecture(format!(
                    "config.json: linear_key_head_dim {k_dim} differs from linear_value_head_dim \
                     {v_dim}; llama.cpp's qwen35 gives keys and values one head size"
                )));
            }
            Some(LinearHeads {
                k_heads: get("linear_num_key_heads")?,
                v_heads: get("linear_num_value_heads")?,
                head_dim: k_dim,
            })
        } else {
            None
        };
        let me = Self {
            arch,
            linear,
            hidden,
            layers: get("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            vocab_size: get("vocab_size")?,
            tied_embeddings: config
                .get("tie_word_embeddings")
                .and_then(Json::as_bool)
                .unwrap_or(false),
            raw: config,
        };
        me.check_llama_cpp_limits()?;
        Ok(me)
    }

    /// The raw config (for fields only some paths need).
    pub fn raw(&self) -> &Json {
        &self.raw
    }

    fn f64_field(&self, key: &str) -> Option<f64> {
        self.raw.get(key).and_then(Json::as_f64)
    }

    /// Rope settings: `rope_parameters` (transformers 5; its global layers' part when given
    /// per layer type) merged over `rope_scaling`.
    pub fn rope(&self) -> Json {
        let mut merged = serde_json::Map::new();
        let parameters = self.raw.get("rope_parameters");
        let global = parameters
            .and_then(|p| p.get("full_attention"))
            .or(parameters);
        for part in [self.raw.get("rope_scaling"), global] {
            if let Some(Json::Object(o)) = part {
                for (k, v) in o {
                    merged.insert(k.clone(), v.clone());
                }
            }
        }
        if let Some(theta) = self.raw.get("rope_theta") {
            merged.entry("rope_theta").or_insert(theta.clone());
        }
        Json::Object(merged)
    }

    /// `rope_type` (`type` in older configs), lower case; empty when absent.
    pub fn rope_type(&self) -> String {
        let rope = self.rope();
        rope.get("rope_type")
            .or_else(|| rope.get("type"))
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_ascii_lowercase()
    }

    /// Refuses settings that llama.cpp's implementation of the architecture cannot run.
    fn check_llama_cpp_limits(&self) -> Result<()> {
        if self.arch == "smollm3" {
            // llama.cpp skips rope on every 4th layer, whatever the config says.
            if let Some(layers) = self.raw.get("no_rope_layers").and_then(Json::as_array) {
                for (i, v) in layers.iter().enumerate() {
                    let uses_rope = v.as_u64() != Some(0);
                    if uses_rope != ((i + 1) % 4 != 0) {
                        return Err(Error::UnsupportedArchitecture(format!(
                            "config.json: no_rope_layers[{i}] = {v}; llama.cpp's smollm3 skips rope exactly on every 4th layer"
                        )));
                    }
                }
            }
        }
        if self.arch == "gemma2" || self.arch == "gemma3" {
            self.check_gemma_layout()?;
        }
        if let Some(linear) = self.linear {
            self.full_attention_interval()?;
            self.check_rope_sections()?;
            if self.raw.get("attention_bias").and_then(Json::as_bool) == Some(true) {
                return Err(Error::UnsupportedArchitecture(
                    "config.json: attention_bias is true; llama.cpp's qwen35 has no attention biases"
                        .into(),
                ));
            }
            if linear.k_heads == 0 || linear.v_heads % linear.k_heads != 0 {
                return Err(Error::UnsupportedArchitecture(format!(
                    "config.json: linear_num_value_heads {} is not a multiple of linear_num_key_heads {}; \
                     llama.cpp's qwen35 shares each key head among whole groups of value heads",
                    linear.v_heads, linear.k_heads
                )));
            }
        }
        let rope_type = self.rope_type();
        let ok = match self.arch {
            "phi3" => matches!(rope_type.as_str(), "" | "default" | "longrope" | "su"),
            "gemma2" => matches!(rope_type.as_str(), "" | "default"),
            "gemma3" => matches!(rope_type.as_str(), "" | "default" | "linear"),
            "qwen35" => matches!(rope_type.as_str(), "" | "default"),
            _ => matches!(rope_type.as_str(), "" | "default" | "llama3"),
        };
        if !ok {
            return Err(Error::UnsupportedArchitecture(format!(
                "config.json: rope type {rope_type:?} is not supported for {} in GGUF export",
                self.arch
            )));
        }
        Ok(())
    }

    /// llama.cpp's gemma2 and gemma3 fix what the config may vary: the pattern of sliding and
    /// global layers (gemma2: every 2nd global; gemma3: every 6th, its sliding layers with rope
    /// base 10000), queries scaled by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B models,
    /// 46 and 62 layers). A config that differs would export into a different model.
    fn check_gemma_layout(&self) -> Result<()> {
        let arch = self.arch;
        let refuse = |what: String| {
            Err(Error::UnsupportedArchitecture(format!(
                "config.json: {what}; llama.cpp's {arch} cannot run it"
            )))
        };
        let (period, big) = if arch == "gemma2" { (2, 46) } else { (6, 62) };
        if let Some(types) = self.raw.get("layer_types").and_then(Json::as_array) {
            for (i, t) in types.iter().enumerate() {
                let sliding = t.as_str() == Some("sliding_attention");
                if sliding != (i % period < period - 1) {
                    return refuse(format!(
                        "layer_types[{i}] = {t}; llama.cpp's {arch} makes every {period}th layer global, \
                         the others sliding"
                    ));
                }
            }
        }
        if arch == "gemma3" {
            let local = self
                .raw
                .get("rope_parameters")
                .and_then(|p| p.get("sliding_attention"))
                .and_then(|p| p.get("rope_theta"))
                .or_else(|| self.raw.get("rope_local_base_freq"))
                .and_then(Json::as_f64)
                .unwrap_or(10000.0);
            if local != 10000.0 {
                return refuse(format!(
                    "sliding layers' rope base {local} (llama.cpp uses 10000)"
                ));
            }
        }
        let scalar = self.f64_field("query_pre_attn_scalar").unwrap_or(256.0);
        let expected = if self.layers == big {
            (self.hidden / self.heads) as f64
        } else {
            self.head_dim as f64
        };
        if scalar != expected {
            return refuse(format!(
                "query_pre_attn_scalar {scalar} (llama.cpp scales queries by 1/sqrt({expected}))"
            ));
        }
        Ok(())
    }

    /// Qwen3.5's period of full-attention layers. llama.cpp's qwen35 makes every `n`th layer
    /// full attention and the others linear, so `layer_types` must follow one period.
    fn full_attention_interval(&self) -> Result<usize> {
        let types = self.raw.get("layer_types").and_then(Json::as_array);
        let full = |t: &Json| t.as_str() == Some("full_attention");
        let interval = match types {
            Some(types) => types
                .iter()
                .position(full)
                .map_or(self.layers + 1, |i| i + 1),
            None => self
                .raw
                .get("full_attention_interval")
                .and_then(Json::as_u64)
                .map_or(4, |v| v as usize),
        };
        for (i, t) in types.into_iter().flatten().enumerate() {
            if full(t) != ((i + 1) % interval == 0) {
                return Err(Error::UnsupportedArchitecture(format!(
                    "config.json: layer_types[{i}] = {t}; llama.cpp's qwen35 makes exactly every \
                     {interval}th layer full attention, the others linear"
                )));
            }
        }
        Ok(interval)
    }

    /// Rotated dimensions per head: Qwen3.5 rotates a quarter of each head unless told otherwise.
    fn rope_dims(&self, rope: &Json) -> usize {
        let partial = match self.arch {
            "qwen35" => rope
                .get("partial_rotary_factor")
                .and_then(Json::as_f64)
                .or_else(|| self.f64_field("partial_rotary_factor"))
                .unwrap_or(0.25),
            _ => 1.0,
        };
        (self.head_dim as f64 * partial) as usize
    }

    /// Qwen3.5's rope sections (transformers' default `[11, 11, 10]`), padded to llama.cpp's four.
    fn rope_sections(&self, rope: &Json) -> Vec<i32> {
        let mut sections: Vec<i32> = rope
            .get("mrope_section")
            .and_then(Json::as_array)
            .map(|s| {
                s.iter()
                    .filter_map(Json::as_i64)
                    .map(|v| v as i32)
                    .collect()
            })
            .unwrap_or_else(|| vec![11, 11, 10]);
        sections.resize(4, 0);
        sections
    }

    /// llama.cpp's interleaved multi-section rope takes rotary pair `p`'s position from
    /// section `p % 3` while `p < 3 * sections[p % 3]`, else from a fourth position that text
    /// tokens leave at 0; and it asserts that the sections fit in a head. Text then rotates
    /// as transformers rotates it only when the sections cover every pair.
    fn check_rope_sections(&self) -> Result<()> {
        let rope = self.rope();
        let sections = self.rope_sections(&rope);
        let pairs = self.rope_dims(&rope) / 2;
        let uncovered = (0..pairs).find(|p| *p as i32 >= 3 * sections[p % 3]);
        let total: i32 = sections.iter().sum();
        if uncovered.is_some() || total as usize > self.head_dim {
            return Err(Error::UnsupportedArchitecture(format!(
                "config.json: rope sections {sections:?} do not fit the {pairs} rotated pairs of a \
                 {}-wide head (set rope_parameters.mrope_section); llama.cpp's qwen35 would \
                 rotate text differently",
                self.head_dim
            )));
        }
        Ok(())
    }

    /// Qwen3.5's Gated DeltaNet sizes and its rope sections.
    fn qwen35_metadata(&self, rope: &Json, linear: LinearHeads) -> Result<Vec<(String, Value)>> {
        let int = |key: &str| -> Result<u32> {
            self.raw
                .get(key)
                .and_then(Json::as_u64)
                .map(|v| v as u32)
                .ok_or_else(|| Error::Model(format!("config.json: missing integer field {key:?}")))
        };
        Ok(vec![
            (
                "qwen35.ssm.conv_kernel".into(),
                Value::U32(int("linear_conv_kernel_dim")?),
            ),
            (
                "qwen35.ssm.state_size".into(),
                Value::U32(linear.head_dim as u32),
            ),
            (
                "qwen35.ssm.group_count".into(),
                Value::U32(linear.k_heads as u32),
            ),
            (
                "qwen35.ssm.time_step_rank".into(),
                Value::U32(linear.v_heads as u32),
            ),
            (
                "qwen35.ssm.inner_size".into(),
                Value::U32((linear.head_dim * linear.v_heads) as u32),
            ),
            (
                "qwen35.full_attention_interval".into(),
                Value::U32(self.full_attention_interval()? as u32),
            ),
            (
                "qwen35.rope.dimension_sections".into(),
                Value::ArrI32(self.rope_sections(rope)),
            ),
        ])
    }

    /// The `{arch}.*` and `general.*` keys llama.cpp needs, with its exact value types.
    pub fn metadata(&self, name: &str, file_type: u32) -> Result<Vec<(String, Value)>> {
        let a = self.arch;
        let rope = self.rope();
        let theta = rope
            .get("rope_theta")
            .and_then(Json::as_f64)
            .unwrap_or(10000.0);
        let eps = self.f64_field("rms_norm_eps").ok_or_else(|| {
            Error::Model("config.json: missing number field \"rms_norm_eps\"".into())
        })?;
        let ctx = self
            .raw
            .get("max_position_embeddings")
            .and_then(Json::as_u64)
            .unwrap_or(4096);
        let ff = self
            .raw
            .get("intermediate_size")
            .and_then(Json::as_u64)
            .ok_or_else(|| {
                Error::Model("config.json: missing integer field \"intermediate_size\"".into())
            })?;
        let mut kvs: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::Str(a.into())),
            ("general.type".into(), Value::Str("model".into())),
            ("general.name".into(), Value::Str(name.into())),
            (format!("{a}.block_count"), Value::U32(self.layers as u32)),
            (format!("{a}.context_length"), Value::U32(ctx as u32)),
            (
                format!("{a}.embedding_length"),
                Value::U32(self.hidden as u32),
            ),
            (format!("{a}.feed_forward_length"), Value::U32(ff as u32)),
            (
                format!("{a}.attention.head_count"),
                Value::U32(self.heads as u32),
            ),
            (
                format!("{a}.attention.head_count_kv"),
                Value::U32(self.kv_heads as u32),
            ),
            (format!("{a}.rope.freq_base"), Value::F32(theta as f32)),
            (
                format!("{a}.attention.layer_norm_rms_epsilon"),
                Value::F32(eps as f32),
            ),
        ];
        if self.raw.get("head_dim").is_some() && a != "phi3" {
            kvs.push((
                format!("{a}.attention.key_length"),
                Value::U32(self.head_dim as u32),
            ));
            kvs.push((
                format!("{a}.attention.value_length"),
                Value::U32(self.head_dim as u32),
            ));
        }
        if a == "phi3" {
            // Published Phi-4-mini configs keep it at the top level, transformers 5 in rope_parameters.
            let partial = rope
                .get("partial_rotary_factor")
                .and_then(Json::as_f64)
                .or_else(|| self.f64_field("partial_rotary_factor"))
                .unwrap_or(1.0);
            let rope_dims = (partial * self.hidden as f64) as usize / self.heads;
            kvs.push((
                format!("{a}.rope.dimension_count"),
                Value::U32(rope_dims as u32),
            ));
            let orig = rope
                .get("original_max_position_embeddings")
                .and_then(Json::as_u64)
                .or_else(|| {
                    self.raw
                        .get("original_max_position_embeddings")
                        .and_then(Json::as_u64)
                })
                .unwrap_or(ctx);
            kvs.push((
                format!("{a}.rope.scaling.original_context_length"),
                Value::U32(orig as u32),
            ));
            let window = self
                .raw
                .get("sliding_window")
                .and_then(Json::as_u64)
                .unwrap_or(0);
            kvs.push((
                format!("{a}.attention.sliding_window"),
                Value::U32(window as u32),
            ));
            if let Some(factor) = self.phi3_attn_factor(ctx, orig) {
                kvs.push((format!("{a}.rope.scaling.attn_factor"), Value::F32(factor)));
            }
        } else {
            kvs.push((
                format!("{a}.rope.dimension_count"),
                Value::U32(self.rope_dims(&rope) as u32),
            ));
        }
        if a == "gemma2" || a == "gemma3" {
            kvs.extend(self.gemma_metadata(&rope)?);
        }
        if let Some(linear) = self.linear {
            kvs.extend(self.qwen35_metadata(&rope, linear)?);
        }
        if a == "llama" || a == "smollm3" {
            kvs.push((
                format!("{a}.vocab_size"),
                Value::U32(self.vocab_size as u32),
            ));
        }
        kvs.push(("general.file_type".into(), Value::U32(file_type)));
        kvs.push(("general.quantization_version".into(), Value::U32(2)));
        Ok(kvs)
    }

    /// Gemma's window, soft-capping (Gemma 2 also caps attention scores) and the linear rope
    /// scaling of Gemma 3's global layers.
    fn gemma_metadata(&self, rope: &Json) -> Result<Vec<(String, Value)>> {
        let a = self.arch;
        let window = self
            .raw
            .get("sliding_window")
            .and_then(Json::as_u64)
            .ok_or_else(|| {
                Error::Model("config.json: missing integer field \"sliding_window\"".into())
            })?;
        let mut kvs = vec![(
            format!("{a}.attention.sliding_window"),
            Value::U32(window as u32),
        )];
        if let Some(cap) = self
            .f64_field("attn_logit_softcapping")
            .filter(|_| a == "gemma2")
        {
            kvs.push((
                format!("{a}.attn_logit_softcapping"),
                Value::F32(cap as f32),
            ));
        }
        // transformers' Gemma3ForConditionalGeneration caps nothing (published Gemma 3 configs
        // set no cap), so the text tower of an image + text config is exported uncapped too.
        let cap = self.f64_field("final_logit_softcapping");
        if let Some(cap) = cap.filter(|_| self.raw.get("text_config").is_none()) {
            kvs.push((
                format!("{a}.final_logit_softcapping"),
                Value::F32(cap as f32),
            ));
        }
        if self.rope_type() == "linear" {
            let factor = rope.get("factor").and_then(Json::as_f64).unwrap_or(1.0);
            kvs.push((
                format!("{a}.rope.scaling.type"),
                Value::Str("linear".into()),
            ));
            kvs.push((
                format!("{a}.rope.scaling.factor"),
                Value::F32(factor as f32),
            ));
        }
        Ok(kvs)
    }

    /// Phi-3's attention factor for long-rope models (llama.cpp's converter's formula).
    fn phi3_attn_factor(&self, ctx: u64, orig: u64) -> Option<f32> {
        self.rope().get("long_factor")?;
        let scale = ctx as f64 / orig as f64;
        let factor = if scale > 1.0 {
            (1.0 + scale.ln() / (orig as f64).ln()).sqrt()
        } else {
            1.0
        };
        Some(factor as f32)
    }

    /// Extra F32 tensors some rope schemes need: `rope_freqs` (Llama 3.1+) and Phi-3's
    /// long/short factors. Computed as llama.cpp's converter computes them.
    pub fn rope_tensors(&self) -> Result<Vec<(String, Vec<f32>)>> {
        let rope = self.rope();
        let rope_type = self.rope_type();
        if self.arch != "phi3" && rope_type == "llama3" {
            let base = rope
                .get("rope_theta")
                .and_then(Json::as_f64)
                .unwrap_or(10000.0) as f32;
            let num = |k: &str, d: f64| rope.get(k).and_then(Json::as_f64).unwrap_or(d) as f32;
            let factor = num("factor", 8.0);
            let low = num("low_freq_factor", 1.0);
            let high = num("high_freq_factor", 4.0);
            let old_ctx = num("original_max_position_embeddings", 8192.0);
            let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
            let dim = self.head_dim;
            let factors = (0..dim)
                .step_by(2)
                .map(|i| {
                    let freq = 1.0 / base.powf(i as f32 / dim as f32);
                    let wavelen = 2.0 * std::f32::consts::PI / freq;
                    if wavelen < high_wavelen {
                        1.0
                    } else if wavelen > low_wavelen {
                        factor
                    } else {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        1.0 / ((1.0 - smooth) / factor + smooth)
                    }
                })
                .collect();
            return Ok(vec![("rope_freqs.weight".into(), factors)]);
        }
        if self.arch == "phi3" {
            let list = |k: &str| -> Option<Vec<f32>> {
                rope.get(k)?
                    .as_array()?
                    .iter()
                    .map(|v| v.as_f64().map(|x| x as f32))
                    .collect()
            };
            if let (Some(long), Some(short)) = (list("long_factor"), list("short_factor")) {
                return Ok(vec![
                    ("rope_factors_long.weight".into(), long),
                    ("rope_factors_short.weight".into(), short),
                ]);
            }
        }
        Ok(vec![])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama(extra: Json) -> Json {
        let mut c = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 100, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    /// The GGUF metadata of `config`, looked up by key.
    fn metadata_of(config: Json) -> impl Fn(&str) -> Option<Value> {
        let kvs = ModelConfig::from_json(config)
            .unwrap()
            .metadata("x", 1)
            .unwrap();
        move |key| kvs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    #[test]
    fn theta_is_read_from_both_forms() {
        for cfg in [
            llama(json!({"rope_theta": 500000.0})),
            llama(json!({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}})),
        ] {
            assert_eq!(
                metadata_of(cfg)("llama.rope.freq_base"),
                Some(Value::F32(500000.0))
            );
        }
    }

    #[test]
    fn llama31_scaling_adds_rope_freqs() {
        let cfg = llama(
            json!({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}}),
        );
        let m = ModelConfig::from_json(cfg).unwrap();
        let t = m.rope_tensors().unwrap();
        assert_eq!(t[0].0, "rope_freqs.weight");
        assert_eq!(t[0].1.len(), 8);
        assert_eq!(t[0].1[0], 1.0);
        assert_eq!(*t[0].1.last().unwrap(), 8.0);
    }

    #[test]
    fn phi4_mini_rotary_dimensions_from_either_place() {
        let phi = |extra: Json| {
            let mut c = llama(extra);
            c["model_type"] = json!("phi3");
            c["architectures"] = json!(["Phi3ForCausalLM"]);
            metadata_of(c)("phi3.rope.dimension_count").unwrap()
        };
        assert_eq!(phi(json!({"partial_rotary_factor": 0.75})), Value::U32(12));
        let nested =
            json!({"rope_parameters": {"partial_rotary_factor": 0.75, "rope_type": "default"}});
        assert_eq!(phi(nested), Value::U32(12));
        assert_eq!(phi(json!({})), Value::U32(16));
    }

    /// Each config is refused as an architecture llama.cpp cannot run.
    fn assert_all_refused(configs: impl IntoIterator<Item = Json>) {
        for config in configs {
            let err = ModelConfig::from_json(config).unwrap_err();
            assert_eq!(err.code(), "INPUT_UNSUPPORTED_ARCHITECTURE");
        }
    }

    /// A tiny Gemma config as llama.cpp runs it (window 8, queries scaled by 1/sqrt(head_dim)),
    /// with `fields` and then `extra` on top.
    fn gemma_config(model_type: &str, class: &str, layers: u64, fields: Json, extra: Json) -> Json {
        let mut c = llama(json!({"model_type": model_type, "head_dim": 16,
            "query_pre_attn_scalar": 16, "sliding_window": 8, "num_hidden_layers": layers}));
        c["architectures"] = json!([class]);
        for (k, v) in fields
            .as_object()
            .unwrap()
            .iter()
            .chain(extra.as_object().unwrap())
        {
            c[k] = v.clone();
        }
        c
    }

    #[test]
    fn gemma3_layouts_llama_cpp_cannot_run_are_refused() {
        let gemma =
            |extra: Json| gemma_config("gemma3_text", "Gemma3ForCausalLM", 6, json!({}), extra);
        let get = metadata_of(gemma(json!({"final_logit_softcapping": 30.0})));
        assert_eq!(get("gemma3.attention.sliding_window"), Some(Value::U32(8)));
        assert_eq!(
            get("gemma3.final_logit_softcapping"),
            Some(Value::F32(30.0))
        );
        assert_all_refused(
            [
                json!({"query_pre_attn_scalar": 32}),
                json!({"layer_types": ["sliding_attention", "full_attention", "sliding_attention",
                    "full_attention", "sliding_attention", "full_attention"]}),
                json!({"rope_local_base_freq": 50000.0}),
            ]
            .map(gemma),
        );
    }

    #[test]
    fn gemma2_caps_attention_and_alternates_its_layers() {
        let caps = json!({"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0});
        let gemma =
            |extra: Json| gemma_config("gemma2", "Gemma2ForCausalLM", 4, caps.clone(), extra);
        let get = metadata_of(gemma(json!({})));
        assert_eq!(
            get("general.architecture"),
            Some(Value::Str("gemma2".into()))
        );
        assert_eq!(get("gemma2.attention.sliding_window"), Some(Value::U32(8)));
        assert_eq!(get("gemma2.attn_logit_softcapping"), Some(Value::F32(50.0)));
        assert_eq!(
            get("gemma2.final_logit_softcapping"),
            Some(Value::F32(30.0))
        );
        assert_all_refused(
            [
                json!({"query_pre_attn_scalar": 32}),
                json!({"layer_types": ["full_attention", "sliding_attention", "full_attention",
                    "sliding_attention"]}),
            ]
            .map(gemma),
        );
    }

    #[test]
    fn qwen35_metadata_describes_its_linear_attention() {
        let mut c = llama(json!({"model_type": "qwen3_5_text", "head_dim": 256,
            "num_hidden_layers": 8, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
            "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10]}}));
        c["architectures"] = json!(["Qwen3_5ForCausalLM"]);
        let get = metadata_of(c.clone());
        assert_eq!(get("qwen35.rope.dimension_count"), Some(Value::U32(64)));
        assert_eq!(
            get("qwen35.rope.dimension_sections"),
            Some(Value::ArrI32(vec![11, 11, 10, 0]))
        );
        assert_eq!(get("qwen35.ssm.inner_size"), Some(Value::U32(4096)));
        assert_eq!(get("qwen35.ssm.group_count"), Some(Value::U32(16)));
        assert_eq!(get("qwen35.ssm.time_step_rank"), Some(Value::U32(32)));
        assert_eq!(get("qwen35.full_attention_interval"), Some(Value::U32(4)));
        assert_all_refused(
            [
                ("linear_num_value_heads", json!(24)),
                ("attention_bias", json!(true)),
            ]
            .map(|(key, bad)| {
                let mut c = c.clone();
                c[key] = bad;
                c
            }),
        );
    }

    #[test]
    fn unknown_architecture_is_refused() {
        let mut cfg = llama(json!({}));
        cfg["architectures"] = json!(["GPTNeoXForCausalLM"]);
        cfg["model_type"] = json!("gpt_neox");
        assert_all_refused([cfg]);
    }
}

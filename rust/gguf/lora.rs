//! LoRA / DoRA adapters as PEFT saves them, merged into base weights row by row.
//!
//! Merging is `W + s * B @ A` with `s = alpha / r` (`alpha / sqrt(r)` for rsLoRA); DoRA
//! then rescales each output row to its learned magnitude: `m / ||W + s B A||_row`.
//! Only the rows being written are merged, so memory stays near one chunk.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use super::safetensors::Safetensors;
use super::tokenizer::read_json;
use crate::{Error, Result};

const PREFIX: &str = "base_model.model.";

/// A PEFT LoRA adapter folder, opened for merging.
pub struct Adapter {
    dir: PathBuf,
    weights: Safetensors,
    alpha: f64,
    rslora: bool,
    dora: bool,
    alpha_pattern: Vec<(String, f64)>,
    modules: BTreeSet<String>,
}

/// The factors of one adapted linear layer, ready to merge.
pub struct Factors {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    cols: usize,
    scale: f32,
    magnitude: Option<Vec<f32>>,
}

fn matches_module(module: &str, pattern: &str) -> bool {
    module == pattern || module.ends_with(&format!(".{pattern}"))
}

impl Adapter {
    /// Opens `adapter_config.json` and `adapter_model.safetensors` in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let bad = |why: String| Error::Adapter(format!("{}: {why}", dir.display()));
        let cfg = read_json(&dir.join("adapter_config.json"))?;
        let peft_type = cfg
            .get("peft_type")
            .and_then(Json::as_str)
            .unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(bad(format!(
                "peft_type {peft_type} cannot be merged; only LoRA and DoRA"
            )));
        }
        if cfg.get("fan_in_fan_out").and_then(Json::as_bool) == Some(true) {
            return Err(bad(
                "fan_in_fan_out adapters (Conv1D layers) are not supported".into(),
            ));
        }
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.exists() {
            return Err(bad("adapter_model.safetensors is missing".into()));
        }
        let weights = Safetensors::open_files(&[weights_path])?;
        let mut modules = BTreeSet::new();
        for name in weights.names() {
            if let Some(m) = name.strip_suffix(".lora_A.weight") {
                modules.insert(m.strip_prefix(PREFIX).unwrap_or(m).to_string());
            } else if name.contains("lora_embedding_") || name.ends_with(".lora_B.bias") {
                return Err(bad(format!(
                    "tensor {name}: embedding LoRA and LoRA biases are not supported for merging"
                )));
            }
        }
        let alpha_pattern = cfg
            .get("alpha_pattern")
            .and_then(Json::as_object)
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            dir: dir.to_path_buf(),
            alpha: cfg.get("lora_alpha").and_then(Json::as_f64).unwrap_or(8.0),
            rslora: cfg
                .get("use_rslora")
                .and_then(Json::as_bool)
                .unwrap_or(false),
            dora: cfg.get("use_dora").and_then(Json::as_bool).unwrap_or(false),
            alpha_pattern,
            modules,
            weights,
        })
    }

    /// Module paths (e.g. `model.layers.0.self_attn.q_proj`) that carry LoRA factors.
    pub fn modules(&self) -> &BTreeSet<String> {
        &self.modules
    }

    /// A full replacement of base tensor `name` (PEFT `modules_to_save`), if saved.
    pub fn replacement(&self, name: &str) -> Option<super::safetensors::TensorView<'_>> {
        self.weights.get(&format!("{PREFIX}{name}"))
    }

    /// Whether the adapter replaces base tensor `name` wholesale.
    pub fn replaces(&self, name: &str) -> bool {
        self.replacement(name).is_some()
    }

    /// Factors for base weight `weight_name` (`...q_proj.weight`) of shape `[rows, cols]`.
    pub fn factors(&self, weight_name: &str, rows: usize, cols: usize) -> Result<Option<Factors>> {
        let Some(module) = weight_name.strip_suffix(".weight") else {
            return Ok(None);
        };
        if !self.modules.contains(module) {
            return Ok(None);
        }
        let get = |suffix: &str| {
            self.weights
                .get(&format!("{PREFIX}{module}.{suffix}"))
                .or_else(|| self.weights.get(&format!("{module}.{suffix}")))
        };
        let bad = |why: String| Error::Adapter(format!("{}: {module}: {why}", self.dir.display()));
        let a = get("lora_A.weight").ok_or_else(|| bad("lora_A.weight missing".into()))?;
        let b = get("lora_B.weight").ok_or_else(|| bad("lora_B.weight missing".into()))?;
        let r = a.rows();
        if a.row_len() != cols || b.rows() != rows || b.row_len() != r {
            return Err(bad(format!(
                "factor shapes A {:?} and B {:?} do not fit the base weight [{rows}, {cols}]",
                a.shape, b.shape
            )));
        }
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(p, _)| matches_module(module, p))
            .map_or(self.alpha, |(_, a)| *a);
        let scale = if self.rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        let magnitude = if self.dora {
            let m = get("lora_magnitude_vector")
                .or_else(|| get("lora_magnitude_vector.weight"))
                .ok_or_else(|| bad("DoRA adapter without lora_magnitude_vector".into()))?;
            if m.rows() * m.row_len() != rows {
                return Err(bad(format!(
                    "magnitude vector {:?} does not fit {rows} rows",
                    m.shape
                )));
            }
            Some(m.to_f32())
        } else {
            None
        };
        Ok(Some(Factors {
            a: a.to_f32(),
            b: b.to_f32(),
            r,
            cols,
            scale: scale as f32,
            magnitude,
        }))
    }
}

impl Factors {
    /// Merges the adapter into `w`, which holds base row `row` (in the base's row order).
    pub fn merge_row(&self, row: usize, w: &mut [f32]) {
        for k in 0..self.r {
            let c = self.scale * self.b[row * self.r + k];
            if c != 0.0 {
                let a = &self.a[k * self.cols..(k + 1) * self.cols];
                for (x, &y) in w.iter_mut().zip(a) {
                    *x += c * y;
                }
            }
        }
        if let Some(m) = &self.magnitude {
            let norm = w.iter().map(|x| x * x).sum::<f32>().sqrt();
            let factor = m[row] / norm;
            for x in w.iter_mut() {
                *x *= factor;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_scaled_product_and_dora_rescales() {
        // B = [[1],[2]], A = [[1, 0, 1]], scale 0.5.
        let f = Factors {
            a: vec![1.0, 0.0, 1.0],
            b: vec![1.0, 2.0],
            r: 1,
            cols: 3,
            scale: 0.5,
            magnitude: None,
        };
        let mut w = vec![1.0, 1.0, 1.0];
        f.merge_row(1, &mut w);
        assert_eq!(w, vec![2.0, 1.0, 2.0]);
        let d = Factors {
            magnitude: Some(vec![3.0, 6.0]),
            ..f
        };
        let mut w = vec![1.0, 1.0, 1.0];
        d.merge_row(1, &mut w);
        let norm = w.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 6.0).abs() < 1e-5);
    }

    #[test]
    fn alpha_patterns_match_module_suffixes() {
        assert!(matches_module("model.layers.0.self_attn.q_proj", "q_proj"));
        assert!(matches_module(
            "model.layers.0.self_attn.q_proj",
            "layers.0.self_attn.q_proj"
        ));
        assert!(!matches_module("model.layers.0.self_attn.q_proj", "_proj"));
    }
}

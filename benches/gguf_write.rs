//! GGUF writing throughput (MB/s of source weights), on a synthetic bf16 model in
//! Qwen2's layout: bf16 copied through, converted to f16, with a LoRA merged in, and
//! quantized to `q4_k_m` (Q4_K and Q6_K only, which need no llama.cpp library).
//!
//! `cargo bench --bench gguf_write`. Runs without Python; the comparison with llama.cpp's
//! own tools is `benches/convert_vs_llamacpp.py`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use _core::gguf::{convert, ConvertOptions, OutType};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const HIDDEN: usize = 1024;
const INTER: usize = 2816;
const LAYERS: usize = 4;
const VOCAB: usize = 32000;
const RANK: usize = 16;

struct Rng(u64);

impl Rng {
    fn bf16(&mut self) -> [u8; 2] {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let x = ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
        let bits = (x.to_bits() >> 16) as u16;
        bits.to_le_bytes()
    }
}

fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>)], rng: &mut Rng) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let n = shape.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut text = serde_json::to_string(&header).unwrap();
    while (8 + text.len()) % 8 != 0 {
        text.push(' ');
    }
    let mut f = std::io::BufWriter::new(fs::File::create(path).unwrap());
    f.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    for (_, shape) in tensors {
        for _ in 0..shape.iter().product::<usize>() {
            f.write_all(&rng.bf16()).unwrap();
        }
    }
}

fn linear_shapes() -> Vec<(String, usize, usize)> {
    let mut v = Vec::new();
    for i in 0..LAYERS {
        for (m, out, inp) in [
            ("self_attn.q_proj", HIDDEN, HIDDEN),
            ("self_attn.k_proj", HIDDEN / 4, HIDDEN),
            ("self_attn.v_proj", HIDDEN / 4, HIDDEN),
            ("self_attn.o_proj", HIDDEN, HIDDEN),
            ("mlp.gate_proj", INTER, HIDDEN),
            ("mlp.up_proj", INTER, HIDDEN),
            ("mlp.down_proj", HIDDEN, INTER),
        ] {
            v.push((format!("model.layers.{i}.{m}"), out, inp));
        }
    }
    v
}

fn synthetic_model(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    let adapter = dir.join("adapter");
    fs::create_dir_all(&model).unwrap();
    fs::create_dir_all(&adapter).unwrap();
    let config = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 16,
        "num_key_value_heads": 4, "vocab_size": VOCAB, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": false
    });
    fs::write(model.join("config.json"), config.to_string()).unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> = (0..VOCAB)
        .map(|i| (format!("t{i}"), serde_json::json!(i)))
        .collect();
    let tokenizer = serde_json::json!({
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "pre_tokenizer": {"type": "ByteLevel", "use_regex": true}, "added_tokens": []
    });
    fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let mut tensors = vec![
        ("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN]),
        ("lm_head.weight".to_string(), vec![VOCAB, HIDDEN]),
        ("model.norm.weight".to_string(), vec![HIDDEN]),
    ];
    let mut lora = Vec::new();
    for (name, out, inp) in linear_shapes() {
        tensors.push((format!("{name}.weight"), vec![out, inp]));
        lora.push((
            format!("base_model.model.{name}.lora_A.weight"),
            vec![RANK, inp],
        ));
        lora.push((
            format!("base_model.model.{name}.lora_B.weight"),
            vec![out, RANK],
        ));
    }
    for i in 0..LAYERS {
        tensors.push((
            format!("model.layers.{i}.input_layernorm.weight"),
            vec![HIDDEN],
        ));
        tensors.push((
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            vec![HIDDEN],
        ));
        for (m, n) in [
            ("q_proj", HIDDEN),
            ("k_proj", HIDDEN / 4),
            ("v_proj", HIDDEN / 4),
        ] {
            tensors.push((format!("model.layers.{i}.self_attn.{m}.bias"), vec![n]));
        }
    }
    let mut rng = Rng(0x9e3779b97f4a7c15);
    write_safetensors(&model.join("model.safetensors"), &tensors, &mut rng);
    write_safetensors(&adapter.join("adapter_model.safetensors"), &lora, &mut rng);
    let adapter_cfg = serde_json::json!({"peft_type": "LORA", "r": RANK, "lora_alpha": 32, "base_model_name_or_path": "x"});
    fs::write(adapter.join("adapter_config.json"), adapter_cfg.to_string()).unwrap();
    (model, adapter)
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("bp-gguf-bench-{}", std::process::id()));
    let (model, adapter) = synthetic_model(&dir);
    let source_bytes = fs::metadata(model.join("model.safetensors")).unwrap().len();
    let mut group = c.benchmark_group("gguf_write");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(source_bytes));
    for (label, out_type, with_adapter) in [
        ("bf16_copy", OutType::BF16, false),
        ("bf16_to_f16", OutType::F16, false),
        ("bf16_lora_merge", OutType::BF16, true),
        ("q4_k_m", OutType::Q4KM, false),
    ] {
        let opts = ConvertOptions {
            model_dir: model.clone(),
            adapter_dir: with_adapter.then(|| adapter.clone()),
            output: dir.join(format!("{label}.gguf")),
            out_type,
            force: true,
            llama_cpp_lib: None,
            name: None,
            tokenizer_dir: None,
        };
        group.bench_function(label, |b| b.iter(|| convert(&opts, &|_, _| {}).unwrap()));
    }
    group.finish();
    let _ = fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);

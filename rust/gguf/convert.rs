//! Hugging Face folder (+ optional LoRA adapter) to one GGUF file, streamed.
//!
//! Tensors are planned up front (names, shapes, types), so the header is written first
//! and tensor data follows in chunks of rows: read through mmap, converted to f32 when
//! needed, merged with the adapter, permuted, encoded, and handed to a writer thread
//! that overlaps disk writes with the next chunk's work. Memory stays near one chunk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use rayon::prelude::*;

use super::atomic::AtomicFile;
use super::config::ModelConfig;
use super::lora::{Adapter, Factors};
use super::mapping::{llama_cpp_order, map_name, permuted_row, Axis, HeadReorder};
use super::quant::{choose_types, encode, needs_kernels, Kernels, MixContext};
use super::safetensors::{DType, Safetensors};
use super::tokenizer::{read_json, tokenizer_metadata};
use super::types::{GgmlType, OutType};
use super::writer::{file_size, header, write_padding, TensorInfo};
use crate::{Error, Result};

/// Elements converted per chunk (16 MiB of f32).
const CHUNK_ELEMS: usize = 4 << 20;

/// Elements one parallel job converts and encodes (256 KiB of f32): small enough that a
/// chunk splits into dozens of jobs, so no core idles at the end of a chunk.
const JOB_ELEMS: usize = 64 << 10;

/// What to convert and how.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Hugging Face model folder (config.json, tokenizer files, *.safetensors).
    pub model_dir: PathBuf,
    /// PEFT adapter folder to merge on the fly.
    pub adapter_dir: Option<PathBuf>,
    /// The GGUF file to write.
    pub output: PathBuf,
    /// Requested type or mix.
    pub out_type: OutType,
    /// Overwrite an existing output.
    pub force: bool,
    /// llama.cpp library providing the quantization kernels (needed for quantized types).
    pub llama_cpp_lib: Option<PathBuf>,
    /// `general.name`; the model folder's name when absent.
    pub name: Option<String>,
    /// Folder with the tokenizer files when they differ from the model's (a trained
    /// adapter saved with its own tokenizer and chat template).
    pub tokenizer_dir: Option<PathBuf>,
}

/// What was written.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub tensors: usize,
    /// Count of tensors per GGUF type name.
    pub types: BTreeMap<String, usize>,
    pub source_bytes: u64,
    pub seconds: f64,
}

enum Source {
    /// A base tensor (or an adapter's full replacement of it).
    Weight {
        hf: String,
        from_adapter: bool,
        permute_heads: Option<usize>,
        /// Added to each value of a 1-D tensor (Gemma's and Qwen3.5's norms).
        shift: f32,
        /// Each value written as `-exp(value)` (Qwen3.5's `A_log`).
        neg_exp: bool,
        /// Qwen3.5's value heads moved to llama.cpp's order.
        reorder: Option<HeadReorder>,
    },
    /// Values computed here (rope factors).
    Data(Vec<f32>),
}

struct Planned {
    info: TensorInfo,
    source: Source,
}

fn plan(cfg: &ModelConfig, base: &Safetensors, adapter: Option<&Adapter>) -> Result<Vec<Planned>> {
    let mut planned = Vec::new();
    let mut adapted = std::collections::BTreeSet::new();
    for hf in base.names() {
        let Some(m) = map_name(cfg.arch, hf, cfg.heads, cfg.kv_heads, cfg.linear)? else {
            continue;
        };
        let from_adapter = adapter.is_some_and(|a| a.replaces(hf));
        if m.name == "output.weight" && cfg.tied_embeddings && !from_adapter {
            continue; // llama.cpp reuses token_embd when output is absent
        }
        let view = if from_adapter {
            adapter.and_then(|a| a.replacement(hf))
        } else {
            base.get(hf)
        }
        .expect("name listed by the same set");
        if let Some(a) = adapter {
            if let Some(module) = hf.strip_suffix(".weight") {
                if a.modules().contains(module) {
                    adapted.insert(module.to_string());
                }
            }
        }
        let mut ne: Vec<u64> = view.shape.iter().rev().map(|&d| d as u64).collect();
        if ne.len() > 2 {
            ne.retain(|&d| d != 1); // Qwen3.5's conv1d kernel [channels, 1, width], as squeezed
        }
        planned.push(Planned {
            info: TensorInfo {
                name: m.name,
                ne,
                ty: GgmlType::F32,
            },
            source: Source::Weight {
                hf: hf.to_string(),
                from_adapter,
                permute_heads: m.permute_heads,
                shift: m.shift,
                neg_exp: m.neg_exp,
                reorder: m.reorder,
            },
        });
    }
    // modules_to_save of a tied lm_head: the base has no lm_head tensor at all.
    if let Some(a) = adapter {
        if cfg.tied_embeddings && base.get("lm_head.weight").is_none() {
            if let Some(view) = a.replacement("lm_head.weight") {
                planned.push(Planned {
                    info: TensorInfo {
                        name: "output.weight".into(),
                        ne: view.shape.iter().rev().map(|&d| d as u64).collect(),
                        ty: GgmlType::F32,
                    },
                    source: Source::Weight {
                        hf: "lm_head.weight".into(),
                        from_adapter: true,
                        permute_heads: None,
                        shift: 0.0,
                        neg_exp: false,
                        reorder: None,
                    },
                });
            }
        }
        if let Some(missing) = a.modules().iter().find(|m| !adapted.contains(*m)) {
            return Err(Error::Adapter(format!(
                "adapter module {missing} has no weight {missing}.weight in the base model; \
                 is this adapter for a different model?"
            )));
        }
    }
    for (name, values) in cfg.rope_tensors()? {
        planned.push(Planned {
            info: TensorInfo {
                name,
                ne: vec![values.len() as u64],
                ty: GgmlType::F32,
            },
            source: Source::Data(values),
        });
    }
    planned.sort_by(|a, b| llama_cpp_order(&a.info.name, &b.info.name));
    Ok(planned)
}

fn dtype_matches(dtype: DType, ty: GgmlType) -> bool {
    matches!(
        (dtype, ty),
        (DType::F32, GgmlType::F32) | (DType::F16, GgmlType::F16) | (DType::BF16, GgmlType::BF16)
    )
}

/// Produces one tensor's bytes chunk by chunk and hands them to `send`.
fn stream_tensor(
    p: &Planned,
    base: &Safetensors,
    adapter: Option<&Adapter>,
    kernels: Option<&Kernels>,
    send: &mut dyn FnMut(Vec<u8>) -> Result<()>,
) -> Result<()> {
    let ty = p.info.ty;
    let (hf, from_adapter, permute_heads, shift, neg_exp, reorder) = match &p.source {
        Source::Data(values) => {
            let mut out = vec![0u8; values.len() * 4];
            encode(GgmlType::F32, values, values.len(), None, &mut out)?;
            return send(out);
        }
        Source::Weight {
            hf,
            from_adapter,
            permute_heads,
            shift,
            neg_exp,
            reorder,
        } => (
            hf,
            *from_adapter,
            *permute_heads,
            *shift,
            *neg_exp,
            *reorder,
        ),
    };
    let row_order = reorder.filter(|r| r.axis == Axis::Rows);
    let column_order = reorder.filter(|r| r.axis == Axis::Columns);
    let view = if from_adapter {
        adapter.and_then(|a| a.replacement(hf))
    } else {
        base.get(hf)
    }
    .expect("planned from this set");
    // A 1-D tensor (norm, bias) is one GGUF row; its permutation is over elements.
    let one_d = view.shape.len() == 1;
    let (rows, width) = if one_d {
        (1, view.row_len())
    } else {
        (view.rows(), view.row_len())
    };
    let factors: Option<Factors> = match adapter {
        Some(a) if !from_adapter && !one_d => a.factors(hf, rows, width)?,
        _ => None,
    };
    let row_bytes = ty.row_bytes(width).expect("type chosen to fit the rows");

    if one_d {
        let mut values = view.to_f32();
        let src = values.clone();
        if let Some(h) = permute_heads {
            for (o, v) in values.iter_mut().enumerate() {
                *v = src[permuted_row(o, src.len(), h)];
            }
        }
        if let Some(r) = row_order {
            for (o, v) in values.iter_mut().enumerate() {
                *v = src[r.source(o)];
            }
        }
        if shift != 0.0 {
            values.iter_mut().for_each(|v| *v += shift);
        }
        if neg_exp {
            values.iter_mut().for_each(|v| *v = -v.exp());
        }
        let mut out = vec![0u8; row_bytes];
        encode(ty, &values, width, kernels, &mut out)?;
        return send(out);
    }

    let chunk_rows = (CHUNK_ELEMS / width).max(1);
    let reordered = permute_heads.is_some() || row_order.is_some();
    let passthrough =
        factors.is_none() && !reordered && column_order.is_none() && dtype_matches(view.dtype, ty);
    let src_row = |o: usize| match (permute_heads, row_order) {
        (Some(h), _) => permuted_row(o, rows, h),
        (_, Some(r)) => r.source(o),
        _ => o,
    };
    let mut start = 0;
    while start < rows {
        let end = (start + chunk_rows).min(rows);
        let out = if passthrough {
            let w = width * view.dtype.size();
            view.data[start * w..end * w].to_vec()
        } else {
            let mut out = vec![0u8; (end - start) * row_bytes];
            // Each job reads, merges and encodes whole rows into its own slice of `out`,
            // so all cores stay busy on one pass and no chunk-sized f32 copy exists.
            let rows_per_job = (JOB_ELEMS / width).max(1);
            out.par_chunks_mut(rows_per_job * row_bytes)
                .enumerate()
                .try_for_each_init(
                    || (Vec::new(), Vec::new()),
                    |(f, merged), (j, dst)| {
                        let first = start + j * rows_per_job;
                        f.resize(dst.len() / row_bytes * width, 0f32);
                        for (i, row) in f.chunks_exact_mut(width).enumerate() {
                            let r = src_row(first + i);
                            view.row_f32(r, row);
                            if let Some(fx) = &factors {
                                fx.merge_row(r, row);
                            }
                            if let Some(c) = column_order {
                                merged.clear();
                                merged.extend_from_slice(row);
                                for (o, v) in row.iter_mut().enumerate() {
                                    *v = merged[c.source(o)];
                                }
                            }
                        }
                        encode(ty, f, width, kernels, dst)
                    },
                )?;
            out
        };
        send(out)?;
        if !reordered {
            let w = width * view.dtype.size();
            view.release(start * w, end * w);
        }
        start = end;
    }
    if reordered {
        view.release(0, view.data.len());
    }
    Ok(())
}

/// Converts a model (and adapter) to GGUF; see the module docs.
pub fn convert(
    opts: &ConvertOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<ConvertReport> {
    let started = Instant::now();
    if opts.output.exists() && !opts.force {
        return Err(Error::OutputExists(opts.output.clone()));
    }
    let cfg_json = read_json(&opts.model_dir.join("config.json"))?;
    let cfg = ModelConfig::from_json(cfg_json)?;
    let base = Safetensors::open_dir(&opts.model_dir)?;
    let adapter = opts.adapter_dir.as_deref().map(Adapter::open).transpose()?;
    let mut planned = plan(&cfg, &base, adapter.as_ref())?;

    let shapes: Vec<(String, Vec<u64>)> = planned
        .iter()
        .map(|p| (p.info.name.clone(), p.info.ne.clone()))
        .collect();
    let mix = MixContext {
        layers: cfg.layers,
        gqa: cfg.heads / cfg.kv_heads.max(1),
        seventy_b: cfg.arch == "llama" && cfg.layers == 80,
    };
    for (p, ty) in planned
        .iter_mut()
        .zip(choose_types(opts.out_type, &shapes, mix))
    {
        p.info.ty = ty;
    }
    let kernels = if planned.iter().any(|p| needs_kernels(p.info.ty)) {
        let lib = opts.llama_cpp_lib.as_deref().ok_or_else(|| {
            Error::LlamaCppUnavailable(format!(
                "{:?} needs llama.cpp's quantization kernels; no llama.cpp library was given",
                opts.out_type
            ))
        })?;
        Some(Kernels::load(lib)?)
    } else {
        None
    };

    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| folder_name(&opts.model_dir));
    let mut kvs = cfg.metadata(&name, opts.out_type.file_type())?;
    let tok_dir = opts.tokenizer_dir.as_deref().unwrap_or(&opts.model_dir);
    // llama.cpp needs exactly one token per embedding row (configs can lag behind a resize).
    let n_vocab = planned
        .iter()
        .find(|p| p.info.name == "token_embd.weight")
        .and_then(|p| p.info.ne.get(1))
        .map_or(cfg.vocab_size, |&rows| rows as usize);
    kvs.extend(tokenizer_metadata(tok_dir, cfg.arch, n_vocab, cfg.raw())?);
    let infos: Vec<TensorInfo> = planned.iter().map(|p| p.info.clone()).collect();
    let head = header(&kvs, &infos);
    let total = file_size(head.len(), &infos);

    let mut file = AtomicFile::create(&opts.output, opts.force)?;
    let temp_path = file.temp_path().to_path_buf();
    let (tx, rx) = sync_channel::<Vec<u8>>(3);
    let writer = std::thread::spawn(move || -> Result<AtomicFile> {
        use std::io::Write;
        for buf in rx {
            file.write_all(&buf)
                .map_err(|e| Error::io(file.temp_path(), e))?;
        }
        Ok(file)
    });
    let result = (|| -> Result<()> {
        let send = |buf: Vec<u8>| -> Result<()> {
            tx.send(buf)
                .map_err(|_| Error::Export(format!("{}: the writer stopped", temp_path.display())))
        };
        send(head)?;
        for (i, p) in planned.iter().enumerate() {
            let mut written = 0u64;
            let mut counted = |buf: Vec<u8>| {
                written += buf.len() as u64;
                send(buf)
            };
            stream_tensor(p, &base, adapter.as_ref(), kernels.as_ref(), &mut counted)?;
            let expected = p.info.nbytes().expect("type fits");
            if written != expected {
                return Err(Error::Export(format!(
                    "tensor {}: produced {written} bytes, expected {expected}",
                    p.info.name
                )));
            }
            let mut pad = Vec::new();
            write_padding(&mut pad, expected).map_err(|e| Error::io(&temp_path, e))?;
            if !pad.is_empty() {
                send(pad)?;
            }
            progress(i + 1, planned.len());
        }
        Ok(())
    })();
    drop(tx);
    let file = writer
        .join()
        .map_err(|_| Error::Export("the writer thread panicked".into()))?;
    // A failure on either side drops the temporary file; the final name never appears.
    let file = match (result, file) {
        (Ok(()), Ok(f)) => f,
        (Err(e), _) | (Ok(()), Err(e)) => return Err(e),
    };
    let path = file.commit()?;
    let mut types = BTreeMap::new();
    for p in &planned {
        *types.entry(p.info.ty.name().to_string()).or_insert(0) += 1;
    }
    Ok(ConvertReport {
        path,
        bytes: total,
        tensors: planned.len(),
        types,
        source_bytes: base.total_bytes(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn folder_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into())
}

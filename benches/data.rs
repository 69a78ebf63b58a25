//! Data engine throughput on 100k generated conversations with long-tailed lengths:
//! JSONL parse+detect (MB/s), template+tokenize+mask (tokens/s), packing (samples/s), and
//! the whole preparation. Tokenizer benches use the real Llama 3.2 tokenizer from shared/
//! and are skipped (with a note) when it is absent.
//!
//! Run: `cargo bench --bench data` (BENCH_ROWS changes the corpus size).

mod common;

use std::hint::black_box;
use std::time::Duration;

use _core::data::config::Settings;
use _core::data::detect::{detect, Detected, Spec};
use _core::data::mask::{labels_from_spans, render_with_spans};
use _core::data::model::ModelAssets;
use _core::data::pack::pack_bfd;
use _core::data::prepare::build;
use _core::data::read::{parse_object, split_records};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rayon::prelude::*;

fn rows() -> usize {
    std::env::var("BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn parse_detect(data: &[u8]) -> Vec<Detected> {
    let records = split_records(data).expect("corpus parses");
    records
        .par_iter()
        .map(|r| detect(&parse_object(r).expect("object")).expect("known shape"))
        .collect()
}

fn template_tokenize_mask(model: &ModelAssets, rows: &[Detected]) -> usize {
    rows.par_iter()
        .map(|d| {
            let Spec::Chat {
                messages,
                label_from,
            } = &d.specs[0]
            else {
                unreachable!("chat corpus")
            };
            let template = model
                .template
                .as_ref()
                .expect("Llama 3.2 has a chat template");
            let r = render_with_spans(template, messages, *label_from, false).expect("renders");
            let enc = model.tokenizer.encode(&r.text).expect("encodes");
            black_box(labels_from_spans(&enc.ids, &enc.offsets, &r.spans)).len()
        })
        .sum()
}

fn benches(c: &mut Criterion) {
    let n = rows();
    let data = common::corpus(n, 0);
    eprintln!(
        "corpus: {n} conversations, {:.1} MB",
        data.len() as f64 / 1e6
    );

    let mut g = c.benchmark_group("jsonl");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("parse_detect", |b| {
        b.iter(|| parse_detect(black_box(&data)).len())
    });
    g.finish();

    let detected = parse_detect(&data);
    let model = common::llama3_tokenizer()
        .map(|dir| ModelAssets::load(&dir, None).expect("Llama 3.2 tokenizer loads"));
    let lengths: Vec<usize> = match &model {
        Some(model) => {
            let tokens = template_tokenize_mask(model, &detected);
            let mut g = c.benchmark_group("llama3");
            g.sample_size(10).measurement_time(Duration::from_secs(60));
            g.throughput(Throughput::Elements(tokens as u64));
            g.bench_function("template_tokenize_mask", |b| {
                b.iter(|| template_tokenize_mask(model, &detected))
            });
            let settings = Settings::default();
            g.bench_function("prepare_end_to_end", |b| {
                b.iter(|| {
                    build("bench", black_box(&data), model, &settings)
                        .expect("prepares")
                        .input_ids
                        .len()
                })
            });
            g.finish();
            let p = build("bench", &data, model, &settings).expect("prepares");
            p.sample_offsets
                .windows(2)
                .map(|w| (w[1] - w[0]) as usize)
                .collect()
        }
        None => {
            eprintln!("note: shared/tokenizers/llama-3.2-3b-instruct not found; tokenizer benches skipped");
            // Packing still runs, on lengths estimated at four characters per token.
            detected
                .iter()
                .map(|d| match &d.specs[0] {
                    Spec::Chat { messages, .. } => messages
                        .iter()
                        .map(|m| m.content.len() / 4 + 5)
                        .sum::<usize>()
                        .min(2048),
                    Spec::Raw { text } => (text.len() / 4).min(2048),
                })
                .collect()
        }
    };

    let mut g = c.benchmark_group("pack");
    g.sample_size(20);
    g.throughput(Throughput::Elements(lengths.len() as u64));
    g.bench_function("bfd_2048", |b| {
        b.iter(|| pack_bfd(black_box(&lengths), 2048).rows())
    });
    g.finish();
}

criterion_group!(data_benches, benches);
criterion_main!(data_benches);

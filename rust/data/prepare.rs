//! The preparation pipeline: records -> detect -> template -> tokenize -> mask ->
//! filter -> truncate -> pack, in parallel over rows, streamed in chunks so memory stays
//! near the size of the output arrays.

use rayon::prelude::*;

use super::bad::{BadRow, Cause};
use super::config::{Overlong, Settings, TrainOn};
use super::detect::{detect, Detected, Format, Kind, Spec};
use super::filter::trace_spans;
use super::mask::{labels_from_spans, render_with_spans};
use super::model::ModelAssets;
use super::pack::{one_per_row, pack_bfd};
use super::read::{parse_object, split_records, Record};
use super::stats::{Stats, TraceStats};
use super::IGNORE_INDEX;
use crate::{Error, Result};

/// Rows handled per parallel step.
pub(crate) const CHUNK: usize = 4096;

/// A prepared dataset: flat arrays in the layout of `PreparedDataset` (Python).
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// Training kind.
    pub kind: Kind,
    /// All samples' tokens back to back.
    pub input_ids: Vec<i32>,
    /// Target ids or IGNORE_INDEX, aligned with `input_ids`.
    pub labels: Vec<i32>,
    /// Sample s is tokens `sample_offsets[s]..sample_offsets[s + 1]`.
    pub sample_offsets: Vec<i64>,
    /// Packed row r holds `pack_samples[pack_offsets[r]..pack_offsets[r + 1]]`.
    pub pack_offsets: Vec<i64>,
    /// Sample indices in row order.
    pub pack_samples: Vec<i32>,
    /// Preference pair of each sample, -1 otherwise.
    pub pair_id: Vec<i32>,
    /// True for the chosen side of a pair.
    pub chosen: Vec<bool>,
    /// KTO label (1 desirable, 0 undesirable), -1 otherwise.
    pub kto_label: Vec<i8>,
    /// Row capacity used for packing.
    pub max_seq_length: usize,
    /// What was read, used and dropped.
    pub stats: Stats,
}

/// One sample's tokens and labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Target ids or IGNORE_INDEX.
    pub labels: Vec<i32>,
}

impl Sample {
    fn has_labels(&self) -> bool {
        self.labels.iter().any(|&l| l != IGNORE_INDEX)
    }

    fn truncate(&mut self, n: usize) {
        self.ids.truncate(n);
        self.labels.truncate(n);
    }
}

enum Outcome {
    Used {
        format: Format,
        samples: Vec<Sample>,
        kto_label: Option<bool>,
        truncated: usize,
        traces: Vec<(usize, usize)>,
        system_left_out: bool,
    },
    Dropped {
        format: Format,
        reason: &'static str,
    },
    Bad(BadRow),
}

/// Prepares `data` (the bytes of file `name`), refusing bad rows unless `skip_invalid`.
pub fn prepare(
    name: &str,
    data: &[u8],
    model: &ModelAssets,
    settings: &Settings,
) -> Result<Prepared> {
    let prepared = build(name, data, model, settings)?;
    refuse_if_unusable(name, &prepared, settings)?;
    Ok(prepared)
}

/// Prepares `data` and reports every problem in the stats without refusing.
pub fn build(
    name: &str,
    data: &[u8],
    model: &ModelAssets,
    settings: &Settings,
) -> Result<Prepared> {
    settings.check()?;
    let records = records_of(name, data)?;
    let mut acc = Accumulator::new(name, settings, model);
    for chunk in records.chunks(CHUNK) {
        let detected: Vec<Detection> = chunk.par_iter().map(detect_record).collect();
        acc.kinds.check(chunk, &detected)?;
        if model.template.is_none() {
            refuse_chat_rows(name, chunk, &detected)?;
        }
        let outcomes: Vec<Outcome> = detected
            .into_par_iter()
            .map(|d| match d {
                Ok(det) => process(det, model, settings, acc.kinds.kind()),
                Err(bad) => Outcome::Bad(bad),
            })
            .collect();
        for (rec, outcome) in chunk.iter().zip(outcomes) {
            acc.add(rec, outcome)?;
        }
    }
    Ok(acc.finish())
}

/// Refuses the first chat-shaped row (anything but raw `text`) of a model without a chat
/// template: rendering it in a made-up format would train on markers the model lacks.
fn refuse_chat_rows(name: &str, chunk: &[Record<'_>], detected: &[Detection]) -> Result<()> {
    let first = chunk.iter().zip(detected).find_map(|(rec, d)| match d {
        Ok(det) if det.format != Format::Text => Some((rec.line, det.format)),
        _ => None,
    });
    match first {
        None => Ok(()),
        Some((line, format)) => Err(Error::ChatTemplateMissing(format!(
            "{name}:{line}: this {} row needs a chat template, and the model has none; \
             choose one with --chat-template chatml|llama3|FILE (DataConfig.chat_template), \
             or give raw `text` rows",
            format.name()
        ))),
    }
}

/// The records of file `name` (a broken JSON array is an error for the whole file).
pub(crate) fn records_of<'a>(name: &str, data: &'a [u8]) -> Result<Vec<Record<'a>>> {
    split_records(data).map_err(|(line, msg)| Error::DatasetParse(format!("{name}:{line}: {msg}")))
}

/// Errors for bad rows (unless skipped) and for a dataset with nothing left.
pub fn refuse_if_unusable(name: &str, prepared: &Prepared, settings: &Settings) -> Result<()> {
    match refusal(name, &prepared.stats, settings.skip_invalid) {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// Why training would refuse a file with these stats: bad rows (unless `skip_invalid`),
/// or no usable row. `validate` reports it with the same code.
pub fn refusal(name: &str, stats: &Stats, skip_invalid: bool) -> Option<Error> {
    if let (Some((cause, _)), false) = (stats.first_bad, skip_invalid) {
        let mut msg = format!(
            "{name}: {} bad row{} of {} read; fix {} or pass skip_invalid=True (--skip-invalid) to skip and count them:",
            stats.errors_total,
            if stats.errors_total == 1 { "" } else { "s" },
            stats.rows_read,
            if stats.errors_total == 1 { "it" } else { "them" },
        );
        for e in &stats.errors {
            msg.push_str("\n  ");
            msg.push_str(e);
        }
        if stats.errors_total > stats.errors.len() {
            msg.push_str(&format!(
                "\n  ... and {} more",
                stats.errors_total - stats.errors.len()
            ));
        }
        return Some(cause.error(msg));
    }
    if stats.rows_used > 0 {
        return None;
    }
    let why = if stats.rows_read == 0 {
        "the file has no rows (it is empty or holds only blank lines)".to_string()
    } else {
        let dropped: Vec<String> = stats
            .dropped
            .iter()
            .map(|(reason, n)| {
                let lines = stats.dropped_lines.get(reason).map_or(&[][..], |l| l);
                format!("{reason}: {n} ({})", line_list(name, lines, *n))
            })
            .collect();
        format!(
            "none of its {} rows is usable (dropped: {})",
            stats.rows_read,
            dropped.join("; ")
        )
    };
    Some(Error::DatasetEmpty(format!("{name}: {why}")))
}

/// `file:3, file:8, ...` for the first lines of `total` rows.
fn line_list(name: &str, lines: &[usize], total: usize) -> String {
    let mut out: Vec<String> = lines.iter().map(|l| format!("{name}:{l}")).collect();
    if total > lines.len() {
        out.push("...".into());
    }
    out.join(", ")
}

/// A record's shape, or why it has none.
pub(crate) type Detection = std::result::Result<Detected, BadRow>;

pub(crate) fn detect_record(rec: &Record<'_>) -> Detection {
    detect(&parse_object(rec)?)
}

enum RowFail {
    Drop(&'static str),
    Template(String),
}

fn process(det: Detected, model: &ModelAssets, settings: &Settings, kind: Kind) -> Outcome {
    let format = det.format;
    match build_samples(&det, model, settings, kind) {
        Ok(built) => Outcome::Used {
            format,
            samples: built.samples,
            kto_label: det.kto_label,
            truncated: built.truncated,
            traces: built.traces,
            system_left_out: built.system_left_out,
        },
        Err(RowFail::Drop(reason)) => Outcome::Dropped { format, reason },
        Err(RowFail::Template(msg)) => Outcome::Bad(BadRow::new(Cause::Template, msg)),
    }
}

/// A row's samples, with what the statistics count about it.
struct Built {
    samples: Vec<Sample>,
    truncated: usize,
    /// (`<think>` spans, trace tokens) of each sample, when the trace filter is on.
    traces: Vec<(usize, usize)>,
    /// Whether the chat template left out a system message of the row.
    system_left_out: bool,
}

fn build_samples(
    det: &Detected,
    model: &ModelAssets,
    settings: &Settings,
    kind: Kind,
) -> std::result::Result<Built, RowFail> {
    let traces = if settings.reasoning_trace {
        det.specs
            .iter()
            .map(|spec| check_trace(spec, model, settings))
            .collect::<std::result::Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    let all = settings.train_on == TrainOn::All && kind == Kind::Sft;
    let mut system_left_out = false;
    let mut samples = det
        .specs
        .iter()
        .map(|spec| sample_of(spec, model, all, &mut system_left_out))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if samples.iter().any(|s| !s.has_labels()) {
        return Err(RowFail::Drop("no_labels"));
    }
    let truncated = fit(&mut samples, settings)?;
    Ok(Built {
        samples,
        truncated,
        traces,
        system_left_out,
    })
}

/// Tokenized sample of `spec`; sets `system_left_out` when the rendered chat lacks the text
/// of one of its system messages (Mistral's templates keep it only when a user turn ends the
/// conversation), which the user should hear of rather than train without it unknowingly.
fn sample_of(
    spec: &Spec,
    model: &ModelAssets,
    all: bool,
    system_left_out: &mut bool,
) -> std::result::Result<Sample, RowFail> {
    match spec {
        Spec::Chat {
            messages,
            label_from,
        } => {
            let template = model
                .template
                .as_ref()
                .ok_or_else(|| RowFail::Template("the model has no chat template".to_string()))?;
            let rendered = render_with_spans(template, messages, *label_from, all)
                .map_err(RowFail::Template)?;
            *system_left_out |= messages.iter().any(|m| {
                let text = m.content.trim();
                m.role == "system" && !text.is_empty() && !rendered.text.contains(text)
            });
            let enc = model
                .tokenizer
                .encode(&rendered.text)
                .map_err(RowFail::Template)?;
            let labels = labels_from_spans(&enc.ids, &enc.offsets, &rendered.spans);
            Ok(Sample {
                ids: enc.ids,
                labels,
            })
        }
        Spec::Raw { text } => {
            let ids = model
                .tokenizer
                .encode_document(text)
                .map_err(RowFail::Template)?;
            let labels = ids.iter().map(|&i| i as i32).collect();
            Ok(Sample { ids, labels })
        }
    }
}

/// Truncates or drops samples over the row budget; a pair shares one row.
fn fit(samples: &mut [Sample], settings: &Settings) -> std::result::Result<usize, RowFail> {
    let cap = settings.max_seq_length;
    let total: usize = samples.iter().map(|s| s.ids.len()).sum();
    if total <= cap {
        return Ok(0);
    }
    if settings.overlong == Overlong::Drop {
        return Err(RowFail::Drop("overlong"));
    }
    let limits: Vec<usize> = match samples {
        [one] => vec![one.ids.len().min(cap)],
        [a, b] => {
            let (la, lb) = (a.ids.len(), b.ids.len());
            let a_cut = la.min(cap - lb.min(cap / 2));
            vec![a_cut, lb.min(cap - a_cut)]
        }
        _ => unreachable!("a row gives one sample or a pair"),
    };
    let mut truncated = 0;
    for (s, &limit) in samples.iter_mut().zip(&limits) {
        if s.ids.len() > limit {
            s.truncate(limit);
            truncated += 1;
        }
    }
    if samples.iter().any(|s| !s.has_labels()) {
        return Err(RowFail::Drop("overlong"));
    }
    Ok(truncated)
}

/// The completion's text (assistant messages from the completion on, or raw text).
pub(crate) fn completion_texts(spec: &Spec) -> Vec<&str> {
    match spec {
        Spec::Chat {
            messages,
            label_from,
        } => messages[*label_from..]
            .iter()
            .filter(|m| m.is_assistant())
            .map(|m| m.content.as_str())
            .collect(),
        Spec::Raw { text } => vec![text.as_str()],
    }
}

/// Trace spans and tokens of one sample, or why it is dropped.
fn check_trace(
    spec: &Spec,
    model: &ModelAssets,
    settings: &Settings,
) -> std::result::Result<(usize, usize), RowFail> {
    let mut spans = 0;
    let mut tokens = 0;
    let mut problem = None;
    for text in completion_texts(spec) {
        match trace_spans(text) {
            Ok(found) => {
                for r in &found {
                    tokens += model
                        .tokenizer
                        .count(&text[r.clone()])
                        .map_err(RowFail::Template)?;
                }
                spans += found.len();
            }
            Err(p) => problem = problem.or(Some(p)),
        }
    }
    // A conversation passes when its assistant turns hold at least one good trace between them.
    if spans == 0 || problem == Some(super::filter::TraceProblem::Unbalanced) {
        return Err(RowFail::Drop(
            problem
                .unwrap_or(super::filter::TraceProblem::Empty)
                .reason(),
        ));
    }
    if tokens < settings.trace_min_tokens {
        return Err(RowFail::Drop("trace_too_short"));
    }
    if tokens > settings.trace_max_tokens {
        return Err(RowFail::Drop("trace_too_long"));
    }
    Ok((spans, tokens))
}

/// One file holds one kind; mixing SFT, preference and KTO rows is refused.
pub(crate) struct KindGuard<'a> {
    name: &'a str,
    first: Option<(Kind, usize)>,
}

impl<'a> KindGuard<'a> {
    pub(crate) fn new(name: &'a str) -> Self {
        KindGuard { name, first: None }
    }

    /// The kind of the file (SFT until a row says otherwise).
    pub(crate) fn kind(&self) -> Kind {
        self.first.map(|k| k.0).unwrap_or(Kind::Sft)
    }

    /// Errors at the first detected row whose kind differs from the file's.
    pub(crate) fn check(&mut self, chunk: &[Record<'_>], detected: &[Detection]) -> Result<()> {
        for (rec, d) in chunk.iter().zip(detected) {
            let Ok(det) = d else { continue };
            let kind = det.format.kind();
            match self.first {
                None => self.first = Some((kind, rec.line)),
                Some((k, line)) if k != kind => {
                    return Err(Error::DatasetValidation(format!(
                        "{name}:{at}: this {new} row does not fit a file of {old} rows (first at line {line}); \
                         one file holds one kind: SFT (messages, conversations, instruction/output, text), \
                         preference (prompt/chosen/rejected) or KTO (prompt/completion/label)",
                        name = self.name,
                        at = rec.line,
                        new = kind_label(kind),
                        old = kind_label(k),
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Collects outcomes in file order into the flat arrays and the stats.
struct Accumulator<'a> {
    name: &'a str,
    settings: &'a Settings,
    kinds: KindGuard<'a>,
    out: Prepared,
    groups: Vec<(usize, usize)>,
    pairs: usize,
    trace: TraceStats,
}

impl<'a> Accumulator<'a> {
    fn new(name: &'a str, settings: &'a Settings, model: &ModelAssets) -> Self {
        let stats = Stats {
            chat_template: model.template_origin.clone(),
            template_markers: model.template_markers.clone(),
            ..Stats::default()
        };
        Accumulator {
            name,
            settings,
            kinds: KindGuard::new(name),
            out: Prepared {
                kind: Kind::Sft,
                input_ids: Vec::new(),
                labels: Vec::new(),
                sample_offsets: vec![0],
                pack_offsets: Vec::new(),
                pack_samples: Vec::new(),
                pair_id: Vec::new(),
                chosen: Vec::new(),
                kto_label: Vec::new(),
                max_seq_length: settings.max_seq_length,
                stats,
            },
            groups: Vec::new(),
            pairs: 0,
            trace: TraceStats::default(),
        }
    }

    fn add(&mut self, rec: &Record<'_>, outcome: Outcome) -> Result<()> {
        let stats = &mut self.out.stats;
        let keep = self.settings.max_errors;
        stats.rows_read += 1;
        match outcome {
            Outcome::Bad(bad) => stats.bad_row(self.name, rec.line, bad, keep)?,
            Outcome::Dropped { format, reason } => {
                *stats.formats.entry(format.name().into()).or_default() += 1;
                stats.drop_row(reason, rec.line, keep);
            }
            Outcome::Used {
                format,
                samples,
                kto_label,
                truncated,
                traces,
                system_left_out,
            } => {
                *stats.formats.entry(format.name().into()).or_default() += 1;
                stats.rows_used += 1;
                stats.truncated += truncated;
                stats.system_left_out += usize::from(system_left_out);
                for (spans, tokens) in traces {
                    self.trace.add(spans, tokens);
                }
                let pair = samples.len() == 2;
                let first = self.out.sample_offsets.len() - 1;
                self.groups.push((first, samples.len()));
                let pair_index = self.pairs as i32;
                self.pairs += usize::from(pair);
                for (k, s) in samples.into_iter().enumerate() {
                    self.out.input_ids.extend(s.ids.iter().map(|&i| i as i32));
                    self.out.labels.extend_from_slice(&s.labels);
                    self.out
                        .sample_offsets
                        .push(self.out.input_ids.len() as i64);
                    self.out.pair_id.push(if pair { pair_index } else { -1 });
                    self.out.chosen.push(pair && k == 0);
                    self.out.kto_label.push(match kto_label {
                        Some(true) => 1,
                        Some(false) => 0,
                        None => -1,
                    });
                }
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Prepared {
        let out = &mut self.out;
        out.kind = self.kinds.kind();
        out.stats.kind = out.kind.name().to_string();
        let offsets = &out.sample_offsets;
        let group_len =
            |&(first, n): &(usize, usize)| (offsets[first + n] - offsets[first]) as usize;
        let lengths: Vec<usize> = self.groups.iter().map(group_len).collect();
        let packing = if self.settings.pack {
            pack_bfd(&lengths, self.settings.max_seq_length)
        } else {
            one_per_row(lengths.len())
        };
        out.pack_offsets = vec![0];
        for r in 0..packing.rows() {
            for &g in &packing.items[packing.offsets[r]..packing.offsets[r + 1]] {
                let (first, n) = self.groups[g];
                out.pack_samples
                    .extend((first..first + n).map(|s| s as i32));
            }
            out.pack_offsets.push(out.pack_samples.len() as i64);
        }
        let stats = &mut out.stats;
        stats.samples = out.sample_offsets.len() - 1;
        stats.tokens = out.input_ids.len();
        stats.label_tokens = out.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        stats.rows = packing.rows();
        stats.fill = if stats.rows == 0 {
            0.0
        } else {
            stats.tokens as f64 / (stats.rows * self.settings.max_seq_length) as f64
        };
        if self.settings.reasoning_trace {
            stats.trace = Some(self.trace);
        }
        self.out
    }
}

fn kind_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Sft => "SFT",
        Kind::Preference => "preference",
        Kind::Kto => "KTO",
    }
}

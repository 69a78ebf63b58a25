//! On-disk cache of prepared datasets: one folder per key holding `.npy` arrays (which
//! numpy memory-maps without copying) and `meta.json` (kind, stats, checksums).
//!
//! The key hashes the data bytes, the tokenizer files (template included), the settings
//! and the engine's format version, so any change rebuilds. Entries are written into a
//! temporary folder, fsynced and renamed into place, so a crash never leaves a partial
//! entry under a key; an entry that fails its checks is reported as STATE_CACHE_CORRUPT.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use super::config::Settings;
use super::prepare::Prepared;
use super::stats::Stats;
use crate::{Error, Result};

/// Bumped whenever the engine's output for the same inputs may change.
pub const FORMAT_VERSION: u32 = 3;

/// Metadata of one cache entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// `FORMAT_VERSION` of the writer.
    pub version: u32,
    /// Training kind.
    pub kind: String,
    /// Row capacity.
    pub max_seq_length: usize,
    /// The run's stats.
    pub stats: Stats,
    /// Every array file: name, dtype, length, checksum.
    pub arrays: Vec<ArrayMeta>,
}

/// One `.npy` file of an entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArrayMeta {
    /// Array name (file `<name>.npy`).
    pub name: String,
    /// numpy dtype string.
    pub dtype: String,
    /// Number of elements.
    pub len: usize,
    /// xxh3-64 of the whole file, hex.
    pub xxh3: String,
}

/// Cache key (hex) of preparing `data` with the model fingerprint and settings.
pub fn cache_key(data: &[u8], model_fingerprint: u128, settings: &Settings) -> String {
    let mut h = Xxh3::new();
    h.update(&FORMAT_VERSION.to_le_bytes());
    h.update(&model_fingerprint.to_le_bytes());
    let settings_json = serde_json::to_vec(settings).expect("settings serialize");
    h.update(&(settings_json.len() as u64).to_le_bytes());
    h.update(&settings_json);
    h.update(&(data.len() as u64).to_le_bytes());
    h.update(data);
    format!("{:032x}", h.digest128())
}

/// Element types of the cached arrays.
trait NpyElement: Copy {
    const DESCR: &'static str;
    const SIZE: usize;
    fn put(self, out: &mut Vec<u8>);
}

macro_rules! npy_int {
    ($t:ty, $descr:expr) => {
        impl NpyElement for $t {
            const DESCR: &'static str = $descr;
            const SIZE: usize = std::mem::size_of::<$t>();
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    };
}
npy_int!(i32, "<i4");
npy_int!(i64, "<i8");
npy_int!(i8, "|i1");

impl NpyElement for bool {
    const DESCR: &'static str = "|b1";
    const SIZE: usize = 1;
    fn put(self, out: &mut Vec<u8>) {
        out.push(u8::from(self));
    }
}

/// The `.npy` (v1.0) header of a 1-D array, padded to 64 bytes as numpy writes it.
fn npy_header(descr: &str, len: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({len},), }}");
    let unpadded = 10 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let header_len = dict.len() + pad + 1;
    let mut out = Vec::with_capacity(10 + header_len);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header_len as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.extend(std::iter::repeat_n(b' ', pad));
    out.push(b'\n');
    out
}

fn write_npy<T: NpyElement>(dir: &Path, name: &str, values: &[T]) -> Result<ArrayMeta> {
    let path = dir.join(format!("{name}.npy"));
    let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Xxh3::new();
    let header = npy_header(T::DESCR, values.len());
    hasher.update(&header);
    w.write_all(&header).map_err(|e| Error::io(&path, e))?;
    let mut buf = Vec::with_capacity(1 << 16);
    for chunk in values.chunks((1 << 16) / T::SIZE) {
        buf.clear();
        for &v in chunk {
            v.put(&mut buf);
        }
        hasher.update(&buf);
        w.write_all(&buf).map_err(|e| Error::io(&path, e))?;
    }
    let file = w
        .into_inner()
        .map_err(|e| Error::io(&path, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(&path, e))?;
    Ok(ArrayMeta {
        name: name.to_string(),
        dtype: T::DESCR.to_string(),
        len: values.len(),
        xxh3: format!("{:016x}", hasher.digest()),
    })
}

/// Writes `prepared` as the entry `root/key`, atomically; returns the entry's folder.
pub fn write(root: &Path, key: &str, prepared: &Prepared) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let final_dir = root.join(key);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = root.join(format!(".tmp-{key}-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = write_entry(&tmp, prepared).and_then(|()| {
        sync_dir(&tmp)?;
        match std::fs::rename(&tmp, &final_dir) {
            Ok(()) => sync_dir(root),
            // Another process finished the same entry first; theirs is as good.
            Err(_) if final_dir.join("meta.json").exists() => Ok(()),
            Err(e) => Err(Error::io(&final_dir, e)),
        }
    });
    if tmp.exists() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written.map(|()| final_dir)
}

fn write_entry(dir: &Path, p: &Prepared) -> Result<()> {
    let arrays = vec![
        write_npy(dir, "input_ids", &p.input_ids)?,
        write_npy(dir, "labels", &p.labels)?,
        write_npy(dir, "sample_offsets", &p.sample_offsets)?,
        write_npy(dir, "pack_offsets", &p.pack_offsets)?,
        write_npy(dir, "pack_samples", &p.pack_samples)?,
        write_npy(dir, "pair_id", &p.pair_id)?,
        write_npy(dir, "chosen", &p.chosen)?,
        write_npy(dir, "kto_label", &p.kto_label)?,
    ];
    let meta = Meta {
        version: FORMAT_VERSION,
        kind: p.kind.name().to_string(),
        max_seq_length: p.max_seq_length,
        stats: p.stats.clone(),
        arrays,
    };
    let path = dir.join("meta.json");
    let bytes = serde_json::to_vec_pretty(&meta).expect("meta serializes");
    let mut f = File::create(&path).map_err(|e| Error::io(&path, e))?;
    f.write_all(&bytes).map_err(|e| Error::io(&path, e))?;
    f.sync_all().map_err(|e| Error::io(&path, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Directory fsync makes the rename durable on POSIX; other systems lack it.
    #[cfg(unix)]
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    Ok(())
}

/// Checks the entry at `dir` (metadata, every file's header, size and checksum) and
/// returns its metadata; any mismatch is STATE_CACHE_CORRUPT.
pub fn verify(dir: &Path) -> Result<Meta> {
    let corrupt =
        |why: String| Error::CacheCorrupt(format!("dataset cache {}: {why}", dir.display()));
    let meta_path = dir.join("meta.json");
    let bytes =
        std::fs::read(&meta_path).map_err(|e| corrupt(format!("meta.json unreadable ({e})")))?;
    let meta: Meta =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("meta.json invalid ({e})")))?;
    if meta.version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {} (expected {FORMAT_VERSION})",
            meta.version
        )));
    }
    let expect = [
        ("input_ids", "<i4"),
        ("labels", "<i4"),
        ("sample_offsets", "<i8"),
        ("pack_offsets", "<i8"),
        ("pack_samples", "<i4"),
        ("pair_id", "<i4"),
        ("chosen", "|b1"),
        ("kto_label", "|i1"),
    ];
    let names: Vec<(&str, &str)> = meta
        .arrays
        .iter()
        .map(|a| (a.name.as_str(), a.dtype.as_str()))
        .collect();
    if names != expect {
        return Err(corrupt("unexpected array list".into()));
    }
    let len = |name: &str| {
        meta.arrays
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.len)
            .unwrap_or(0)
    };
    let samples = len("sample_offsets").saturating_sub(1);
    let consistent = len("labels") == len("input_ids")
        && len("pack_samples") == samples
        && [len("pair_id"), len("chosen"), len("kto_label")]
            .iter()
            .all(|&n| n == samples)
        && len("input_ids") == meta.stats.tokens
        && samples == meta.stats.samples;
    if !consistent {
        return Err(corrupt("array lengths disagree".into()));
    }
    for a in &meta.arrays {
        let path = dir.join(format!("{}.npy", a.name));
        let file =
            File::open(&path).map_err(|e| corrupt(format!("{}.npy unreadable ({e})", a.name)))?;
        let header = npy_header(&a.dtype, a.len);
        let size = header.len() + a.len * item_size(&a.dtype);
        let actual = file.metadata().map(|m| m.len() as usize).unwrap_or(0);
        if actual != size {
            return Err(corrupt(format!(
                "{}.npy has {actual} bytes, expected {size}",
                a.name
            )));
        }
        // SAFETY: the file is only read; a concurrent writer would at worst fail the checksum.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| corrupt(format!("{}.npy: {e}", a.name)))?;
        if !map.starts_with(&header) || format!("{:016x}", xxh3_64(&map)) != a.xxh3 {
            return Err(corrupt(format!("{}.npy fails its checksum", a.name)));
        }
    }
    Ok(meta)
}

fn item_size(dtype: &str) -> usize {
    match dtype {
        "<i8" => 8,
        "<i4" => 4,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_64_aligned_and_numpy_shaped() {
        for len in [0, 7, 123_456_789] {
            let h = npy_header("<i4", len);
            assert_eq!(h.len() % 64, 0);
            assert!(h.ends_with(b"\n"));
            assert!(std::str::from_utf8(&h[10..])
                .unwrap()
                .contains(&format!("({len},)")));
        }
    }

    #[test]
    fn key_changes_with_every_input() {
        let s = Settings::default();
        let base = cache_key(b"data", 1, &s);
        assert_ne!(base, cache_key(b"datb", 1, &s));
        assert_ne!(base, cache_key(b"data", 2, &s));
        let s2 = Settings {
            max_seq_length: 4096,
            ..Settings::default()
        };
        assert_ne!(base, cache_key(b"data", 1, &s2));
        assert_eq!(base, cache_key(b"data", 1, &Settings::default()));
    }
}

//! Memory-mapped safetensors shards, read row by row without loading whole tensors.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use serde_json::Value as Json;

use crate::{Error, Result};

/// Element types of safetensors that the exporter reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// One tensor's bytes inside a mapped shard.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
    map: &'a Mmap,
    offset: usize,
}

impl TensorView<'_> {
    /// Drops bytes `[start, end)` of this tensor from resident memory once they are
    /// consumed, so peak memory stays near one chunk however large the tensor.
    pub fn release(&self, start: usize, end: usize) {
        #[cfg(unix)]
        {
            const PAGE: usize = 4096;
            // Only whole pages inside the range: a page shared with unread data stays.
            let first = (self.offset + start).div_ceil(PAGE) * PAGE;
            let last = (self.offset + end) / PAGE * PAGE;
            if last > first {
                // SAFETY: the mapping is private and read-only; dropped pages are read
                // again from the file if touched later, so no data is lost.
                let _ = unsafe {
                    self.map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        first,
                        last - first,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = (start, end);
    }

    /// Elements per row: the last dimension (1 for scalars).
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Number of rows: the product of the other dimensions.
    pub fn rows(&self) -> usize {
        let n = self.shape.len();
        if n == 0 {
            1
        } else {
            self.shape[..n - 1].iter().product()
        }
    }

    /// Raw bytes of row `r`.
    pub fn row_bytes(&self, r: usize) -> &[u8] {
        let w = self.row_len() * self.dtype.size();
        &self.data[r * w..(r + 1) * w]
    }

    /// Converts row `r` to f32 into `out` (exact for every supported dtype).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let bytes = self.row_bytes(r);
        match self.dtype {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
    }

    /// The whole tensor as f32 (for small tensors: norms, biases, LoRA factors).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows() * self.row_len()];
        for (r, row) in out.chunks_exact_mut(self.row_len().max(1)).enumerate() {
            self.row_f32(r, row);
        }
        out
    }
}

/// A set of safetensors files opened together (one model or one adapter).
pub struct Safetensors {
    maps: Vec<Mmap>,
    entries: BTreeMap<String, Entry>,
}

fn parse_header(
    path: &Path,
    map: &Mmap,
    file: usize,
    into: &mut BTreeMap<String, Entry>,
) -> Result<()> {
    let bad = |why: String| {
        Error::Model(format!(
            "{}: not a safetensors file ({why})",
            path.display()
        ))
    };
    if map.len() < 8 {
        return Err(bad("shorter than its header".into()));
    }
    let n = u64::from_le_bytes(map[..8].try_into().expect("8 bytes")) as usize;
    let header = map
        .get(8..8 + n)
        .ok_or_else(|| bad("header runs past the end".into()))?;
    let json: Json = serde_json::from_slice(header).map_err(|e| bad(e.to_string()))?;
    let base = 8 + n;
    for (name, info) in json
        .as_object()
        .ok_or_else(|| bad("header is not an object".into()))?
    {
        if name == "__metadata__" {
            continue;
        }
        let dtype = match info.get("dtype").and_then(Json::as_str) {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            other => {
                return Err(Error::Model(format!(
                    "{}: tensor {name} has dtype {}; export reads F32, F16 and BF16 weights \
                     (merge from the unquantized base model)",
                    path.display(),
                    other.unwrap_or("?")
                )))
            }
        };
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(Json::as_array)
            .map(|s| {
                s.iter()
                    .filter_map(|d| d.as_u64().map(|d| d as usize))
                    .collect()
            })
            .unwrap_or_default();
        let offs = info.get("data_offsets").and_then(Json::as_array);
        let (start, end) = match offs.map(|o| (o[0].as_u64(), o[1].as_u64())) {
            Some((Some(s), Some(e))) => (base + s as usize, base + e as usize),
            _ => return Err(bad(format!("tensor {name} has no data_offsets"))),
        };
        let expected = shape.iter().product::<usize>() * dtype.size();
        if end > map.len() || end - start != expected {
            return Err(bad(format!("tensor {name} is truncated or mis-sized")));
        }
        into.insert(
            name.clone(),
            Entry {
                file,
                dtype,
                shape,
                start,
                end,
            },
        );
    }
    Ok(())
}

impl Safetensors {
    /// Maps the given files and indexes their tensors.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::with_capacity(paths.len());
        let mut entries = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the file is only read; a concurrent writer could change bytes under us,
            // which would corrupt the export's data but not memory safety of these slices.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            parse_header(path, &map, i, &mut entries)?;
            maps.push(map);
        }
        Ok(Self { maps, entries })
    }

    /// Maps every `*.safetensors` file of a model folder.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(Error::Model(format!(
                "{}: no *.safetensors weights in this folder",
                dir.display()
            )));
        }
        Self::open_files(&paths)
    }

    /// Tensor names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// A view of tensor `name`, if present.
    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        let e = self.entries.get(name)?;
        let map = &self.maps[e.file];
        Some(TensorView {
            dtype: e.dtype,
            shape: &e.shape,
            data: &map[e.start..e.end],
            map,
            offset: e.start,
        })
    }

    /// Total bytes of tensor data (for throughput reports).
    pub fn total_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| (e.end - e.start) as u64)
            .sum()
    }
}

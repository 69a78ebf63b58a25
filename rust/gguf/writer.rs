//! GGUF v3 layout: header, metadata, tensor infos, then aligned tensor data.
//!
//! The header is computed up front from the tensor shapes and types, so tensor data can
//! be streamed straight after it without seeking back.

use std::io::Write;

use super::types::{GgmlType, Value};

/// Alignment of tensor data (`general.alignment` default).
pub const ALIGNMENT: u64 = 32;

/// Shape and type of one tensor as written.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// GGUF tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order (innermost first): a `[out, in]` matrix is `[in, out]`.
    pub ne: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
}

impl TensorInfo {
    /// Elements per row (`ne[0]`).
    pub fn row_len(&self) -> usize {
        self.ne[0] as usize
    }

    /// Number of rows (product of the outer dimensions).
    pub fn rows(&self) -> usize {
        self.ne[1..].iter().product::<u64>() as usize
    }

    /// Bytes of the tensor's data, or `None` if rows are not whole blocks of its type.
    pub fn nbytes(&self) -> Option<u64> {
        self.ty
            .row_bytes(self.row_len())
            .map(|r| r as u64 * self.rows() as u64)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(&v.type_id().to_le_bytes());
    match v {
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::Str(s) => put_str(out, s),
        Value::ArrStr(items) => {
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for s in items {
                put_str(out, s);
            }
        }
        Value::ArrI32(items) => {
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for x in items {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        Value::ArrF32(items) => {
            out.extend_from_slice(&6u32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for x in items {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// Bytes of padding that bring `n` to the next multiple of `ALIGNMENT`.
pub fn padding(n: u64) -> u64 {
    (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT
}

/// Serializes everything before the tensor data, padded to the alignment.
///
/// Panics if a tensor's rows are not whole blocks; callers choose types that fit.
pub fn header(kvs: &[(String, Value)], tensors: &[TensorInfo]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 << 20);
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (key, value) in kvs {
        put_str(&mut out, key);
        put_value(&mut out, value);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
        for d in &t.ne {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&(t.ty as u32).to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        let n = t.nbytes().expect("tensor type chosen to fit its rows");
        offset += n + padding(n);
    }
    let pad = padding(out.len() as u64) as usize;
    out.resize(out.len() + pad, 0);
    out
}

/// Total file size for this header and these tensors.
pub fn file_size(header_len: usize, tensors: &[TensorInfo]) -> u64 {
    header_len as u64
        + tensors
            .iter()
            .map(|t| {
                let n = t.nbytes().unwrap_or(0);
                n + padding(n)
            })
            .sum::<u64>()
}

/// Writes zero bytes that align a tensor of `n` bytes.
pub fn write_padding(out: &mut impl Write, n: u64) -> std::io::Result<()> {
    let pad = padding(n) as usize;
    out.write_all(&[0u8; ALIGNMENT as usize][..pad])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_aligned_and_starts_with_magic() {
        let kvs = vec![
            (
                "general.architecture".to_string(),
                Value::Str("llama".into()),
            ),
            ("llama.block_count".to_string(), Value::U32(2)),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::ArrStr(vec!["a".into(), "b".into()]),
            ),
        ];
        let tensors = vec![
            TensorInfo {
                name: "a".into(),
                ne: vec![3],
                ty: GgmlType::F32,
            },
            TensorInfo {
                name: "b".into(),
                ne: vec![64, 2],
                ty: GgmlType::Q8_0,
            },
        ];
        let h = header(&kvs, &tensors);
        assert_eq!(&h[..4], b"GGUF");
        assert_eq!(h.len() % 32, 0);
        assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), 2);
        // 12 bytes of f32 padded to 32, then 2 rows of 68 bytes.
        assert_eq!(file_size(h.len(), &tensors), h.len() as u64 + 32 + 160);
    }
}

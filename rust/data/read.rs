//! Splits a dataset file into records (one JSON value each) with their line numbers.
//!
//! JSONL is the main format: one object per line; a UTF-8 BOM, CRLF line ends and blank
//! lines are accepted. A file whose first non-blank byte is `[` is a JSON array of
//! objects. Records keep borrowing the file's bytes; parsing happens later, in parallel.

use serde::de::{Deserialize, IgnoredAny};

use super::bad::{wide_encoding, BadRow, Cause};

/// A file's bytes: memory-mapped, or owned when the file is empty.
pub enum FileBytes {
    /// The file mapped read-only.
    Mapped(memmap2::Mmap),
    /// Bytes held in memory.
    Owned(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

/// Maps the dataset file at `path`; a missing, unreadable or directory path is an
/// `Error::Input` naming it (INPUT_FILE_NOT_FOUND or INPUT_FILE_UNREADABLE).
pub fn load_file(path: &std::path::Path) -> crate::Result<FileBytes> {
    let fail = |e| crate::Error::input(path, e);
    let file = std::fs::File::open(path).map_err(fail)?;
    let meta = file.metadata().map_err(fail)?;
    // Opening a directory read-only succeeds on Linux; reading it would fail later, less clearly.
    if meta.is_dir() {
        return Err(fail(std::io::ErrorKind::IsADirectory.into()));
    }
    if meta.len() == 0 {
        return Ok(FileBytes::Owned(Vec::new()));
    }
    // SAFETY: the map is read-only; a file changed under us gives wrong rows, never UB in safe code
    // that only reads bytes.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(fail)?;
    Ok(FileBytes::Mapped(map))
}

/// One row of the file, not parsed yet.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// 1-based line where the row starts.
    pub line: usize,
    /// The row's bytes (without line end).
    pub bytes: &'a [u8],
}

/// The records of a file, or the first syntax error of a JSON array (line, message).
pub type Records<'a> = std::result::Result<Vec<Record<'a>>, (usize, String)>;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Splits `data` into records; JSONL line by line, a JSON array element by element.
pub fn split_records(data: &[u8]) -> Records<'_> {
    let (data, _) = strip_bom(data);
    match data.iter().position(|b| !b.is_ascii_whitespace()) {
        Some(first) if data[first] == b'[' => split_array(data, first),
        _ => Ok(split_lines(data)),
    }
}

fn strip_bom(data: &[u8]) -> (&[u8], bool) {
    match data.strip_prefix(BOM) {
        Some(rest) => (rest, true),
        None => (data, false),
    }
}

/// JSONL lines that hold something other than whitespace.
pub fn split_lines(data: &[u8]) -> Vec<Record<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut line = 1;
    for end in memchr::memchr_iter(b'\n', data) {
        push_line(&mut out, line, &data[start..end]);
        start = end + 1;
        line += 1;
    }
    if start < data.len() {
        push_line(&mut out, line, &data[start..]);
    }
    out
}

fn push_line<'a>(out: &mut Vec<Record<'a>>, line: usize, bytes: &'a [u8]) {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    if bytes.iter().any(|b| !b.is_ascii_whitespace()) {
        out.push(Record { line, bytes });
    }
}

fn split_array(data: &[u8], open: usize) -> Records<'_> {
    let lines = LineIndex::new(data);
    let mut out = Vec::new();
    let mut pos = skip_ws(data, open + 1);
    if data.get(pos) == Some(&b']') {
        return check_trailing(data, pos + 1, &lines).map(|_| out);
    }
    loop {
        let mut stream =
            serde_json::Deserializer::from_slice(&data[pos..]).into_iter::<IgnoredAny>();
        match stream.next() {
            Some(Ok(_)) => {
                let end = pos + stream.byte_offset();
                out.push(Record {
                    line: lines.line_of(pos),
                    bytes: &data[pos..end],
                });
                pos = skip_ws(data, end);
            }
            Some(Err(e)) => {
                let line = lines.line_of(pos) + e.line().saturating_sub(1);
                return Err((line, json_error_text(&e)));
            }
            None => return Err((lines.line_of(pos), "the JSON array is not closed".into())),
        }
        match data.get(pos) {
            Some(b',') => pos = skip_ws(data, pos + 1),
            Some(b']') => return check_trailing(data, pos + 1, &lines).map(|_| out),
            _ => {
                return Err((
                    lines.line_of(pos),
                    "expected ',' or ']' after an element of the JSON array".into(),
                ))
            }
        }
    }
}

fn check_trailing(
    data: &[u8],
    pos: usize,
    lines: &LineIndex,
) -> std::result::Result<(), (usize, String)> {
    let rest = skip_ws(data, pos);
    if rest < data.len() {
        return Err((
            lines.line_of(rest),
            "unexpected data after the JSON array".into(),
        ));
    }
    Ok(())
}

fn skip_ws(data: &[u8], mut pos: usize) -> usize {
    while pos < data.len() && data[pos].is_ascii_whitespace() {
        pos += 1;
    }
    pos
}

/// Byte offset to line number, by binary search over newline positions.
struct LineIndex {
    newlines: Vec<usize>,
}

impl LineIndex {
    fn new(data: &[u8]) -> Self {
        LineIndex {
            newlines: memchr::memchr_iter(b'\n', data).collect(),
        }
    }

    fn line_of(&self, offset: usize) -> usize {
        self.newlines.partition_point(|&n| n < offset) + 1
    }
}

/// A JSON error's text without serde_json's own "at line L column C" (our line is the file's).
pub fn json_error_text(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let msg = match full.rfind(" at line ") {
        Some(i) => &full[..i],
        None => full.as_str(),
    };
    if e.line() > 1 {
        format!(
            "malformed JSON: {msg} (line {} of the row, column {})",
            e.line(),
            e.column()
        )
    } else {
        format!("malformed JSON: {msg} at column {}", e.column())
    }
}

/// Parses one record into a JSON object, or says why it is not one.
pub fn parse_object(
    rec: &Record<'_>,
) -> std::result::Result<serde_json::Map<String, serde_json::Value>, BadRow> {
    let text = std::str::from_utf8(rec.bytes).map_err(|e| not_utf8(rec.bytes, e.valid_up_to()))?;
    let mut de = serde_json::Deserializer::from_str(text);
    // `end` rejects trailing data on the line, like a strict JSONL reader.
    let value = serde_json::Value::deserialize(&mut de)
        .and_then(|v| de.end().map(|_| v))
        .map_err(|e| {
            wide_encoding(rec.bytes)
                .unwrap_or_else(|| BadRow::new(Cause::Malformed, json_error_text(&e)))
        })?;
    match value {
        serde_json::Value::Object(map) => Ok(map),
        other => Err(BadRow::new(
            Cause::NotAnObject,
            format!("the row is {}, not a JSON object", json_kind(&other)),
        )),
    }
}

/// Why a line is not UTF-8: UTF-16/32 text, or the first invalid byte.
fn not_utf8(bytes: &[u8], valid_up_to: usize) -> BadRow {
    if let Some(wide) = wide_encoding(bytes) {
        return wide;
    }
    BadRow::new(
        Cause::InvalidUtf8,
        format!(
            "invalid UTF-8 at byte {} of the line (byte 0x{:02X}); the file may be Latin-1 or \
             Windows-1252: convert it to UTF-8",
            valid_up_to + 1,
            bytes[valid_up_to]
        ),
    )
}

/// Name of a JSON value's type, for messages.
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_files_are_input_errors() {
        let dir = std::env::temp_dir();
        let err = load_file(&dir).err().unwrap();
        assert_eq!(err.code(), "INPUT_FILE_UNREADABLE");
        assert!(err.to_string().contains("is a directory"), "{err}");
        let err = load_file(&dir.join("no-such-file.jsonl")).err().unwrap();
        assert_eq!(err.code(), "INPUT_FILE_NOT_FOUND");
    }

    #[test]
    fn lines_skip_blank_bom_and_crlf() {
        let data = b"\xEF\xBB\xBF{\"a\":1}\r\n\r\n  \n{\"b\":2}";
        let recs = split_records(data).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!((recs[0].line, recs[0].bytes), (1, &b"{\"a\":1}"[..]));
        assert_eq!((recs[1].line, recs[1].bytes), (4, &b"{\"b\":2}"[..]));
    }

    #[test]
    fn arrays_give_element_lines() {
        let data = b"[\n {\"a\": 1},\n {\"b\": [1,\n 2]}\n]\n";
        let recs = split_records(data).unwrap();
        assert_eq!(recs.iter().map(|r| r.line).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(recs[1].bytes, b"{\"b\": [1,\n 2]}");
    }

    #[test]
    fn broken_array_names_the_line() {
        let err = split_records(b"[\n{\"a\": 1},\n{\"b\": }\n]").unwrap_err();
        assert_eq!(err.0, 3);
        assert!(err.1.contains("malformed JSON"), "{}", err.1);
    }

    #[test]
    fn parse_reports_kind_and_utf8() {
        let cause = |bytes: &[u8]| parse_object(&Record { line: 1, bytes }).unwrap_err();
        let bad = cause(b"[1, 2]");
        assert_eq!(bad.cause, Cause::NotAnObject);
        assert!(bad.message.contains("an array"));
        let bad = cause(b"{\"a\": \"caf\xe9\"}");
        assert_eq!(bad.cause, Cause::InvalidUtf8);
        assert!(
            bad.message.contains("invalid UTF-8 at byte 11"),
            "{}",
            bad.message
        );
        assert!(bad.message.contains("0xE9"), "{}", bad.message);
        let bad = cause(b"\xFF\xFE{\x00}\x00");
        assert_eq!(bad.cause, Cause::WideEncoding("UTF-16 LE"));
        // UTF-16 without a mark: valid UTF-8 bytes, but NULs between the characters.
        let bad = cause(b"\x00{\x00}\x00");
        assert_eq!(bad.cause, Cause::WideEncoding("UTF-16 or UTF-32"));
        let bad = cause(b"{\"a\": 1} x");
        assert_eq!(bad.cause, Cause::Malformed);
        assert!(bad.message.contains("malformed JSON"));
    }
}

//! Why a row is bad. Each cause has a reason name (its key in `Stats::dropped` when
//! `skip_invalid` skips the row) and decides the error code when the file is refused.

use crate::Error;

/// The cause of a bad row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The line is UTF-16 or UTF-32 text (the encoding named): a byte-order mark, or NUL bytes.
    WideEncoding(&'static str),
    /// Bytes that are not UTF-8 (Latin-1, Windows-1252, ...).
    InvalidUtf8,
    /// Malformed JSON.
    Malformed,
    /// Valid JSON, but not an object.
    NotAnObject,
    /// An object of no known shape.
    UnknownFormat,
    /// A known shape lacking a field it needs.
    MissingField,
    /// A field of the wrong JSON type, or a content part of a kind that is not text.
    WrongFieldType,
    /// A field of the right type whose value cannot be used (empty, unknown role, ...).
    InvalidValue,
    /// The chat template or the tokenizer failed on the row.
    Template,
}

impl Cause {
    /// Reason name in the dropped counts.
    pub fn reason(self) -> &'static str {
        match self {
            Cause::WideEncoding(_) | Cause::InvalidUtf8 => "encoding",
            Cause::Malformed => "parse_error",
            Cause::NotAnObject => "not_an_object",
            Cause::UnknownFormat => "unknown_format",
            Cause::MissingField => "missing_field",
            Cause::WrongFieldType => "wrong_field_type",
            Cause::InvalidValue => "invalid_value",
            Cause::Template => "template_failed",
        }
    }

    /// The error refusing a file whose first bad row has this cause.
    pub fn error(self, message: String) -> Error {
        match self {
            Cause::WideEncoding(_) => Error::DatasetEncoding(message),
            Cause::InvalidUtf8 | Cause::Malformed | Cause::NotAnObject => {
                Error::DatasetParse(message)
            }
            Cause::Template => Error::TemplateRender(message),
            _ => Error::DatasetValidation(message),
        }
    }
}

/// A bad row: its cause and what is wrong with it (the caller adds `file:line`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// Why the row is bad.
    pub cause: Cause,
    /// What is wrong, naming the field involved.
    pub message: String,
}

impl BadRow {
    /// A bad row of `cause`.
    pub fn new(cause: Cause, message: impl Into<String>) -> Self {
        BadRow {
            cause,
            message: message.into(),
        }
    }
}

/// A line that is UTF-16 or UTF-32 text: a byte-order mark starts it, or it holds NUL bytes
/// (which JSON text never does, and the ASCII of UTF-16/32 text always does).
pub fn wide_encoding(bytes: &[u8]) -> Option<BadRow> {
    if let Some(encoding) = byte_order_mark(bytes) {
        let message = format!("the line starts with a {encoding} byte-order mark");
        return Some(BadRow::new(Cause::WideEncoding(encoding), message));
    }
    memchr::memchr(0, bytes).map(|_| {
        BadRow::new(
            Cause::WideEncoding("UTF-16 or UTF-32"),
            "the line holds NUL bytes, as UTF-16 or UTF-32 text without a byte-order mark does",
        )
    })
}

/// The encoding named by a UTF-16 or UTF-32 byte-order mark at the start of `bytes`.
fn byte_order_mark(bytes: &[u8]) -> Option<&'static str> {
    // UTF-32 LE's mark starts with UTF-16 LE's, so it is tried first.
    const MARKS: [(&[u8], &str); 4] = [
        (b"\xFF\xFE\x00\x00", "UTF-32 LE"),
        (b"\x00\x00\xFE\xFF", "UTF-32 BE"),
        (b"\xFF\xFE", "UTF-16 LE"),
        (b"\xFE\xFF", "UTF-16 BE"),
    ];
    MARKS
        .iter()
        .find(|(mark, _)| bytes.starts_with(mark))
        .map(|&(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_name_their_encoding() {
        assert_eq!(byte_order_mark(b"\xFF\xFE{\x00"), Some("UTF-16 LE"));
        assert_eq!(byte_order_mark(b"\xFE\xFF\x00{"), Some("UTF-16 BE"));
        assert_eq!(byte_order_mark(b"\xFF\xFE\x00\x00{"), Some("UTF-32 LE"));
        assert_eq!(byte_order_mark(b"\x00\x00\xFE\xFF"), Some("UTF-32 BE"));
        assert_eq!(byte_order_mark(b"\xEF\xBB\xBF{}"), None);
        assert_eq!(byte_order_mark(b"{\"caf\xE9\": 1}"), None);
    }

    #[test]
    fn nul_bytes_mean_utf16_without_a_mark() {
        let bad = wide_encoding(b"{\x00\"\x00a\x00\"\x00").unwrap();
        assert_eq!(bad.cause, Cause::WideEncoding("UTF-16 or UTF-32"));
        assert_eq!(
            wide_encoding(b"\xFE\xFF\x00{").unwrap().cause,
            Cause::WideEncoding("UTF-16 BE")
        );
        assert_eq!(wide_encoding(b"{\"a\": \"caf\xE9\"}"), None);
    }

    #[test]
    fn causes_pick_codes() {
        let code = |c: Cause| c.error(String::new()).code();
        assert_eq!(
            code(Cause::WideEncoding("UTF-16 LE")),
            "INPUT_DATASET_ENCODING_UNSUPPORTED"
        );
        assert_eq!(code(Cause::InvalidUtf8), "INPUT_DATASET_PARSE_FAILED");
        assert_eq!(code(Cause::NotAnObject), "INPUT_DATASET_PARSE_FAILED");
        assert_eq!(code(Cause::MissingField), "INPUT_DATASET_VALIDATION_FAILED");
        assert_eq!(code(Cause::Template), "INPUT_TEMPLATE_RENDER_FAILED");
    }
}

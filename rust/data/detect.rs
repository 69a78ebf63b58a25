//! Per-row format detection and normalisation into chat messages or raw text.
//!
//! Every known shape becomes one or two `Spec`s: a chat (messages rendered with the
//! model's template, with the index of the first message that may carry a loss) or raw
//! text. Detection is per row, so files mixing SFT shapes work.

use serde_json::{Map, Value};

use super::bad::{BadRow, Cause};
use super::read::json_kind;

/// The shape a row was recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// OpenAI chat: `messages` with role/content.
    Messages,
    /// ShareGPT: `conversations` with from/value.
    ShareGpt,
    /// Alpaca: `instruction`, optional `input`, `output`, optional `system`.
    Alpaca,
    /// Raw text: `text`.
    Text,
    /// Preference pair: optional `prompt`, `chosen`, `rejected`.
    Preference,
    /// KTO: `prompt`, `completion`, boolean `label`.
    Kto,
}

impl Format {
    /// Name used in stats and messages.
    pub fn name(self) -> &'static str {
        match self {
            Format::Messages => "messages",
            Format::ShareGpt => "sharegpt",
            Format::Alpaca => "alpaca",
            Format::Text => "text",
            Format::Preference => "preference",
            Format::Kto => "kto",
        }
    }

    /// The training kind rows of this format belong to.
    pub fn kind(self) -> Kind {
        match self {
            Format::Preference => Kind::Preference,
            Format::Kto => Kind::Kto,
            _ => Kind::Sft,
        }
    }
}

/// What a dataset trains: plain SFT, preference pairs, or KTO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Supervised fine-tuning (chat, instruction or raw text rows).
    Sft,
    /// Chosen/rejected pairs.
    Preference,
    /// Completions labelled desirable or not.
    Kto,
}

impl Kind {
    /// Name used by the Python side (`PreparedDataset.kind`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Sft => "sft",
            Kind::Preference => "preference",
            Kind::Kto => "kto",
        }
    }
}

/// Roles a message may have after normalisation.
pub const ROLES: [&str; 7] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
    "ipython",
];

/// One chat message, normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// One of `ROLES`.
    pub role: String,
    /// Text content (list-of-parts content joined).
    pub content: String,
    /// Other fields kept for the template (tool_calls, name, tool_call_id, ...).
    pub extra: Map<String, Value>,
}

impl Message {
    fn new(role: &str, content: impl Into<String>) -> Self {
        Message {
            role: role.to_string(),
            content: content.into(),
            extra: Map::new(),
        }
    }

    /// Whether this message's text is the model's own (carries a loss).
    pub fn is_assistant(&self) -> bool {
        self.role == "assistant"
    }
}

/// What one sample is made from.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    /// Messages rendered with the chat template; assistant messages from `label_from` on carry a loss.
    Chat {
        /// The conversation.
        messages: Vec<Message>,
        /// Index of the first message that may carry a loss (the completion's start).
        label_from: usize,
    },
    /// Text tokenized as is (with the tokenizer's own special tokens), every token a target.
    Raw {
        /// The text.
        text: String,
    },
}

/// A recognised row.
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    /// The shape found.
    pub format: Format,
    /// One spec (SFT, KTO) or two (preference: chosen then rejected).
    pub specs: Vec<Spec>,
    /// KTO's desirable (true) / undesirable (false) label.
    pub kto_label: Option<bool>,
}

impl Message {
    /// The message as the template sees it: role, content, then the other fields.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("role".into(), Value::from(self.role.as_str()));
        map.insert("content".into(), Value::from(self.content.as_str()));
        map.extend(self.extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        Value::Object(map)
    }
}

impl Detected {
    /// The normalised row as JSON (format, specs, kto_label), for tests and tools.
    pub fn to_json(&self) -> Value {
        let specs: Vec<Value> = self
            .specs
            .iter()
            .map(|spec| match spec {
                Spec::Chat {
                    messages,
                    label_from,
                } => serde_json::json!({
                    "messages": messages.iter().map(Message::to_json).collect::<Vec<_>>(),
                    "label_from": label_from,
                }),
                Spec::Raw { text } => serde_json::json!({ "text": text }),
            })
            .collect();
        serde_json::json!({
            "format": self.format.name(),
            "kind": self.format.kind().name(),
            "specs": specs,
            "kto_label": self.kto_label,
        })
    }
}

type Found<T> = std::result::Result<T, BadRow>;

fn missing(message: String) -> BadRow {
    BadRow::new(Cause::MissingField, message)
}

fn wrong_type(message: String) -> BadRow {
    BadRow::new(Cause::WrongFieldType, message)
}

fn invalid(message: impl Into<String>) -> BadRow {
    BadRow::new(Cause::InvalidValue, message)
}

/// Recognises the shape of one row (a JSON object) and normalises it.
pub fn detect(row: &Map<String, Value>) -> Found<Detected> {
    let sft = |format, specs| Detected {
        format,
        specs,
        kto_label: None,
    };
    if let Some(v) = row.get("messages") {
        let messages = message_list(v, "messages", RoleKeys::OPENAI)?;
        return Ok(sft(Format::Messages, vec![chat(messages, 0)]));
    }
    if let Some(v) = row.get("conversations") {
        let messages = message_list(v, "conversations", RoleKeys::SHAREGPT)?;
        return Ok(sft(Format::ShareGpt, vec![chat(messages, 0)]));
    }
    if row.contains_key("chosen") || row.contains_key("rejected") {
        return preference(row);
    }
    if row.contains_key("completion") || row.contains_key("label") {
        return kto(row);
    }
    if row.contains_key("instruction") || row.contains_key("output") {
        return Ok(sft(Format::Alpaca, vec![chat(alpaca(row)?, 0)]));
    }
    if let Some(v) = row.get("text") {
        let text = string_field(v, "text")?;
        if text.trim().is_empty() {
            return Err(invalid("field 'text' is empty"));
        }
        return Ok(sft(
            Format::Text,
            vec![Spec::Raw {
                text: text.to_string(),
            }],
        ));
    }
    let mut keys: Vec<&str> = row.keys().map(String::as_str).collect();
    keys.truncate(8);
    Err(BadRow::new(
        Cause::UnknownFormat,
        format!(
            "the row has no known shape (keys: {}); expected messages, conversations, instruction/output, \
             text, prompt/chosen/rejected or prompt/completion/label",
            if keys.is_empty() { "none".to_string() } else { keys.join(", ") }
        ),
    ))
}

fn chat(messages: Vec<Message>, label_from: usize) -> Spec {
    Spec::Chat {
        messages,
        label_from,
    }
}

fn string_field<'a>(v: &'a Value, field: &str) -> Found<&'a str> {
    v.as_str().ok_or_else(|| {
        wrong_type(format!(
            "field '{field}' must be a string, found {}",
            json_kind(v)
        ))
    })
}

fn required<'a>(row: &'a Map<String, Value>, field: &str, shape: &str) -> Found<&'a Value> {
    row.get(field)
        .ok_or_else(|| missing(format!("{shape} row lacks field '{field}'")))
}

/// Field names of one message shape.
#[derive(Clone, Copy)]
struct RoleKeys {
    role: &'static str,
    content: &'static str,
    sharegpt: bool,
}

impl RoleKeys {
    const OPENAI: RoleKeys = RoleKeys {
        role: "role",
        content: "content",
        sharegpt: false,
    };
    const SHAREGPT: RoleKeys = RoleKeys {
        role: "from",
        content: "value",
        sharegpt: true,
    };
}

fn sharegpt_role(from: &str) -> Option<&'static str> {
    Some(match from {
        "human" | "user" => "user",
        "gpt" | "assistant" | "chatgpt" | "bing" | "bard" | "model" | "function_call" => {
            "assistant"
        }
        "system" => "system",
        "tool" | "function_response" | "observation" | "ipython" => "tool",
        _ => return None,
    })
}

fn message_list(v: &Value, field: &str, keys: RoleKeys) -> Found<Vec<Message>> {
    let items = v.as_array().ok_or_else(|| {
        wrong_type(format!(
            "field '{field}' must be a list of messages, found {}",
            json_kind(v)
        ))
    })?;
    if items.is_empty() {
        return Err(invalid(format!("field '{field}' is an empty list")));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| message(item, &format!("{field}[{i}]"), keys))
        .collect()
}

fn message(v: &Value, at: &str, keys: RoleKeys) -> Found<Message> {
    let obj = v
        .as_object()
        .ok_or_else(|| wrong_type(format!("'{at}' must be an object, found {}", json_kind(v))))?;
    // ShareGPT files sometimes use role/content inside `conversations`.
    let keys = if keys.sharegpt && !obj.contains_key("from") && obj.contains_key("role") {
        RoleKeys::OPENAI
    } else {
        keys
    };
    let role_v = obj
        .get(keys.role)
        .ok_or_else(|| missing(format!("'{at}' lacks field '{}'", keys.role)))?;
    let role_s = role_v.as_str().ok_or_else(|| {
        wrong_type(format!(
            "'{at}.{}' must be a string, found {}",
            keys.role,
            json_kind(role_v)
        ))
    })?;
    let role = if keys.sharegpt {
        sharegpt_role(role_s).ok_or_else(|| {
            invalid(format!(
                "'{at}.from' is '{role_s}'; expected human, gpt, system, tool (or user, assistant)"
            ))
        })?
    } else {
        ROLES
            .iter()
            .find(|r| **r == role_s)
            .copied()
            .ok_or_else(|| {
                invalid(format!(
                    "'{at}.role' is '{role_s}'; expected one of {}",
                    ROLES.join(", ")
                ))
            })?
    };
    let content = match obj.get(keys.content) {
        None | Some(Value::Null)
            if obj.contains_key("tool_calls") || obj.contains_key("function_call") =>
        {
            String::new()
        }
        None => return Err(missing(format!("'{at}' lacks field '{}'", keys.content))),
        Some(c) => content_text(c, &format!("{at}.{}", keys.content))?,
    };
    let extra = obj
        .iter()
        .filter(|(k, _)| k.as_str() != keys.role && k.as_str() != keys.content)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Message {
        role: role.to_string(),
        content,
        extra,
    })
}

/// Content as text: a string, or a list of text parts joined.
fn content_text(v: &Value, at: &str) -> Found<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (i, part) in parts.iter().enumerate() {
                match part {
                    Value::String(s) => out.push_str(s),
                    Value::Object(p) => {
                        let kind = p.get("type").and_then(Value::as_str).unwrap_or("text");
                        match (kind, p.get("text")) {
                            ("text", Some(Value::String(s))) => out.push_str(s),
                            ("text", _) => {
                                return Err(wrong_type(format!(
                                    "'{at}[{i}]' is a text part without a string 'text'"
                                )))
                            }
                            (other, _) => {
                                return Err(wrong_type(format!(
                                    "'{at}[{i}]' is a '{other}' part; only text parts are supported"
                                )))
                            }
                        }
                    }
                    other => {
                        return Err(wrong_type(format!(
                            "'{at}[{i}]' must be a text part, found {}",
                            json_kind(other)
                        )))
                    }
                }
            }
            Ok(out)
        }
        other => Err(wrong_type(format!(
            "'{at}' must be a string or a list of text parts, found {}",
            json_kind(other)
        ))),
    }
}

fn alpaca(row: &Map<String, Value>) -> Found<Vec<Message>> {
    let instruction = string_field(required(row, "instruction", "an alpaca")?, "instruction")?;
    let output = string_field(required(row, "output", "an alpaca")?, "output")?;
    let input = match row.get("input") {
        None | Some(Value::Null) => "",
        Some(v) => string_field(v, "input")?,
    };
    let mut messages = Vec::with_capacity(3);
    match row.get("system") {
        None | Some(Value::Null) => {}
        Some(v) => {
            let system = string_field(v, "system")?;
            if !system.is_empty() {
                messages.push(Message::new("system", system));
            }
        }
    }
    let user = if input.is_empty() {
        instruction.to_string()
    } else {
        format!("{instruction}\n\n{input}")
    };
    messages.push(Message::new("user", user));
    messages.push(Message::new("assistant", output));
    Ok(messages)
}

/// A prompt or completion: a string (one user / assistant message) or a message list.
enum Side {
    Text(String),
    Messages(Vec<Message>),
}

fn side(v: &Value, field: &str) -> Found<Side> {
    match v {
        Value::String(s) => Ok(Side::Text(s.clone())),
        Value::Array(_) => Ok(Side::Messages(message_list(v, field, RoleKeys::OPENAI)?)),
        other => Err(wrong_type(format!(
            "field '{field}' must be a string or a list of messages, found {}",
            json_kind(other)
        ))),
    }
}

fn as_messages(side: Side, role: &str) -> Vec<Message> {
    match side {
        Side::Text(t) => vec![Message::new(role, t)],
        Side::Messages(m) => m,
    }
}

fn preference(row: &Map<String, Value>) -> Found<Detected> {
    let chosen = side(required(row, "chosen", "a preference")?, "chosen")?;
    let rejected = side(required(row, "rejected", "a preference")?, "rejected")?;
    let prompt = match row.get("prompt") {
        None | Some(Value::Null) => None,
        Some(v) => Some(side(v, "prompt")?),
    };
    let specs = match (prompt, chosen, rejected) {
        (Some(p), c, r) => {
            let prompt = as_messages(p, "user");
            let n = prompt.len();
            let with = |side| {
                let mut m = prompt.clone();
                m.extend(as_messages(side, "assistant"));
                chat(m, n)
            };
            vec![with(c), with(r)]
        }
        (None, Side::Messages(c), Side::Messages(r)) => {
            // The prompt is the messages both sides share.
            let n = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            if n == c.len() || n == r.len() {
                return Err(invalid(
                    "'chosen' and 'rejected' do not differ after their shared messages",
                ));
            }
            vec![chat(c, n), chat(r, n)]
        }
        (None, Side::Text(c), Side::Text(r)) => vec![Spec::Raw { text: c }, Spec::Raw { text: r }],
        (None, _, _) => {
            return Err(wrong_type(
                "without a 'prompt', 'chosen' and 'rejected' must both be strings or both message lists"
                    .into(),
            ))
        }
    };
    Ok(Detected {
        format: Format::Preference,
        specs,
        kto_label: None,
    })
}

fn kto(row: &Map<String, Value>) -> Found<Detected> {
    let prompt = as_messages(side(required(row, "prompt", "a KTO")?, "prompt")?, "user");
    let completion = as_messages(
        side(required(row, "completion", "a KTO")?, "completion")?,
        "assistant",
    );
    let label_v = required(row, "label", "a KTO")?;
    let label = label_v.as_bool().ok_or_else(|| {
        wrong_type(format!(
            "field 'label' must be true or false, found {}",
            json_kind(label_v)
        ))
    })?;
    let n = prompt.len();
    let mut messages = prompt;
    messages.extend(completion);
    Ok(Detected {
        format: Format::Kto,
        specs: vec![chat(messages, n)],
        kto_label: Some(label),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(json: &str) -> Found<Detected> {
        detect(
            serde_json::from_str::<Value>(json)
                .unwrap()
                .as_object()
                .unwrap(),
        )
    }

    #[test]
    fn shapes() {
        assert_eq!(
            det(r#"{"messages":[{"role":"user","content":"a"}]}"#)
                .unwrap()
                .format,
            Format::Messages
        );
        let d =
            det(r#"{"conversations":[{"from":"human","value":"a"},{"from":"gpt","value":"b"}]}"#)
                .unwrap();
        assert_eq!(d.format, Format::ShareGpt);
        let Spec::Chat { messages, .. } = &d.specs[0] else {
            panic!()
        };
        assert_eq!(messages[1].role, "assistant");
        let d = det(r#"{"instruction":"i","input":"x","output":"o","system":"s"}"#).unwrap();
        let Spec::Chat { messages, .. } = &d.specs[0] else {
            panic!()
        };
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[1].content, "i\n\nx");
        assert_eq!(det(r#"{"text":"t"}"#).unwrap().format, Format::Text);
        let d = det(r#"{"prompt":"p","chosen":"c","rejected":"r"}"#).unwrap();
        assert_eq!((d.format, d.specs.len()), (Format::Preference, 2));
        let d = det(r#"{"prompt":"p","completion":"c","label":false}"#).unwrap();
        assert_eq!((d.format, d.kto_label), (Format::Kto, Some(false)));
    }

    #[test]
    fn content_parts_and_tool_calls() {
        let d = det(
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
            {"role":"assistant","content":null,"tool_calls":[{"function":{"name":"f"}}]}]}"#,
        )
        .unwrap();
        let Spec::Chat { messages, .. } = &d.specs[0] else {
            panic!()
        };
        assert_eq!(messages[0].content, "ab");
        assert!(messages[1].extra.contains_key("tool_calls"));
    }

    #[test]
    fn preference_without_prompt_splits_shared_prefix() {
        let d = det(
            r#"{"chosen":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}],
                "rejected":[{"role":"user","content":"q"},{"role":"assistant","content":"b"}]}"#,
        )
        .unwrap();
        assert!(matches!(&d.specs[0], Spec::Chat { label_from: 1, .. }));
    }

    #[test]
    fn errors_name_the_field_and_cause() {
        let cases = [
            (r#"{"foo":1}"#, Cause::UnknownFormat, "no known shape"),
            (
                r#"{"messages":[{"role":"user","content":3}]}"#,
                Cause::WrongFieldType,
                "'messages[0].content'",
            ),
            (
                r#"{"messages":[{"role":"bot","content":"x"}]}"#,
                Cause::InvalidValue,
                "'bot'",
            ),
            (
                r#"{"prompt":"p","completion":"c","label":"yes"}"#,
                Cause::WrongFieldType,
                "'label'",
            ),
            (r#"{"messages":[]}"#, Cause::InvalidValue, "empty"),
            (r#"{"text":5}"#, Cause::WrongFieldType, "'text'"),
            (r#"{"instruction":"i"}"#, Cause::MissingField, "'output'"),
        ];
        for (row, cause, words) in cases {
            let bad = det(row).unwrap_err();
            assert_eq!(bad.cause, cause, "{row}");
            assert!(bad.message.contains(words), "{}", bad.message);
        }
    }
}

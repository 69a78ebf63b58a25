//! Chat templates: the model's own Hugging Face Jinja template, rendered with minijinja
//! the way `transformers` renders it (trim_blocks, lstrip_blocks, loop controls,
//! `raise_exception`, Python string methods, Python-style `tojson`).

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;

use super::detect::Message;
use crate::{Error, Result};

/// ChatML, the built-in template `chatml`.
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}\
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// The Llama 3 chat format, the built-in template `llama3`.
pub const LLAMA3_TEMPLATE: &str = "{{- bos_token if bos_token is defined else '' }}\
{%- for message in messages %}\
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";

/// A chat template shipped with the engine, for models without one of their own.
pub struct BuiltinTemplate {
    /// Its name (`--chat-template NAME`).
    pub name: &'static str,
    /// Its Jinja source.
    pub source: &'static str,
    /// The special strings it writes, which should be single tokens of the model.
    pub markers: &'static [&'static str],
}

/// The built-in templates.
pub const BUILTIN_TEMPLATES: [BuiltinTemplate; 2] = [
    BuiltinTemplate {
        name: "chatml",
        source: CHATML_TEMPLATE,
        markers: &["<|im_start|>", "<|im_end|>"],
    },
    BuiltinTemplate {
        name: "llama3",
        source: LLAMA3_TEMPLATE,
        markers: &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    },
];

/// The built-in template called `name`, if any.
pub fn builtin(name: &str) -> Option<&'static BuiltinTemplate> {
    BUILTIN_TEMPLATES.iter().find(|t| t.name == name)
}

const NAME: &str = "chat";

/// A compiled chat template with the tokenizer's special tokens as globals.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compiles `source`; `globals` are the special-token strings (bos_token, eos_token, ...).
    pub fn new(source: &str, globals: &[(String, String)]) -> Result<Self> {
        let mut env = Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(
            syntax
                .build()
                .map_err(|e| Error::TemplateRender(format!("chat template syntax: {e}")))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_test("iterable", is_iterable);
        env.add_test("sequence", is_sequence);
        for (k, v) in globals {
            env.add_global(k.clone(), Value::from(v.clone()));
        }
        env.add_template_owned(NAME, strip_generation_tags(source))
            .map_err(|e| {
                Error::TemplateRender(format!("the chat template does not compile: {e:#}"))
            })?;
        Ok(ChatTemplate { env })
    }

    /// Renders `messages` (already converted with `message_value`).
    pub fn render(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> std::result::Result<String, String> {
        let tpl = self.env.get_template(NAME).map_err(|e| e.to_string())?;
        tpl.render(minijinja::context! {
            messages => Value::from(messages.to_vec()),
            add_generation_prompt => add_generation_prompt,
            // transformers always passes these (as None when not given); some templates iterate them.
            tools => Value::from(()),
            documents => Value::from(()),
        })
        .map_err(|e| render_error_text(&e))
    }
}

fn render_error_text(e: &minijinja::Error) -> String {
    match e.kind() {
        ErrorKind::InvalidOperation if e.detail().is_some() => {
            e.detail().unwrap_or_default().to_string()
        }
        _ => format!("{e}"),
    }
}

/// The `{% generation %}` block tag exists only in transformers; masks here come from the
/// rendering itself, so the tags are dropped and their body kept.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let Some(close) = rest[open..].find("%}") else {
            break;
        };
        let inner = rest[open + 2..open + close]
            .trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..open]);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(&rest[open..open + close + 2]);
        }
        rest = &rest[open + close + 2..];
    }
    out.push_str(rest);
    out
}

/// Jinja2's `is iterable`: `None` and numbers are not (minijinja iterates `none` as empty).
fn is_iterable(v: &Value) -> bool {
    match v.kind() {
        ValueKind::Undefined => true,
        ValueKind::None | ValueKind::Bool | ValueKind::Number => false,
        _ => v.try_iter().is_ok(),
    }
}

/// Jinja2's `is sequence` (anything with a length and items: strings, lists, dicts).
fn is_sequence(v: &Value) -> bool {
    matches!(
        v.kind(),
        ValueKind::Undefined
            | ValueKind::Seq
            | ValueKind::Map
            | ValueKind::String
            | ValueKind::Bytes
    )
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)` as transformers defines it: the current time (UTC here) formatted
/// with Python's strftime codes. Templates that call it change with the date, so the
/// dataset cache key includes the date for them (`uses_clock`).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, secs)
}

/// Whether a template's output depends on the current date.
pub fn uses_clock(source: &str) -> bool {
    source.contains("strftime_now")
}

/// Formats Unix time `secs` (UTC) with the common Python strftime codes.
pub fn strftime(format: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let (hh, mm, ss) = (tod / 3600, tod / 60 % 60, tod % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut code = chars.next().unwrap_or('%');
        let unpadded = code == '-';
        if unpadded {
            code = chars.next().unwrap_or('%');
        }
        let num = |v: i64, w: usize| {
            if unpadded {
                v.to_string()
            } else {
                format!("{v:0w$}")
            }
        };
        match code {
            'Y' => out.push_str(&y.to_string()),
            'y' => out.push_str(&num(y % 100, 2)),
            'm' => out.push_str(&num(m, 2)),
            'd' => out.push_str(&num(d, 2)),
            'e' => out.push_str(&format!("{d:2}")),
            'j' => out.push_str(&num(yday, 3)),
            'H' => out.push_str(&num(hh, 2)),
            'I' => out.push_str(&num((hh + 11) % 12 + 1, 2)),
            'M' => out.push_str(&num(mm, 2)),
            'S' => out.push_str(&num(ss, 2)),
            'p' => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            'B' => out.push_str(MONTHS[(m - 1) as usize]),
            'b' | 'h' => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            'A' => out.push_str(DAYS[weekday]),
            'a' => out.push_str(&DAYS[weekday][..3]),
            'F' => out.push_str(&format!("{y}-{m:02}-{d:02}")),
            '%' => out.push('%'),
            other => {
                out.push('%');
                out.push(other);
            }
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `tojson` as transformers defines it: Python's `json.dumps` (ensure_ascii False by
/// default, `", "` / `": "` separators, optional indent and sort_keys).
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(s) => {
            let a = s.get_item(&Value::from(0))?;
            let b = s.get_item(&Value::from(1))?;
            (
                a.as_str().unwrap_or(", ").to_string(),
                b.as_str().unwrap_or(": ").to_string(),
            )
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut w = JsonWriter {
        out: String::new(),
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
        item_sep,
        key_sep,
    };
    w.value(value, 0)?;
    Ok(Value::from(w.out))
}

struct JsonWriter {
    out: String,
    indent: Option<usize>,
    sort_keys: bool,
    ensure_ascii: bool,
    item_sep: String,
    key_sep: String,
}

impl JsonWriter {
    fn value(&mut self, v: &Value, depth: usize) -> std::result::Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self
                .out
                .push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => self.number(v),
            ValueKind::String => self.string(v.as_str().unwrap_or_default()),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.open_close('{', '}', depth, keys.len(), |w, i, d| {
                    let key = &keys[i];
                    match key.as_str() {
                        Some(s) => w.string(s),
                        None => w.string(&key.to_string()),
                    }
                    w.out.push_str(&w.key_sep.clone());
                    w.value(&v.get_item(key)?, d)
                })?;
            }
            _ => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.open_close('[', ']', depth, items.len(), |w, i, d| {
                    w.value(&items[i], d)
                })?;
            }
        }
        Ok(())
    }

    fn open_close<F>(
        &mut self,
        open: char,
        close: char,
        depth: usize,
        n: usize,
        mut item: F,
    ) -> std::result::Result<(), minijinja::Error>
    where
        F: FnMut(&mut Self, usize, usize) -> std::result::Result<(), minijinja::Error>,
    {
        self.out.push(open);
        if n == 0 {
            self.out.push(close);
            return Ok(());
        }
        for i in 0..n {
            if i > 0 {
                let sep = self.item_sep.clone();
                self.out.push_str(if self.indent.is_some() {
                    sep.trim_end()
                } else {
                    &sep
                });
            }
            self.newline(depth + 1);
            item(self, i, depth + 1)?;
        }
        self.newline(depth);
        self.out.push(close);
        Ok(())
    }

    fn newline(&mut self, depth: usize) {
        if let Some(n) = self.indent {
            self.out.push('\n');
            self.out.extend(std::iter::repeat_n(' ', n * depth));
        }
    }

    fn number(&mut self, v: &Value) {
        if let Some(i) = v.as_i64() {
            self.out.push_str(&i.to_string());
            return;
        }
        let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
        if f.is_nan() {
            self.out.push_str("NaN");
        } else if f.is_infinite() {
            self.out
                .push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
        } else {
            let s = format!("{f:?}");
            self.out.push_str(&s);
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 => self.out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        self.out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// A JSON value as a template value (objects keep their key order).
pub fn json_to_value(v: &Json) -> Value {
    match v {
        Json::Null => Value::from(()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(u)) => Value::from(u),
            _ => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(a) => a.iter().map(json_to_value).collect(),
        Json::Object(o) => Value::from_pairs(
            o.iter()
                .map(|(k, v)| (Value::from(k.as_str()), json_to_value(v))),
        ),
    }
}

/// A message as the template sees it: role, content, then any other fields.
pub fn message_value(m: &Message) -> Value {
    if m.extra.is_empty() {
        return Value::from_pairs([
            (Value::from("role"), Value::from(m.role.as_str())),
            (Value::from("content"), Value::from(m.content.as_str())),
        ]);
    }
    let Json::Object(map) = m.to_json() else {
        unreachable!("a message is an object")
    };
    template_message(map)
}

/// Older names of the reasoning field; templates read `reasoning_content` (and gpt-oss
/// reads `thinking`), so transformers fills both from whichever is given.
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// A JSON message as the template sees it, with reasoning aliases as transformers sets them.
pub fn template_message(mut map: serde_json::Map<String, Json>) -> Value {
    let reasoning = REASONING_FIELDS
        .iter()
        .find_map(|k| map.get(*k).filter(|v| !v.is_null()).cloned());
    if let Some(r) = reasoning {
        let mut aliased = serde_json::Map::new();
        aliased.insert("thinking".into(), r.clone());
        aliased.extend(map);
        aliased.insert("reasoning_content".into(), r);
        map = aliased;
    }
    json_to_value(&Json::Object(map))
}

/// The same message with another content (used to locate content in renderings).
pub fn message_value_with_content(m: &Message, content: &str) -> Value {
    let mut copy = m.clone();
    copy.content = content.to_string();
    message_value(&copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Value> {
        pairs
            .iter()
            .map(|(r, c)| {
                message_value(&Message {
                    role: r.to_string(),
                    content: c.to_string(),
                    extra: Default::default(),
                })
            })
            .collect()
    }

    #[test]
    fn chatml_default_renders() {
        let t = ChatTemplate::new(CHATML_TEMPLATE, &[]).unwrap();
        let out = t.render(&msgs(&[("user", "hi")]), true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_raise_and_tojson() {
        let src = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}\
                   {{ raise_exception('bad role ' + m.role) }}{% endif %}\
                   {{ m.content.strip().upper() }}|{{ {'b': 1, 'a': [m.role, none, 1.5]} | tojson }}{% endfor %}";
        let t = ChatTemplate::new(src, &[]).unwrap();
        assert_eq!(
            t.render(&msgs(&[("user", " hé ")]), false).unwrap(),
            "HÉ|{\"b\": 1, \"a\": [\"user\", null, 1.5]}"
        );
        assert_eq!(
            t.render(&msgs(&[("tool", "x")]), false).unwrap_err(),
            "bad role tool"
        );
    }

    #[test]
    fn strftime_matches_python() {
        // 2024-07-26 13:05:09 UTC, a Friday (datetime.strftime gives the same strings).
        let t = 1_722_000_309;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %A %j %-d %B", t),
            "2024-07-26 13:25:09 Friday 208 26 July"
        );
        assert_eq!(strftime("%d %b %Y", 951_782_400), "29 Feb 2000");
    }

    #[test]
    fn tests_follow_jinja2_for_none() {
        let src = "{{ none is iterable }} {{ [] is iterable }} {{ 'a' is sequence }} {{ none is sequence }} {{ x is iterable }}";
        let t = ChatTemplate::new(src, &[]).unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "False True True False True");
    }

    #[test]
    fn generation_tags_are_dropped() {
        let src = "{% for m in messages %}{% generation %}{{ m.content }}{%- endgeneration %}{% endfor %}";
        let t = ChatTemplate::new(src, &[]).unwrap();
        assert_eq!(t.render(&msgs(&[("assistant", "x")]), false).unwrap(), "x");
    }

    #[test]
    fn globals_and_trim_blocks() {
        let src = "{{ bos_token }}\n{% for m in messages %}\n  {{ m.content }}\n{% endfor %}";
        let t = ChatTemplate::new(src, &[("bos_token".into(), "<s>".into())]).unwrap();
        assert_eq!(
            t.render(&msgs(&[("user", "a")]), false).unwrap(),
            "<s>\n  a\n"
        );
    }
}

//! Assistant-only loss masks, found from the rendering itself.
//!
//! For assistant message `i`, the conversation up to `i` rendered with the generation
//! prompt ends exactly where the model starts writing, and the conversation up to and
//! including `i` ends where its turn ends (end-of-turn token included). Both are
//! prefixes of the full rendering for ordinary templates, which gives the span to train
//! on with no knowledge of the family's markers. Templates that rewrite earlier turns
//! (e.g. dropping old reasoning, or moving the system prompt) fall back to rendering
//! with a sentinel in place of the message's content and reading where it lands.

use std::ops::Range;

use minijinja::Value;

use super::detect::Message;
use super::template::{message_value, message_value_with_content, ChatTemplate};

/// A rendered conversation and the byte spans of it that carry a loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// The full rendering.
    pub text: String,
    /// Byte ranges of `text` to train on, in order, not overlapping.
    pub spans: Vec<Range<usize>>,
}

const SENTINEL: &str = "\u{E000}\u{E001}bp-content\u{E001}\u{E000}";

/// Renders `messages` and finds the spans of assistant messages from `label_from` on
/// (every byte when `all`).
pub fn render_with_spans(
    tpl: &ChatTemplate,
    messages: &[Message],
    label_from: usize,
    all: bool,
) -> std::result::Result<Rendered, String> {
    let values: Vec<Value> = messages.iter().map(message_value).collect();
    let text = tpl.render(&values, false)?;
    if all {
        let whole = 0..text.len();
        let spans = if whole.is_empty() {
            Vec::new()
        } else {
            Vec::from([whole])
        };
        return Ok(Rendered { text, spans });
    }
    let mut spans: Vec<Range<usize>> = Vec::new();
    for i in label_from..messages.len() {
        if !messages[i].is_assistant() {
            continue;
        }
        let span = assistant_span(tpl, messages, &values, &text, i)?;
        if span.is_empty() {
            continue;
        }
        match spans.last_mut() {
            Some(last) if span.start <= last.end => last.end = last.end.max(span.end),
            _ => spans.push(span),
        }
    }
    Ok(Rendered { text, spans })
}

fn assistant_span(
    tpl: &ChatTemplate,
    messages: &[Message],
    values: &[Value],
    full: &str,
    i: usize,
) -> std::result::Result<Range<usize>, String> {
    let prompt = tpl.render(&values[..i], true)?;
    let upto = if i + 1 == values.len() {
        None
    } else {
        Some(tpl.render(&values[..=i], false)?)
    };
    if full.starts_with(&prompt) {
        let end = match &upto {
            // The last message's turn runs to the end of the rendering.
            None => return Ok(prompt.len()..full.len()),
            Some(u) if u.len() >= prompt.len() && full.starts_with(u.as_str()) => {
                return Ok(prompt.len()..u.len())
            }
            // Otherwise the turn ends where the rendering that stops after it departs from
            // the full one (templates may append a trailer, e.g. an EOS, when a
            // conversation ends there); the content must lie inside for this to hold.
            Some(u) => common_prefix(full, u),
        };
        let content = messages[i].content.trim().as_bytes();
        if end >= prompt.len()
            && memchr::memmem::find(&full.as_bytes()[prompt.len()..end], content).is_some()
        {
            return Ok(prompt.len()..end);
        }
    }
    sentinel_span(tpl, messages, values, full, i, &prompt)
}

/// Locates message `i`'s content by rendering a sentinel in its place.
fn sentinel_span(
    tpl: &ChatTemplate,
    messages: &[Message],
    values: &[Value],
    full: &str,
    i: usize,
    prompt: &str,
) -> std::result::Result<Range<usize>, String> {
    let fail = || {
        format!(
            "cannot locate assistant message {} in the chat template's rendering (the template \
             renders it more than once or rewrites other messages around it)",
            i + 1
        )
    };
    if full.contains(SENTINEL) {
        return Err(fail());
    }
    let mut marked: Vec<Value> = values.to_vec();
    marked[i] = message_value_with_content(&messages[i], SENTINEL);
    let marked_full = tpl.render(&marked, false)?;
    let marked_upto = tpl.render(&marked[..=i], false)?;
    let (Some(pos), Some(pos_upto)) = (
        unique_find(&marked_full, SENTINEL),
        unique_find(&marked_upto, SENTINEL),
    ) else {
        return Err(fail());
    };
    let after = &marked_full[pos + SENTINEL.len()..];
    let content_len = (full.len() + SENTINEL.len())
        .checked_sub(marked_full.len())
        .ok_or_else(fail)?;
    if full.get(..pos) != Some(&marked_full[..pos]) || full.get(pos + content_len..) != Some(after)
    {
        return Err(fail());
    }
    let content_end = pos + content_len;
    let tail = common_prefix(
        &full[content_end..],
        &marked_upto[pos_upto + SENTINEL.len()..],
    );
    let start = if full.starts_with(prompt) && prompt.len() <= pos {
        prompt.len()
    } else {
        pos
    };
    Ok(start..content_end + tail)
}

fn unique_find(hay: &str, needle: &str) -> Option<usize> {
    let first = hay.find(needle)?;
    if hay[first + needle.len()..].contains(needle) {
        return None;
    }
    Some(first)
}

/// Length in bytes of the longest common prefix, on a character boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !a.is_char_boundary(n) {
        n -= 1;
    }
    n
}

/// Labels for tokens: the token's id when the token starts inside a span and at least
/// half of it lies inside, else IGNORE_INDEX. (A span's end is where two renderings part,
/// which can fall a character or two into the next turn's first special token.)
pub fn labels_from_spans(
    ids: &[u32],
    offsets: &[Range<usize>],
    spans: &[Range<usize>],
) -> Vec<i32> {
    let mut labels = vec![super::IGNORE_INDEX; ids.len()];
    let mut s = 0;
    for (k, off) in offsets.iter().enumerate() {
        while s < spans.len() && spans[s].end <= off.start {
            s += 1;
        }
        if s == spans.len() {
            break;
        }
        let span = &spans[s];
        let inside = span.end.min(off.end) - off.start;
        if span.start <= off.start && 2 * inside >= off.len() {
            labels[k] = ids[k] as i32;
        }
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::template::CHATML_TEMPLATE;

    fn m(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            extra: Default::default(),
        }
    }

    #[test]
    fn chatml_spans_cover_each_assistant_turn() {
        let t = ChatTemplate::new(CHATML_TEMPLATE, &[]).unwrap();
        let msgs = [
            m("user", "q1"),
            m("assistant", "a1"),
            m("user", "q2"),
            m("assistant", "a2"),
        ];
        let r = render_with_spans(&t, &msgs, 0, false).unwrap();
        let picked: Vec<&str> = r.spans.iter().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(picked, vec!["a1<|im_end|>\n", "a2<|im_end|>\n"]);
    }

    #[test]
    fn prefix_changing_template_uses_the_sentinel() {
        // The header depends on the whole conversation, so no partial rendering is a prefix.
        let src = "{{ messages|length }}|{% for m in messages %}{% if m.role == 'user' %}[U]{{ m.content }}\
                   {% else %}[A]{{ m.content | trim }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}[A]{% endif %}";
        let t = ChatTemplate::new(src, &[]).unwrap();
        let msgs = [
            m("user", "q1"),
            m("assistant", " a1 "),
            m("user", "q2"),
            m("assistant", "a2"),
        ];
        let r = render_with_spans(&t, &msgs, 0, false).unwrap();
        let picked: Vec<&str> = r.spans.iter().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(picked, vec!["a1</s>", "a2</s>"]);
    }

    #[test]
    fn labels_follow_token_starts() {
        let ids = [10, 11, 12, 13];
        let offsets = [0..2, 2..4, 4..6, 6..8];
        assert_eq!(
            labels_from_spans(&ids, &offsets, &[Range { start: 3, end: 6 }]),
            vec![-100, -100, 12, -100]
        );
        // A token mostly past the span's end stays unlabelled.
        assert_eq!(
            labels_from_spans(
                &ids,
                &[0..2, 2..4, 4..9, 9..10],
                &[Range { start: 2, end: 5 }]
            ),
            vec![-100, 11, -100, -100]
        );
        assert_eq!(
            labels_from_spans(&ids, &offsets, &[0..2, 6..8]),
            vec![10, -100, -100, 13]
        );
    }
}

//! One JSONL line to a [`RawRow`]: the standard (text) and conversational (message list) formats,
//! with TRL's implicit-prompt extraction (`trl/data_utils.py: extract_prompt`).

use serde_json::{Map, Value};

use crate::error::{LoaderError, Result, RowRef};

/// A chat message: a JSON object with at least a string `role` and (unless it carries
/// `tool_calls`) a string `content`; every other key is passed to the chat template as is.
pub type Message = Map<String, Value>;

/// One parsed row.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RawRow {
    /// Standard row: `{"prompt": str, "chosen": str, "rejected": str}` (the prompt may be implicit).
    Text { prompt: String, chosen: String, rejected: String },
    /// Conversational row: `chosen`/`rejected` (and an explicit `prompt`) are message lists; an
    /// implicit prompt has already been extracted. `tools` (a list, possibly given as a JSON
    /// string) and the keys of `chat_template_kwargs` are passed to the chat template.
    Conversation {
        prompt: Vec<Message>,
        chosen: Vec<Message>,
        rejected: Vec<Message>,
        tools: Option<Value>,
        template_kwargs: Map<String, Value>,
    },
}

impl RawRow {
    /// Whether the row is conversational (rendered with the chat template).
    pub fn is_conversational(&self) -> bool {
        matches!(self, RawRow::Conversation { .. })
    }
}

const FIELDS: [&str; 3] = ["prompt", "chosen", "rejected"];

/// Parses one line (without `\n`; a trailing `\r` is ignored) into a [`RawRow`].
pub fn parse_row(bytes: &[u8], at: &RowRef) -> Result<RawRow> {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes)
        .map_err(|e| LoaderError::NotUtf8 { at: at.clone(), byte: e.valid_up_to() })?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| LoaderError::MalformedJson { at: at.clone(), message: json_message(&e) })?;
    let Value::Object(mut map) = value else {
        return Err(LoaderError::NotAnObject { at: at.clone(), found: type_name(&value) });
    };
    // A field that is a list makes the row conversational; then all three must be lists.
    let is_list = |f: &str| map.get(f).is_some_and(Value::is_array);
    if let Some(messages) = FIELDS.into_iter().find(|f| is_list(f)) {
        if let Some(text) = FIELDS.into_iter().find(|f| map.get(*f).is_some_and(Value::is_string)) {
            return Err(LoaderError::MixedFormats { at: at.clone(), text, messages });
        }
        return parse_conversation(&mut map, at);
    }
    parse_text(&map, at)
}

fn parse_text(map: &Map<String, Value>, at: &RowRef) -> Result<RawRow> {
    let chosen = string_field(map, "chosen", at);
    let rejected = string_field(map, "rejected", at);
    let (prompt, chosen, rejected) = if map.contains_key("prompt") {
        let prompt = string_field(map, "prompt", at)?;
        (prompt.to_owned(), chosen?.to_owned(), rejected?.to_owned())
    } else {
        let (chosen, rejected) = (chosen?, rejected?);
        for (field, value) in [("chosen", chosen), ("rejected", rejected)] {
            if value.is_empty() {
                return Err(LoaderError::EmptyField { at: at.clone(), field });
            }
        }
        let (prompt, chosen, rejected) = extract_text_prompt(chosen, rejected);
        if prompt.is_empty() {
            return Err(LoaderError::NoSharedPrompt { at: at.clone(), unit: "character" });
        }
        (prompt.to_owned(), chosen.to_owned(), rejected.to_owned())
    };
    for (field, value) in FIELDS.into_iter().zip([&prompt, &chosen, &rejected]) {
        if value.is_empty() {
            return Err(LoaderError::EmptyField { at: at.clone(), field });
        }
    }
    if chosen == rejected {
        return Err(LoaderError::SameCompletions { at: at.clone() });
    }
    Ok(RawRow::Text { prompt, chosen, rejected })
}

fn parse_conversation(map: &mut Map<String, Value>, at: &RowRef) -> Result<RawRow> {
    let mut lists = Vec::with_capacity(3);
    for field in FIELDS {
        lists.push(match map.remove(field) {
            None if field == "prompt" => None,
            None | Some(Value::Null) => {
                return Err(LoaderError::MissingField { at: at.clone(), field });
            }
            Some(Value::Array(items)) => Some(messages(items, field, at)?),
            Some(other) => {
                return Err(LoaderError::WrongTypeAt {
                    at: at.clone(),
                    path: field.into(),
                    expected: "a message list",
                    found: type_name(&other),
                });
            }
        });
    }
    let [prompt, chosen, rejected]: [Option<Vec<Message>>; 3] = lists.try_into().expect("three fields");
    let (chosen, rejected) = (chosen.expect("required"), rejected.expect("required"));
    for (field, list) in [("chosen", &chosen), ("rejected", &rejected)] {
        if list.is_empty() {
            return Err(LoaderError::EmptyMessages { at: at.clone(), field });
        }
    }
    let implicit = prompt.is_none();
    let (prompt, chosen, rejected) = match prompt {
        Some(prompt) if prompt.is_empty() => {
            return Err(LoaderError::EmptyMessages { at: at.clone(), field: "prompt" });
        }
        Some(prompt) => (prompt, chosen, rejected),
        None => {
            let k = implicit_prompt_len(&chosen, &rejected, |_| false);
            if k == 0 {
                return Err(LoaderError::NoSharedPrompt { at: at.clone(), unit: "message" });
            }
            let mut chosen = chosen;
            let rest_chosen = chosen.split_off(k);
            let rest_rejected = rejected[k..].to_vec();
            (chosen, rest_chosen, rest_rejected)
        }
    };
    // Indices as in the file: an extracted prompt came from the front of both lists.
    let offset = if implicit { prompt.len() } else { 0 };
    for (field, list) in [("chosen", &chosen), ("rejected", &rejected)] {
        for (k, m) in list.iter().enumerate() {
            if m.get("content").and_then(Value::as_str).is_some_and(str::is_empty) {
                let path = format!("{field}[{}].content", k + offset);
                return Err(LoaderError::EmptyContent { at: at.clone(), path });
            }
        }
    }
    if chosen == rejected {
        return Err(LoaderError::SameCompletions { at: at.clone() });
    }
    let tools = match map.remove("tools") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match serde_json::from_str::<Value>(&s) {
            Ok(v @ (Value::Array(_) | Value::Null)) => Some(v).filter(|v| !v.is_null()),
            _ => {
                return Err(LoaderError::WrongTypeAt {
                    at: at.clone(),
                    path: "tools".into(),
                    expected: "a list of tools or a JSON string of one",
                    found: "a string that is not a JSON list",
                });
            }
        },
        Some(v @ Value::Array(_)) => Some(v),
        Some(other) => {
            return Err(LoaderError::WrongTypeAt {
                at: at.clone(),
                path: "tools".into(),
                expected: "a list of tools or a JSON string of one",
                found: type_name(&other),
            });
        }
    };
    let template_kwargs = match map.remove("chat_template_kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(kwargs)) => kwargs,
        Some(other) => {
            return Err(LoaderError::WrongTypeAt {
                at: at.clone(),
                path: "chat_template_kwargs".into(),
                expected: "an object",
                found: type_name(&other),
            });
        }
    };
    Ok(RawRow::Conversation { prompt, chosen, rejected, tools, template_kwargs })
}

/// Checks the items of a message list: objects with a string `role` and a string `content`
/// (`content` may be absent or null when the message has `tool_calls`).
fn messages(items: Vec<Value>, field: &'static str, at: &RowRef) -> Result<Vec<Message>> {
    items
        .into_iter()
        .enumerate()
        .map(|(k, item)| {
            let path = |key: &str| format!("{field}[{k}]{key}");
            let Value::Object(m) = item else {
                return Err(LoaderError::WrongTypeAt {
                    at: at.clone(),
                    path: path(""),
                    expected: "a message object with `role` and `content`",
                    found: type_name(&item),
                });
            };
            match m.get("role") {
                Some(Value::String(role)) if !role.is_empty() => {}
                Some(Value::String(_)) => {
                    return Err(LoaderError::EmptyContent { at: at.clone(), path: path(".role") });
                }
                None | Some(Value::Null) => {
                    return Err(LoaderError::MissingKey { at: at.clone(), path: path(".role") });
                }
                Some(other) => {
                    return Err(LoaderError::WrongTypeAt {
                        at: at.clone(),
                        path: path(".role"),
                        expected: "a string",
                        found: type_name(other),
                    });
                }
            }
            let has_tool_calls = m.get("tool_calls").is_some_and(|v| !v.is_null());
            match m.get("content") {
                Some(Value::String(_)) => {}
                None | Some(Value::Null) if has_tool_calls => {}
                None | Some(Value::Null) => {
                    return Err(LoaderError::MissingKey { at: at.clone(), path: path(".content") });
                }
                Some(other) => {
                    return Err(LoaderError::WrongTypeAt {
                        at: at.clone(),
                        path: path(".content"),
                        expected: "a string",
                        found: type_name(other),
                    });
                }
            }
            Ok(m)
        })
        .collect()
}

/// Length of TRL's implicit prompt (`extract_prompt`): the index of the first item where
/// `chosen` and `rejected` differ, moved back by one when the item before it is a space
/// (`is_space`, strings only). When neither differs within the shorter one, Python's loop
/// variable keeps its last value: `min(len) - 1`. `0` for an empty input.
fn implicit_prompt_len<T: PartialEq>(chosen: &[T], rejected: &[T], is_space: impl Fn(&T) -> bool) -> usize {
    let n = chosen.len().min(rejected.len());
    match (0..n).find(|&i| chosen[i] != rejected[i]) {
        Some(0) => 0,
        Some(i) if is_space(&chosen[i - 1]) => i - 1,
        Some(i) => i,
        None => n.saturating_sub(1),
    }
}

/// TRL's `extract_prompt` on strings (by Unicode code points, as Python indexes `str`).
fn extract_text_prompt<'a>(chosen: &'a str, rejected: &'a str) -> (&'a str, &'a str, &'a str) {
    let c: Vec<char> = chosen.chars().collect();
    let r: Vec<char> = rejected.chars().collect();
    let k = implicit_prompt_len(&c, &r, |ch| *ch == ' ');
    let byte_at = |s: &str, chars: usize| s.char_indices().nth(chars).map_or(s.len(), |(b, _)| b);
    let (kc, kr) = (byte_at(chosen, k), byte_at(rejected, k));
    (&chosen[..kc], &chosen[kc..], &rejected[kr..])
}

fn string_field<'a>(map: &'a Map<String, Value>, field: &'static str, at: &RowRef) -> Result<&'a str> {
    match map.get(field) {
        None => Err(LoaderError::MissingField { at: at.clone(), field }),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(LoaderError::WrongType { at: at.clone(), field, found: type_name(other) }),
    }
}

pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// serde's message with the position given as a column (the line is always 1 within a row).
fn json_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let msg = full.rsplit_once(" at line ").map_or(full.as_str(), |(m, _)| m);
    format!("{msg} (column {})", e.column())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use serde_json::json;

    use super::*;

    fn at() -> RowRef {
        RowRef { file: Arc::new(PathBuf::from("d.jsonl")), line: 7 }
    }

    #[test]
    fn parses_text_rows_and_ignores_cr_and_extra_fields() {
        let row = parse_row(br#"{"prompt":"p","chosen":"c","rejected":"r","id":3}"#, &at()).unwrap();
        let expected = RawRow::Text { prompt: "p".into(), chosen: "c".into(), rejected: "r".into() };
        assert_eq!(row, expected);
        let crlf = parse_row(b"{\"prompt\":\"p\",\"chosen\":\"c\",\"rejected\":\"r\"}\r", &at());
        assert_eq!(crlf.unwrap(), expected);
    }

    #[test]
    fn json_message_names_the_column_not_a_line() {
        let e = parse_row(br#"{"prompt": "p", "chosen"#, &at()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("d.jsonl:7: malformed JSON: EOF while parsing"), "{msg}");
        assert!(msg.ends_with("(column 23)") && !msg.contains("line 1"), "{msg}");
    }

    /// The examples of TRL's `extract_prompt`, and Python's loop-variable quirk.
    #[test]
    fn implicit_text_prompt_follows_trl() {
        assert_eq!(
            extract_text_prompt("The sky is blue.", "The sky is green."),
            ("The sky is", " blue.", " green.")
        );
        assert_eq!(extract_text_prompt("Answer: yes", "Answer: no"), ("Answer:", " yes", " no"));
        assert_eq!(extract_text_prompt("abc", "abcd"), ("ab", "c", "cd"));
        assert_eq!(extract_text_prompt("héé x", "héé y"), ("héé", " x", " y"));
        assert_eq!(extract_text_prompt("x", "y").0, "");
    }

    #[test]
    fn implicit_message_prompt_follows_trl() {
        let line = json!({
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        })
        .to_string();
        let RawRow::Conversation { prompt, chosen, rejected, tools, template_kwargs } =
            parse_row(line.as_bytes(), &at()).unwrap()
        else {
            panic!("not conversational")
        };
        assert_eq!(Value::from(prompt), json!([{"role": "user", "content": "q"}]));
        assert_eq!(Value::from(chosen), json!([{"role": "assistant", "content": "a"}]));
        assert_eq!(Value::from(rejected), json!([{"role": "assistant", "content": "b"}]));
        assert!(tools.is_none() && template_kwargs.is_empty());
        // One conversation extending the other: the prompt stops one message short of the shorter.
        let u = |c: &str| json!({"role": "user", "content": c});
        let a = |c: &str| json!({"role": "assistant", "content": c});
        let line = json!({"chosen": [u("q"), a("x")], "rejected": [u("q"), a("x"), u("more"), a("y")]});
        let row = parse_row(line.to_string().as_bytes(), &at()).unwrap();
        let RawRow::Conversation { prompt, rejected, .. } = row else { panic!() };
        assert_eq!((prompt.len(), rejected.len()), (1, 3));
    }

    #[test]
    fn tools_may_be_a_json_string_or_a_list() {
        let tool = json!({"type": "function", "function": {"name": "f"}});
        for tools in [json!([tool]), json!(json!([tool]).to_string())] {
            let line = json!({
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
                "tools": tools,
                "chat_template_kwargs": {"date_string": "1 Jan 2025"},
            });
            let row = parse_row(line.to_string().as_bytes(), &at()).unwrap();
            let RawRow::Conversation { tools, template_kwargs, .. } = row else { panic!() };
            assert_eq!(tools, Some(json!([tool])));
            assert_eq!(template_kwargs["date_string"], "1 Jan 2025");
        }
    }
}

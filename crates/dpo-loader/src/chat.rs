//! Chat templates rendered as transformers 5.17 renders them (`utils/chat_template_utils.py`):
//! a Jinja environment with `trim_blocks`, `lstrip_blocks`, loop controls, no auto-escaping, the
//! `raise_exception` and `strftime_now` globals and Python's `json.dumps` as `tojson`; the
//! context is `messages`, `tools`, `documents` (none), `add_generation_prompt`, the tokenizer's
//! named special tokens (`bos_token`, `eos_token`...) and the row's `chat_template_kwargs`.
//!
//! The engine is `minijinja` with Python string/dict methods (`minijinja-contrib`'s `pycompat`);
//! `trim`, `.strip()`, `.lstrip()` and `.rstrip()` use Python's definition of whitespace.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use minijinja::value::{Kwargs, Rest, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State};
use serde_json::Map;

use crate::row::Message;

/// The instruction budget of one rendering: bounds a runaway template (real ones use a few
/// hundred instructions per message).
const FUEL: u64 = 50_000_000;
const NAME: &str = "chat_template";
/// Marks the errors of the template's own `raise_exception`.
const RAISED: &str = "raise_exception: ";

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    special_tokens: BTreeMap<String, String>,
    known_roles: BTreeSet<String>,
}

impl ChatTemplate {
    /// Compiles `source`. `special_tokens` are the named special tokens (`bos_token`, ...) the
    /// template sees as variables. Errors with the compiler's message.
    pub fn new(source: &str, special_tokens: BTreeMap<String, String>) -> Result<Self, String> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| describe(&e))?;
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(python_methods);
        env.add_filter("tojson", tojson);
        env.add_filter("trim", trim_filter);
        env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, format!("{RAISED}{message}")))
        });
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_template_owned(NAME, source.to_owned()).map_err(|e| describe(&e))?;
        let known_roles = known_roles(source);
        Ok(Self { env, source: source.to_owned(), special_tokens, known_roles })
    }

    /// The template's source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Roles a message may have: `system`, `user`, `assistant`, and every short identifier-like
    /// string literal of the template (so `tool`, `ipython`... where the template handles them).
    pub fn known_roles(&self) -> &BTreeSet<String> {
        &self.known_roles
    }

    /// Whether `role` is one of [`Self::known_roles`].
    pub fn knows_role(&self, role: &str) -> bool {
        self.known_roles.contains(role)
    }

    /// Renders `messages` like `tokenizer.apply_chat_template(messages, tools=tools,
    /// add_generation_prompt=..., tokenize=False, **kwargs)`.
    pub fn render<'a>(
        &self,
        messages: impl IntoIterator<Item = &'a Message>,
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
        kwargs: &Map<String, serde_json::Value>,
    ) -> Result<String, String> {
        let messages: Vec<Value> = messages.into_iter().map(to_value).collect();
        self.render_values(Value::from(messages), add_generation_prompt, tools, kwargs)
    }

    fn render_values(
        &self,
        messages: Value,
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
        kwargs: &Map<String, serde_json::Value>,
    ) -> Result<String, String> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        for (k, v) in &self.special_tokens {
            ctx.insert(k.clone(), Value::from(v.as_str()));
        }
        for (k, v) in kwargs {
            ctx.insert(k.clone(), json_to_value(v));
        }
        ctx.insert("messages".into(), messages);
        ctx.insert("tools".into(), tools.map_or(Value::from(()), json_to_value));
        ctx.insert("documents".into(), Value::from(()));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        let template = self.env.get_template(NAME).map_err(|e| describe(&e))?;
        template.render(Value::from(ctx)).map_err(|e| describe(&e))
    }
}

fn to_value(message: &Message) -> Value {
    Value::from(minijinja::value::Serde(message))
}

fn json_to_value(value: &serde_json::Value) -> Value {
    Value::from(minijinja::value::Serde(value))
}

/// An error message: the template's own `raise_exception` text, or the engine's error with the
/// template line.
fn describe(e: &Error) -> String {
    if let Some(raised) = e.detail().and_then(|d| d.strip_prefix(RAISED)) {
        return format!("the template raised an exception: {raised}");
    }
    let mut msg = format!("{}", e.kind());
    if let Some(detail) = e.detail() {
        let _ = write!(msg, ": {detail}");
    }
    if let Some(line) = e.line() {
        let _ = write!(msg, " (template line {line})");
    }
    msg
}

/// `system`, `user`, `assistant` and the identifier-like string literals inside the template's
/// `{% %}` / `{{ }}` blocks.
fn known_roles(source: &str) -> BTreeSet<String> {
    let mut roles: BTreeSet<String> = ["system", "user", "assistant"].map(String::from).into();
    let mut rest = source;
    while let Some(open) = rest.find(['{']) {
        rest = &rest[open + 1..];
        let close = match rest.as_bytes().first() {
            Some(b'%') => "%}",
            Some(b'{') => "}}",
            _ => continue,
        };
        let end = rest.find(close).unwrap_or(rest.len());
        let block = &rest[..end];
        rest = &rest[end..];
        let bytes = block.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let quote = bytes[i];
            if quote != b'\'' && quote != b'"' {
                i += 1;
                continue;
            }
            let Some(len) = block[i + 1..].find(quote as char) else { break };
            let literal = &block[i + 1..i + 1 + len];
            if (1..=32).contains(&literal.len())
                && literal.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
            {
                roles.insert(literal.to_owned());
            }
            i += len + 2;
        }
    }
    roles
}

/// Python's `str.isspace`: Unicode White_Space plus the ASCII separators 0x1C-0x1F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn py_strip<'a>(s: &'a str, chars: Option<&str>, start: bool, end: bool) -> &'a str {
    let matches = |c: char| match chars {
        Some(set) => set.contains(c),
        None => is_py_space(c),
    };
    let s = if start { s.trim_start_matches(matches) } else { s };
    if end { s.trim_end_matches(matches) } else { s }
}

/// Jinja's `trim(value, chars=None)`: Python's `str.strip`.
fn trim_filter(value: String, chars: Option<String>) -> String {
    py_strip(&value, chars.as_deref(), true, true).to_owned()
}

/// `str.strip/lstrip/rstrip` with Python whitespace, the rest from `minijinja-contrib`.
fn python_methods(state: &mut State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let (Some(s), Some((start, end))) = (
        value.as_str(),
        match method {
            "strip" => Some((true, true)),
            "lstrip" => Some((true, false)),
            "rstrip" => Some((false, true)),
            _ => None,
        },
    ) {
        let chars = match args {
            [] => None,
            [v] if v.is_none() => None,
            [v] => Some(v.as_str().ok_or_else(|| {
                Error::new(ErrorKind::InvalidOperation, format!("{method} arg must be None or str"))
            })?),
            _ => return Err(Error::from(ErrorKind::TooManyArguments)),
        };
        return Ok(Value::from(py_strip(s, chars, start, end)));
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// which is Python's `json.dumps`.
fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    if !args.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: only keyword arguments (ensure_ascii, indent, separators, sort_keys) are supported",
        ));
    }
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_owned(),
            None => {
                let n = v.as_i64().ok_or_else(|| {
                    Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or string")
                })?;
                " ".repeat(n.clamp(0, 64) as usize)
            }
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let item = v.get_item_by_index(0)?;
            let key = v.get_item_by_index(1)?;
            match (item.as_str(), key.as_str()) {
                (Some(i), Some(k)) => (i.to_owned(), k.to_owned()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ));
                }
            }
        }
        _ => ((if indent.is_some() { "," } else { ", " }).to_owned(), ": ".to_owned()),
    };
    let opts = JsonOpts {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    dump(&mut out, value, &opts, 0)?;
    Ok(Value::from(out))
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// Nesting limit of `tojson` (Python raises RecursionError far deeper; templates never nest).
const MAX_JSON_DEPTH: usize = 128;

fn dump(out: &mut String, value: &Value, o: &JsonOpts, depth: usize) -> Result<(), Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(Error::new(ErrorKind::InvalidOperation, "tojson: value nested too deeply"));
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    };
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                let _ = write!(out, "{value}");
            } else {
                let f = f64::try_from(value.clone())?;
                out.push_str(&py_float_json(f));
            }
        }
        ValueKind::String => dump_str(out, value.as_str().unwrap_or_default(), o.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (k, item) in items.iter().enumerate() {
                if k > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                dump(out, item, o, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
                    ValueKind::None => "null".to_owned(),
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_owned(),
                    ValueKind::Number if key.is_integer() => key.to_string(),
                    ValueKind::Number => py_float_json(f64::try_from(key.clone())?),
                    other => {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            format!("tojson: keys must be str, int, float, bool or None, not {other}"),
                        ));
                    }
                };
                entries.push((key, item));
            }
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (k, (key, item)) in entries.iter().enumerate() {
                if k > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                dump_str(out, key, o.ensure_ascii);
                out.push_str(&o.key_sep);
                dump(out, item, o, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: object of type {other} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

/// A JSON string as Python's `json.dumps` writes it.
fn dump_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `float.__repr__` as `json.dumps` writes it (`NaN`, `Infinity` for the non-finite).
pub(crate) fn py_float_json(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    py_float_repr(f)
}

/// Python's `repr(float)`: shortest round-trip digits; scientific notation when the decimal
/// exponent is below -4 or at least 16.
pub(crate) fn py_float_repr(f: f64) -> String {
    let sign = if f.is_sign_negative() { "-" } else { "" };
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let point = exp as usize + 1;
            let (int, frac) = if digits.len() > point {
                (digits[..point].to_owned(), digits[point..].to_owned())
            } else {
                (format!("{digits:0<point$}"), "0".to_owned())
            };
            format!("{sign}{int}.{frac}")
        } else {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let mantissa = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// `strftime_now(format)`: the current UTC time formatted with the common `strftime` codes
/// (`%Y %y %m %d %e %H %I %M %S %p %b %B %a %A %j %%`); other codes are kept as written.
fn strftime_now(format: &str) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    strftime(format, secs)
}

fn strftime(format: &str, unix_secs: i64) -> String {
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
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let is_leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[month as usize - 1] + day + i64::from(month > 2 && is_leap(year));
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(code) = chars.next() else {
            out.push('%');
            break;
        };
        let _ = match code {
            'Y' => write!(out, "{year}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'm' => write!(out, "{month:02}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:2}"),
            'H' => write!(out, "{h:02}"),
            'I' => write!(out, "{:02}", if h % 12 == 0 { 12 } else { h % 12 }),
            'M' => write!(out, "{m:02}"),
            'S' => write!(out, "{s:02}"),
            'p' => write!(out, "{}", if h < 12 { "AM" } else { "PM" }),
            'b' => write!(out, "{}", &MONTHS[month as usize - 1][..3]),
            'B' => write!(out, "{}", MONTHS[month as usize - 1]),
            'a' => write!(out, "{}", &DAYS[weekday][..3]),
            'A' => write!(out, "{}", DAYS[weekday]),
            'j' => write!(out, "{yday:03}"),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn render(template: &str, messages: serde_json::Value) -> Result<String, String> {
        let t = ChatTemplate::new(template, BTreeMap::from([("bos_token".into(), "<s>".into())]))?;
        let messages: Vec<Message> = serde_json::from_value(messages).unwrap();
        t.render(&messages, false, None, &Map::new())
    }

    #[test]
    fn python_float_repr() {
        for (f, want) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1.5e-5, "1.5e-05"),
            (1e-4, "0.0001"),
            (123.456, "123.456"),
            (1e16, "1e+16"),
            (1.2345678901234567e17, "1.2345678901234566e+17"),
            (9999999999999998.0, "9999999999999998.0"),
            (-2.5e-7, "-2.5e-07"),
        ] {
            assert_eq!(py_float_repr(f), want, "{f}");
        }
        assert_eq!(py_float_json(f64::NEG_INFINITY), "-Infinity");
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let m = json!([{"role": "user", "content": "a\"é\u{1}\n", "n": [1, 2.5, true, null], "e": {}}]);
        let out = render("{{ messages[0] | tojson }}", m.clone()).unwrap();
        assert_eq!(out, r#"{"role": "user", "content": "a\"é\u0001\n", "n": [1, 2.5, true, null], "e": {}}"#);
        let out = render("{{ messages[0].n | tojson(indent=2) }}", m.clone()).unwrap();
        assert_eq!(out, "[\n  1,\n  2.5,\n  true,\n  null\n]");
        let out = render("{{ messages[0] | tojson(ensure_ascii=True, sort_keys=True) }}", m).unwrap();
        assert!(out.starts_with(r#"{"content": "a\"\u00e9\u0001\n", "e": {}, "n""#), "{out}");
    }

    #[test]
    fn python_whitespace_and_methods() {
        let m = json!([{"role": "user", "content": "\u{1c} hi \u{a0}\n"}]);
        assert_eq!(render("[{{ messages[0].content | trim }}]", m.clone()).unwrap(), "[hi]");
        assert_eq!(render("[{{ messages[0].content.strip() }}]", m.clone()).unwrap(), "[hi]");
        assert_eq!(render("[{{ messages[0].content.rstrip() }}]", m.clone()).unwrap(), "[\u{1c} hi]");
        assert_eq!(render("{{ 'a,b'.split(',') | join('|') }}", m.clone()).unwrap(), "a|b");
        let items = "{% for k, v in messages[0].items() %}{{ k }}={{ v | trim }};{% endfor %}";
        assert_eq!(render(items, m).unwrap(), "role=user;content=hi;");
    }

    #[test]
    fn trim_blocks_lstrip_blocks_loop_controls_and_none() {
        let t = "{% for m in messages %}\n  {% if loop.first %}{% continue %}{% endif %}\n{{ m.role }}\n{% endfor %}\n";
        let m = json!([{"role": "a", "content": ""}, {"role": "b", "content": ""}]);
        assert_eq!(render(t, m.clone()).unwrap(), "b\n");
        assert_eq!(
            render("{{ none }}|{{ True }}|{{ bos_token }}|{{ nope }}|", m).unwrap(),
            "None|True|<s>||"
        );
    }

    #[test]
    fn raise_exception_and_errors_are_messages() {
        let m = json!([{"role": "x", "content": ""}]);
        let e = render("{{ raise_exception('roles must alternate') }}", m.clone()).unwrap_err();
        assert_eq!(e, "the template raised an exception: roles must alternate");
        let e = render("{{ messages[5].role.upper() }}", m.clone()).unwrap_err();
        assert!(e.contains("template line 1"), "{e}");
        assert!(ChatTemplate::new("{% for %}", BTreeMap::new()).is_err());
        // A runaway template runs out of fuel instead of hanging.
        let e = render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", m);
        assert!(e.unwrap_err().contains("fuel"));
    }

    #[test]
    fn known_roles_are_the_template_literals() {
        let t = ChatTemplate::new(
            "{% if m.role == 'tool' %}{{ \"ipython\" }}{% endif %}'human' {{ 'a b' }}",
            BTreeMap::new(),
        )
        .unwrap();
        let roles: Vec<&str> = t.known_roles().iter().map(String::as_str).collect();
        assert_eq!(roles, ["assistant", "ipython", "system", "tool", "user"]);
    }

    #[test]
    fn strftime_formats_utc() {
        // 2024-07-26 15:05:09 UTC, a Friday.
        assert_eq!(
            strftime("%d %b %Y %H:%M:%S %A %j %%", 1_722_006_309),
            "26 Jul 2024 15:05:09 Friday 208 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
        assert_eq!(strftime("%B %e, %y", 951_782_400), "February 29, 00");
    }
}

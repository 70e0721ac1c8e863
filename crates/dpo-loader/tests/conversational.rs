//! Hostile conversational input: every bad row errors with file, line and field (path into the
//! message list), or is skipped and counted by reason; never a panic or a silently wrong batch.

use std::path::Path;
use std::sync::Arc;

use crate::common::{row, tokenizer, write, write_model};
use dpo_loader::{
    DataConfig, DataPosition, OnBadRow, PreferenceDataset, PreferenceTokenizer, RawRow, batches,
    count_batches,
};
use serde_json::{Value, json};

const QWEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/chat/qwen2");

fn qwen() -> Arc<PreferenceTokenizer> {
    Arc::new(PreferenceTokenizer::from_model_dir(QWEN).unwrap())
}

fn u(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn a(text: &str) -> Value {
    json!({"role": "assistant", "content": text})
}

fn conv(prompt: Value, chosen: Value, rejected: Value) -> String {
    json!({"prompt": prompt, "chosen": chosen, "rejected": rejected}).to_string() + "\n"
}

fn config(on_bad_row: OnBadRow) -> DataConfig {
    DataConfig { max_length: None, batch_size: 2, shuffle: false, on_bad_row, ..DataConfig::default() }
}

/// The error of reading the only row of a file holding `line` after a blank line (line 2).
fn row_error(dir: &Path, line: &[u8]) -> (dpo_loader::LoaderError, String) {
    let path = write(dir, "bad.jsonl", [b"\n".as_slice(), line, b"\n"].concat());
    let data = PreferenceDataset::open(&path).unwrap();
    let e = data.read_row(0).unwrap_err();
    let msg = e.to_string();
    let prefix = format!("{}:2: ", path.display());
    assert!(msg.starts_with(&prefix), "{msg:?} should start with {prefix:?}");
    (e, msg)
}

#[test]
fn bad_conversational_rows_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = json!([u("q")]);
    let cases: Vec<(String, &str, &str)> = vec![
        (
            conv(p.clone(), json!({"role": "assistant", "content": "x"}), json!([a("y")])),
            "field `chosen` must be a message list, found an object",
            "wrong_type",
        ),
        (
            conv(p.clone(), json!(["hi"]), json!([a("y")])),
            "field `chosen[0]` must be a message object with `role` and `content`, found a string",
            "wrong_type",
        ),
        (
            conv(p.clone(), json!([{"content": "x"}]), json!([a("y")])),
            "missing field `chosen[0].role`",
            "missing_field",
        ),
        (
            conv(p.clone(), json!([a("x")]), json!([{"role": "assistant"}])),
            "missing field `rejected[0].content`",
            "missing_field",
        ),
        (
            conv(p.clone(), json!([{"role": "assistant", "content": 5}]), json!([a("y")])),
            "field `chosen[0].content` must be a string, found a number",
            "wrong_type",
        ),
        (
            conv(json!([{"role": ["user"], "content": "q"}]), json!([a("x")]), json!([a("y")])),
            "field `prompt[0].role` must be a string, found an array",
            "wrong_type",
        ),
        (
            conv(
                json!([u("q"), {"role": "assistant", "content": [{"type": "text", "text": "t"}]}]),
                json!([a("x")]),
                json!([a("y")]),
            ),
            "field `prompt[1].content` must be a string, found an array",
            "wrong_type",
        ),
        (
            conv(p.clone(), json!([]), json!([a("y")])),
            "field `chosen` is an empty message list",
            "empty_field",
        ),
        (
            conv(json!([]), json!([a("x")]), json!([a("y")])),
            "field `prompt` is an empty message list",
            "empty_field",
        ),
        (
            conv(p.clone(), json!([a("x")]), json!([a("")])),
            "field `rejected[0].content` is an empty string",
            "empty_field",
        ),
        (
            json!({"chosen": [u("q"), a("")], "rejected": [u("q"), a("y")]}).to_string(),
            "field `chosen[1].content` is an empty string",
            "empty_field",
        ),
        (
            conv(p.clone(), json!([a("same")]), json!([a("same")])),
            "`chosen` and `rejected` are identical",
            "chosen_equals_rejected",
        ),
        (
            json!({"chosen": [u("q1"), a("x")], "rejected": [u("q2"), a("y")]}).to_string(),
            "no `prompt` field and `chosen` and `rejected` differ from their first message",
            "empty_field",
        ),
        (
            json!({"prompt": "q", "chosen": [a("x")], "rejected": [a("y")]}).to_string(),
            "field `prompt` is a string but `chosen` is a message list",
            "wrong_type",
        ),
        (json!({"prompt": p, "chosen": [a("x")]}).to_string(), "missing field `rejected`", "missing_field"),
        (
            json!({"prompt": p, "chosen": [a("x")], "rejected": [a("y")], "tools": 5}).to_string(),
            "field `tools` must be a list of tools or a JSON string of one, found a number",
            "wrong_type",
        ),
        (
            json!({"prompt": p, "chosen": [a("x")], "rejected": [a("y")], "tools": "not json"}).to_string(),
            "field `tools` must be a list of tools or a JSON string of one",
            "wrong_type",
        ),
        (
            json!({"prompt": p, "chosen": [a("x")], "rejected": [a("y")], "chat_template_kwargs": []})
                .to_string(),
            "field `chat_template_kwargs` must be an object, found an array",
            "wrong_type",
        ),
        (
            r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assis"#.into(),
            "malformed JSON: EOF while parsing",
            "malformed_json",
        ),
    ];
    for (line, expected, reason) in cases {
        let (e, msg) = row_error(dir.path(), line.trim_end().as_bytes());
        assert!(msg.contains(expected), "{msg:?} should contain {expected:?}");
        assert_eq!(e.skip_reason(), Some(reason), "{msg}");
    }
    // Invalid UTF-8 inside a message.
    let (e, msg) = row_error(dir.path(), b"{\"prompt\": [{\"role\": \"user\", \"content\": \"\xc3\x28\"}]}");
    assert!(msg.contains("not valid UTF-8 (invalid bytes at byte 41"), "{msg}");
    assert_eq!(e.skip_reason(), Some("not_utf8"));
}

#[test]
fn a_role_the_template_does_not_know_is_an_error_or_a_counted_skip() {
    let dir = tempfile::tempdir().unwrap();
    let tok = qwen();
    let human = conv(json!([{"role": "human", "content": "q"}]), json!([a("x")]), json!([a("y")]));
    // `tool` appears in Qwen2.5's template, so it is known.
    let tool = conv(
        json!([u("q"), {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
               {"role": "tool", "content": "42"}]),
        json!([a("x")]),
        json!([a("y")]),
    );
    let body = conv(json!([u("q")]), json!([a("x")]), json!([a("y")])) + &human + &tool;
    let path = write(dir.path(), "roles.jsonl", body);
    let data = Arc::new(PreferenceDataset::open(&path).unwrap());
    let e = tok.tokenize_row(&data.read_row(1).unwrap(), data.source(1)).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!(
            "{}:2: field `prompt[0].role` has role \"human\", which the chat template does not know (known: ",
            path.display()
        )),
        "{msg}"
    );
    assert!(msg.contains("tool") && msg.contains("user"), "{msg}");
    assert_eq!(e.skip_reason(), Some("unknown_role"));
    assert!(tok.tokenize_row(&data.read_row(2).unwrap(), data.source(2)).is_ok());

    let stats = count_batches(&data, &tok, &config(OnBadRow::Skip)).unwrap();
    assert_eq!((stats.pairs, stats.skips.get("unknown_role"), stats.skips.total()), (2, 1, 1));
    let mut iter =
        batches(data.clone(), tok.clone(), config(OnBadRow::Skip), DataPosition::default()).unwrap();
    let lines: Vec<u64> = iter.by_ref().flat_map(|b| b.unwrap().sources).map(|s| s.line).collect();
    assert_eq!(lines, [1, 3]);
    assert_eq!(iter.skips(), &stats.skips);
    let msg = count_batches(&data, &tok, &config(OnBadRow::Error)).unwrap_err().to_string();
    assert!(msg.contains("roles.jsonl:2: field `prompt[0].role` has role \"human\""), "{msg}");
}

#[test]
fn conversational_rows_need_a_chat_template_even_in_skip_mode() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path()); // its tokenizer_config.json has no chat_template
    assert!(tok.chat_template().unwrap_err().contains("the model has no chat template"));
    let body = row("Hello", " world", " there") + &conv(json!([u("q")]), json!([a("x")]), json!([a("y")]));
    let data = Arc::new(PreferenceDataset::open(write(dir.path(), "c.jsonl", body)).unwrap());
    let mut iter = batches(data, tok, config(OnBadRow::Skip), DataPosition::default()).unwrap();
    let msg = iter.next().unwrap().unwrap_err().to_string();
    assert!(msg.contains("c.jsonl:2: conversational row, but the model has no chat template"), "{msg}");
}

#[test]
fn a_chat_template_that_does_not_compile_is_reported_when_used() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    write_model(&model, json!({"eos_token": "<eos>", "chat_template": "{% for m in messages %}"}));
    let tok = PreferenceTokenizer::from_model_dir(&model).unwrap();
    let problem = tok.chat_template().unwrap_err();
    assert!(problem.contains("cannot be compiled"), "{problem}");
    // A chat_template.jinja file takes precedence over the config's template.
    std::fs::write(model.join("chat_template.jinja"), "{% for m in messages %}{{ m.content }}{% endfor %}")
        .unwrap();
    let tok = PreferenceTokenizer::from_model_dir(&model).unwrap();
    let row = RawRow::Conversation {
        prompt: vec![serde_json::from_value(u("q")).unwrap()],
        chosen: vec![serde_json::from_value(a("x")).unwrap()],
        rejected: vec![serde_json::from_value(a("y")).unwrap()],
        tools: None,
        template_kwargs: Default::default(),
    };
    let at = dpo_loader::RowRef { file: Arc::new("x".into()), line: 1 };
    assert_eq!(tok.render_row(&row, &at).unwrap().prompt_chosen, "qx");
}

#[test]
fn conversational_prompt_filling_max_length_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let tok = qwen();
    let long = "word ".repeat(200);
    let body = conv(json!([u("q")]), json!([a("x")]), json!([a("y")]))
        + &conv(json!([u(&long)]), json!([a("x")]), json!([a("y")]));
    let data = Arc::new(PreferenceDataset::open(write(dir.path(), "long.jsonl", body)).unwrap());
    // Qwen2.5's template adds a default system message: ~80 tokens of this tiny tokenizer.
    let cfg = DataConfig { max_length: Some(256), ..config(OnBadRow::Error) };
    let stats = count_batches(&data, &tok, &cfg).unwrap();
    assert_eq!((stats.pairs, stats.skips.get("prompt_too_long")), (1, 1));
    let got: Vec<_> = batches(data, tok, cfg, DataPosition::default()).unwrap().map(Result::unwrap).collect();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].sources[0].line, 1);
    assert!(got[0].seq_len <= 256);
}

#[test]
fn conversational_files_with_bom_crlf_blank_lines_and_a_truncated_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let tok = qwen();
    let good = conv(json!([u("q")]), json!([a("x")]), json!([a("y")]));
    let body = format!(
        "\u{feff}{}\r\n\r\n  \r\n{}\r\n{{\"prompt\": [{{\"role\": \"user\"",
        good.trim_end(),
        good.trim_end()
    );
    let path = write(dir.path(), "crlf.jsonl", body);
    let data = Arc::new(PreferenceDataset::open(&path).unwrap());
    assert_eq!((0..3).map(|i| data.source(i).line).collect::<Vec<_>>(), [1, 4, 5]);
    let plain = tok.tokenize_row(&data.read_row(0).unwrap(), data.source(0)).unwrap();
    assert_eq!(
        tok.tokenize_row(&data.read_row(1).unwrap(), data.source(1)).unwrap().chosen_ids,
        plain.chosen_ids
    );
    let mut iter =
        batches(data.clone(), tok.clone(), config(OnBadRow::Skip), DataPosition::default()).unwrap();
    assert_eq!(iter.by_ref().map(|b| b.unwrap().n_pairs).sum::<usize>(), 2);
    assert_eq!(iter.skips().get("malformed_json"), 1);
    let msg = count_batches(&data, &tok, &config(OnBadRow::Error)).unwrap_err().to_string();
    assert!(msg.contains("crlf.jsonl:5: malformed JSON: EOF while parsing"), "{msg}");
}

#[test]
fn a_ten_megabyte_line_is_read_and_dropped_or_truncated_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let huge = "Hello world ".repeat(10 * 1024 * 1024 / 12);
    let body =
        row("Hello", " world", " there") + &row(&huge, " good", " bad") + &row("Hello", " good", " bad");
    assert!(body.len() > 10 * 1024 * 1024);
    let data = Arc::new(PreferenceDataset::open(write(dir.path(), "huge.jsonl", &body)).unwrap());
    assert_eq!(data.len(), 3);
    let cfg = DataConfig { max_length: Some(16), ..config(OnBadRow::Error) };
    let stats = count_batches(&data, &tok, &cfg).unwrap();
    assert_eq!((stats.pairs, stats.skips.get("prompt_too_long")), (2, 1));
    // A huge completion is kept and truncated to max_length.
    let body = row("Hello", &huge, " bad");
    let data = Arc::new(PreferenceDataset::open(write(dir.path(), "huge2.jsonl", &body)).unwrap());
    let b = batches(data, tok, cfg, DataPosition::default()).unwrap().next().unwrap().unwrap();
    assert_eq!(b.seq_len, 16);
    // The same line in a conversational row.
    let tok = qwen();
    let body = conv(json!([u("q")]), json!([a(&huge)]), json!([a("y")]));
    let data = Arc::new(PreferenceDataset::open(write(dir.path(), "huge3.jsonl", &body)).unwrap());
    let cfg = DataConfig { max_length: Some(256), ..config(OnBadRow::Error) };
    let b = batches(data, tok, cfg, DataPosition::default()).unwrap().next().unwrap().unwrap();
    assert_eq!((b.n_pairs, b.seq_len), (1, 256));
}

//! JSONL reading: every bad input errors with file, line and field, or is skipped and counted.

use std::path::Path;
use std::sync::Arc;

use crate::common::{row, tokenizer, write};
use dpo_loader::{
    DataConfig, DataPosition, LoaderError, OnBadRow, PreferenceDataset, RawRow, batches, count_batches,
};

fn text(prompt: &str, chosen: &str, rejected: &str) -> RawRow {
    RawRow::Text { prompt: prompt.into(), chosen: chosen.into(), rejected: rejected.into() }
}

/// The error of reading the only row of a file holding `line` after two blank lines (line 3).
fn row_error(dir: &Path, line: &[u8]) -> (LoaderError, String) {
    let path = write(dir, "bad.jsonl", [b"\n  \n".as_slice(), line, b"\n"].concat());
    let data = PreferenceDataset::open(&path).unwrap();
    assert_eq!(data.len(), 1);
    let e = data.read_row(0).unwrap_err();
    let msg = e.to_string();
    let prefix = format!("{}:3: ", path.display());
    assert!(msg.starts_with(&prefix), "{msg:?} should start with {prefix:?}");
    (e, msg)
}

#[test]
fn bad_rows_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: &[(&[u8], &str, Option<&str>)] = &[
        (
            br#"{"prompt": "a", "chosen": "b""#,
            "malformed JSON: EOF while parsing an object",
            Some("malformed_json"),
        ),
        (br#"{"prompt": "a" "chosen": "b"}"#, "malformed JSON: expected `,` or `}`", Some("malformed_json")),
        (
            b"{\"prompt\": \"\xff\xfe\", \"chosen\": \"b\", \"rejected\": \"c\"}",
            "not valid UTF-8 (invalid bytes at byte 12",
            Some("not_utf8"),
        ),
        (br#"["a", "b"]"#, "a row must be a JSON object, found an array", Some("wrong_type")),
        (br#"{"prompt": "a", "chosen": "b"}"#, "missing field `rejected`", Some("missing_field")),
        (
            br#"{"chosen": "b", "rejected": "c"}"#,
            "no `prompt` field and `chosen` and `rejected` differ from their first character",
            Some("empty_field"),
        ),
        (
            br#"{"prompt": "a", "chosen": 3, "rejected": "c"}"#,
            "field `chosen` must be a string, found a number",
            Some("wrong_type"),
        ),
        (
            br#"{"prompt": null, "chosen": "b", "rejected": "c"}"#,
            "field `prompt` must be a string, found null",
            Some("wrong_type"),
        ),
        (
            br#"{"prompt": "a", "chosen": "b", "rejected": {"x": 1}}"#,
            "field `rejected` must be a string, found an object",
            Some("wrong_type"),
        ),
        (
            br#"{"prompt": "", "chosen": "b", "rejected": "c"}"#,
            "field `prompt` is an empty string, which makes a useless training pair",
            Some("empty_field"),
        ),
        (
            br#"{"prompt": "a", "chosen": "", "rejected": "c"}"#,
            "field `chosen` is an empty string",
            Some("empty_field"),
        ),
        (
            br#"{"prompt": "a", "chosen": "b", "rejected": "b"}"#,
            "`chosen` and `rejected` are identical, a degenerate pair",
            Some("chosen_equals_rejected"),
        ),
        (
            br#"{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}"#,
            "field `chosen` is a string but `prompt` is a message list",
            Some("wrong_type"),
        ),
    ];
    for &(line, expected, reason) in cases {
        let (e, msg) = row_error(d, line);
        assert!(msg.contains(expected), "{msg:?} should contain {expected:?}");
        assert_eq!(e.skip_reason(), reason, "{msg}");
    }
}

#[test]
fn truncated_last_line_is_a_malformed_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "cut.jsonl", row("a", "b", "c") + r#"{"prompt": "a", "cho"#);
    let data = PreferenceDataset::open(&path).unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data.read_row(0).unwrap(), text("a", "b", "c"));
    let msg = data.read_row(1).unwrap_err().to_string();
    assert!(msg.starts_with(&format!("{}:2: malformed JSON: EOF while parsing", path.display())), "{msg}");
}

#[test]
fn bom_crlf_and_blank_lines_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let body = "\u{feff}{\"prompt\":\"p1\",\"chosen\":\"c\",\"rejected\":\"r\"}\r\n\r\n   \r\n\
                {\"prompt\":\"p2\",\"chosen\":\"c\\r\",\"rejected\":\"r\"}\r\n\
                {\"prompt\":\"p3\",\"chosen\":\"c\",\"rejected\":\"r\"}";
    let data = PreferenceDataset::open(write(dir.path(), "crlf.jsonl", body)).unwrap();
    assert_eq!(data.len(), 3);
    let lines: Vec<u64> = (0..3).map(|i| data.source(i).line).collect();
    assert_eq!(lines, [1, 4, 5]);
    assert_eq!(data.read_row(0).unwrap(), text("p1", "c", "r"));
    // A `\r` escaped inside a string is data, not a line end.
    assert_eq!(data.read_row(1).unwrap(), text("p2", "c\r", "r"));
    assert_eq!(data.read_row(2).unwrap(), text("p3", "c", "r"));
}

#[test]
fn empty_blank_and_missing_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, body, expected) in [
        ("empty.jsonl", "", "the data file is empty"),
        ("bom.jsonl", "\u{feff}", "the data file is empty"),
        ("blank.jsonl", "\n\n  \r\n\t\n", "the data file has only blank lines, no rows"),
    ] {
        let path = write(d, name, body);
        let e = PreferenceDataset::open(&path).unwrap_err();
        assert_eq!(e.to_string(), format!("{}: {expected}", path.display()));
    }
    let missing = d.join("nope.jsonl");
    let msg = PreferenceDataset::open(&missing).unwrap_err().to_string();
    assert!(msg.starts_with(&format!("{}: I/O error:", missing.display())), "{msg}");
}

/// A file with good rows (lines 1, 4, 8) around one bad row of each skippable kind.
fn mixed(dir: &Path) -> Arc<PreferenceDataset> {
    let lines: [Vec<u8>; 9] = [
        row("Hello", " world", " there").into_bytes(),
        b"{\"prompt\": \"a\", \"chosen\": \"b\"\n".to_vec(),
        b"{\"prompt\": \"\xff\"}\n".to_vec(),
        row("Q1", " good", " bad").into_bytes(),
        b"{\"prompt\": \"a\", \"chosen\": \"b\"}\n".to_vec(),
        b"{\"prompt\": \"a\", \"chosen\": 1, \"rejected\": \"c\"}\n".to_vec(),
        row("a", "", "c").into_bytes(),
        row("Q2", " good", " bad").into_bytes(),
        row("a", "same", "same").into_bytes(),
    ];
    Arc::new(PreferenceDataset::open(write(dir, "mixed.jsonl", lines.concat())).unwrap())
}

fn config(on_bad_row: OnBadRow) -> DataConfig {
    DataConfig { max_length: None, batch_size: 2, shuffle: false, on_bad_row, ..DataConfig::default() }
}

#[test]
fn skip_mode_skips_and_counts_each_bad_row() {
    let dir = tempfile::tempdir().unwrap();
    let (data, tok) = (mixed(dir.path()), tokenizer(dir.path()));
    let cfg = config(OnBadRow::Skip);
    let mut iter = batches(data.clone(), tok.clone(), cfg.clone(), DataPosition::default()).unwrap();
    let lines: Vec<Vec<u64>> =
        iter.by_ref().map(|b| b.unwrap().sources.iter().map(|s| s.line).collect()).collect();
    assert_eq!(lines, [vec![1, 4], vec![8]]);
    let expected = [
        ("malformed_json", 1),
        ("not_utf8", 1),
        ("missing_field", 1),
        ("wrong_type", 1),
        ("empty_field", 1),
        ("chosen_equals_rejected", 1),
    ];
    let got: Vec<(&str, u64)> = iter.skips().0.iter().map(|(k, &v)| (k.as_str(), v)).collect();
    let mut want = expected.to_vec();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(iter.position(), DataPosition::at(0, 9));
    let stats = count_batches(&data, &tok, &cfg).unwrap();
    assert_eq!((stats.rows, stats.pairs, stats.batches), (9, 3, 2));
    assert_eq!(&stats.skips, iter.skips());
    assert_eq!(stats.skips.to_string().matches('=').count(), 6);
}

#[test]
fn error_mode_stops_at_the_first_bad_row() {
    let dir = tempfile::tempdir().unwrap();
    let (data, tok) = (mixed(dir.path()), tokenizer(dir.path()));
    let cfg = config(OnBadRow::Error);
    let mut iter = batches(data.clone(), tok.clone(), cfg.clone(), DataPosition::default()).unwrap();
    let msg = iter.next().unwrap().unwrap_err().to_string();
    assert!(msg.contains("mixed.jsonl:2: malformed JSON"), "{msg}");
    assert!(iter.next().is_none(), "iteration ends after an error");
    assert_eq!(iter.position().cursor, 1, "positioned at the bad row");
    let msg = count_batches(&data, &tok, &cfg).unwrap_err().to_string();
    assert!(msg.contains("mixed.jsonl:2: malformed JSON"), "{msg}");
}

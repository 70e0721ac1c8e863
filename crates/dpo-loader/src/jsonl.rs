//! Streaming access to a JSONL preference file: a byte-offset index of its rows and row parsing.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

use crate::error::{LoaderError, Result, RowRef};

/// Size of the buffer the index is built with; the file is never held in memory whole.
const CHUNK_SIZE: usize = 64 * 1024;
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One parsed row.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RawRow {
    /// Plain-text row: `{"prompt": str, "chosen": str, "rejected": str}`.
    Text { prompt: String, chosen: String, rejected: String },
}

/// Byte range `[start, end)` of a non-blank line (without its `\n`) and its 1-based number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LineSpan {
    start: u64,
    end: u64,
    line: u64,
}

/// A JSONL preference file opened for streaming: an index of its rows, read one at a time.
#[derive(Debug)]
pub struct PreferenceDataset {
    path: Arc<PathBuf>,
    rows: Vec<LineSpan>,
    file: Mutex<File>,
}

impl PreferenceDataset {
    /// Opens `path` and indexes its non-blank lines in one chunked pass.
    ///
    /// Errors when the file cannot be read, is empty, or has only blank lines.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io_err = |source| LoaderError::Io { file: path.clone(), source };
        let mut file = File::open(&path).map_err(io_err)?;
        let (rows, content_bytes) = index_lines(&mut file, CHUNK_SIZE).map_err(io_err)?;
        if content_bytes == 0 {
            return Err(LoaderError::EmptyFile { file: path });
        }
        if rows.is_empty() {
            return Err(LoaderError::BlankFile { file: path });
        }
        tracing::debug!(file = %path.display(), rows = rows.len(), "indexed preference data");
        Ok(Self { path: Arc::new(path), rows, file: Mutex::new(file) })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of rows (non-blank lines).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Always false for an opened dataset (an empty file is an error); here for completeness.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Where row `i` comes from. Panics if `i >= len()`.
    pub fn source(&self, i: usize) -> RowRef {
        RowRef { file: Arc::clone(&self.path), line: self.rows[i].line }
    }

    /// Reads and parses row `i` (seek + read of that line only). Panics if `i >= len()`.
    pub fn read_row(&self, i: usize) -> Result<RawRow> {
        let span = self.rows[i];
        let mut bytes = vec![0; (span.end - span.start) as usize];
        {
            // A poisoned lock only means another reader panicked; the file handle is still fine.
            let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
            file.seek(SeekFrom::Start(span.start))
                .and_then(|_| file.read_exact(&mut bytes))
                .map_err(|source| LoaderError::Io { file: self.path.to_path_buf(), source })?;
        }
        parse_row(&bytes, &self.source(i))
    }
}

/// Incremental line indexer fed with chunks.
struct Indexer {
    pos: u64,
    line_start: u64,
    line: u64,
    has_content: bool,
    rows: Vec<LineSpan>,
}

impl Indexer {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.end_line(self.pos);
                self.line_start = self.pos + 1;
                self.line += 1;
            } else if !b.is_ascii_whitespace() {
                self.has_content = true;
            }
            self.pos += 1;
        }
    }

    fn end_line(&mut self, end: u64) {
        if self.has_content {
            self.rows.push(LineSpan { start: self.line_start, end, line: self.line });
        }
        self.has_content = false;
    }
}

/// Indexes the non-blank lines of `reader`, reading at most `chunk_size` bytes at a time.
/// Returns the lines and the number of bytes after an optional UTF-8 BOM.
fn index_lines(reader: &mut impl Read, chunk_size: usize) -> io::Result<(Vec<LineSpan>, u64)> {
    let mut buf = vec![0; chunk_size.max(BOM.len())];
    // Read the first bytes fully to recognise a BOM even from a reader giving short reads.
    let mut head = 0;
    while head < BOM.len() {
        match reader.read(&mut buf[head..BOM.len()]) {
            Ok(0) => break,
            Ok(n) => head += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let skip = if buf[..head] == *BOM { BOM.len() } else { 0 };
    let mut ix =
        Indexer { pos: skip as u64, line_start: skip as u64, line: 1, has_content: false, rows: Vec::new() };
    ix.feed(&buf[skip..head]);
    loop {
        match reader.read(&mut buf[..chunk_size.max(1)]) {
            Ok(0) => break,
            Ok(n) => ix.feed(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    ix.end_line(ix.pos);
    Ok((ix.rows, ix.pos - skip as u64))
}

/// Parses one line (without `\n`; a trailing `\r` is ignored) into a [`RawRow`].
fn parse_row(bytes: &[u8], at: &RowRef) -> Result<RawRow> {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes)
        .map_err(|e| LoaderError::NotUtf8 { at: at.clone(), byte: e.valid_up_to() })?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| LoaderError::MalformedJson { at: at.clone(), message: json_message(&e) })?;
    let Value::Object(map) = value else {
        return Err(LoaderError::NotAnObject { at: at.clone(), found: type_name(&value) });
    };
    const FIELDS: [&str; 3] = ["prompt", "chosen", "rejected"];
    if let Some(field) = FIELDS.into_iter().find(|f| map.get(*f).is_some_and(Value::is_array)) {
        return Err(LoaderError::Conversational { at: at.clone(), field });
    }
    let [prompt, chosen, rejected] = FIELDS.map(|field| string_field(&map, field, at));
    let (prompt, chosen, rejected) = (prompt?, chosen?, rejected?);
    for (field, value) in FIELDS.into_iter().zip([prompt, chosen, rejected]) {
        if value.is_empty() {
            return Err(LoaderError::EmptyField { at: at.clone(), field });
        }
    }
    if chosen == rejected {
        return Err(LoaderError::SameCompletions { at: at.clone() });
    }
    Ok(RawRow::Text { prompt: prompt.to_owned(), chosen: chosen.to_owned(), rejected: rejected.to_owned() })
}

fn string_field<'a>(map: &'a Map<String, Value>, field: &'static str, at: &RowRef) -> Result<&'a str> {
    match map.get(field) {
        None => Err(LoaderError::MissingField { at: at.clone(), field }),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(LoaderError::WrongType { at: at.clone(), field, found: type_name(other) }),
    }
}

fn type_name(value: &Value) -> &'static str {
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
    use super::*;

    /// A reader that fails the test if asked for more than `max` bytes at once.
    struct ChunkChecked<'a> {
        data: &'a [u8],
        max: usize,
        reads: usize,
    }

    impl Read for ChunkChecked<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            assert!(buf.len() <= self.max, "read of {} bytes > chunk {}", buf.len(), self.max);
            self.reads += 1;
            let n = buf.len().min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn spans(data: &[u8], chunk: usize) -> (Vec<(u64, u64, u64)>, u64, usize) {
        let mut r = ChunkChecked { data, max: chunk.max(BOM.len()), reads: 0 };
        let (rows, n) = index_lines(&mut r, chunk).unwrap();
        let rows = rows.iter().map(|s| (s.start, s.end, s.line)).collect();
        (rows, n, r.reads)
    }

    #[test]
    fn index_is_built_from_small_chunks_and_is_chunk_size_independent() {
        let data = b"{\"a\":1}\n\n  \r\n{\"b\":2}\r\n{\"c\":3}";
        let (whole, n, _) = spans(data, 1 << 16);
        assert_eq!(whole, vec![(0, 7, 1), (13, 21, 4), (22, 29, 5)]);
        assert_eq!(n, data.len() as u64);
        for chunk in [1, 2, 3, 5, 7] {
            let (rows, n2, reads) = spans(data, chunk);
            assert_eq!(rows, whole, "chunk {chunk}");
            assert_eq!(n2, n);
            assert!(reads >= data.len() / chunk.max(3), "chunk {chunk}: only {reads} reads");
        }
    }

    #[test]
    fn index_skips_bom_and_counts_blank_files() {
        let (rows, n, _) = spans(b"\xEF\xBB\xBF{}\n", 2);
        assert_eq!(rows, vec![(3, 5, 1)]);
        assert_eq!(n, 3);
        assert_eq!(spans(b"\xEF\xBB\xBF", 4).1, 0);
        let (rows, n, _) = spans(b"\n \n\t\r\n", 4);
        assert!(rows.is_empty());
        assert_eq!(n, 6);
        // A BOM not at the very start is content.
        assert_eq!(spans(b"\n\xEF\xBB\xBF", 4).0, vec![(1, 4, 2)]);
    }

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
}

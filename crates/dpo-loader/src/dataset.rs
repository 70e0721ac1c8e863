//! Preference data on disk: one JSONL file, a folder of them or a glob pattern (shards), each
//! plain, gzip or zstd compressed (or Parquet, with the `parquet` feature). Plain shards are
//! indexed by the byte offset of each row and read a row at a time; compressed shards can only be
//! read from the start, and are counted (not held) at open. Memory use is independent of the
//! data's size apart from 8 bytes per row of a plain shard's index.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{LoaderError, Result, RowRef};
use crate::row::{RawRow, parse_row};

/// The longest line accepted as a row (64 MiB); a longer one is a `row_too_long` bad row.
pub const MAX_ROW_BYTES: usize = 64 << 20;
/// Size of the read buffer when scanning or streaming a file.
const CHUNK_SIZE: usize = 256 * 1024;
const BOM: &[u8] = b"\xEF\xBB\xBF";
/// File names a folder's data shards end with.
const DATA_SUFFIXES: [&str; 10] = [
    ".parquet",
    ".jsonl",
    ".jsonl.gz",
    ".jsonl.zst",
    ".json",
    ".json.gz",
    ".json.zst",
    ".ndjson",
    ".ndjson.gz",
    ".ndjson.zst",
];

/// How a shard is stored, recognised by its first bytes (not its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    /// A Parquet file (read with the `parquet` feature): each row becomes a JSON object of its
    /// columns, and its "line" is its 1-based row number.
    Parquet,
}

/// A line's bytes (without `\n`), or `Err(length so far)` for a line over [`MAX_ROW_BYTES`].
pub(crate) type LineBytes = std::result::Result<Vec<u8>, usize>;

/// Line numbers of a shard's rows: `line(row) = row + 1 + extra`, where `extra` (blank lines
/// before the row) changes only after blank lines, so only the changes are stored.
#[derive(Debug, Default)]
struct LineMap {
    /// `(first row, extra)` at each change of `extra`.
    jumps: Vec<(usize, u64)>,
}

impl LineMap {
    fn push(&mut self, row: usize, line: u64) {
        let extra = line - row as u64 - 1;
        if self.jumps.last().map_or(extra != 0, |&(_, e)| e != extra) {
            self.jumps.push((row, extra));
        }
    }

    fn line(&self, row: usize) -> u64 {
        let k = self.jumps.partition_point(|&(r, _)| r <= row);
        row as u64 + 1 + if k == 0 { 0 } else { self.jumps[k - 1].1 }
    }
}

/// One data file.
#[derive(Debug)]
struct Shard {
    path: Arc<PathBuf>,
    compression: Compression,
    /// Global index of its first row.
    first_row: usize,
    rows: usize,
    /// Plain shards: byte offset of each row's line.
    starts: Vec<u64>,
    lines: LineMap,
    /// Plain shards: the open file, read with positioned reads.
    file: Option<File>,
    /// Compressed shards: a reader positioned before local row `.0`, for [`PreferenceDataset::read_raw`].
    cursor: Mutex<Option<(usize, LineReader)>>,
}

/// Preference data opened for streaming: rows numbered across its shards.
#[derive(Debug)]
pub struct PreferenceDataset {
    path: PathBuf,
    shards: Vec<Shard>,
    len: usize,
}

impl PreferenceDataset {
    /// Opens `path`: a JSONL file (plain, `.gz` or `.zst`, recognised by content) or Parquet
    /// file, a folder (its files ending in `.jsonl`, `.json`, `.ndjson`, optionally followed by
    /// `.gz`/`.zst`, or `.parquet`, in name order) or a glob pattern (`data/train-*.jsonl.zst`,
    /// matches in name order). Each shard is scanned once in chunks: plain ones are indexed,
    /// compressed ones counted (Parquet ones read their row count from the footer).
    ///
    /// Errors when a file cannot be read, is empty or has only blank lines, or when a folder or
    /// pattern names no file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut shards = Vec::new();
        let mut len = 0;
        for file in discover(&path)? {
            let shard = open_shard(file, len)?;
            len += shard.rows;
            shards.push(shard);
        }
        tracing::debug!(path = %path.display(), shards = shards.len(), rows = len, "opened preference data");
        Ok(Self { path, shards, len })
    }

    /// The path it was opened with (a file, folder or pattern).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shard files, in row order.
    pub fn shard_paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// Number of shards.
    pub fn n_shards(&self) -> usize {
        self.shards.len()
    }

    /// Number of rows (non-blank lines) in all shards.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false for an opened dataset (an empty file is an error); here for completeness.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether every shard is uncompressed, so rows can be read in any order (a full shuffle);
    /// otherwise rows are streamed shard by shard (through a shuffle buffer when shuffling).
    pub fn random_access(&self) -> bool {
        self.shards.iter().all(|s| s.compression == Compression::None)
    }

    /// Where row `i` comes from. Panics if `i >= len()`.
    pub fn source(&self, i: usize) -> RowRef {
        let (shard, local) = self.locate(i);
        RowRef { file: Arc::clone(&shard.path), line: shard.lines.line(local) }
    }

    /// Reads and parses row `i`. Panics if `i >= len()`. For a compressed shard this reads on
    /// from the previous call's row, or from the start of the shard if `i` is before it.
    pub fn read_row(&self, i: usize) -> Result<RawRow> {
        parse_row(&self.read_raw(i)?, &self.source(i))
    }

    /// The bytes of row `i`'s line (without `\n`). Panics if `i >= len()`.
    pub fn read_raw(&self, i: usize) -> Result<Vec<u8>> {
        let (shard, local) = self.locate(i);
        let line = match &shard.file {
            Some(file) => read_line_at(file, shard.starts[local]).map_err(|e| io_error(&shard.path, e))?,
            None => {
                // A poisoned lock only means another reader panicked; the reader is rebuilt.
                let mut cursor = shard.cursor.lock().unwrap_or_else(|e| e.into_inner());
                if cursor.as_ref().is_none_or(|(next, _)| *next > local) {
                    *cursor = Some((0, LineReader::open(&shard.path, shard.compression)?));
                }
                let (next, reader) = cursor.as_mut().expect("just set");
                loop {
                    let Some((_, line)) = reader.next_line()? else {
                        return Err(LoaderError::Corrupt {
                            file: shard.path.to_path_buf(),
                            after_line: reader.line,
                            source: io::Error::new(io::ErrorKind::UnexpectedEof, "fewer rows than at open"),
                        });
                    };
                    *next += 1;
                    if *next > local {
                        break line;
                    }
                }
            }
        };
        line.map_err(|_| LoaderError::RowTooLong { at: self.source(i), limit: MAX_ROW_BYTES })
    }

    fn locate(&self, i: usize) -> (&Shard, usize) {
        assert!(i < self.len, "row {i} out of range ({} rows)", self.len);
        let k = self.shards.partition_point(|s| s.first_row <= i) - 1;
        let shard = &self.shards[k];
        (shard, i - shard.first_row)
    }

    /// Reads shard `k` from its start: `(global row index, line bytes)` for each row in order.
    pub(crate) fn stream_shard(&self, k: usize) -> Result<ShardStream> {
        let shard = &self.shards[k];
        Ok(ShardStream {
            reader: LineReader::open(&shard.path, shard.compression)?,
            next_row: shard.first_row,
            end_row: shard.first_row + shard.rows,
        })
    }
}

/// The rows of one shard, read sequentially.
#[derive(Debug)]
pub(crate) struct ShardStream {
    reader: LineReader,
    next_row: usize,
    end_row: usize,
}

impl ShardStream {
    /// The next row: its global index and bytes; `None` at the end of the shard.
    pub(crate) fn next_row(&mut self) -> Result<Option<(usize, LineBytes)>> {
        if self.next_row == self.end_row {
            return Ok(None);
        }
        match self.reader.next_line()? {
            Some((_, line)) => {
                self.next_row += 1;
                Ok(Some((self.next_row - 1, line)))
            }
            None => Err(LoaderError::Corrupt {
                file: self.reader.path.to_path_buf(),
                after_line: self.reader.line,
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file has fewer rows than when opened",
                ),
            }),
        }
    }
}

fn io_error(path: &Path, source: io::Error) -> LoaderError {
    LoaderError::Io { file: path.to_path_buf(), source }
}

/// The shard files of `path`: itself if a file, a folder's data files, or a glob's matches.
fn discover(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| io_error(path, e))?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error(path, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let p = entry.path();
            if !name.starts_with('.') && DATA_SUFFIXES.iter().any(|s| name.ends_with(s)) && p.is_file() {
                files.push(p);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(LoaderError::NoShards {
                path: path.to_path_buf(),
                problem: format!(
                    "the folder has no data files (names ending in {})",
                    DATA_SUFFIXES.join(", ")
                ),
            });
        }
        return Ok(files);
    }
    let text = path.to_string_lossy();
    if !path.exists() && text.contains(['*', '?', '[']) {
        let pattern = glob::glob(&text).map_err(|e| LoaderError::NoShards {
            path: path.to_path_buf(),
            problem: format!("invalid glob pattern: {e}"),
        })?;
        let mut files = Vec::new();
        for entry in pattern {
            let p = entry.map_err(|e| io_error(e.path(), io::Error::other(e.to_string())))?;
            if p.is_file() {
                files.push(p);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(LoaderError::NoShards {
                path: path.to_path_buf(),
                problem: "the pattern matches no file".into(),
            });
        }
        return Ok(files);
    }
    Ok(vec![path.to_path_buf()])
}

fn detect(file: &mut File) -> io::Result<Compression> {
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < magic.len() {
        match file.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(match &magic[..n] {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
        b"PAR1" => Compression::Parquet,
        _ => Compression::None,
    })
}

fn decoder(path: &Path, compression: Compression) -> io::Result<Box<dyn Read + Send>> {
    let file = File::open(path)?;
    Ok(match compression {
        Compression::None | Compression::Parquet => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(file)?),
    })
}

#[cfg(not(feature = "parquet"))]
fn open_parquet(path: PathBuf, _first_row: usize) -> Result<Shard> {
    Err(LoaderError::Config(format!(
        "{}: a Parquet file, but this build has no Parquet support (build with the `parquet` feature of \
         dpo-loader, or convert it to JSONL)",
        path.display()
    )))
}

#[cfg(feature = "parquet")]
fn open_parquet(path: PathBuf, first_row: usize) -> Result<Shard> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = File::open(&path).map_err(|e| io_error(&path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| LoaderError::Corrupt {
        file: path.clone(),
        after_line: 0,
        source: io::Error::other(e),
    })?;
    let rows = usize::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0);
    if rows == 0 {
        return Err(LoaderError::EmptyFile { file: path });
    }
    Ok(Shard {
        path: Arc::new(path),
        compression: Compression::Parquet,
        first_row,
        rows,
        starts: Vec::new(),
        lines: LineMap::default(),
        file: None,
        cursor: Mutex::new(None),
    })
}

fn open_shard(path: PathBuf, first_row: usize) -> Result<Shard> {
    let mut file = File::open(&path).map_err(|e| io_error(&path, e))?;
    let compression = detect(&mut file).map_err(|e| io_error(&path, e))?;
    if compression == Compression::Parquet {
        return open_parquet(path, first_row);
    }
    let mut starts = Vec::new();
    let mut lines = LineMap::default();
    let mut rows = 0;
    let keep_starts = compression == Compression::None;
    let mut on_row = |start: u64, line: u64| {
        if keep_starts {
            starts.push(start);
        }
        lines.push(rows, line);
        rows += 1;
    };
    let content = match compression {
        Compression::None => {
            drop(file);
            let mut reader = decoder(&path, compression).map_err(|e| io_error(&path, e))?;
            scan_lines(&mut reader, CHUNK_SIZE, &mut on_row).map_err(|e| io_error(&path, e))?
        }
        _ => {
            let mut reader = decoder(&path, compression).map_err(|e| io_error(&path, e))?;
            let mut last_line = 0;
            let mut tracked = |start, line| {
                last_line = line;
                on_row(start, line)
            };
            scan_lines(&mut reader, CHUNK_SIZE, &mut tracked).map_err(|source| LoaderError::Corrupt {
                file: path.clone(),
                after_line: last_line,
                source,
            })?
        }
    };
    if content == 0 {
        return Err(LoaderError::EmptyFile { file: path });
    }
    if rows == 0 {
        return Err(LoaderError::BlankFile { file: path });
    }
    let file = match compression {
        Compression::None => Some(File::open(&path).map_err(|e| io_error(&path, e))?),
        _ => None,
    };
    Ok(Shard {
        path: Arc::new(path),
        compression,
        first_row,
        rows,
        starts,
        lines,
        file,
        cursor: Mutex::new(None),
    })
}

/// Incremental line scanner fed with chunks.
struct Scanner {
    pos: u64,
    line_start: u64,
    line: u64,
    has_content: bool,
}

impl Scanner {
    fn feed(&mut self, mut bytes: &[u8], on_row: &mut impl FnMut(u64, u64)) {
        while !bytes.is_empty() {
            let (segment, newline) = match memchr::memchr(b'\n', bytes) {
                Some(k) => (&bytes[..k], true),
                None => (bytes, false),
            };
            if !self.has_content {
                self.has_content = segment.iter().any(|b| !b.is_ascii_whitespace());
            }
            self.pos += segment.len() as u64;
            bytes = &bytes[segment.len()..];
            if newline {
                self.end_line(on_row);
                self.pos += 1;
                self.line_start = self.pos;
                self.line += 1;
                bytes = &bytes[1..];
            }
        }
    }

    fn end_line(&mut self, on_row: &mut impl FnMut(u64, u64)) {
        if self.has_content {
            on_row(self.line_start, self.line);
        }
        self.has_content = false;
    }
}

/// Calls `on_row(byte offset, line number)` for each non-blank line of `reader`, read at most
/// `chunk_size` bytes at a time. Returns the number of bytes after an optional UTF-8 BOM.
fn scan_lines(
    reader: &mut impl Read,
    chunk_size: usize,
    on_row: &mut impl FnMut(u64, u64),
) -> io::Result<u64> {
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
    let mut sc = Scanner { pos: skip as u64, line_start: skip as u64, line: 1, has_content: false };
    sc.feed(&buf[skip..head], on_row);
    loop {
        match reader.read(&mut buf[..chunk_size.max(1)]) {
            Ok(0) => break,
            Ok(n) => sc.feed(&buf[..n], on_row),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    sc.end_line(on_row);
    Ok(sc.pos - skip as u64)
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(file, buf, offset)
}

/// The line starting at `start` (up to `\n` or the end of the file), read with positioned reads
/// so that several threads can share the file.
fn read_line_at(file: &File, start: u64) -> io::Result<LineBytes> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut len = 0;
    loop {
        if len == buf.len() {
            if len > MAX_ROW_BYTES {
                return Ok(Err(len));
            }
            buf.resize((2 * len).min(MAX_ROW_BYTES + 1), 0);
        }
        let n = match read_at(file, &mut buf[len..], start + len as u64) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        if let Some(k) = memchr::memchr(b'\n', &buf[len..len + n]) {
            len += k;
            break;
        }
        len += n;
    }
    if len > MAX_ROW_BYTES {
        return Ok(Err(len));
    }
    buf.truncate(len);
    Ok(Ok(buf))
}

/// Sequential reader of a shard's non-blank lines, in bounded memory per line.
pub(crate) struct LineReader {
    inner: BufReader<Box<dyn Read + Send>>,
    /// Rows of a Parquet shard, read instead of `inner`.
    #[cfg(feature = "parquet")]
    parquet: Option<parquet::record::reader::RowIter<'static>>,
    path: Arc<PathBuf>,
    /// Number of the last line read (0 before the first).
    line: u64,
}

impl std::fmt::Debug for LineReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineReader").field("path", &self.path).field("line", &self.line).finish()
    }
}

impl LineReader {
    fn open(path: &Arc<PathBuf>, compression: Compression) -> Result<Self> {
        let corrupt = |source| LoaderError::Corrupt { file: path.to_path_buf(), after_line: 0, source };
        #[cfg(feature = "parquet")]
        if compression == Compression::Parquet {
            let file = File::open(path.as_path()).map_err(|e| io_error(path, e))?;
            let reader = parquet::file::reader::SerializedFileReader::new(file)
                .map_err(|e| corrupt(io::Error::other(e)))?;
            let empty: Box<dyn Read + Send> = Box::new(io::empty());
            return Ok(Self {
                inner: BufReader::new(empty),
                parquet: Some(reader.into_iter()),
                path: Arc::clone(path),
                line: 0,
            });
        }
        let mut inner = decoder(path, compression).map_err(|e| io_error(path, e))?;
        // A BOM at the very start of the shard is not content (as when indexing).
        let mut head = Vec::with_capacity(BOM.len());
        (&mut inner).take(BOM.len() as u64).read_to_end(&mut head).map_err(corrupt)?;
        if head == BOM {
            head.clear();
        }
        let inner: Box<dyn Read + Send> = Box::new(io::Cursor::new(head).chain(inner));
        Ok(Self {
            inner: BufReader::with_capacity(CHUNK_SIZE, inner),
            #[cfg(feature = "parquet")]
            parquet: None,
            path: Arc::clone(path),
            line: 0,
        })
    }

    /// The next non-blank line and its number; `None` at the end.
    fn next_line(&mut self) -> Result<Option<(u64, LineBytes)>> {
        #[cfg(feature = "parquet")]
        if let Some(rows) = &mut self.parquet {
            let corrupt = |source| LoaderError::Corrupt {
                file: self.path.to_path_buf(),
                after_line: self.line,
                source,
            };
            let Some(row) = rows.next() else { return Ok(None) };
            let row = row.map_err(|e| corrupt(io::Error::other(e)))?;
            let bytes = serde_json::to_vec(&row.to_json_value()).map_err(|e| corrupt(io::Error::other(e)))?;
            self.line += 1;
            let bytes = if bytes.len() > MAX_ROW_BYTES { Err(bytes.len()) } else { Ok(bytes) };
            return Ok(Some((self.line, bytes)));
        }
        loop {
            let mut buf = Vec::new();
            let mut too_long = 0;
            let mut has_content = false;
            let mut any = false;
            loop {
                let available = match self.inner.fill_buf() {
                    Ok(b) => b,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(source) => {
                        return Err(LoaderError::Corrupt {
                            file: self.path.to_path_buf(),
                            after_line: self.line,
                            source,
                        });
                    }
                };
                if available.is_empty() {
                    break;
                }
                any = true;
                let (segment, newline) = match memchr::memchr(b'\n', available) {
                    Some(k) => (&available[..k], true),
                    None => (available, false),
                };
                let consumed = segment.len() + usize::from(newline);
                if !has_content {
                    has_content = segment.iter().any(|b| !b.is_ascii_whitespace());
                }
                if too_long > 0 || buf.len() + segment.len() > MAX_ROW_BYTES {
                    too_long = too_long.max(buf.len()) + segment.len();
                    buf = Vec::new();
                } else {
                    buf.extend_from_slice(segment);
                }
                self.inner.consume(consumed);
                if newline {
                    break;
                }
            }
            if !any {
                return Ok(None);
            }
            self.line += 1;
            if has_content {
                let bytes = if too_long > 0 { Err(too_long) } else { Ok(buf) };
                return Ok(Some((self.line, bytes)));
            }
        }
    }
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

    fn spans(data: &[u8], chunk: usize) -> (Vec<(u64, u64)>, u64, usize) {
        let mut r = ChunkChecked { data, max: chunk.max(BOM.len()), reads: 0 };
        let mut rows = Vec::new();
        let n = scan_lines(&mut r, chunk, &mut |start, line| rows.push((start, line))).unwrap();
        (rows, n, r.reads)
    }

    #[test]
    fn index_is_built_from_small_chunks_and_is_chunk_size_independent() {
        let data = b"{\"a\":1}\n\n  \r\n{\"b\":2}\r\n{\"c\":3}";
        let (whole, n, _) = spans(data, 1 << 16);
        assert_eq!(whole, vec![(0, 1), (13, 4), (22, 5)]);
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
        assert_eq!(rows, vec![(3, 1)]);
        assert_eq!(n, 3);
        assert_eq!(spans(b"\xEF\xBB\xBF", 4).1, 0);
        let (rows, n, _) = spans(b"\n \n\t\r\n", 4);
        assert!(rows.is_empty());
        assert_eq!(n, 6);
        // A BOM not at the very start is content.
        assert_eq!(spans(b"\n\xEF\xBB\xBF", 4).0, vec![(1, 2)]);
    }

    #[test]
    fn line_map_stores_only_changes() {
        let mut m = LineMap::default();
        for (row, line) in [(0, 1), (1, 2), (2, 5), (3, 6), (4, 9)] {
            m.push(row, line);
        }
        assert_eq!(m.jumps, [(2, 2), (4, 4)]);
        let lines: Vec<u64> = (0..5).map(|r| m.line(r)).collect();
        assert_eq!(lines, [1, 2, 5, 6, 9]);
    }

    #[test]
    fn line_reader_matches_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"\xEF\xBB\xBF\n{\"a\":1}\r\n\n  \n{\"b\":2}\n\xEF\xBB\xBF\n{\"c\"";
        let path = Arc::new(dir.path().join("d.jsonl"));
        std::fs::write(&*path, data).unwrap();
        let mut r = LineReader::open(&path, Compression::None).unwrap();
        let mut got = Vec::new();
        while let Some((line, bytes)) = r.next_line().unwrap() {
            got.push((line, String::from_utf8_lossy(&bytes.unwrap()).into_owned()));
        }
        let want = [(2, "{\"a\":1}\r"), (5, "{\"b\":2}"), (6, "\u{feff}"), (7, "{\"c\"")];
        assert_eq!(got, want.map(|(l, s)| (l, s.to_owned())));
        let (rows, _, _) = spans(data, 3);
        assert_eq!(rows.iter().map(|r| r.1).collect::<Vec<_>>(), [2, 5, 6, 7]);
    }
}

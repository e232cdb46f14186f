//! Corpus readers: every input format yields documents (`String`s) in file order.
//! - `.jsonl` / `.jsonl.zst`: one JSON object per line, text in `text_field` (default "text", SlimPajama)
//! - `.parquet`: one row per document, text in `text_field` (default "content", StarCoderData)
//! - `.txt`: the whole file is one document

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    JsonlZst,
    Parquet,
    Text,
}

impl Format {
    pub fn of(path: &Path) -> Option<Format> {
        let name = path.file_name()?.to_str()?;
        if name.ends_with(".jsonl.zst") {
            Some(Format::JsonlZst)
        } else if name.ends_with(".jsonl") {
            Some(Format::Jsonl)
        } else if name.ends_with(".parquet") {
            Some(Format::Parquet)
        } else if name.ends_with(".txt") {
            Some(Format::Text)
        } else {
            None
        }
    }
    fn default_field(self) -> &'static str {
        match self {
            Format::Parquet => "content",
            _ => "text",
        }
    }
}

/// Expands files and directories (recursively, sorted) into the input files kiln can read.
pub fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    // Each file once, however it is reached (named twice, through a symlink alias, or inside a
    // directory also named): by canonical path. Directories likewise, which also ends a symlink loop.
    let mut files = Inputs::default();
    for p in inputs {
        let meta = std::fs::metadata(p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::anyhow!("{}: input does not exist", p.display()),
            _ => anyhow::anyhow!("{}: cannot read input ({e})", p.display()),
        })?;
        if meta.is_dir() {
            let before = files.list.len();
            walk(p, &mut files)?; // in sorted path order: each directory's entries are sorted
            if files.list.len() == before && !files.seen_any_under(p) {
                bail!("{}: no .jsonl, .jsonl.zst, .parquet or .txt files in this directory", p.display());
            }
        } else if meta.is_file() {
            if Format::of(p).is_none() {
                bail!("{}: unsupported input (expected .jsonl, .jsonl.zst, .parquet or .txt)", p.display());
            }
            files.add(p)?;
        } else {
            bail!("{}: not a regular file or directory ({})", p.display(), special_kind(&meta));
        }
    }
    Ok(files.list)
}

/// Input files in order, each once by canonical path, and the directories already walked.
#[derive(Default)]
struct Inputs {
    list: Vec<PathBuf>,
    files: std::collections::HashSet<PathBuf>,
    dirs: std::collections::HashSet<PathBuf>,
}

impl Inputs {
    fn canonical(p: &Path) -> Result<PathBuf> {
        p.canonicalize().with_context(|| format!("{}: cannot resolve", p.display()))
    }

    fn add(&mut self, p: &Path) -> Result<()> {
        if self.files.insert(Self::canonical(p)?) {
            self.list.push(p.to_path_buf());
        }
        Ok(())
    }

    /// True when a file under `dir` was already taken (so the directory is not empty, only repeated).
    fn seen_any_under(&self, dir: &Path) -> bool {
        Self::canonical(dir).is_ok_and(|d| self.files.iter().any(|f| f.starts_with(&d)))
    }
}

fn special_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

fn walk(dir: &Path, out: &mut Inputs) -> Result<()> {
    if !out.dirs.insert(Inputs::canonical(dir)?) {
        return Ok(()); // walked already: a repeated input, or a symlink back up the tree
    }
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot read directory", dir.display()))? {
        entries.push(entry.with_context(|| format!("{}: cannot read directory", dir.display()))?.path());
    }
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.is_file() && Format::of(&p).is_some() {
            out.add(&p)?;
        }
    }
    Ok(())
}

/// Calls `f` with every document of `path`, in order.
pub fn for_each_document(path: &Path, text_field: Option<&str>, mut f: impl FnMut(String) -> Result<()>) -> Result<()> {
    let format = Format::of(path).with_context(|| format!("{}: unsupported input", path.display()))?;
    let field = text_field.unwrap_or(format.default_field());
    let open = || File::open(path).with_context(|| format!("{}: cannot open", path.display()));
    match format {
        Format::Text => {
            let mut s = String::new();
            open()?.read_to_string(&mut s).with_context(|| format!("{}: not UTF-8 text", path.display()))?;
            // An empty file is no document (as an empty .jsonl is), not an empty one.
            if s.trim().is_empty() {
                return Ok(());
            }
            f(s)
        }
        Format::Jsonl => jsonl(path, BufReader::new(open()?), field, f),
        Format::JsonlZst => {
            let dec = zstd::Decoder::new(open()?).with_context(|| format!("{}: not a zstd stream", path.display()))?;
            jsonl(path, BufReader::new(dec), field, f)
        }
        Format::Parquet => parquet_docs(path, field, f),
    }
}

fn jsonl(path: &Path, reader: impl BufRead, field: &str, mut f: impl FnMut(String) -> Result<()>) -> Result<()> {
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot read (corrupt or not UTF-8)", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("{}:{}: not valid JSON ({e})", path.display(), i + 1))?;
        match v.get(field) {
            Some(serde_json::Value::String(s)) => f(s.clone())?,
            Some(_) => bail!("{}:{}: field {field:?} is not a string", path.display(), i + 1),
            None => bail!("{}:{}: no {field:?} field (set --text-field)", path.display(), i + 1),
        }
    }
    Ok(())
}

fn parquet_docs(path: &Path, field: &str, mut f: impl FnMut(String) -> Result<()>) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let reader = decoding(path, || SerializedFileReader::new(file))?
        .map_err(|e| anyhow::anyhow!("{}: not a parquet file ({e})", path.display()))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    if !schema.columns().iter().any(|c| c.name() == field) {
        bail!("{}: no {field:?} column (set --text-field)", path.display());
    }
    let mut rows =
        decoding(path, || reader.get_row_iter(None))?.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    for i in 0.. {
        let Some(row) = decoding(path, || rows.next())? else { break };
        let row = row.map_err(|e| anyhow::anyhow!("{}: row {i}: {e}", path.display()))?;
        let text = row.get_column_iter().find(|(name, _)| name.as_str() == field).map(|(_, v)| v);
        match text {
            Some(Field::Str(s)) => f(s.clone())?,
            Some(Field::Null) => continue,
            _ => bail!("{}: row {i}: column {field:?} is not a string", path.display()),
        }
    }
    Ok(())
}

/// Runs a step of the parquet crate's decoding, which panics on some corrupt files (a negative
/// column chunk offset, for one) instead of returning its error: the panic becomes this file's
/// one-line error, and its default report (a multi-line trace) is kept off the terminal.
fn decoding<T>(path: &Path, step: impl FnOnce() -> T) -> Result<T> {
    use std::cell::Cell;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    thread_local!(static QUIET: Cell<bool> = const { Cell::new(false) });
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                default(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let result = catch_unwind(AssertUnwindSafe(step));
    QUIET.with(|q| q.set(false));
    result.map_err(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("the decoder failed");
        anyhow::anyhow!("{}: corrupt parquet file ({why})", path.display())
    })
}

//! The workflow file format: load → parse (YAML with positions) → schema →
//! semantic analysis, each stage reporting every located error it finds.

pub mod analyze;
pub mod diagnostic;
pub mod model;
pub mod parse;
pub mod payload;
pub mod schema;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use diagnostic::{Diagnostic, Format, Pos};
pub use model::{
    Action, ActionKind, HttpAction, Method, OnError, RetrySettings, Trigger, Workflow,
};

/// Files larger than this are refused: a workflow is a page of YAML, not a data dump.
pub const MAX_FILE_BYTES: usize = 1024 * 1024;

/// A workflow that passed every check, with the text it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The file it was read from, as displayed in diagnostics.
    pub file: String,
    /// The file's text, so a run can pin the exact version it started with.
    pub source: String,
    /// Hex SHA-256 of `source`.
    pub hash: String,
    /// The typed workflow.
    pub workflow: Workflow,
}

/// A path could not be read at all (as opposed to holding an invalid workflow).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path does not exist or cannot be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Module-local result.
pub type Result<T> = std::result::Result<T, Error>;

/// Hex SHA-256 of a workflow's text: its version.
pub fn version_hash(source: &str) -> String {
    let digest = Sha256::digest(source.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs every per-file check on raw file bytes.
pub fn load_bytes(file: &str, bytes: &[u8]) -> std::result::Result<Loaded, Vec<Diagnostic>> {
    let one = |pos: Pos, message: String| vec![Diagnostic::new(file, None, pos, "", message)];
    if bytes.len() > MAX_FILE_BYTES {
        return Err(one(
            Pos::START,
            format!(
                "file is {} bytes; workflow files are limited to {MAX_FILE_BYTES} bytes (1 MiB)",
                bytes.len()
            ),
        ));
    }
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let source = match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => {
            let valid = &bytes[..e.valid_up_to()];
            let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
            let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&valid[line_start..])
                .chars()
                .count()
                + 1;
            return Err(one(
                Pos { line, column },
                "file is not valid UTF-8 text".to_owned(),
            ));
        }
    };
    if let Some(i) = source.find('\0') {
        let before = &source[..i];
        let line = before.matches('\n').count() + 1;
        let column = before
            .rsplit('\n')
            .next()
            .unwrap_or_default()
            .chars()
            .count()
            + 1;
        return Err(one(
            Pos { line, column },
            "file contains a NUL byte; it is not a text file".to_owned(),
        ));
    }
    load_str(file, source)
}

/// Runs every per-file check on YAML text.
pub fn load_str(file: &str, source: &str) -> std::result::Result<Loaded, Vec<Diagnostic>> {
    let doc = parse::parse(file, source)?;
    if !doc.value.is_object() {
        let found = match &doc.value {
            serde_json::Value::Array(_) => "a list",
            serde_json::Value::Null => "nothing",
            _ => "a single value",
        };
        return Err(vec![Diagnostic::new(
            file,
            Some(source),
            doc.value_pos(""),
            "",
            format!(
                "a workflow file holds a mapping with `name`, `trigger` and `actions`; found {found}"
            ),
        )]);
    }
    let mut errors = schema::check(file, source, &doc);
    if !errors.is_empty() {
        sort(&mut errors);
        return Err(errors);
    }
    let mut errors = analyze::check_durations(file, source, &doc);
    if !errors.is_empty() {
        return Err(errors);
    }
    let workflow: Workflow = match serde_json::from_value(doc.value.clone()) {
        Ok(w) => w,
        Err(e) => {
            return Err(vec![Diagnostic::new(
                file,
                Some(source),
                Pos::START,
                "",
                format!("invalid workflow: {e}"),
            )]);
        }
    };
    errors = analyze::check(file, source, &doc, &workflow);
    if !errors.is_empty() {
        sort(&mut errors);
        return Err(errors);
    }
    Ok(Loaded {
        file: file.to_owned(),
        source: source.to_owned(),
        hash: version_hash(source),
        workflow,
    })
}

fn sort(errors: &mut [Diagnostic]) {
    errors.sort_by_key(|d| (d.line, d.column));
}

/// Reads and checks one file.
pub fn load_file(path: &Path) -> Result<std::result::Result<Loaded, Vec<Diagnostic>>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(load_bytes(&path.display().to_string(), &bytes))
}

/// Whether `path` names a workflow file.
pub fn is_workflow_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

/// Expands directories (recursively, sorted) into their `.yaml`/`.yml` files; files stay as given.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.is_dir() {
            walk(path, &mut out)?;
        } else {
            out.push(path.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let io = |source| Error::Io {
        path: dir.display().to_string(),
        source,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(io)?;
    entries.sort();
    for path in entries {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else if is_workflow_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// The error for a workflow whose `name` the file `owner` already has, located at `/name`.
pub fn duplicate_name(loaded: &Loaded, owner: &str) -> Diagnostic {
    let pos =
        parse::parse(&loaded.file, &loaded.source).map_or(Pos::START, |d| d.value_pos("/name"));
    let name = &loaded.workflow.name;
    Diagnostic::new(
        &loaded.file,
        Some(&loaded.source),
        pos,
        "/name",
        format!(
            "workflow name `{name}` is already used by `{owner}`; names must be unique in a directory"
        ),
    )
}

/// The outcome of loading a set of files.
#[derive(Debug, Default)]
pub struct Set {
    /// Workflows that passed every check (a duplicate name keeps the first file's).
    pub loaded: Vec<Loaded>,
    /// Every error found, per file then across files.
    pub diagnostics: Vec<Diagnostic>,
    /// How many files were checked.
    pub files: usize,
}

/// Loads every file in `files`, then checks names are unique across them.
pub fn load_set(files: &[PathBuf]) -> Result<Set> {
    let mut set = Set::default();
    for path in files {
        set.files += 1;
        match load_file(path)? {
            Ok(loaded) => set.loaded.push(loaded),
            Err(mut errors) => set.diagnostics.append(&mut errors),
        }
    }
    let mut first: HashMap<String, String> = HashMap::new();
    let mut unique = Vec::with_capacity(set.loaded.len());
    for loaded in std::mem::take(&mut set.loaded) {
        let name = loaded.workflow.name.clone();
        if let Some(other) = first.get(&name) {
            set.diagnostics.push(duplicate_name(&loaded, other));
        } else {
            first.insert(name, loaded.file.clone());
            unique.push(loaded);
        }
    }
    set.loaded = unique;
    Ok(set)
}

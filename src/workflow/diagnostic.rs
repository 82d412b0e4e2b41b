//! Located diagnostics and the three ways `validate` prints them.

use std::fmt::Write as _;

use serde::Serialize;

/// A position in a source file: 1-based line and 1-based column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Pos {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
}

impl Pos {
    /// The first character of a file.
    pub const START: Pos = Pos { line: 1, column: 1 };
}

/// One problem found in a workflow file, with its place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// The file, as given on the command line (or found under a directory).
    pub file: String,
    /// 1-based line of the offending key or value.
    pub line: usize,
    /// 1-based column of the offending key or value.
    pub column: usize,
    /// JSON pointer of the offending value (`""` for the whole document).
    pub pointer: String,
    /// What is wrong, and what would be right.
    pub message: String,
    /// The source line the error points into, for the caret display.
    #[serde(skip)]
    pub source_line: Option<String>,
}

impl Diagnostic {
    /// Builds a diagnostic at `pos` in `file`, taking the source line from `source`.
    pub fn new(
        file: &str,
        source: Option<&str>,
        pos: Pos,
        pointer: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        let source_line =
            source.and_then(|s| s.lines().nth(pos.line.saturating_sub(1)).map(str::to_owned));
        Diagnostic {
            file: file.to_owned(),
            line: pos.line,
            column: pos.column,
            pointer: pointer.into(),
            message: message.into(),
            source_line,
        }
    }

    /// Compiler-style text: `file:line:col: error: message`, the source line and a caret.
    pub fn render_text(&self) -> String {
        let mut out = format!(
            "{}:{}:{}: error: {}",
            self.file, self.line, self.column, self.message
        );
        if !self.pointer.is_empty() {
            let _ = write!(out, " (at `{}`)", self.pointer);
        }
        out.push('\n');
        if let Some(line) = &self.source_line {
            // Show at most 120 characters so a minified line cannot flood the terminal.
            let shown: String = line
                .chars()
                .take(120)
                .map(|c| if c == '\t' { ' ' } else { c })
                .collect();
            let gutter = self.line.to_string();
            let _ = writeln!(out, "{gutter} | {shown}");
            let pad = " ".repeat(gutter.len());
            let caret_col = self.column.saturating_sub(1).min(shown.chars().count());
            let _ = writeln!(out, "{pad} | {}^", " ".repeat(caret_col));
        }
        out
    }

    /// A GitHub Actions workflow command, so the error shows as an annotation.
    pub fn render_github(&self) -> String {
        format!(
            "::error file={},line={},col={}::{}",
            escape_github_property(&self.file),
            self.line,
            self.column,
            escape_github_data(&self.message)
        )
    }
}

/// Output format for diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Compiler-style text with the source line and a caret.
    #[default]
    Text,
    /// GitHub Actions `::error` annotations, one per line.
    Github,
    /// A JSON array of `{file, line, column, pointer, message}`.
    Json,
}

/// Renders every diagnostic in `format`; the summary line is the caller's.
pub fn render_all(diagnostics: &[Diagnostic], format: Format) -> String {
    match format {
        Format::Text => diagnostics
            .iter()
            .map(Diagnostic::render_text)
            .collect::<Vec<_>>()
            .join("\n"),
        Format::Github => diagnostics
            .iter()
            .map(|d| d.render_github() + "\n")
            .collect(),
        Format::Json => {
            let mut s = serde_json::to_string_pretty(diagnostics)
                .unwrap_or_else(|e| panic!("BUG: diagnostics always serialize: {e}"));
            s.push('\n');
            s
        }
    }
}

// GitHub's workflow commands escape %, CR and LF in data, and also `:` and `,` in properties.
fn escape_github_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn escape_github_property(s: &str) -> String {
    escape_github_data(s)
        .replace(':', "%3A")
        .replace(',', "%2C")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_puts_the_caret_under_the_column() {
        let d = Diagnostic::new(
            "a.yaml",
            Some("name: x\nfoo: 1\n"),
            Pos { line: 2, column: 1 },
            "",
            "unknown key `foo`",
        );
        insta::assert_snapshot!(d.render_text(), @r"
        a.yaml:2:1: error: unknown key `foo`
        2 | foo: 1
          | ^
        ");
    }

    #[test]
    fn github_escapes_newlines_and_property_separators() {
        let d = Diagnostic::new("a,b.yaml", None, Pos::START, "", "bad\nthing 100%");
        assert_eq!(
            d.render_github(),
            "::error file=a%2Cb.yaml,line=1,col=1::bad%0Athing 100%25"
        );
    }
}

//! Secrets: where they come from (environment, a secrets file), which ones a
//! workflow needs, and keeping their values out of every output.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::template;
use crate::workflow::Workflow;
use crate::workflow::model::TemplateKind;

/// Environment variables with this prefix are secrets: `FLOWRUN_SECRET_ERP_TOKEN` → `ERP_TOKEN`.
pub const ENV_PREFIX: &str = "FLOWRUN_SECRET_";

/// What replaces a secret value in output.
pub const REDACTED: &str = "[redacted]";

/// Secrets could not be loaded or are missing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The secrets file could not be read.
    #[error("cannot read secrets file `{path}`: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The secrets file is not a YAML map or `.env` file.
    #[error("secrets file `{path}` line {line}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A secret the workflow references is not set.
    #[error(
        "secret `{0}` is not set; set the environment variable FLOWRUN_SECRET_{0} or put it in --secrets-file"
    )]
    Missing(String),
}

/// Module-local result.
pub type Result<T> = std::result::Result<T, Error>;

/// Named secret values.
#[derive(Clone, Default)]
pub struct Secrets {
    values: BTreeMap<String, String>,
}

// Never print values, even in debug output.
impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.values.keys()).finish()
    }
}

impl Secrets {
    /// Secrets from `FLOWRUN_SECRET_<NAME>` environment variables.
    pub fn from_env() -> Self {
        Self::from_vars(std::env::vars())
    }

    /// Secrets from `(name, value)` pairs shaped like environment variables.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let values = vars
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(ENV_PREFIX).map(|name| (name.to_owned(), v)))
            .collect();
        Secrets { values }
    }

    /// Adds (and overrides with) the secrets in a `.env` file or a YAML map of strings.
    pub fn merge_file(&mut self, path: &Path) -> Result<()> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: shown.clone(),
            source,
        })?;
        if crate::workflow::is_workflow_file(path) {
            return self.merge_yaml(&shown, &text);
        }
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line == "---" {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            // `.env` uses `NAME=value`, YAML uses `NAME: value`: take whichever separator comes first.
            let sep = line.find(['=', ':']).ok_or_else(|| Error::Parse {
                path: shown.clone(),
                line: i + 1,
                message: "expected `NAME=value` or `NAME: value`".to_owned(),
            })?;
            let name = line[..sep].trim();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(Error::Parse {
                    path: shown,
                    line: i + 1,
                    message: "a secret name uses letters, digits and `_`".to_owned(),
                });
            }
            let value = unquote(line[sep + 1..].trim());
            self.values.insert(name.to_owned(), value.to_owned());
        }
        Ok(())
    }

    /// A YAML file: one mapping of names to scalar values (real YAML: quotes, block scalars).
    fn merge_yaml(&mut self, shown: &str, text: &str) -> Result<()> {
        let doc = crate::workflow::parse::parse(shown, text).map_err(|errors| {
            let d = errors.into_iter().next();
            Error::Parse {
                path: shown.to_owned(),
                line: d.as_ref().map_or(1, |d| d.line),
                // The parser's message never quotes values beyond its position.
                message: d.map_or_else(|| "invalid YAML".to_owned(), |d| d.message),
            }
        })?;
        let serde_json::Value::Object(map) = doc.value.clone() else {
            return Err(Error::Parse {
                path: shown.to_owned(),
                line: 1,
                message: "expected a mapping of secret names to values".to_owned(),
            });
        };
        for (name, value) in map {
            let line = doc
                .key_pos(&format!(
                    "/{}",
                    crate::workflow::parse::escape_segment(&name)
                ))
                .line;
            let value = match value {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => {
                    return Err(Error::Parse {
                        path: shown.to_owned(),
                        line,
                        message: format!("secret `{name}` must be a string"),
                    });
                }
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(Error::Parse {
                    path: shown.to_owned(),
                    line,
                    message: "a secret name uses letters, digits and `_`".to_owned(),
                });
            }
            self.values.insert(name, value);
        }
        Ok(())
    }

    /// Sets one secret.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.values.insert(name.into(), value.into());
    }

    /// Only the secrets `names` lists, or the first missing name as an error.
    pub fn select(&self, names: &BTreeSet<String>) -> Result<Secrets> {
        let mut values = BTreeMap::new();
        for name in names {
            let value = self
                .values
                .get(name)
                .ok_or_else(|| Error::Missing(name.clone()))?;
            values.insert(name.clone(), value.clone());
        }
        Ok(Secrets { values })
    }

    /// The secrets as the template variable `secrets`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.values
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
        )
    }

    /// A redactor that hides these secrets' values.
    pub fn redactor(&self) -> Redactor {
        let mut needles: Vec<String> = self
            .values
            .values()
            .filter(|v| !v.is_empty())
            .flat_map(|v| encodings(v))
            .collect();
        // Longest first, so a secret that contains another is hidden whole.
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        needles.dedup();
        Redactor { needles }
    }
}

/// A secret as output may carry it: raw, and as the escapes a `json:` body
/// (`"` → `\"`) and the URL filters (`"` → `%22`) turn it into.
fn encodings(value: &str) -> Vec<String> {
    let mut out = vec![value.to_owned()];
    let json =
        serde_json::to_string(value).unwrap_or_else(|e| panic!("BUG: a string serializes: {e}"));
    out.push(unquote(&json).to_owned());
    let ctx = serde_json::json!({ "s": value });
    for filter in ["tojson", "urlencode", "urlencode_segment"] {
        if let Ok(encoded) = template::render(&format!("{{{{ s | {filter} }}}}"), &ctx) {
            out.push(unquote(&encoded).to_owned());
        }
    }
    out
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

/// The secret names (`secrets.NAME`) the workflow's templates read.
pub fn referenced(wf: &Workflow) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let verify = wf
        .trigger
        .verify
        .iter()
        .map(|v| (v.secret.as_str(), TemplateKind::Template));
    let actions = wf.templates().into_iter().map(|t| (t.source, t.kind));
    for (source, kind) in verify.chain(actions) {
        let vars = match kind {
            TemplateKind::Template => template::check_template(source),
            TemplateKind::Expression => template::check_expression(source),
        };
        for var in vars.unwrap_or_default() {
            let mut parts = var.split('.');
            if parts.next() == Some("secrets")
                && let Some(name) = parts.next()
            {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// Replaces secret values with `[redacted]` in text.
#[derive(Clone, Default)]
pub struct Redactor {
    needles: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.needles.len())
    }
}

impl Redactor {
    /// `text` with every secret value replaced.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for n in &self.needles {
            if out.contains(n.as_str()) {
                out = out.replace(n.as_str(), REDACTED);
            }
        }
        out
    }

    /// A JSON value with every string redacted (keys too).
    pub fn redact_json(&self, value: &serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match value {
            Value::String(s) => Value::String(self.redact(s)),
            Value::Array(a) => Value::Array(a.iter().map(|v| self.redact_json(v)).collect()),
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| (self.redact(k), self.redact_json(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_prefix_names_secrets() {
        let s = Secrets::from_vars([
            ("FLOWRUN_SECRET_TOKEN".into(), "t0k".into()),
            ("HOME".into(), "/root".into()),
        ]);
        assert_eq!(format!("{s:?}"), r#"{"TOKEN"}"#);
        assert_eq!(s.to_json(), serde_json::json!({"TOKEN": "t0k"}));
    }

    #[test]
    fn file_accepts_dotenv_and_yaml_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s.env");
        std::fs::write(&p, "# c\nA=1\nexport B=\"two\"\nC: 'three:3'\n").expect("write");
        let mut s = Secrets::default();
        s.merge_file(&p).expect("parses");
        assert_eq!(
            s.to_json(),
            serde_json::json!({"A": "1", "B": "two", "C": "three:3"})
        );
    }

    #[test]
    fn yaml_files_are_parsed_as_yaml() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s.yaml");
        std::fs::write(
            &p,
            "A: \"x # not a comment\"\nB: |\n  multi\n  line\nC: 12\n",
        )
        .expect("write");
        let mut s = Secrets::default();
        s.merge_file(&p).expect("parses");
        assert_eq!(
            s.to_json(),
            serde_json::json!({"A": "x # not a comment", "B": "multi\nline\n", "C": "12"})
        );
    }

    #[test]
    fn redaction_hides_longest_first() {
        let mut s = Secrets::default();
        s.insert("A", "abc");
        s.insert("B", "abcdef");
        assert_eq!(
            s.redactor().redact("x abcdef abc"),
            "x [redacted] [redacted]"
        );
    }

    #[test]
    fn missing_secret_is_named() {
        let s = Secrets::default();
        let err = s
            .select(&BTreeSet::from(["TOKEN".to_owned()]))
            .expect_err("missing");
        assert!(err.to_string().starts_with("secret `TOKEN` is not set"));
    }
}

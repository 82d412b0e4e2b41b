//! Semantic checks the schema cannot express: ids, templates and their
//! variables, cron, header names, durations and the payload schema.

use std::collections::{BTreeSet, HashMap};

use saphyr_parser::ScalarStyle;
use serde_json::Value;

use super::diagnostic::{Diagnostic, Pos};
use super::model::{TemplateKind, Workflow, human};
use super::parse::{Document, escape_segment};
use crate::template;

/// The pointers under an action whose strings are durations.
const DURATION_FIELDS: [&str; 4] = [
    "timeout",
    "retry/max_duration",
    "retry/initial_backoff",
    "retry/max_backoff",
];

struct Checker<'a> {
    file: &'a str,
    source: &'a str,
    doc: &'a Document,
    out: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn at(&mut self, pos: Pos, pointer: &str, message: String) {
        self.out.push(Diagnostic::new(
            self.file,
            Some(self.source),
            pos,
            pointer,
            message,
        ));
    }

    fn at_value(&mut self, pointer: &str, message: String) {
        let pos = self.doc.value_pos(pointer);
        self.at(pos, pointer, message);
    }

    fn at_key(&mut self, pointer: &str, message: String) {
        let pos = self.doc.key_pos(pointer);
        self.at(pos, pointer, message);
    }

    /// Where line/column `(line, col)` of a template sits in the file.
    fn template_pos(&self, pointer: &str, line: Option<usize>, col: Option<usize>) -> Pos {
        let Some(node) = self.doc.nearest(pointer) else {
            return Pos::START;
        };
        let base = node.value;
        let (line, col) = (line.unwrap_or(1), col.unwrap_or(1));
        match node.style {
            // A block scalar's text starts on the line after `|`/`>`; its indentation is unknown
            // here, so we point at the template's own column.
            Some(ScalarStyle::Literal | ScalarStyle::Folded) => Pos {
                line: base.line + line,
                column: col,
            },
            Some(style) if line == 1 => {
                let quote = usize::from(matches!(
                    style,
                    ScalarStyle::SingleQuoted | ScalarStyle::DoubleQuoted
                ));
                Pos {
                    line: base.line,
                    column: base.column + quote + col - 1,
                }
            }
            _ => Pos {
                line: base.line + line - 1,
                column: col,
            },
        }
    }
}

/// Variables the template at `pointer` may use.
struct Scope<'a> {
    /// Ids of the actions before this one.
    earlier: &'a [String],
    /// Ids of all actions, to tell "later" from "unknown".
    all: &'a [String],
    /// This action's own id.
    own: Option<&'a str>,
    /// The declared payload schema, if any.
    payload_schema: Option<&'a Value>,
}

/// Runs every semantic check on one workflow that passed the schema.
pub fn check(file: &str, source: &str, doc: &Document, wf: &Workflow) -> Vec<Diagnostic> {
    let mut c = Checker {
        file,
        source,
        doc,
        out: Vec::new(),
    };

    if let Some(expr) = &wf.trigger.schedule
        && let Err(e) = crate::schedule::parse(expr)
    {
        c.at_value("/trigger/schedule", e);
    }
    if let Some(schema) = &wf.trigger.payload_schema
        && let Err(e) = jsonschema::draft202012::meta::validate(schema)
    {
        let inner = e.instance_path().as_str();
        let pointer = format!("/trigger/payload_schema{inner}");
        c.at_value(
            &pointer,
            format!("`payload_schema` is not a valid JSON Schema: {e}"),
        );
    } else if let Some(schema) = &wf.trigger.payload_schema
        && let Err(e) = jsonschema::draft202012::new(schema)
    {
        // Valid against the metaschema but unusable (a bad `pattern`, a `$ref` to nothing):
        // serve would refuse every event.
        let inner = e.instance_path().as_str();
        let pointer = format!("/trigger/payload_schema{inner}");
        c.at_value(&pointer, format!("`payload_schema` cannot be used: {e}"));
    }

    if let Some(verify) = &wf.trigger.verify {
        if wf.trigger.schedule.is_some() {
            c.at_key(
                "/trigger/verify",
                "`verify` checks incoming events; a `schedule` trigger has none".to_owned(),
            );
        }
        match template::check_template(&verify.secret) {
            Ok(vars) => {
                for var in vars.iter().filter(|v| !v.starts_with("secrets.")) {
                    c.at_value(
                        "/trigger/verify/secret",
                        format!("`verify.secret` may only read `secrets`; found `{var}`"),
                    );
                }
            }
            Err(e) => {
                let pos = c.template_pos("/trigger/verify/secret", e.line, e.column);
                c.at(
                    pos,
                    "/trigger/verify/secret",
                    format!("invalid template: {e}"),
                );
            }
        }
    }
    let all: Vec<String> = wf.actions.iter().filter_map(|a| a.id.clone()).collect();
    // earlier[i]: ids of the actions before action i.
    let mut earlier: Vec<Vec<String>> = Vec::with_capacity(wf.actions.len());
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, action) in wf.actions.iter().enumerate() {
        earlier.push(
            wf.actions[..i]
                .iter()
                .filter_map(|a| a.id.clone())
                .collect(),
        );
        if let Some(id) = &action.id
            && let Some(first) = seen.insert(id, i)
        {
            c.at_value(
                &format!("/actions/{i}/id"),
                format!(
                    "duplicate action id `{id}`; action {} already uses it",
                    first + 1
                ),
            );
        }
        let Some(http) = &action.http else { continue };
        for name in http.headers.keys() {
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                c.at_key(
                    &format!("/actions/{i}/http/headers/{}", escape_segment(name)),
                    format!("`{name}` is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only)"),
                );
            }
        }
        if http.body.is_some() && http.json.is_some() {
            c.at_key(
                &format!("/actions/{i}/http/json"),
                "`body` and `json` cannot both be set; choose one".to_owned(),
            );
        }
    }

    let payload_schema = wf.trigger.payload_schema.as_ref().filter(|s| s.is_object());
    for t in wf.templates() {
        let scope = Scope {
            earlier: &earlier[t.action],
            all: &all,
            own: wf.actions[t.action].id.as_deref(),
            payload_schema,
        };
        let compiled = match t.kind {
            TemplateKind::Template => template::check_template(t.source),
            TemplateKind::Expression => template::check_expression(t.source),
        };
        match compiled {
            Ok(vars) => check_vars(&mut c, &t.pointer, &vars, &scope),
            Err(e) => {
                let what = if t.pointer.ends_with("/when") {
                    "`when` expression"
                } else {
                    "template"
                };
                // A `json:` expression was unwrapped from `{{ }}`: its offsets no longer match the file.
                let pos = if t.kind == TemplateKind::Expression && !t.pointer.ends_with("/when") {
                    c.doc.value_pos(&t.pointer)
                } else {
                    c.template_pos(&t.pointer, e.line, e.column)
                };
                c.at(pos, &t.pointer, format!("invalid {what}: {e}"));
            }
        }
    }
    c.out
}

/// Durations the schema's pattern let through but that do not parse.
pub fn check_durations(file: &str, source: &str, doc: &Document) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let actions = doc
        .value
        .get("actions")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    for i in 0..actions {
        for field in DURATION_FIELDS {
            let pointer = format!("/actions/{i}/http/{field}");
            if let Some(Value::String(s)) = doc.value.pointer(&pointer)
                && let Err(e) = human::parse(s)
            {
                out.push(Diagnostic::new(
                    file,
                    Some(source),
                    doc.value_pos(&pointer),
                    pointer,
                    e,
                ));
            }
        }
    }
    out
}

fn check_vars(c: &mut Checker<'_>, pointer: &str, vars: &BTreeSet<String>, scope: &Scope<'_>) {
    for var in vars {
        let mut parts = var.split('.');
        let root = parts.next().unwrap_or_default();
        if !template::ROOTS.contains(&root) {
            c.at_value(
                pointer,
                format!(
                    "unknown variable `{root}`; templates may use {}",
                    template::ROOTS.map(|r| format!("`{r}`")).join(", ")
                ),
            );
            continue;
        }
        match root {
            "steps" => {
                let Some(id) = parts.next() else { continue };
                if scope.earlier.iter().any(|e| e == id) {
                    continue;
                }
                let message = if scope.own == Some(id) {
                    format!(
                        "`steps.{id}` refers to this action itself; only earlier actions' results exist"
                    )
                } else if scope.all.iter().any(|e| e == id) {
                    format!(
                        "`steps.{id}` refers to an action that runs later; only earlier actions' results exist"
                    )
                } else {
                    format!(
                        "`steps.{id}` refers to no action; earlier action ids: {}",
                        list(scope.earlier)
                    )
                };
                c.at_value(pointer, message);
            }
            "payload" => {
                if let Some(schema) = scope.payload_schema
                    && let Some(problem) = payload_path_problem(schema, &parts.collect::<Vec<_>>())
                {
                    c.at_value(
                        pointer,
                        format!("`{var}` is not declared in `payload_schema`{problem}"),
                    );
                }
            }
            _ => {}
        }
    }
}

fn list(ids: &[String]) -> String {
    if ids.is_empty() {
        "none".to_owned()
    } else {
        ids.iter()
            .map(|i| format!("`{i}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Why a `payload.a.b` path is not allowed by `schema`, or `None` when it is.
///
/// A level that lists `properties` allows only those keys, unless it also gives
/// `additionalProperties` a schema; a level without `properties` (or using
/// combinators/`$ref`) is open, since we cannot tell what it allows.
fn payload_path_problem(schema: &Value, path: &[&str]) -> Option<String> {
    let mut node = schema;
    for seg in path {
        let props = node.get("properties").and_then(Value::as_object)?;
        if let Some(next) = props.get(*seg) {
            node = next;
            continue;
        }
        match node.get("additionalProperties") {
            Some(Value::Object(_) | Value::Bool(true)) => return None,
            _ => {
                let declared: Vec<String> = props.keys().map(|k| format!("`{k}`")).collect();
                return Some(format!("; declared here: {}", declared.join(", ")));
            }
        }
    }
    None
}

//! The embedded JSON Schema, compiled once per process, and its errors mapped
//! back to the source positions of the offending keys and values.

use std::sync::OnceLock;

use jsonschema::error::ValidationErrorKind;
use jsonschema::{ValidationError, Validator};
use serde_json::Value;

use super::diagnostic::{Diagnostic, Pos};
use super::parse::{Document, escape_segment};

/// The schema text, byte for byte the file under `schemas/`.
pub const SCHEMA_JSON: &str = include_str!("../../schemas/workflow.schema.json");

/// The parsed schema.
pub fn schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        serde_json::from_str(SCHEMA_JSON)
            .unwrap_or_else(|e| panic!("BUG: embedded schema is not JSON: {e}"))
    })
}

fn validator() -> &'static Validator {
    static VALIDATOR: OnceLock<Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        jsonschema::draft202012::new(schema())
            .unwrap_or_else(|e| panic!("BUG: embedded schema does not compile: {e}"))
    })
}

/// Checks `doc` against the workflow schema; one diagnostic per violation.
pub fn check(file: &str, source: &str, doc: &Document) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for error in validator().iter_errors(&doc.value) {
        let pointer = error.instance_path().as_str().to_owned();
        match error.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected } => {
                for key in unexpected {
                    let child = format!("{pointer}/{}", escape_segment(key));
                    let allowed = allowed_keys(&error);
                    let message = if allowed.is_empty() {
                        format!("unknown key `{key}`")
                    } else {
                        format!(
                            "unknown key `{key}`; expected one of {}",
                            allowed.join(", ")
                        )
                    };
                    out.push(Diagnostic::new(
                        file,
                        Some(source),
                        doc.key_pos(&child),
                        child,
                        message,
                    ));
                }
            }
            ValidationErrorKind::Required { property } => {
                let name = property.as_str().unwrap_or_default();
                let at = if pointer.is_empty() {
                    first_key(doc)
                } else {
                    doc.key_pos(&pointer)
                };
                out.push(Diagnostic::new(
                    file,
                    Some(source),
                    at,
                    pointer.clone(),
                    format!("missing required key `{name}`"),
                ));
            }
            _ => {
                let message = friendly(&pointer, &error);
                out.push(Diagnostic::new(
                    file,
                    Some(source),
                    doc.value_pos(&pointer),
                    pointer,
                    message,
                ));
            }
        }
    }
    out
}

fn first_key(doc: &Document) -> Pos {
    doc.positions.get("").map_or(Pos::START, |n| n.value)
}

/// The property names the schema allows where `error` found an unknown one.
fn allowed_keys(error: &ValidationError<'_>) -> Vec<String> {
    // The schema path ends in `/additionalProperties`; its parent holds `properties`.
    let path = error.schema_path().as_str();
    let parent = path.strip_suffix("/additionalProperties").unwrap_or(path);
    schema()
        .pointer(parent)
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
        .map(|props| props.keys().map(|k| format!("`{k}`")).collect())
        .unwrap_or_default()
}

/// A message that names the value and says what would be right.
fn friendly(pointer: &str, error: &ValidationError<'_>) -> String {
    let field = pointer.rsplit('/').next().unwrap_or_default();
    let instance = error.instance();
    let shown = match instance.as_ref() {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let schema_path = error.schema_path().as_str();
    match error.kind() {
        ValidationErrorKind::OneOfNotValid { .. }
        | ValidationErrorKind::OneOfMultipleValid { .. } => {
            if field == "trigger" {
                "`trigger` needs exactly one of `event` or `schedule`".to_owned()
            } else {
                "an action needs exactly one of `http` or `log`".to_owned()
            }
        }
        ValidationErrorKind::Pattern { .. } => match field {
            "method" => format!(
                "unknown method `{shown}`; expected one of GET, DELETE, HEAD, OPTIONS, PATCH, PUT, POST"
            ),
            "name" => format!(
                "`{shown}` is not a valid workflow name; use lower-case letters, digits, `.`, `_` and `-`, starting with a letter or digit"
            ),
            "id" => format!(
                "`{shown}` is not a valid action id; use lower-case letters, digits and `_`, not starting with a digit"
            ),
            "event" => format!(
                "`{shown}` is not a valid event name; use letters, digits, `.`, `_`, `:` and `-`"
            ),
            _ if schema_path.contains("duration") => {
                format!("`{shown}` is not a duration; write e.g. `250ms`, `30s`, `10m`, `24h`")
            }
            _ => error.to_string(),
        },
        ValidationErrorKind::Type { .. } if schema_path.contains("duration") => {
            format!(
                "`{shown}` is not a duration; write a string such as `250ms`, `30s`, `10m`, `24h`"
            )
        }
        ValidationErrorKind::Enum { options } => {
            let choices: Vec<String> = options
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(|s| format!("`{s}`"))
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "`{shown}` is not allowed for `{field}`; expected one of {}",
                choices.join(", ")
            )
        }
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_schema_is_valid_draft_2020_12() {
        jsonschema::draft202012::meta::validate(schema())
            .expect("schema must satisfy its metaschema");
    }

    #[test]
    fn embedded_schema_is_the_file_in_schemas() {
        let on_disk = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/schemas/workflow.schema.json"
        ))
        .expect("schemas/workflow.schema.json is readable");
        assert_eq!(SCHEMA_JSON, on_disk);
    }
}

//! One minijinja environment (strict undefined, no auto-escape) and the ways
//! flowrun renders with it: string templates, `json:` bodies and `when:` tests.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use minijinja::value::Serde;
use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value as JinjaValue};
use serde_json::Value;

/// The variables a template may use; anything else is a validation error.
pub const ROOTS: [&str; 6] = ["payload", "trigger", "run", "action", "steps", "secrets"];

/// A template could not be compiled or rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    /// One-sentence explanation.
    pub message: String,
    /// 1-based line inside the template, when known.
    pub line: Option<usize>,
    /// 1-based column inside the template's line, when known.
    pub column: Option<usize>,
}

/// Module-local result.
pub type Result<T> = std::result::Result<T, Error>;

/// The process-wide environment.
pub fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        // A missing variable must fail the action, never render as "".
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        // Bounded work per render: a template is user input.
        env.set_fuel(Some(1_000_000));
        env.add_filter("urlencode_segment", urlencode_segment);
        env
    })
}

/// Percent-encodes every byte outside RFC 3986's unreserved set (unlike `urlencode`, also `/`).
fn urlencode_segment(value: String) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn located(e: &minijinja::Error, source: &str) -> Error {
    let (line, column) = match (e.line(), e.range()) {
        (Some(line), Some(range)) => {
            let start = range.start.min(source.len());
            let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
            (
                Some(line),
                Some(source[line_start..start].chars().count() + 1),
            )
        }
        (line, _) => (line, None),
    };
    let mut message = e.kind().to_string();
    if let Some(detail) = e.detail() {
        message = format!("{message}: {detail}");
    }
    Error {
        message,
        line,
        column,
    }
}

/// Compiles a string template and returns the dotted variable paths it reads.
pub fn check_template(source: &str) -> Result<BTreeSet<String>> {
    let t = env()
        .template_from_str(source)
        .map_err(|e| located(&e, source))?;
    Ok(t.undeclared_variables(true).into_iter().collect())
}

/// Compiles an expression (`when:`) and returns the dotted variable paths it reads.
pub fn check_expression(source: &str) -> Result<BTreeSet<String>> {
    let e = env()
        .compile_expression(source)
        .map_err(|e| located(&e, source))?;
    Ok(e.undeclared_variables(true).into_iter().collect())
}

/// The expression inside a string that is exactly one `{{ expr }}`, if it is one.
pub fn sole_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") || inner.contains("{#")
    {
        return None;
    }
    Some(inner.trim())
}

/// Names the first variable path of `source` that `ctx` lacks, for a strict-undefined error.
fn missing_path(paths: &BTreeSet<String>, ctx: &Value) -> Option<String> {
    for path in paths {
        let mut node = ctx;
        let mut walked = Vec::new();
        for seg in path.split('.') {
            walked.push(seg);
            match node.get(seg) {
                Some(next) => node = next,
                None => return Some(walked.join(".")),
            }
        }
    }
    None
}

fn render_error(
    e: &minijinja::Error,
    source: &str,
    paths: impl FnOnce() -> BTreeSet<String>,
    ctx: &Value,
) -> Error {
    let mut err = located(e, source);
    if e.kind() == minijinja::ErrorKind::UndefinedError
        && let Some(path) = missing_path(&paths(), ctx)
    {
        err.message = format!("`{path}` is undefined");
    }
    err
}

/// Renders a string template against the JSON context.
pub fn render(source: &str, ctx: &Value) -> Result<String> {
    let t = env()
        .template_from_str(source)
        .map_err(|e| located(&e, source))?;
    t.render(JinjaValue::from(Serde(ctx))).map_err(|e| {
        render_error(
            &e,
            source,
            || t.undeclared_variables(true).into_iter().collect(),
            ctx,
        )
    })
}

/// Evaluates an expression against the JSON context.
fn eval(source: &str, ctx: &Value) -> Result<JinjaValue> {
    let expr = env()
        .compile_expression(source)
        .map_err(|e| located(&e, source))?;
    let paths = || expr.undeclared_variables(true).into_iter().collect();
    let value = expr
        .eval(JinjaValue::from(Serde(ctx)))
        .map_err(|e| render_error(&e, source, paths, ctx))?;
    // minijinja's `eval` hands an undefined result back instead of failing; strict
    // undefined must fail here too (a `json:` value or a `when:` test), never become null/false.
    if value.is_undefined() {
        let what = missing_path(&paths(), ctx).unwrap_or_else(|| source.trim().to_owned());
        return Err(Error {
            message: format!("`{what}` is undefined"),
            line: None,
            column: None,
        });
    }
    Ok(value)
}

/// Evaluates a `when:` expression for truth.
pub fn is_true(source: &str, ctx: &Value) -> Result<bool> {
    eval(source, ctx).map(|v| v.is_true())
}

/// Renders a `json:` body: each string value is a template (keys are sent as
/// written), and a string that is exactly one `{{ expr }}` keeps the expression's JSON type.
pub fn render_json(value: &Value, ctx: &Value) -> Result<Value> {
    Ok(match value {
        Value::String(s) => match sole_expression(s) {
            Some(expr) => {
                let v = eval(expr, ctx)?;
                serde_json::to_value(&v).map_err(|e| Error {
                    message: format!("`{expr}` does not convert to JSON: {e}"),
                    line: None,
                    column: None,
                })?
            }
            None => Value::String(render(s, ctx)?),
        },
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render_json(v, ctx))
                .collect::<Result<_>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_json(v, ctx)?)))
                .collect::<Result<_>>()?,
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn strict_undefined_names_the_missing_path() {
        let ctx = json!({"payload": {"order": {}}});
        let err = render("id={{ payload.order.id }}", &ctx).expect_err("undefined");
        assert_eq!(err.message, "`payload.order.id` is undefined");
    }

    #[test]
    fn sole_expression_keeps_json_types() {
        let ctx = json!({"payload": {"n": 12.5, "ok": true, "o": {"a": [1]}, "s": "q\"\n✓"}});
        let body = json!({"n": "{{ payload.n }}", "ok": "{{payload.ok}}", "o": "{{ payload.o }}", "s": "{{ payload.s }}", "t": "n={{ payload.n }}"});
        let out = render_json(&body, &ctx).expect("renders");
        assert_eq!(
            out,
            json!({"n": 12.5, "ok": true, "o": {"a": [1]}, "s": "q\"\n✓", "t": "n=12.5"})
        );
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let err = check_template("a\nb {{ payload.x ").expect_err("syntax");
        assert_eq!(err.line, Some(2));
        assert!(err.column.is_some(), "{err:?}");
    }

    #[test]
    fn undeclared_variables_are_dotted() {
        let vars = check_template("{{ payload.a.b }} {{ steps.x.status }}").expect("compiles");
        assert!(
            vars.contains("payload.a.b") && vars.contains("steps.x.status"),
            "{vars:?}"
        );
    }

    #[test]
    fn segment_encoding_escapes_slashes() {
        assert_eq!(urlencode_segment("a/b c".into()), "a%2Fb%20c");
    }
}

//! YAML text → JSON value plus the source position of every key and value.
//!
//! We walk saphyr-parser's event stream ourselves rather than building a tree
//! first: it gives every node's span and scalar style (needed to place template
//! errors inside a string), and lets us refuse anchors and aliases before they
//! can expand (a "billion laughs" file is a few hundred bytes).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use saphyr::Scalar;
use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span, Tag};
use serde_json::{Map, Number, Value};

use super::diagnostic::{Diagnostic, Pos};

/// Deeper nesting than this is refused instead of risking the stack.
const MAX_DEPTH: usize = 64;

/// Where a node sits in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePos {
    /// Position of the mapping key that holds this node, if any.
    pub key: Option<Pos>,
    /// Position where the node's value starts.
    pub value: Pos,
    /// How a string scalar was written; `None` for non-scalars.
    pub style: Option<ScalarStyle>,
}

/// A parsed workflow file: its JSON value and a position for every JSON pointer.
#[derive(Debug, Clone)]
pub struct Document {
    /// The document as JSON (what the schema and the model see).
    pub value: Value,
    /// JSON pointer → source position.
    pub positions: HashMap<String, NodePos>,
}

impl Document {
    /// The best position for `pointer`: the node itself, or its nearest ancestor.
    pub fn value_pos(&self, pointer: &str) -> Pos {
        self.nearest(pointer).map_or(Pos::START, |n| n.value)
    }

    /// The position of the key that holds `pointer` (falls back to its value, then ancestors).
    pub fn key_pos(&self, pointer: &str) -> Pos {
        self.nearest(pointer)
            .map_or(Pos::START, |n| n.key.unwrap_or(n.value))
    }

    /// The node at `pointer` or at its nearest recorded ancestor.
    pub fn nearest(&self, pointer: &str) -> Option<&NodePos> {
        let mut p = pointer;
        loop {
            if let Some(n) = self.positions.get(p) {
                return Some(n);
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => return None,
            }
        }
    }
}

/// Escapes one JSON pointer segment (RFC 6901).
pub fn escape_segment(s: &str) -> Cow<'_, str> {
    if s.contains(['~', '/']) {
        Cow::Owned(s.replace('~', "~0").replace('/', "~1"))
    } else {
        Cow::Borrowed(s)
    }
}

/// Parses `source` (one YAML document) into a [`Document`], or every located error found.
pub fn parse(file: &str, source: &str) -> Result<Document, Vec<Diagnostic>> {
    let mut walker = Walker {
        file,
        source,
        parser: Parser::new_from_str(source),
        positions: HashMap::new(),
        errors: Vec::new(),
    };
    match walker.document() {
        Ok(Some(value)) if walker.errors.is_empty() => Ok(Document {
            value,
            positions: walker.positions,
        }),
        Ok(Some(_)) => Err(walker.errors),
        Ok(None) => Err(vec![Diagnostic::new(
            file,
            Some(source),
            Pos::START,
            "",
            "the file holds no workflow; expected a mapping with `name`, `trigger` and `actions`",
        )]),
        Err(e) => {
            walker.errors.push(walker.scan_error(&e));
            Err(walker.errors)
        }
    }
}

fn pos(span: Span) -> Pos {
    Pos {
        line: span.start.line(),
        column: span.start.col() + 1,
    }
}

struct Walker<'a> {
    file: &'a str,
    source: &'a str,
    parser: Parser<'a, saphyr_parser::StrInput<'a>>,
    positions: HashMap<String, NodePos>,
    errors: Vec<Diagnostic>,
}

type Step<T> = Result<T, ScanError>;

impl<'a> Walker<'a> {
    fn next(&mut self) -> Step<(Event<'a>, Span)> {
        match self.parser.next_event() {
            Some(r) => r,
            // The parser always ends with StreamEnd; running dry means it already failed.
            None => Ok((Event::StreamEnd, Span::default())),
        }
    }

    fn error(&mut self, at: Pos, pointer: &str, message: impl Into<String>) {
        self.errors.push(Diagnostic::new(
            self.file,
            Some(self.source),
            at,
            pointer,
            message,
        ));
    }

    fn scan_error(&self, e: &ScanError) -> Diagnostic {
        let at = Pos {
            line: e.marker().line(),
            column: e.marker().col() + 1,
        };
        Diagnostic::new(
            self.file,
            Some(self.source),
            at,
            "",
            format!("invalid YAML: {}", e.info()),
        )
    }

    /// Reads the stream: `None` when it holds no document.
    fn document(&mut self) -> Step<Option<Value>> {
        let mut value = None;
        loop {
            let (event, span) = self.next()?;
            match event {
                Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
                Event::StreamEnd => return Ok(value),
                Event::DocumentStart(_) if value.is_some() => {
                    self.error(
                        pos(span),
                        "",
                        "a workflow file holds one YAML document; remove this second document (`---`)",
                    );
                    return Ok(value);
                }
                Event::DocumentStart(_) => {
                    let (event, span) = self.next()?;
                    value = Some(self.node(event, span, String::new(), None, 0)?);
                }
                other => {
                    // Not reachable with a well-behaved parser; report rather than panic.
                    self.error(pos(span), "", format!("unexpected YAML event {other:?}"));
                    return Ok(value);
                }
            }
        }
    }

    fn node(
        &mut self,
        event: Event<'a>,
        span: Span,
        pointer: String,
        key: Option<Pos>,
        depth: usize,
    ) -> Step<Value> {
        let at = pos(span);
        if depth > MAX_DEPTH {
            self.error(
                at,
                &pointer,
                format!("nesting deeper than {MAX_DEPTH} levels is not supported"),
            );
            return Err(ScanError::new_str(span.start, "nesting too deep"));
        }
        let anchor = match &event {
            Event::Scalar(_, _, a, _) | Event::SequenceStart(a, _) | Event::MappingStart(a, _) => {
                *a
            }
            _ => 0,
        };
        if anchor != 0 {
            self.error(
                at,
                &pointer,
                "YAML anchors (`&name`) are not supported in workflow files; write the value out",
            );
        }
        let record = |style| NodePos {
            key,
            value: at,
            style,
        };
        match event {
            Event::Alias(_) => {
                self.positions.insert(pointer.clone(), record(None));
                self.error(
                    at,
                    &pointer,
                    "YAML aliases (`*name`) are not supported in workflow files; write the value out",
                );
                Ok(Value::Null)
            }
            Event::Scalar(text, style, _, tag) => {
                self.positions.insert(pointer.clone(), record(Some(style)));
                Ok(self.scalar(text, style, tag.as_ref(), at, &pointer))
            }
            Event::SequenceStart(_, _) => {
                self.positions.insert(pointer.clone(), record(None));
                let mut items = Vec::new();
                loop {
                    let (event, span) = self.next()?;
                    if matches!(event, Event::SequenceEnd) {
                        return Ok(Value::Array(items));
                    }
                    let child = format!("{pointer}/{}", items.len());
                    items.push(self.node(event, span, child, None, depth + 1)?);
                }
            }
            Event::MappingStart(_, _) => {
                self.positions.insert(pointer.clone(), record(None));
                self.mapping(pointer, depth)
            }
            other => {
                self.error(at, &pointer, format!("unexpected YAML event {other:?}"));
                Err(ScanError::new_str(span.start, "unexpected event"))
            }
        }
    }

    fn mapping(&mut self, pointer: String, depth: usize) -> Step<Value> {
        let mut map = Map::new();
        let mut seen = HashSet::new();
        loop {
            let (event, span) = self.next()?;
            let key_at = pos(span);
            let key = match event {
                Event::MappingEnd => return Ok(Value::Object(map)),
                Event::Scalar(text, _, anchor, _) => {
                    if anchor != 0 {
                        self.error(
                            key_at,
                            &pointer,
                            "YAML anchors (`&name`) are not supported in workflow files",
                        );
                    }
                    text.into_owned()
                }
                _ => {
                    self.error(key_at, &pointer, "mapping keys must be plain strings");
                    return Err(ScanError::new_str(span.start, "complex mapping key"));
                }
            };
            let child = format!("{pointer}/{}", escape_segment(&key));
            let (event, span) = self.next()?;
            if !seen.insert(key.clone()) {
                self.error(
                    key_at,
                    &child,
                    format!("duplicate key `{key}`; each key may appear once in a mapping"),
                );
                // Parse and drop the repeated value so the walk stays in step.
                let saved = self.positions.get(&child).copied();
                self.node(event, span, child.clone(), Some(key_at), depth + 1)?;
                if let Some(saved) = saved {
                    self.positions.insert(child, saved);
                }
                continue;
            }
            let value = self.node(event, span, child, Some(key_at), depth + 1)?;
            map.insert(key, value);
        }
    }

    fn scalar(
        &mut self,
        text: Cow<'a, str>,
        style: ScalarStyle,
        tag: Option<&Cow<'a, Tag>>,
        at: Pos,
        pointer: &str,
    ) -> Value {
        let raw = text.clone();
        match Scalar::parse_from_cow_and_metadata(text, style, tag) {
            Some(Scalar::Null) => Value::Null,
            Some(Scalar::Boolean(b)) => Value::Bool(b),
            Some(Scalar::Integer(i)) => Value::Number(i.into()),
            Some(Scalar::FloatingPoint(f)) => match Number::from_f64(f.into_inner()) {
                Some(n) => Value::Number(n),
                None => {
                    self.error(at, pointer, format!("`{raw}` is not a finite number"));
                    Value::Null
                }
            },
            Some(Scalar::String(s)) => Value::String(s.into_owned()),
            None => {
                let tag = tag
                    .map(|t| format!("{}{}", t.handle, t.suffix))
                    .unwrap_or_default();
                self.error(at, pointer, format!("`{raw}` is not a valid `{tag}` value"));
                Value::Null
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_point_at_keys_and_values() {
        let doc = parse("a.yaml", "name: x\nactions:\n  - log: \"hi\"\n").expect("valid");
        let n = doc.positions["/actions/0/log"];
        assert_eq!(n.key, Some(Pos { line: 3, column: 5 }));
        assert_eq!(
            n.value,
            Pos {
                line: 3,
                column: 10
            }
        );
        assert_eq!(n.style, Some(ScalarStyle::DoubleQuoted));
        assert_eq!(doc.value["actions"][0]["log"], "hi");
    }

    #[test]
    fn scalars_keep_their_yaml_types() {
        let doc = parse("a.yaml", "a: 1\nb: true\nc: 1.5\nd: null\ne: '1'\n").expect("valid");
        assert_eq!(
            doc.value,
            serde_json::json!({"a": 1, "b": true, "c": 1.5, "d": null, "e": "1"})
        );
    }

    #[test]
    fn aliases_and_duplicates_are_located_errors() {
        let errs = parse("a.yaml", "a: &x 1\nb: *x\na: 2\n").expect_err("invalid");
        let at: Vec<_> = errs.iter().map(|d| (d.line, d.column)).collect();
        assert_eq!(at, vec![(1, 4), (2, 4), (3, 1)]);
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing() {
        let src = "[".repeat(10_000);
        let errs = parse("a.yaml", &src).expect_err("invalid");
        assert!(
            errs[0].message.contains("recursion limit") || errs[0].message.contains("nesting"),
            "{errs:?}"
        );
    }
}

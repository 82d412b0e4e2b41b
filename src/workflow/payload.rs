//! Checking a trigger payload against the workflow's `payload_schema`.

use serde_json::Value;

/// Every way `payload` violates `schema`, each as `pointer: message`; empty when it matches.
pub fn check(schema: &Value, payload: &Value) -> Vec<String> {
    match jsonschema::draft202012::new(schema) {
        Ok(v) => v
            .iter_errors(payload)
            .map(|e| {
                let at = e.instance_path().as_str().to_owned();
                let at = if at.is_empty() { "/".to_owned() } else { at };
                format!("{at}: {e}")
            })
            .collect(),
        // Validation refuses such schemas; report rather than panic.
        Err(e) => vec![format!("`payload_schema` does not compile: {e}")],
    }
}

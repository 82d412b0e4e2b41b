//! Every file under `tests/inputs/valid` loads; every file under
//! `tests/inputs/invalid` fails with its located text diagnostic snapshotted.

use std::path::Path;

use flowrun::workflow::{self, diagnostic};

fn display(path: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

fn load(path: &Path) -> Result<workflow::Loaded, Vec<workflow::Diagnostic>> {
    let bytes = std::fs::read(path).expect("fixture is readable");
    workflow::load_bytes(&display(path), &bytes)
}

#[test]
fn valid_inputs_load() {
    insta::glob!("inputs/valid/*.{yaml,yml}", |path| {
        match load(path) {
            Ok(loaded) => insta::assert_json_snapshot!(loaded.workflow),
            Err(errors) => panic!(
                "{} should be valid:\n{}",
                path.display(),
                diagnostic::render_all(&errors, workflow::Format::Text)
            ),
        }
    });
}

#[test]
fn invalid_inputs_fail_with_located_errors() {
    insta::glob!("inputs/invalid/*.yaml", |path| {
        let errors = load(path).expect_err("an invalid fixture must not load");
        insta::assert_snapshot!(diagnostic::render_all(&errors, workflow::Format::Text));
    });
}

#[test]
fn shipped_workflows_and_examples_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["workflows", "examples"] {
        let files = workflow::discover(&[root.join(dir)]).expect("directory exists");
        assert!(files.len() >= 2, "{dir} holds workflows");
        let set = workflow::load_set(&files).expect("readable");
        assert!(
            set.diagnostics.is_empty(),
            "{dir}:\n{}",
            diagnostic::render_all(&set.diagnostics, workflow::Format::Text)
        );
    }
}

//! `flowrun validate` and `flowrun schema` on the real binary: formats and exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn flowrun(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowrun"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A temp dir with two files: one valid, one with two errors.
fn mixed_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("good.yaml"),
        "name: good\ntrigger:\n  event: a\nactions:\n  - log: hi\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("bad.yml"),
        "name: bad\ntrigger:\n  event: a\nactions:\n  - http:\n      method: FETCH\n      url: x\n      colour: red\n",
    )
    .expect("write");
    dir
}

#[test]
fn valid_directory_exits_zero_with_a_summary() {
    let out = flowrun(&["validate", "workflows", "examples"], root());
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
    assert!(
        text(&out.stderr).contains(": no errors") || text(&out.stderr).contains(": 0 errors"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn default_path_is_workflows() {
    let out = flowrun(&["validate"], root());
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let files = std::fs::read_dir(root().join("workflows"))
        .expect("dir")
        .count();
    assert!(
        text(&out.stderr).starts_with(&format!("checked {files} files")),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn text_format_reports_every_error_and_exits_one() {
    let dir = mixed_dir();
    let out = flowrun(&["validate", "."], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("./bad.yml:6:15: error: unknown method `FETCH`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("./bad.yml:8:7: error: unknown key `colour`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("6 |       method: FETCH\n  |               ^"),
        "{stdout}"
    );
    assert_eq!(text(&out.stderr).trim(), "checked 2 files: 2 errors");
}

#[test]
fn github_format_is_one_annotation_per_error() {
    let dir = mixed_dir();
    let out = flowrun(&["validate", "--format", "github", "bad.yml"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].starts_with("::error file=bad.yml,line=6,col=15::unknown method `FETCH`"),
        "{lines:?}"
    );
}

#[test]
fn json_format_is_an_array_of_located_errors() {
    let dir = mixed_dir();
    let out = flowrun(
        &["validate", "--format", "json", "bad.yml", "good.yaml"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let errors: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    insta::assert_json_snapshot!(errors);
}

#[test]
fn json_format_of_valid_files_is_an_empty_array() {
    let dir = mixed_dir();
    let out = flowrun(&["validate", "--format", "json", "good.yaml"], dir.path());
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout).trim(), "[]");
}

#[test]
fn missing_path_exits_two() {
    let out = flowrun(&["validate", "no/such/dir"], root());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot read `no/such/dir`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn duplicate_names_across_files_are_located_in_the_second() {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["a.yaml", "b.yaml"] {
        std::fs::write(
            dir.path().join(f),
            "name: same\ntrigger:\n  event: a\nactions:\n  - log: hi\n",
        )
        .expect("write");
    }
    let out = flowrun(&["validate", "."], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout)
            .contains("./b.yaml:1:7: error: workflow name `same` is already used by `./a.yaml`"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn oversized_file_gets_a_located_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big: PathBuf = dir.path().join("big.yaml");
    let mut body =
        String::from("name: big\ntrigger:\n  event: a\nactions:\n  - log: hi\ndescription: \"");
    body.push_str(&"x".repeat(10 * 1024 * 1024));
    body.push_str("\"\n");
    let len = body.len();
    std::fs::write(&big, body).expect("write");
    let out = flowrun(&["validate", "big.yaml"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).starts_with(&format!("big.yaml:1:1: error: file is {len} bytes")),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn schema_command_prints_the_file_in_schemas() {
    let out = flowrun(&["schema"], root());
    assert_eq!(out.status.code(), Some(0));
    let on_disk = std::fs::read(root().join("schemas/workflow.schema.json")).expect("schema file");
    assert_eq!(out.stdout, on_disk);
}

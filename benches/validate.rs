//! Generates 1,000 varied workflow files and times loading + validating them
//! the way `flowrun validate` does. Prints what it measured.
//!
//! Run: `cargo bench --bench validate`

use std::fmt::Write as _;
use std::time::Instant;

use flowrun::workflow;

fn workflow_text(i: usize) -> String {
    let mut s =
        format!("# yaml-language-server: $schema=../schemas/workflow.schema.json\nname: wf-{i}\n");
    if i.is_multiple_of(3) {
        s.push_str("trigger:\n  schedule: \"*/5 * * * *\"\n");
    } else {
        s.push_str(&format!(
            "trigger:\n  event: order.e{i}\n  payload_schema:\n    type: object\n    properties:\n      order:\n        type: object\n        properties:\n          id: {{type: integer}}\n          total: {{type: number}}\n"
        ));
    }
    s.push_str("actions:\n");
    for a in 0..(1 + i % 5) {
        let payload = if i.is_multiple_of(3) {
            "run.id"
        } else {
            "payload.order.id"
        };
        let _ = write!(
            s,
            "  - id: step_{a}\n    when: \"{payload} != 0\"\n    http:\n      method: {}\n      url: \"https://api.example.com/v1/{{{{ {payload} }}}}/{a}\"\n      headers:\n        Authorization: \"Bearer {{{{ secrets.TOKEN }}}}\"\n        X-Attempt: \"{{{{ action.attempt }}}}\"\n      json:\n        id: \"{{{{ {payload} }}}}\"\n        note: \"step {a} of {{{{ run.workflow }}}}\"\n        prev: \"{}\"\n      timeout: 10s\n      retry:\n        max_duration: 1h\n",
            ["POST", "PUT", "patch", "GET"][a % 4],
            if a > 0 {
                format!("{{{{ steps.step_{}.status }}}}", a - 1)
            } else {
                "first".to_owned()
            },
        );
    }
    s.push_str("  - log: \"done {{ run.id }}\"\n");
    s
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = 0;
    for i in 0..1000 {
        let text = workflow_text(i);
        bytes += text.len();
        std::fs::write(dir.path().join(format!("wf-{i:04}.yaml")), text).expect("write");
    }
    let paths = [dir.path().to_path_buf()];
    let mut runs = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let files = workflow::discover(&paths).expect("discover");
        let set = workflow::load_set(&files).expect("load");
        runs.push(start.elapsed());
        assert_eq!(set.files, 1000);
        assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics.first());
    }
    let first = runs[0];
    runs.sort();
    let median = runs[runs.len() / 2];
    println!(
        "validate: 1000 files ({} KiB): first run (incl. schema compile) {:.1} ms, median of 5 {:.1} ms = {:.0} files/s",
        bytes / 1024,
        first.as_secs_f64() * 1e3,
        median.as_secs_f64() * 1e3,
        1000.0 / median.as_secs_f64()
    );
}

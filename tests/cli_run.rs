//! `flowrun run` on the real binary: exit codes, payload input, workflow
//! lookup, `--output json` snapshots, and secrets kept out of every output.

mod common;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{Reply, Server, yaml};

/// A `flowrun` invocation, built up and then run in a directory.
struct Flowrun {
    dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    stdin: Option<String>,
}

/// What a run printed and how it exited.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// stdout then stderr.
    fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// stdout parsed as the run's JSON object.
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.all()))
    }
}

fn flowrun(dir: &Path) -> Flowrun {
    Flowrun {
        dir: dir.to_path_buf(),
        args: Vec::new(),
        env: Vec::new(),
        stdin: None,
    }
}

impl Flowrun {
    fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    fn stdin(mut self, text: &str) -> Self {
        self.stdin = Some(text.to_owned());
        self
    }

    fn run(self) -> Ran {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flowrun"));
        // Nothing from the outer environment (FLOWRUN_SECRET_*, RUST_LOG) leaks in.
        cmd.env_clear()
            .envs(self.env)
            .args(&self.args)
            .current_dir(&self.dir)
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("the binary starts");
        if let Some(text) = self.stdin {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            pipe.write_all(text.as_bytes()).expect("write stdin");
        }
        // Drain the pipes on threads so waiting with a deadline cannot block the child.
        let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut pipe) = pipe {
                    pipe.read_to_end(&mut bytes).expect("read output");
                }
                String::from_utf8_lossy(&bytes).into_owned()
            })
        };
        let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
        let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
        // Defaults (30s timeouts, a 24h window) must never make a broken binary hang the suite.
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                child.kill().expect("kill");
                panic!(
                    "`flowrun {}` did not finish within 20s",
                    self.args.join(" ")
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ran {
            code: status.code(),
            stdout: stdout.join().expect("stdout reader"),
            stderr: stderr.join().expect("stderr reader"),
        }
    }
}

/// A temp dir holding `payload.json` and the given files (YAML dedented, `BASE` replaced).
fn dir_with(base: &str, payload: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("payload.json"), payload).expect("write payload");
    for (name, text) in files {
        let path = dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(path, yaml(text, base)).expect("write file");
    }
    dir
}

/// Replaces the server's random port so snapshots are stable.
fn stable(ran: &Ran, server: &Server) -> Value {
    let text = ran.stdout.replace(server.base(), "http://127.0.0.1:[port]");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{text}"))
}

const CHAIN: &str = r#"
    name: order-paid-to-erp
    trigger:
      event: order.paid
    actions:
      - id: lookup
        http:
          method: GET
          url: "BASE/orders/{{ payload.order.id }}"
      - id: notify_erp
        http:
          method: POST
          url: "BASE/erp"
          json:
            order: "{{ payload.order.id }}"
            total: "{{ steps.lookup.json.total }}"
            note: "{{ payload.order.note }}"
      - id: vip_only
        when: payload.order.vip
        http:
          method: POST
          url: "BASE/vip"
      - id: note
        log: "sent order {{ payload.order.id }}: {{ steps.notify_erp.status }}"
"#;

const PAYLOAD: &str =
    r#"{"order": {"id": 1001, "vip": false, "note": "ring \"twice\"\nthanks ✓"}}"#;

#[test]
fn succeeded_run_exits_0_with_one_line_per_action() {
    let server = Server::start();
    server.route(
        "/orders/1001",
        vec![Reply::json(&serde_json::json!({"total": 250}))],
    );
    server.route("/erp", vec![Reply::status(201)]);
    let dir = dir_with(server.base(), PAYLOAD, &[("chain.yaml", CHAIN)]);
    let ran = flowrun(dir.path())
        .args(&["run", "chain.yaml", "--payload", "payload.json"])
        .run();
    assert_eq!(ran.code, Some(0), "{}", ran.all());
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert!(
        lines[0].starts_with("run ") && lines[0].ends_with(" of `order-paid-to-erp`: succeeded"),
        "{}",
        ran.stdout
    );
    assert_eq!(
        &lines[1..],
        [
            "  lookup      succeeded  1 attempt  HTTP 200",
            "  notify_erp  succeeded  1 attempt  HTTP 201",
            "  vip_only    skipped  ",
            "  note        succeeded  sent order 1001: 201",
        ],
        "{}",
        ran.stdout
    );
    let erp = &server.hits("/erp")[0];
    assert_eq!(
        erp.json(),
        serde_json::json!({"order": 1001, "total": 250, "note": "ring \"twice\"\nthanks ✓"})
    );
    assert!(server.hits("/vip").is_empty());
}

#[test]
fn failed_run_exits_1_and_later_actions_are_not_run() {
    let server = Server::start();
    server.route("/orders/1001", vec![Reply::status(404)]);
    let dir = dir_with(server.base(), PAYLOAD, &[("chain.yaml", CHAIN)]);
    let ran = flowrun(dir.path())
        .args(&["run", "chain.yaml", "--payload", "payload.json"])
        .run();
    assert_eq!(ran.code, Some(1), "{}", ran.all());
    assert!(ran.stdout.contains(": failed\n"), "{}", ran.stdout);
    assert!(
        ran.stdout.contains(
            "  lookup      failed     1 attempt  HTTP 404  404 Not Found is a client error\n"
        ),
        "{}",
        ran.stdout
    );
    for id in ["notify_erp", "vip_only", "note"] {
        assert!(
            ran.stdout.contains(&format!("  {id:10}  not_run")),
            "{id}: {}",
            ran.stdout
        );
    }
    assert!(server.hits("/erp").is_empty());
}

#[test]
fn non_json_payload_exits_2() {
    let dir = dir_with("", "{order: 1}", &[("w.yaml", LOG_ONLY)]);
    let ran = flowrun(dir.path())
        .args(&["run", "w.yaml", "--payload", "payload.json"])
        .run();
    assert_eq!(ran.code, Some(2), "{}", ran.all());
    assert!(
        ran.stderr
            .starts_with("error: payload `payload.json` is not JSON: "),
        "{}",
        ran.stderr
    );
    assert_eq!(ran.stdout, "");
}

#[test]
fn unreadable_payload_file_exits_2() {
    let dir = dir_with("", "{}", &[("w.yaml", LOG_ONLY)]);
    let ran = flowrun(dir.path())
        .args(&["run", "w.yaml", "--payload", "no-such-file.json"])
        .run();
    assert_eq!(ran.code, Some(2), "{}", ran.all());
    assert!(
        ran.stderr
            .starts_with("error: cannot read payload `no-such-file.json`: "),
        "{}",
        ran.stderr
    );
    assert_eq!(ran.stdout, "");
}

#[test]
fn invalid_workflow_exits_2_with_its_located_diagnostic() {
    let bad = r#"
        name: bad
        trigger:
          event: a
        actions:
          - http:
              method: FETCH
              url: "http://127.0.0.1:9/x"
    "#;
    let dir = dir_with("", "{}", &[("bad.yaml", bad)]);
    let ran = flowrun(dir.path())
        .args(&["run", "bad.yaml", "--payload", "payload.json"])
        .run();
    assert_eq!(ran.code, Some(2), "{}", ran.all());
    assert!(
        ran.stderr
            .contains("bad.yaml:6:15: error: unknown method `FETCH`"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr
            .contains("6 |       method: FETCH\n  |               ^"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr.ends_with("error: the workflow is invalid\n"),
        "{}",
        ran.stderr
    );
    assert_eq!(ran.stdout, "");
}

#[test]
fn missing_secret_exits_2_before_anything_is_sent() {
    let server = Server::start();
    let wf = r#"
        name: needs-secret
        trigger:
          event: a
        actions:
          - http:
              method: POST
              url: "BASE/x"
              headers:
                Authorization: "Bearer {{ secrets.ERP_TOKEN }}"
    "#;
    let dir = dir_with(server.base(), "{}", &[("w.yaml", wf)]);
    let ran = flowrun(dir.path())
        .args(&["run", "w.yaml", "--payload", "payload.json"])
        .env("FLOWRUN_SECRET_OTHER", "x")
        .run();
    assert_eq!(ran.code, Some(2), "{}", ran.all());
    assert!(
        ran.stderr
            .starts_with("error: secret `ERP_TOKEN` is not set"),
        "{}",
        ran.stderr
    );
    assert!(server.all_hits().is_empty());
}

const LOG_ONLY: &str = r#"
    name: echo-payload
    trigger:
      event: a
    actions:
      - log: "got {{ payload.greeting }}"
"#;

#[test]
fn payload_dash_reads_stdin() {
    let dir = dir_with("", "{}", &[("w.yaml", LOG_ONLY)]);
    let ran = flowrun(dir.path())
        .args(&["run", "w.yaml", "--payload", "-"])
        .stdin(r#"{"greeting": "hello from stdin"}"#)
        .run();
    assert_eq!(ran.code, Some(0), "{}", ran.all());
    assert!(
        ran.stdout
            .contains("  #1  succeeded  got hello from stdin\n"),
        "{}",
        ran.stdout
    );
}

#[test]
fn workflow_is_found_by_name_in_dir() {
    let dir = dir_with(
        "",
        r#"{"greeting": "hi"}"#,
        &[
            ("flows/some-file.yaml", LOG_ONLY),
            (
                "workflows/other.yaml",
                &LOG_ONLY.replace("echo-payload", "default-dir"),
            ),
        ],
    );
    let ran = flowrun(dir.path())
        .args(&[
            "run",
            "echo-payload",
            "--dir",
            "flows",
            "--payload",
            "payload.json",
        ])
        .run();
    assert_eq!(ran.code, Some(0), "{}", ran.all());
    assert!(
        ran.stdout.contains("of `echo-payload`: succeeded"),
        "{}",
        ran.stdout
    );
    assert!(ran.stdout.contains("got hi"), "{}", ran.stdout);

    // Without --dir the name is looked up in workflows/.
    let ran = flowrun(dir.path())
        .args(&["run", "default-dir", "--payload", "payload.json"])
        .run();
    assert_eq!(ran.code, Some(0), "{}", ran.all());
    assert!(
        ran.stdout.contains("of `default-dir`: succeeded"),
        "{}",
        ran.stdout
    );

    // A name that is in neither place is a usage error.
    let ran = flowrun(dir.path())
        .args(&["run", "echo-payload", "--payload", "payload.json"])
        .run();
    assert_eq!(ran.code, Some(2), "{}", ran.all());
    assert!(
        ran.stderr
            .contains("no valid workflow named `echo-payload` in `workflows`"),
        "{}",
        ran.stderr
    );
}

#[test]
fn verbose_shows_every_attempt_on_stderr() {
    let server = Server::start();
    server.route("/x", vec![Reply::status(503), Reply::status(200)]);
    let wf = r#"
        name: flaky
        trigger:
          event: a
        actions:
          - id: call
            http:
              method: POST
              url: "BASE/x"
              retry: {initial_backoff: 10ms, max_backoff: 50ms, max_duration: 5s}
    "#;
    let dir = dir_with(server.base(), "{}", &[("w.yaml", wf)]);
    let ran = flowrun(dir.path())
        .args(&["run", "w.yaml", "--payload", "payload.json", "-v"])
        .run();
    assert_eq!(ran.code, Some(0), "{}", ran.all());
    assert!(
        ran.stderr.contains("  call attempt 1: 503 in ")
            && ran
                .stderr
                .contains("ms: 503 Service Unavailable is retried; retrying in "),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stderr.contains("  call attempt 2: 200 in "),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stdout
            .contains("  call  succeeded  2 attempts  HTTP 200\n"),
        "{}",
        ran.stdout
    );
}

#[test]
fn json_output_of_a_succeeded_chain() {
    let server = Server::start();
    server.route(
        "/orders/1001",
        vec![Reply::json(&serde_json::json!({"total": 250}))],
    );
    server.route("/erp", vec![Reply::status(503), Reply::status(201)]);
    let chain = CHAIN.replace(
        "url: \"BASE/erp\"",
        "url: \"BASE/erp\"\n          retry: {initial_backoff: 10ms, max_backoff: 50ms, max_duration: 5s}",
    );
    let dir = dir_with(server.base(), PAYLOAD, &[("chain.yaml", &chain)]);
    let ran = flowrun(dir.path())
        .args(&[
            "run",
            "chain.yaml",
            "--payload",
            "payload.json",
            "--output",
            "json",
        ])
        .run();
    assert_eq!(ran.code, Some(0), "{}", ran.all());
    insta::assert_json_snapshot!(stable(&ran, &server), {".run_id" => "[run_id]"});
}

#[test]
fn json_output_of_a_failure_with_not_run() {
    let server = Server::start();
    server.route(
        "/orders/1001",
        vec![Reply::json(&serde_json::json!({"total": 250}))],
    );
    server.route("/erp", vec![Reply::status(422).body("total is wrong")]);
    let dir = dir_with(server.base(), PAYLOAD, &[("chain.yaml", CHAIN)]);
    let ran = flowrun(dir.path())
        .args(&[
            "run",
            "chain.yaml",
            "--payload",
            "payload.json",
            "--output",
            "json",
        ])
        .run();
    assert_eq!(ran.code, Some(1), "{}", ran.all());
    insta::assert_json_snapshot!(stable(&ran, &server), {".run_id" => "[run_id]"});
}

#[test]
fn json_output_of_a_dry_run_sends_nothing() {
    let server = Server::start();
    // A dry run's `steps.lookup` is a placeholder with no JSON: read only its status.
    let chain = CHAIN.replace(
        "total: \"{{ steps.lookup.json.total }}\"",
        "lookup_status: \"{{ steps.lookup.status }}\"",
    );
    assert_ne!(chain, CHAIN);
    let dir = dir_with(server.base(), PAYLOAD, &[("chain.yaml", &chain)]);
    let ran = flowrun(dir.path())
        .args(&[
            "run",
            "chain.yaml",
            "--payload",
            "payload.json",
            "--output",
            "json",
            "--dry-run",
        ])
        .run();
    assert_eq!(ran.code, Some(0), "{}", ran.all());
    assert!(server.all_hits().is_empty(), "a dry run sent requests");
    let mut out = stable(&ran, &server);
    // Headers are [name, value] pairs; the Idempotency-Key is a fresh delivery id.
    for action in out["actions"].as_array_mut().expect("actions") {
        let headers = action
            .get_mut("request")
            .and_then(|r| r.get_mut("headers"))
            .and_then(Value::as_array_mut);
        for pair in headers.into_iter().flatten() {
            if pair[0] == "Idempotency-Key" {
                pair[1] = "[delivery_id]".into();
            }
        }
    }
    insta::assert_json_snapshot!(out, {".run_id" => "[run_id]"});
}

const TOKEN: &str = "tok-8d1f0c-SECRET-a71b";

/// Sends the token in a query, a header and a body to a server that echoes it
/// back (headers and body), logs the echo, then fails on a 500 that echoes it too.
const LEAKY: &str = r#"
    name: leaky
    trigger:
      event: a
    actions:
      - id: echo
        http:
          method: POST
          url: "BASE/echo?token={{ secrets.TOKEN }}"
          headers:
            Authorization: "Bearer {{ secrets.TOKEN }}"
          json: {token: "{{ secrets.TOKEN }}", order: "{{ payload.order }}"}
      - id: note
        log: "echo said {{ steps.echo.body }} with {{ steps.echo.headers }}"
      - id: fail
        http:
          method: POST
          url: "BASE/fail"
          headers:
            Authorization: "Bearer {{ secrets.TOKEN }}"
          body: "token={{ secrets.TOKEN }}"
          retry: {initial_backoff: 10ms, max_backoff: 20ms, max_duration: 100ms}
"#;

/// Fails while rendering: the secret itself is not a URL, and the error quotes the URL.
const BAD_URL: &str = r#"
    name: bad-url
    trigger:
      event: a
    actions:
      - id: call
        http:
          method: GET
          url: "{{ secrets.TOKEN }}"
"#;

#[test]
fn secrets_are_absent_from_every_output() {
    let server = Server::start();
    server.route("/echo", vec![Reply::echo().header("x-echo-token", TOKEN)]);
    server.route("/fail", vec![Reply::status(500).with_echo()]);
    let dir = dir_with(
        server.base(),
        r#"{"order": 7}"#,
        &[("leaky.yaml", LEAKY), ("bad-url.yaml", BAD_URL)],
    );
    std::fs::write(dir.path().join("secrets.env"), format!("TOKEN={TOKEN}\n"))
        .expect("write secrets file");

    let leaky = |args: &[&str]| {
        flowrun(dir.path())
            .args(&["run", "leaky.yaml", "--payload", "payload.json"])
            .args(args)
            .env("FLOWRUN_SECRET_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .run()
    };
    let runs = [
        ("text -v", leaky(&["-v"])),
        ("json", leaky(&["--output", "json"])),
        ("json -v", leaky(&["--output", "json", "-v"])),
        ("dry run text", leaky(&["--dry-run", "-v"])),
        ("dry run json", leaky(&["--dry-run", "--output", "json"])),
        (
            "secrets file",
            flowrun(dir.path())
                .args(&["run", "leaky.yaml", "--payload", "payload.json", "-v"])
                .args(&["--secrets-file", "secrets.env"])
                .run(),
        ),
        (
            "bad url",
            flowrun(dir.path())
                .args(&["run", "bad-url.yaml", "--payload", "payload.json", "-v"])
                .env("FLOWRUN_SECRET_TOKEN", TOKEN)
                .run(),
        ),
    ];
    for (what, ran) in &runs {
        assert!(
            !ran.all().contains(TOKEN),
            "{what} leaked the secret:\n{}",
            ran.all()
        );
        assert!(ran.all().contains("[redacted]"), "{what}:\n{}", ran.all());
    }

    // The secret really went out, and really came back: redaction did the hiding.
    let echo = &server.hits("/echo")[0];
    assert_eq!(
        echo.query.as_deref(),
        Some(format!("token={TOKEN}").as_str())
    );
    assert_eq!(
        echo.header("authorization"),
        Some(format!("Bearer {TOKEN}"))
    );
    assert!(server.hits("/fail").len() > 1, "the 500 was retried");

    let [text, json, _, dry_text, dry_json, from_file, bad_url] = &runs;
    let text = &text.1;
    assert_eq!(text.code, Some(1), "{}", text.all());
    assert!(
        text.stdout.contains("  note  succeeded  echo said {"),
        "{}",
        text.stdout
    );
    assert!(
        text.stderr.contains("fail attempt 1: 500"),
        "{}",
        text.stderr
    );
    assert!(
        text.stderr.contains("echo said {"),
        "the log line is traced at info: {}",
        text.stderr
    );

    let json = json.1.json();
    assert_eq!(json["status"], "failed");
    let message = json["actions"][1]["message"].as_str().expect("a message");
    assert!(message.contains("Bearer [redacted]"), "{message}");
    assert!(
        message.contains("'x-echo-token': '[redacted]'"),
        "{message}"
    );
    let error = json["actions"][2]["error"].as_str().expect("an error");
    assert!(error.ends_with("; last: 500"), "{error}");

    let dry_text = &dry_text.1;
    assert_eq!(dry_text.code, Some(0), "{}", dry_text.all());
    for shown in [
        "POST http://127.0.0.1:",
        "/echo?token=[redacted]\n",
        "    Authorization: Bearer [redacted]\n",
        r#"{"token":"[redacted]","order":7}"#,
        "token=[redacted]\n",
    ] {
        assert!(
            dry_text.stdout.contains(shown),
            "{shown}: {}",
            dry_text.stdout
        );
    }
    let dry_json = dry_json.1.json();
    assert_eq!(
        dry_json["actions"][0]["request"]["body"],
        r#"{"token":"[redacted]","order":7}"#
    );

    assert_eq!(from_file.1.code, Some(1), "{}", from_file.1.all());

    let bad_url = &bad_url.1;
    assert_eq!(bad_url.code, Some(1), "{}", bad_url.all());
    assert!(
        bad_url
            .stdout
            .contains("`[redacted]` is not an absolute http(s) URL"),
        "{}",
        bad_url.stdout
    );
}

#[test]
fn secrets_are_redacted_in_their_json_and_url_encodings() {
    // Quotes, a backslash, a space and base64 punctuation: every encoding changes it.
    let token = r#"Zq9"Sup3rSecret\wo rd+/="#;
    let wf = r#"
        name: encoded
        trigger:
          event: a
        actions:
          - id: call
            http:
              method: POST
              url: "http://127.0.0.1:9/x?t={{ secrets.TOKEN | urlencode }}&u={{ secrets.TOKEN | urlencode_segment }}"
              headers:
                X-Token: "{{ secrets.TOKEN }}"
              json: {token: "{{ secrets.TOKEN }}", nested: ["{{ secrets.TOKEN }}"]}
          - id: raw
            http:
              method: POST
              url: "http://127.0.0.1:9/y"
              body: '{"token": {{ secrets.TOKEN | tojson }}}'
    "#;
    let dir = dir_with("", "{}", &[("w.yaml", wf)]);
    for output in ["text", "json"] {
        let ran = flowrun(dir.path())
            .args(&["run", "w.yaml", "--payload", "payload.json", "--dry-run"])
            .args(&["--output", output])
            .env("FLOWRUN_SECRET_TOKEN", token)
            .run();
        assert_eq!(ran.code, Some(0), "{}", ran.all());
        assert!(
            !ran.all().contains("Sup3rSecret"),
            "{output}: an encoded secret leaked:\n{}",
            ran.all()
        );
        assert!(
            ran.all().matches("[redacted]").count() >= 6,
            "{}",
            ran.all()
        );
    }
}

//! The engine against real HTTP servers on 127.0.0.1:0: methods, Flow's
//! classification, retries, timeouts, idempotency, signing, templates.
//!
//! Every timeout and backoff is set in milliseconds in the workflow itself.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use common::{End, Reply, Server, closed_port, yaml};
use flowrun::engine::{
    ActionReport, ActionStatus, Engine, NoSink, RunInput, RunReport, RunStatus, SystemClock,
};
use flowrun::secrets::Secrets;

/// Quick retries inside a 5 s window.
const FAST_RETRY: &str = "{initial_backoff: 10ms, max_backoff: 50ms, max_duration: 5s}";
/// Quick retries inside a window that runs out in a fraction of a second.
const SHORT_WINDOW: &str = "{initial_backoff: 10ms, max_backoff: 50ms, max_duration: 200ms}";

fn workflow(actions: &str, base: &str) -> flowrun::workflow::Workflow {
    let source = format!(
        "name: test\ntrigger:\n  event: test.event\nactions:\n{}",
        yaml(actions, base)
            .replace("FAST_RETRY", FAST_RETRY)
            .replace("SHORT_WINDOW", SHORT_WINDOW)
    );
    match flowrun::workflow::load_str("test.yaml", &source) {
        Ok(loaded) => loaded.workflow,
        Err(errors) => panic!(
            "invalid test workflow:\n{}\n{source}",
            flowrun::workflow::diagnostic::render_all(&errors, flowrun::workflow::Format::Text)
        ),
    }
}

async fn run_with(actions: &str, base: &str, payload: Value, secrets: Secrets) -> RunReport {
    let wf = workflow(actions, base);
    let engine = Engine::new(Arc::new(SystemClock)).expect("an engine");
    let input = RunInput {
        run_id: flowrun::engine::new_id(),
        trigger: RunInput::trigger_for(&wf, std::time::SystemTime::now()),
        payload,
        secrets,
    };
    // Defaults (30s timeouts, a 24h window) must never make a broken engine hang the suite.
    tokio::time::timeout(
        Duration::from_secs(20),
        engine.run(&wf, &input, false, &mut NoSink),
    )
    .await
    .expect("the run finishes within 20s")
}

async fn run(actions: &str, server: &Server) -> RunReport {
    run_with(actions, server.base(), json!({}), Secrets::default()).await
}

fn action<'a>(report: &'a RunReport, id: &str) -> &'a ActionReport {
    report
        .actions
        .iter()
        .find(|a| a.id.as_deref() == Some(id))
        .unwrap_or_else(|| panic!("no action `{id}` in {report:#?}"))
}

fn reason(status: u16) -> &'static str {
    axum::http::StatusCode::from_u16(status)
        .expect("a status")
        .canonical_reason()
        .expect("a reason phrase")
}

#[tokio::test]
async fn every_method_arrives_with_its_headers_and_body() {
    let server = Server::start();
    for method in ["GET", "DELETE", "HEAD", "OPTIONS", "PATCH", "PUT", "POST"] {
        let report = run_with(
            &format!(
                r#"
                - id: call
                  http:
                    method: {method}
                    url: "BASE/m/{{{{ payload.id }}}}?q={{{{ payload.q | urlencode }}}}"
                    headers:
                      X-Method: "{method}"
                      X-Order: "order-{{{{ payload.id }}}}"
                    body: "body of {method} for {{{{ payload.id }}}}"
                "#
            ),
            server.base(),
            json!({"id": 42, "q": "a b"}),
            Secrets::default(),
        )
        .await;
        assert_eq!(report.status, RunStatus::Succeeded, "{method}: {report:#?}");
        let hit = server
            .all_hits()
            .into_iter()
            .find(|h| h.header("x-method").as_deref() == Some(method))
            .unwrap_or_else(|| panic!("{method} never arrived"));
        assert_eq!(hit.method, method);
        assert_eq!(hit.path, "/m/42");
        assert_eq!(hit.query.as_deref(), Some("q=a%20b"));
        assert_eq!(hit.header("x-order").as_deref(), Some("order-42"));
        assert_eq!(hit.text(), format!("body of {method} for 42"), "{method}");
        assert!(hit.header("idempotency-key").is_some(), "{method}");
        assert!(
            hit.header("user-agent")
                .is_some_and(|ua| ua.starts_with("flowrun/")),
            "{method}"
        );
    }
    assert_eq!(server.all_hits().len(), 7);
}

#[tokio::test]
async fn redirect_is_success_and_not_followed() {
    let server = Server::start();
    for status in [200, 201, 204, 301, 302, 304] {
        let path = format!("/s{status}");
        server.route(
            &path,
            vec![Reply::status(status).header("location", &format!("{}/target", server.base()))],
        );
        let report = run(
            &format!(
                r#"
                - id: call
                  http: {{method: GET, url: "BASE{path}", retry: SHORT_WINDOW}}
                - id: after
                  http: {{method: GET, url: "BASE/after{status}"}}
                "#
            ),
            &server,
        )
        .await;
        assert_eq!(report.status, RunStatus::Succeeded, "{status}: {report:#?}");
        let call = action(&report, "call");
        assert_eq!(call.status, ActionStatus::Succeeded, "{status}");
        assert_eq!(call.attempts, 1, "{status}");
        assert_eq!(call.http_status, Some(status));
        assert_eq!(call.error, None);
        assert_eq!(server.hits(&path).len(), 1, "{status}");
        assert_eq!(server.hits(&format!("/after{status}")).len(), 1, "{status}");
    }
    assert!(
        server.hits("/target").is_empty(),
        "a redirect target was requested"
    );
}

#[tokio::test]
async fn client_errors_fail_on_the_first_attempt_and_later_actions_do_not_run() {
    let server = Server::start();
    for status in [400, 401, 403, 404, 409, 422] {
        let path = format!("/c{status}");
        server.route(&path, vec![Reply::status(status).body("nope")]);
        let report = run(
            &format!(
                r#"
                - id: call
                  http: {{method: POST, url: "BASE{path}", retry: FAST_RETRY}}
                - id: after
                  http: {{method: GET, url: "BASE/after"}}
                - log: never
                "#
            ),
            &server,
        )
        .await;
        assert_eq!(report.status, RunStatus::Failed, "{status}");
        let call = action(&report, "call");
        assert_eq!(call.status, ActionStatus::Failed, "{status}");
        assert_eq!(call.attempts, 1, "{status}");
        assert_eq!(call.http_status, Some(status));
        assert_eq!(
            call.error.as_deref(),
            Some(format!("{status} {} is a client error", reason(status)).as_str())
        );
        assert_eq!(server.hits(&path).len(), 1, "{status} was retried");
        for later in &report.actions[1..] {
            assert_eq!(later.status, ActionStatus::NotRun, "{status}");
            assert_eq!(later.attempts, 0);
        }
    }
    assert!(server.hits("/after").is_empty());
}

#[tokio::test]
async fn too_many_requests_then_ok_succeeds_on_attempt_2() {
    let server = Server::start();
    server.route("/x", vec![Reply::status(429), Reply::status(200)]);
    let report = run(
        r#"
        - id: call
          http: {method: POST, url: "BASE/x", retry: FAST_RETRY}
        "#,
        &server,
    )
    .await;
    let call = action(&report, "call");
    assert_eq!(call.status, ActionStatus::Succeeded, "{report:#?}");
    assert_eq!(call.attempts, 2);
    assert_eq!(call.http_status, Some(200));
    assert_eq!(
        call.attempt_log[0].error.as_deref(),
        Some("429 Too Many Requests is retried")
    );
    assert_eq!(server.hits("/x").len(), 2);
}

#[tokio::test]
async fn unavailable_twice_then_ok_succeeds_on_attempt_3() {
    let server = Server::start();
    server.route(
        "/x",
        vec![Reply::status(503), Reply::status(503), Reply::status(200)],
    );
    let report = run(
        r#"
        - id: call
          http: {method: POST, url: "BASE/x", retry: FAST_RETRY}
        "#,
        &server,
    )
    .await;
    let call = action(&report, "call");
    assert_eq!(call.status, ActionStatus::Succeeded, "{report:#?}");
    assert_eq!(call.attempts, 3);
    assert_eq!(call.http_status, Some(200));
    let statuses: Vec<_> = call.attempt_log.iter().map(|a| a.http_status).collect();
    assert_eq!(statuses, [Some(503), Some(503), Some(200)]);
    assert_eq!(server.hits("/x").len(), 3);
}

#[tokio::test]
async fn permanent_server_error_fails_when_the_window_runs_out() {
    let server = Server::start();
    server.route("/x", vec![Reply::status(500)]);
    let report = run(
        r#"
        - id: call
          http: {method: POST, url: "BASE/x", retry: SHORT_WINDOW}
        - id: after
          http: {method: GET, url: "BASE/after"}
        "#,
        &server,
    )
    .await;
    assert_eq!(report.status, RunStatus::Failed);
    let call = action(&report, "call");
    assert_eq!(call.status, ActionStatus::Failed);
    assert!(call.attempts > 2, "{call:#?}");
    assert_eq!(call.http_status, Some(500));
    assert_eq!(
        call.error.as_deref(),
        Some(
            format!(
                "retry window of 200ms ran out after {} attempts; last: 500",
                call.attempts
            )
            .as_str()
        )
    );
    assert_eq!(server.hits("/x").len() as u32, call.attempts);
    assert_eq!(action(&report, "after").status, ActionStatus::NotRun);
    assert!(server.hits("/after").is_empty());
}

#[tokio::test]
async fn retry_after_is_obeyed() {
    let server = Server::start();
    server.route(
        "/x",
        vec![
            Reply::status(429).header("retry-after", "1"),
            Reply::status(200),
        ],
    );
    let report = run(
        r#"
        - id: call
          http: {method: POST, url: "BASE/x", retry: FAST_RETRY}
        "#,
        &server,
    )
    .await;
    let call = action(&report, "call");
    assert_eq!(call.status, ActionStatus::Succeeded, "{report:#?}");
    assert_eq!(call.attempts, 2);
    assert_eq!(call.attempt_log[0].retry_in_ms, Some(1000));
    let hits = server.hits("/x");
    let gap = hits[1].at - hits[0].at;
    // Without Retry-After the backoff would have been 10ms.
    assert!(
        gap >= Duration::from_millis(950),
        "second request after {gap:?}"
    );
}

#[tokio::test]
async fn retry_after_beyond_the_window_fails_at_once() {
    let server = Server::start();
    server.route(
        "/x",
        vec![
            Reply::status(503).header("retry-after", "10"),
            Reply::status(200),
        ],
    );
    let report = run(
        r#"
        - id: call
          http: {method: POST, url: "BASE/x", retry: FAST_RETRY}
        "#,
        &server,
    )
    .await;
    let call = action(&report, "call");
    assert_eq!(call.status, ActionStatus::Failed);
    assert_eq!(call.attempts, 1);
    assert_eq!(
        call.error.as_deref(),
        Some("Retry-After of 10s points past the retry window of 5s; last: 503")
    );
    assert_eq!(server.hits("/x").len(), 1);
}

#[tokio::test]
async fn retry_after_as_an_http_date_beyond_the_window_fails_at_once() {
    let server = Server::start();
    let in_an_hour =
        httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3600));
    server.route(
        "/x",
        vec![Reply::status(429).header("retry-after", &in_an_hour)],
    );
    let report = run(
        r#"
        - id: call
          http: {method: POST, url: "BASE/x", retry: FAST_RETRY}
        "#,
        &server,
    )
    .await;
    let call = action(&report, "call");
    assert_eq!(call.status, ActionStatus::Failed);
    assert_eq!(call.attempts, 1);
    let error = call.error.as_deref().expect("an error");
    assert!(
        error.starts_with("Retry-After of ")
            && error.ends_with("points past the retry window of 5s; last: 429"),
        "{error}"
    );
}

#[tokio::test]
async fn slow_response_is_retried_and_the_slow_connection_dropped() {
    let server = Server::start();
    server.route(
        "/slow",
        vec![
            Reply::status(200).delay(Duration::from_secs(2)),
            Reply::status(200),
        ],
    );
    let report = run(
        r#"
        - id: call
          http: {method: POST, url: "BASE/slow", timeout: 100ms, retry: FAST_RETRY}
        "#,
        &server,
    )
    .await;
    let call = action(&report, "call");
    assert_eq!(call.status, ActionStatus::Succeeded, "{report:#?}");
    assert_eq!(call.attempts, 2);
    assert_eq!(call.attempt_log[0].http_status, None);
    assert_eq!(
        call.attempt_log[0].error.as_deref(),
        Some("no response within 100ms")
    );
    let hits = server.hits("/slow");
    assert_eq!(hits.len(), 2);
    // The first handler never got to answer: its connection was closed under it.
    assert_eq!(
        hits[0].end(Duration::from_secs(1)),
        Some(End::Cancelled),
        "the slow request's connection was kept open"
    );
    assert_eq!(hits[1].end(Duration::from_secs(1)), Some(End::Completed));
}

#[tokio::test]
async fn connection_refused_is_retried() {
    let port = closed_port();
    let report = run_with(
        r#"
        - id: call
          http: {method: POST, url: "BASE/x", retry: SHORT_WINDOW}
        "#,
        &format!("http://127.0.0.1:{port}"),
        json!({}),
        Secrets::default(),
    )
    .await;
    let call = action(&report, "call");
    assert_eq!(call.status, ActionStatus::Failed);
    assert!(call.attempts > 1, "{call:#?}");
    assert_eq!(call.http_status, None);
    let error = call.error.as_deref().expect("an error");
    let prefix = format!(
        "retry window of 200ms ran out after {} attempts; last: connection failed",
        call.attempts
    );
    assert!(error.starts_with(&prefix), "{error}");
    assert!(error.to_lowercase().contains("refused"), "{error}");
}

#[tokio::test]
async fn client_error_ignored_lets_the_chain_go_on() {
    let server = Server::start();
    server.route("/x", vec![Reply::status(404).body("no such order")]);
    let report = run(
        r#"
        - id: call
          http: {method: GET, url: "BASE/x", on_client_error: ignore, retry: FAST_RETRY}
        - id: after
          http:
            method: POST
            url: "BASE/after"
            body: "{{ steps.call.status }} {{ steps.call.outcome }} {{ steps.call.body }}"
        "#,
        &server,
    )
    .await;
    assert_eq!(report.status, RunStatus::Succeeded, "{report:#?}");
    let call = action(&report, "call");
    assert_eq!(call.status, ActionStatus::Ignored);
    assert_eq!(call.attempts, 1);
    assert_eq!(call.http_status, Some(404));
    assert_eq!(
        call.error.as_deref(),
        Some("404 Not Found is a client error (ignored)")
    );
    assert_eq!(action(&report, "after").status, ActionStatus::Succeeded);
    assert_eq!(server.hits("/x").len(), 1);
    let after = server.hits("/after");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].text(), "404 ignored no such order");
}

#[tokio::test]
async fn client_error_retried_succeeds_on_attempt_2() {
    let server = Server::start();
    server.route("/x", vec![Reply::status(404), Reply::status(200)]);
    let report = run(
        r#"
        - id: call
          http: {method: GET, url: "BASE/x", on_client_error: retry, retry: FAST_RETRY}
        "#,
        &server,
    )
    .await;
    let call = action(&report, "call");
    assert_eq!(call.status, ActionStatus::Succeeded, "{report:#?}");
    assert_eq!(call.attempts, 2);
    assert_eq!(call.http_status, Some(200));
    assert_eq!(server.hits("/x").len(), 2);
}

#[tokio::test]
async fn when_false_skips_and_the_chain_goes_on() {
    let server = Server::start();
    let report = run_with(
        r#"
        - id: skipped
          when: payload.send
          http: {method: POST, url: "BASE/skipped"}
        - id: after
          when: not payload.send
          http:
            method: POST
            url: "BASE/after"
            body: "{{ steps.skipped.outcome }}"
        "#,
        server.base(),
        json!({"send": false}),
        Secrets::default(),
    )
    .await;
    assert_eq!(report.status, RunStatus::Succeeded, "{report:#?}");
    let skipped = action(&report, "skipped");
    assert_eq!(skipped.status, ActionStatus::Skipped);
    assert_eq!(skipped.attempts, 0);
    assert_eq!(skipped.http_status, None);
    assert!(server.hits("/skipped").is_empty());
    assert_eq!(action(&report, "after").status, ActionStatus::Succeeded);
    let after = server.hits("/after");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].text(), "skipped");
}

#[tokio::test]
async fn strict_undefined_fails_the_action_and_sends_nothing() {
    let server = Server::start();
    for (field, actions) in [
        (
            "url",
            r#"
            - id: call
              http: {method: GET, url: "BASE/x/{{ payload.missing }}"}
            - id: after
              http: {method: GET, url: "BASE/after"}
            "#,
        ),
        (
            "header `X-Thing`",
            r#"
            - id: call
              http:
                method: GET
                url: "BASE/x"
                headers: {X-Thing: "{{ payload.missing }}"}
            - id: after
              http: {method: GET, url: "BASE/after"}
            "#,
        ),
        (
            "`json`",
            r#"
            - id: call
              http:
                method: POST
                url: "BASE/x"
                json: {a: "{{ payload.present }}", b: "x {{ payload.missing }}"}
            - id: after
              http: {method: GET, url: "BASE/after"}
            "#,
        ),
        (
            // A value that is exactly one expression keeps its JSON type; undefined is not null.
            "`json`",
            r#"
            - id: call
              http:
                method: POST
                url: "BASE/x"
                json: {a: "{{ payload.present }}", b: ["{{ payload.missing }}"]}
            - id: after
              http: {method: GET, url: "BASE/after"}
            "#,
        ),
        (
            "`body`",
            r#"
            - id: call
              http:
                method: POST
                url: "BASE/x"
                body: |
                  line one
                  {{ payload.missing }}
            - id: after
              http: {method: GET, url: "BASE/after"}
            "#,
        ),
        (
            // Undefined is not false: a typo in `when` must not skip the action silently.
            "`when`",
            r#"
            - id: call
              when: payload.missing
              http: {method: GET, url: "BASE/x"}
            - id: after
              http: {method: GET, url: "BASE/after"}
            "#,
        ),
    ] {
        let report = run_with(
            actions,
            server.base(),
            json!({"present": 1}),
            Secrets::default(),
        )
        .await;
        assert_eq!(report.status, RunStatus::Failed, "{field}");
        let call = action(&report, "call");
        assert_eq!(call.status, ActionStatus::Failed, "{field}");
        assert_eq!(call.http_status, None);
        let error = call.error.as_deref().expect("an error");
        assert!(error.contains("`payload.missing` is undefined"), "{error}");
        assert!(error.contains(field), "{field}: {error}");
        assert_eq!(action(&report, "after").status, ActionStatus::NotRun);
    }
    assert!(
        server.all_hits().is_empty(),
        "something was sent: {:?}",
        server.all_hits()
    );
}

#[tokio::test]
async fn json_body_keeps_types_and_escapes_strings() {
    let server = Server::start();
    let tricky =
        "she said \"hi\"\nthen left\t\\o/ — naïve café ✓ 🎉 </script> {{ not a template }}";
    let payload = json!({
        "s": tricky,
        "n": 12.5,
        "i": 7,
        "big": 9_007_199_254_740_993_u64,
        "zip": "007",
        "ok": true,
        "nothing": null,
        "obj": {"k": ["v", 1, {"deep": "\"q\""}]},
    });
    let report = run_with(
        r#"
        - id: call
          http:
            method: POST
            url: "BASE/json"
            json:
              s: "{{ payload.s }}"
              n: "{{ payload.n }}"
              i: "{{payload.i}}"
              big: "{{ payload.big }}"
              zip: "{{ payload.zip }}"
              ok: "{{ payload.ok }}"
              nothing: "{{ payload.nothing }}"
              obj: "{{ payload.obj }}"
              mixed: "n={{ payload.n }} s={{ payload.s }}"
              literal: [1, false, "plain"]
              "{{ payload.zip }}": keys are sent as written
        "#,
        server.base(),
        payload,
        Secrets::default(),
    )
    .await;
    assert_eq!(report.status, RunStatus::Succeeded, "{report:#?}");
    let hit = &server.hits("/json")[0];
    assert_eq!(
        hit.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        hit.json(),
        json!({
            "s": tricky,
            "n": 12.5,
            "i": 7,
            "big": 9_007_199_254_740_993_u64,
            "zip": "007",
            "ok": true,
            "nothing": null,
            "obj": {"k": ["v", 1, {"deep": "\"q\""}]},
            "mixed": format!("n=12.5 s={tricky}"),
            "literal": [1, false, "plain"],
            "{{ payload.zip }}": "keys are sent as written",
        })
    );
}

#[tokio::test]
async fn idempotency_key_is_the_same_across_retries() {
    let server = Server::start();
    server.route("/x", vec![Reply::status(503), Reply::status(200)]);
    let report = run(
        r#"
        - id: call
          http: {method: POST, url: "BASE/x", retry: FAST_RETRY}
        - id: other
          http: {method: POST, url: "BASE/other"}
        "#,
        &server,
    )
    .await;
    assert_eq!(report.status, RunStatus::Succeeded, "{report:#?}");
    let keys: Vec<String> = server
        .hits("/x")
        .iter()
        .map(|h| h.header("idempotency-key").expect("an Idempotency-Key"))
        .collect();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1], "the key changed between retries");
    assert!(!keys[0].is_empty());
    let other = server.hits("/other")[0]
        .header("idempotency-key")
        .expect("an Idempotency-Key");
    assert_ne!(other, keys[0], "two actions share a delivery id");
}

#[tokio::test]
async fn idempotency_key_false_sends_none() {
    let server = Server::start();
    let report = run(
        r#"
        - id: call
          http: {method: POST, url: "BASE/x", idempotency_key: false}
        "#,
        &server,
    )
    .await;
    assert_eq!(report.status, RunStatus::Succeeded);
    assert_eq!(server.hits("/x")[0].header("idempotency-key"), None);
}

#[tokio::test]
async fn workflow_idempotency_key_header_wins() {
    let server = Server::start();
    server.route("/x", vec![Reply::status(503), Reply::status(200)]);
    let report = run_with(
        r#"
        - id: call
          http:
            method: POST
            url: "BASE/x"
            headers: {idempotency-key: "order-{{ payload.id }}"}
            retry: FAST_RETRY
        "#,
        server.base(),
        json!({"id": 9}),
        Secrets::default(),
    )
    .await;
    assert_eq!(report.status, RunStatus::Succeeded, "{report:#?}");
    for hit in server.hits("/x") {
        assert_eq!(hit.all("idempotency-key"), ["order-9"]);
    }
}

/// Verifies a Standard Webhooks signature independently of flowrun's signer.
fn verify(secret: &str, id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").expect("a whsec_ secret"))
        .expect("base64");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    // The header may carry several space-separated signatures.
    header
        .split(' ')
        .any(|sig| sig.strip_prefix("v1,") == Some(expected.as_str()))
}

#[tokio::test]
async fn signature_verifies_with_an_independent_hmac() {
    let server = Server::start();
    server.route("/hook", vec![Reply::status(503), Reply::status(204)]);
    let secret = format!(
        "whsec_{}",
        STANDARD.encode(b"a signing key of 32 bytes, exact")
    );
    let mut secrets = Secrets::default();
    secrets.insert("HOOK_SECRET", secret.clone());
    let report = run_with(
        r#"
        - id: deliver
          http:
            method: POST
            url: "BASE/hook"
            json: {order: "{{ payload.order }}", note: "{{ payload.note }}"}
            sign: {secret: "{{ secrets.HOOK_SECRET }}"}
            retry: FAST_RETRY
        "#,
        server.base(),
        json!({"order": 1001, "note": "ünïcode \"quoted\""}),
        secrets,
    )
    .await;
    assert_eq!(report.status, RunStatus::Succeeded, "{report:#?}");
    let hits = server.hits("/hook");
    assert_eq!(hits.len(), 2);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    for hit in &hits {
        let id = hit.header("webhook-id").expect("webhook-id");
        let timestamp = hit.header("webhook-timestamp").expect("webhook-timestamp");
        let signature = hit.header("webhook-signature").expect("webhook-signature");
        assert_eq!(
            Some(&id),
            hit.header("idempotency-key").as_ref(),
            "webhook-id is the delivery id"
        );
        let ts: u64 = timestamp.parse().expect("Unix seconds");
        assert!(now.abs_diff(ts) < 60, "timestamp {ts} is not now ({now})");
        assert!(
            verify(&secret, &id, &timestamp, &hit.body, &signature),
            "signature {signature} does not verify"
        );
        // The check itself can fail: a changed body does not verify.
        assert!(!verify(&secret, &id, &timestamp, b"{}", &signature));
    }
    assert_eq!(
        hits[0].header("webhook-id"),
        hits[1].header("webhook-id"),
        "a retry is the same delivery"
    );
}

#[tokio::test]
async fn later_actions_read_earlier_json_and_redirect_location() {
    let server = Server::start();
    server.route("/first", vec![Reply::json(&json!({"x": 41, "tag": "a/b"}))]);
    let elsewhere = format!("{}/elsewhere/orders/7", server.base());
    server.route(
        "/moved",
        vec![Reply::status(302).header("location", &elsewhere)],
    );
    let report = run(
        r#"
        - id: first
          http: {method: GET, url: "BASE/first"}
        - id: moved
          http: {method: POST, url: "BASE/moved"}
        - id: use
          http:
            method: PUT
            url: "BASE/use/{{ steps.first.json.tag | urlencode_segment }}"
            json:
              x: "{{ steps.first.json.x + 1 }}"
              location: "{{ steps.moved.headers.location }}"
              status: "{{ steps.moved.status }}"
        "#,
        &server,
    )
    .await;
    assert_eq!(report.status, RunStatus::Succeeded, "{report:#?}");
    assert_eq!(action(&report, "moved").http_status, Some(302));
    let hits = server.hits("/use/a%2Fb");
    assert_eq!(hits.len(), 1, "{:?}", server.all_hits());
    assert_eq!(
        hits[0].json(),
        json!({"x": 42, "location": elsewhere, "status": 302})
    );
    assert!(server.hits("/elsewhere/orders/7").is_empty());
}

//! The HTTP action, one attempt at a time: render the request, send it with a
//! per-attempt timeout, capture the response, classify it by Flow's contract.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use super::sign;
use crate::template;
use crate::workflow::{HttpAction, OnError};

/// Responses keep at most this much body (the result says when it was cut).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A rendered request, ready to send (or to print in a dry run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Request {
    /// Upper-case method.
    pub method: &'static str,
    /// Absolute http(s) URL.
    pub url: String,
    /// Headers in order: the workflow's, then those flowrun adds.
    pub headers: Vec<(String, String)>,
    /// The body text (empty for none).
    pub body: String,
}

/// Renders the action's request for one attempt.
///
/// `ctx` is the template context; `delivery_id` is stable across retries;
/// `unix_now` is the signing timestamp.
pub fn render(
    http: &HttpAction,
    ctx: &Value,
    delivery_id: &str,
    unix_now: u64,
) -> Result<Request, String> {
    let field = |what: &str, e: template::Error| format!("cannot render {what}: {e}");
    let url = template::render(&http.url, ctx).map_err(|e| field("`url`", e))?;
    match reqwest::Url::parse(url.trim()) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {}
        Ok(_) | Err(_) => return Err(format!("`{url}` is not an absolute http(s) URL")),
    }
    let mut headers = Vec::with_capacity(http.headers.len() + 4);
    for (name, value) in &http.headers {
        let Value::String(source) = value else {
            panic!("BUG: the schema makes header values strings");
        };
        let rendered =
            template::render(source, ctx).map_err(|e| field(&format!("header `{name}`"), e))?;
        if reqwest::header::HeaderValue::from_str(&rendered).is_err() {
            return Err(format!(
                "header `{name}` renders to a value HTTP cannot carry (control characters or newlines)"
            ));
        }
        headers.push((name.clone(), rendered));
    }
    let has = |headers: &[(String, String)], name: &str| {
        headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    };
    let body = match (&http.body, &http.json) {
        (Some(source), _) => template::render(source, ctx).map_err(|e| field("`body`", e))?,
        (None, Some(json)) => {
            let value = template::render_json(json, ctx).map_err(|e| field("`json`", e))?;
            if !has(&headers, "content-type") {
                headers.push(("Content-Type".to_owned(), "application/json".to_owned()));
            }
            serde_json::to_string(&value)
                .unwrap_or_else(|e| panic!("BUG: a JSON value serializes: {e}"))
        }
        (None, None) => String::new(),
    };
    if http.idempotency_key && !has(&headers, "idempotency-key") {
        headers.push(("Idempotency-Key".to_owned(), delivery_id.to_owned()));
    }
    if let Some(s) = &http.sign {
        let secret = template::render(&s.secret, ctx).map_err(|e| field("`sign.secret`", e))?;
        let key = sign::key(&secret)?;
        let sig = sign::sign(&key, delivery_id, unix_now, body.as_bytes());
        headers.push(("webhook-id".to_owned(), sig.id));
        headers.push(("webhook-timestamp".to_owned(), sig.timestamp.to_string()));
        headers.push(("webhook-signature".to_owned(), sig.signature));
    }
    Ok(Request {
        method: http.method.as_str(),
        url: url.trim().to_owned(),
        headers,
        body,
    })
}

/// What came back from one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header name (lower case) → value; repeated headers are joined with `, `.
    pub headers: Map<String, Value>,
    /// Body as text (lossy UTF-8), at most [`MAX_BODY_BYTES`].
    pub body: String,
    /// Whether the body was cut at [`MAX_BODY_BYTES`].
    pub truncated: bool,
    /// The body parsed as JSON, when it is JSON.
    pub json: Option<Value>,
}

impl Response {
    /// `404 Not Found`.
    pub fn status_line(&self) -> String {
        status_line(self.status)
    }

    /// The server's `Retry-After` as a delay from `now` (seconds or an HTTP date).
    pub fn retry_after(&self, now: std::time::SystemTime) -> Option<Duration> {
        let v = self.headers.get("retry-after")?.as_str()?.trim();
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        let at = httpdate::parse_http_date(v).ok()?;
        Some(at.duration_since(now).unwrap_or(Duration::ZERO))
    }

    /// The value later actions read as `steps.<id>`.
    pub fn to_step(&self, outcome: &str) -> Value {
        serde_json::json!({
            "outcome": outcome,
            "status": self.status,
            "headers": self.headers,
            "body": self.body,
            "truncated": self.truncated,
            "json": self.json,
        })
    }
}

/// `404 Not Found`, or just `599` for codes without a reason phrase.
pub fn status_line(status: u16) -> String {
    match reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
    {
        Some(reason) => format!("{status} {reason}"),
        None => status.to_string(),
    }
}

/// How one attempt ended on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum Sent {
    /// A status line arrived.
    Response(Response),
    /// No status line within the timeout; the connection was dropped.
    Timeout(Duration),
    /// The connection could not be made or broke.
    Connection(String),
}

/// Sends `req`, waiting at most `timeout` for the status line.
pub async fn send(client: &reqwest::Client, req: &Request, timeout: Duration) -> Sent {
    let method = reqwest::Method::from_bytes(req.method.as_bytes())
        .unwrap_or_else(|_| panic!("BUG: methods are valid"));
    let mut builder = client.request(method, &req.url);
    for (name, value) in &req.headers {
        builder = builder.header(name, value);
    }
    if !req.body.is_empty() {
        builder = builder.body(req.body.clone());
    }
    // Flow: no response code within the timeout → close the connection (drop the future) and send again.
    let mut response = match tokio::time::timeout(timeout, builder.send()).await {
        Err(_) => return Sent::Timeout(timeout),
        Ok(Err(e)) if e.is_timeout() => return Sent::Timeout(timeout),
        Ok(Err(e)) => return Sent::Connection(describe(&e)),
        Ok(Ok(r)) => r,
    };
    let status = response.status().as_u16();
    let mut headers = Map::new();
    for (name, value) in response.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_owned(), Value::String(value));
            }
        }
    }
    // The status is what counts; the body gets the same time budget and is kept up to 1 MiB.
    let mut body = Vec::new();
    let mut truncated = false;
    let read = async {
        while let Ok(Some(chunk)) = response.chunk().await {
            let room = MAX_BODY_BYTES - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
    };
    if tokio::time::timeout(timeout, read).await.is_err() {
        truncated = true;
    }
    let json = serde_json::from_slice(&body).ok();
    Sent::Response(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        truncated,
        json,
    })
}

/// One sentence for a reqwest error, with its root cause.
fn describe(e: &reqwest::Error) -> String {
    let mut msg = if e.is_connect() {
        "connection failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    let mut last = None;
    while let Some(s) = source {
        last = Some(s.to_string());
        source = s.source();
    }
    if let Some(cause) = last {
        msg.push_str(": ");
        msg.push_str(&cause);
    }
    msg
}

/// Flow's classification of a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2XX or 3XX.
    Success,
    /// A 429/5XX or other code whose policy says what to do.
    Policy(OnError, Class),
}

/// Which class an unsuccessful code falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 429 or 5XX.
    Server,
    /// Any other code (4XX and the rest).
    Client,
}

/// Classifies a status code under the action's policies.
pub fn classify(status: u16, http: &HttpAction) -> Verdict {
    match status {
        // Flow: 2XX or 3XX is success; redirects are not followed.
        200..=399 => Verdict::Success,
        // Flow: 429 and 5XX are retried (by default).
        429 | 500..=599 => Verdict::Policy(http.on_server_error, Class::Server),
        // Flow: any other code fails (by default).
        _ => Verdict::Policy(http.on_client_error, Class::Client),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(yaml_json: Value) -> HttpAction {
        serde_json::from_value(yaml_json).expect("valid action")
    }

    #[test]
    fn classification_follows_flow() {
        let h = action(serde_json::json!({"method": "GET", "url": "http://x"}));
        for s in [200, 201, 204, 301, 302, 304] {
            assert_eq!(classify(s, &h), Verdict::Success, "{s}");
        }
        for s in [429, 500, 502, 503] {
            assert_eq!(
                classify(s, &h),
                Verdict::Policy(OnError::Retry, Class::Server),
                "{s}"
            );
        }
        for s in [400, 401, 403, 404, 409, 422, 100, 600] {
            assert_eq!(
                classify(s, &h),
                Verdict::Policy(OnError::Fail, Class::Client),
                "{s}"
            );
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut r = Response {
            status: 429,
            headers: Map::new(),
            body: String::new(),
            truncated: false,
            json: None,
        };
        r.headers.insert("retry-after".into(), "7".into());
        assert_eq!(r.retry_after(now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        r.headers.insert("retry-after".into(), later.into());
        assert_eq!(r.retry_after(now), Some(Duration::from_secs(90)));
    }

    #[test]
    fn json_body_sets_content_type_and_idempotency_key() {
        let h = action(
            serde_json::json!({"method": "post", "url": "http://x/{{ payload.id }}", "json": {"n": "{{ payload.id }}"}}),
        );
        let ctx = serde_json::json!({"payload": {"id": 7}});
        let req = render(&h, &ctx, "d-1", 0).expect("renders");
        assert_eq!(req.url, "http://x/7");
        assert_eq!(req.body, r#"{"n":7}"#);
        assert_eq!(
            req.headers,
            vec![
                ("Content-Type".to_owned(), "application/json".to_owned()),
                ("Idempotency-Key".to_owned(), "d-1".to_owned())
            ]
        );
    }

    #[test]
    fn non_http_urls_fail() {
        let h = action(serde_json::json!({"method": "GET", "url": "{{ payload.u }}"}));
        let err = render(
            &h,
            &serde_json::json!({"payload": {"u": "ftp://x"}}),
            "d",
            0,
        )
        .expect_err("ftp");
        assert_eq!(err, "`ftp://x` is not an absolute http(s) URL");
    }
}

//! The typed workflow, deserialized from a document that passed the schema.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// One workflow file: a trigger plus an ordered list of actions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    /// Unique name in a directory.
    pub name: String,
    /// Free text for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Disabled workflows load and validate but never run.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// What starts a run.
    pub trigger: Trigger,
    /// What a run does, in order.
    pub actions: Vec<Action>,
}

fn yes() -> bool {
    true
}

/// What starts a run: a named event or a cron schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// Name of the event that starts a run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Five-field cron expression, evaluated in UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// JSON Schema the payload must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_schema: Option<Value>,
    /// Signature check of incoming events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verify>,
}

/// How an incoming event's signature is checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    /// The signature scheme.
    pub scheme: VerifyScheme,
    /// Template for the secret (reads only `secrets`).
    pub secret: String,
}

/// Signature schemes for incoming events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyScheme {
    /// `X-Shopify-Hmac-Sha256`: base64 HMAC-SHA256 of the body.
    Shopify,
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature`.
    StandardWebhooks,
}

/// One step of a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// Name later actions use as `steps.<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Minijinja expression; the action is skipped when it is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// An HTTP request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpAction>,
    /// A message template written to the run's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

/// What an action does; the schema guarantees exactly one kind.
#[derive(Debug, Clone, Copy)]
pub enum ActionKind<'a> {
    /// Send an HTTP request.
    Http(&'a HttpAction),
    /// Render a message.
    Log(&'a str),
}

impl Action {
    /// The action's kind.
    pub fn kind(&self) -> ActionKind<'_> {
        match (&self.http, &self.log) {
            (Some(h), _) => ActionKind::Http(h),
            (None, Some(l)) => ActionKind::Log(l),
            (None, None) => panic!("BUG: the schema requires `http` or `log` on every action"),
        }
    }

    /// The id shown in output: the declared id or `#<index>` (1-based).
    pub fn label(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("#{}", index + 1))
    }
}

/// The HTTP methods of Flow's "Send HTTP request".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    /// GET
    Get,
    /// DELETE
    Delete,
    /// HEAD
    Head,
    /// OPTIONS
    Options,
    /// PATCH
    Patch,
    /// PUT
    Put,
    /// POST
    Post,
}

impl Method {
    /// Every method, in Flow's order.
    pub const ALL: [Method; 7] = [
        Method::Get,
        Method::Delete,
        Method::Head,
        Method::Options,
        Method::Patch,
        Method::Put,
        Method::Post,
    ];

    /// The upper-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Delete => "DELETE",
            Method::Head => "HEAD",
            Method::Options => "OPTIONS",
            Method::Patch => "PATCH",
            Method::Put => "PUT",
            Method::Post => "POST",
        }
    }
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Method::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(&s))
            .ok_or_else(|| serde::de::Error::custom(format!("unknown method `{s}`")))
    }
}

/// What to do with a class of responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Mark the action failed; later actions do not run.
    Fail,
    /// Mark the action ignored; the chain goes on.
    Ignore,
    /// Retry within the retry window.
    Retry,
}

/// Retry window and backoff, as written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// How long after the first attempt retries may still start (`0s` = never retry).
    #[serde(default = "RetrySettings::default_max_duration", with = "human")]
    pub max_duration: Duration,
    /// Delay before the second attempt; doubles each time.
    #[serde(default = "RetrySettings::default_initial_backoff", with = "human")]
    pub initial_backoff: Duration,
    /// Upper bound of one delay.
    #[serde(default = "RetrySettings::default_max_backoff", with = "human")]
    pub max_backoff: Duration,
}

impl RetrySettings {
    /// Flow: 429 and 5XX are retried for up to 24 h.
    pub const DEFAULT: RetrySettings = RetrySettings {
        max_duration: Duration::from_secs(24 * 3600),
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(3600),
    };
    fn default_max_duration() -> Duration {
        Self::DEFAULT.max_duration
    }
    fn default_initial_backoff() -> Duration {
        Self::DEFAULT.initial_backoff
    }
    fn default_max_backoff() -> Duration {
        Self::DEFAULT.max_backoff
    }
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Standard Webhooks signing of outgoing requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sign {
    /// Template for the signing secret (`whsec_` prefix: the rest is base64).
    pub secret: String,
}

/// An HTTP request action (Shopify Flow's "Send HTTP request").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAction {
    /// Request method.
    pub method: Method,
    /// URL template.
    pub url: String,
    /// Header name → value template, in file order.
    #[serde(default)]
    pub headers: serde_json::Map<String, Value>,
    /// Body as a string template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Body as structured JSON whose strings are templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<Value>,
    /// How long to wait for a response status per attempt (Flow: 30 s).
    #[serde(default = "default_timeout", with = "human")]
    pub timeout: Duration,
    /// Retry window and backoff.
    #[serde(default)]
    pub retry: RetrySettings,
    /// What a 4XX other than 429 does.
    #[serde(default = "default_on_client_error")]
    pub on_client_error: OnError,
    /// What a 429 or 5XX does.
    #[serde(default = "default_on_server_error")]
    pub on_server_error: OnError,
    /// Whether to send `Idempotency-Key: <delivery id>`.
    #[serde(default = "yes")]
    pub idempotency_key: bool,
    /// Standard Webhooks signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign: Option<Sign>,
}

/// Flow waits at most 30 seconds for a response code.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}
fn default_on_client_error() -> OnError {
    OnError::Fail
}
fn default_on_server_error() -> OnError {
    OnError::Retry
}

/// Human-readable durations (`250ms`, `30s`, `24h`) for serde.
pub mod human {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Parses `250ms`, `30s`, `10m`, `24h`, `1h 30m`.
    pub fn parse(s: &str) -> Result<Duration, String> {
        humantime::parse_duration(s.trim()).map_err(|e| {
            format!("`{s}` is not a duration ({e}); write e.g. `250ms`, `30s`, `10m`, `24h`")
        })
    }

    /// Formats a duration the way files write it.
    pub fn format(d: Duration) -> String {
        humantime::format_duration(d).to_string()
    }

    /// Serde: serialize as a human string.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    /// Serde: deserialize from a human string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }
}

/// How a template string is compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateKind {
    /// A string template (`{{ }}` and `{% %}` inside text).
    Template,
    /// A bare expression: `when:`, or a `json:` string that is exactly one `{{ expr }}`.
    Expression,
}

/// One template in a workflow, with where it sits.
#[derive(Debug, Clone)]
pub struct TemplateRef<'a> {
    /// Index of the action that holds it.
    pub action: usize,
    /// JSON pointer of the string in the file.
    pub pointer: String,
    /// The template or expression text.
    pub source: &'a str,
    /// How to compile it.
    pub kind: TemplateKind,
}

impl Workflow {
    /// Every template and expression in the workflow, in file order.
    pub fn templates(&self) -> Vec<TemplateRef<'_>> {
        let mut out = Vec::new();
        for (i, action) in self.actions.iter().enumerate() {
            let base = format!("/actions/{i}");
            let mut add = |pointer: String, source, kind| {
                out.push(TemplateRef {
                    action: i,
                    pointer,
                    source,
                    kind,
                });
            };
            if let Some(when) = &action.when {
                add(
                    format!("{base}/when"),
                    when.as_str(),
                    TemplateKind::Expression,
                );
            }
            if let Some(log) = &action.log {
                add(format!("{base}/log"), log.as_str(), TemplateKind::Template);
            }
            let Some(http) = &action.http else { continue };
            add(
                format!("{base}/http/url"),
                http.url.as_str(),
                TemplateKind::Template,
            );
            for (name, value) in &http.headers {
                if let Value::String(value) = value {
                    let pointer =
                        format!("{base}/http/headers/{}", super::parse::escape_segment(name));
                    add(pointer, value.as_str(), TemplateKind::Template);
                }
            }
            if let Some(body) = &http.body {
                add(
                    format!("{base}/http/body"),
                    body.as_str(),
                    TemplateKind::Template,
                );
            }
            if let Some(json) = &http.json {
                json_templates(json, format!("{base}/http/json"), &mut add);
            }
            if let Some(sign) = &http.sign {
                add(
                    format!("{base}/http/sign/secret"),
                    sign.secret.as_str(),
                    TemplateKind::Template,
                );
            }
        }
        out
    }
}

fn json_templates<'a>(
    value: &'a Value,
    pointer: String,
    add: &mut impl FnMut(String, &'a str, TemplateKind),
) {
    match value {
        Value::String(s) => match crate::template::sole_expression(s) {
            Some(expr) => add(pointer, expr, TemplateKind::Expression),
            None => add(pointer, s.as_str(), TemplateKind::Template),
        },
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                json_templates(v, format!("{pointer}/{i}"), add);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                json_templates(
                    v,
                    format!("{pointer}/{}", super::parse::escape_segment(k)),
                    add,
                );
            }
        }
        _ => {}
    }
}

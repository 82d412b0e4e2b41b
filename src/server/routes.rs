//! The HTTP API: ingest, run history, health. Errors are `{"error": "..."}`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::{AppState, auth};
use crate::store::{NewEvent, RunFilter, Store, now_millis};
use crate::workflow::Loaded;

/// An API error: a status and a one-sentence message (or a full JSON body).
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    /// An error whose body is `body` (serialized into the message).
    pub fn with_body(status: StatusCode, body: Value) -> Self {
        ApiError(status, body.to_string())
    }

    /// The metrics label for a refused event.
    pub fn reason(&self) -> String {
        match self.0 {
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            StatusCode::BAD_REQUEST => "not_json",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::UNPROCESSABLE_ENTITY => "payload_schema",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            _ => "error",
        }
        .to_owned()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // A body built with `with_body` is already JSON.
        let body = match serde_json::from_str::<Value>(&self.1) {
            Ok(v @ Value::Object(_)) => v,
            _ => json!({"error": self.1}),
        };
        let mut resp = (self.0, Json(body)).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<crate::store::Error> for ApiError {
    fn from(e: crate::store::Error) -> Self {
        tracing::error!("store: {e}");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the store is unavailable: {e}"),
        )
    }
}

/// The API's routes.
pub fn router<S: Store>(state: Arc<AppState<S>>) -> Router {
    Router::new()
        .route("/events/{name}", post(ingest::<S>))
        .route("/runs", get(list_runs::<S>))
        .route("/runs/{id}", get(show_run::<S>))
        .route("/workflows", get(workflows::<S>))
        .route("/metrics", get(metrics::<S>))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S>))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such endpoint; see docs/api.md".into(),
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint; see docs/api.md".into(),
            )
        })
        .with_state(state)
}

/// Reads the body, at most `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the event body is larger than the limit of {limit} bytes"),
        )
    })
}

/// The compiled `payload_schema` of a workflow version.
fn validator<S>(
    state: &AppState<S>,
    loaded: &Loaded,
    schema: &Value,
) -> Result<Arc<jsonschema::Validator>, String> {
    let mut cache = state
        .validators
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(v) = cache.get(&loaded.hash) {
        return Ok(Arc::clone(v));
    }
    let v = Arc::new(jsonschema::draft202012::new(schema).map_err(|e| e.to_string())?);
    cache.insert(loaded.hash.clone(), Arc::clone(&v));
    Ok(v)
}

async fn ingest<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let result = accept(&state, name, &headers, body).await;
    if let Err(e) = &result {
        state.metrics.rejected(&e.reason());
    }
    result
}

async fn accept<S: Store>(
    state: &AppState<S>,
    name: String,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if state.draining.load(Ordering::SeqCst) {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "flowrun is shutting down; send the event again later".into(),
        ));
    }
    if let Some(token) = &state.ingest_token
        && !auth::bearer_ok(headers, token)
    {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "a valid `Authorization: Bearer <token>` is required".into(),
        ));
    }
    let valid_name = !name.is_empty()
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
    if !valid_name {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "an event name uses letters, digits, `.`, `_`, `:` and `-` (at most 128), starting with a letter or digit".into(),
        ));
    }
    let bytes = read_body(body, state.max_body).await?;
    let registry = state.registry();
    let workflows: Vec<Arc<Loaded>> = registry.by_event.get(&name).cloned().unwrap_or_default();

    // Signatures over the raw body, before anything is parsed or stored.
    let now = crate::engine::unix(std::time::SystemTime::now());
    for loaded in &workflows {
        let Some(verify) = &loaded.workflow.trigger.verify else {
            continue;
        };
        let wf = &loaded.workflow.name;
        // Strict undefined: a secret that is not configured fails here, and nothing is stored.
        let secret = crate::template::render(
            &verify.secret,
            &json!({ "secrets": state.secrets.to_json() }),
        )
        .map_err(|e| {
            tracing::error!(workflow = %wf, "cannot verify events: {e}");
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "workflow `{wf}` cannot verify events: its `verify.secret` is not configured"
                ),
            )
        })?;
        if crate::engine::sign::key(&secret).is_err()
            && verify.scheme == crate::workflow::model::VerifyScheme::StandardWebhooks
        {
            tracing::error!(workflow = %wf, "the `verify.secret` has a `whsec_` prefix but is not base64");
            return Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("workflow `{wf}` cannot verify events: its `verify.secret` is malformed"),
            ));
        }
        auth::check(verify, &secret, headers, &bytes, now).map_err(|why| {
            ApiError(
                StatusCode::UNAUTHORIZED,
                format!("signature check of workflow `{wf}` failed: {why}"),
            )
        })?;
    }

    let payload: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("the event body is not JSON: {e}"),
        )
    })?;

    let mut violations = Vec::new();
    for loaded in &workflows {
        let Some(schema) = &loaded.workflow.trigger.payload_schema else {
            continue;
        };
        let wf = &loaded.workflow.name;
        match validator(state, loaded, schema) {
            Ok(v) => violations.extend(v.iter_errors(&payload).map(|e| {
                json!({"workflow": wf, "pointer": e.instance_path().as_str(), "message": e.to_string()})
            })),
            Err(e) => violations.push(json!({"workflow": wf, "pointer": "", "message": e})),
        }
    }
    if !violations.is_empty() {
        let body = json!({"error": "the payload does not match `payload_schema`", "violations": violations});
        return Err(ApiError::with_body(StatusCode::UNPROCESSABLE_ENTITY, body));
    }

    let received_at = now_millis();
    let fired_at = crate::store::from_millis(received_at);
    let runs: Vec<_> = workflows
        .iter()
        .map(|l| super::new_run(l, fired_at))
        .collect();
    let event_id = crate::engine::new_id();
    let run_ids: Vec<String> = runs.iter().map(|r| r.id.clone()).collect();
    let event = NewEvent {
        id: event_id.clone(),
        name,
        payload,
        received_at,
        runs,
        tick: None,
    };
    // The 202 only after the event and its runs are committed (fsync'd).
    state.store.ingest(event).await?;
    state.metrics.accepted(run_ids.len());
    if !run_ids.is_empty() {
        state.wake.notify_one();
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"event_id": event_id, "runs": run_ids})),
    )
        .into_response())
}

async fn workflows<S: Store>(State(state): State<Arc<AppState<S>>>) -> Response {
    Json(json!({"workflows": state.registry().view()})).into_response()
}

async fn metrics<S: Store>(State(state): State<Arc<AppState<S>>>) -> Response {
    match state.store.queue_depth().await {
        Ok((pending, retrying)) => state.metrics.queue(pending, retrying),
        Err(e) => tracing::error!("cannot read the queue depth: {e}"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Reads `workflow`, `status`, `limit`, `before`; empty values mean "any".
fn run_filter(query: &HashMap<String, String>) -> Result<RunFilter, ApiError> {
    let get = |k: &str| {
        query
            .get(k)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    if let Some(unknown) = query
        .keys()
        .find(|k| !matches!(k.as_str(), "workflow" | "status" | "limit" | "before"))
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown query parameter `{unknown}`; expected workflow, status, limit, before"
            ),
        ));
    }
    let limit = match get("limit") {
        None => None,
        Some(l) => Some(
            l.parse::<u32>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| {
                    ApiError(
                        StatusCode::BAD_REQUEST,
                        format!("`limit` must be a number from 1 to 1000, not `{l}`"),
                    )
                })?,
        ),
    };
    Ok(RunFilter {
        workflow: get("workflow"),
        status: get("status"),
        limit,
        before: get("before"),
    })
}

async fn list_runs<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let filter = run_filter(&query)?;
    if let Some(s) = &filter.status
        && !matches!(s.as_str(), "pending" | "succeeded" | "failed")
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("unknown status `{s}`; expected one of pending, succeeded, failed"),
        ));
    }
    let runs = state.store.list_runs(&filter).await?;
    Ok(Json(json!({"runs": runs})).into_response())
}

async fn show_run<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match state.store.get_run(&id).await? {
        // Attempts were redacted when recorded; the payload may hold a secret value too.
        Some(run) => {
            let value =
                serde_json::to_value(&run).unwrap_or_else(|e| panic!("BUG: a run serializes: {e}"));
            Ok(Json(state.secrets.redactor().redact_json(&value)).into_response())
        }
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no run `{id}`"))),
    }
}

async fn healthz() -> Response {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({"status": "ok"})),
    )
        .into_response()
}

async fn readyz<S: Store>(State(state): State<Arc<AppState<S>>>) -> Response {
    let registry = state.registry();
    let store = state.store.ping().await;
    let draining = state.draining.load(Ordering::SeqCst);
    let body = json!({
        "store": store.as_ref().map_or_else(|e| e.to_string(), |()| "ok".to_owned()),
        "workflows": registry.entries.len(),
        "workflow_errors": registry.errors.len(),
        "draining": draining,
    });
    let status = if store.is_ok() && !draining {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

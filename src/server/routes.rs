//! The HTTP API: ingest, run history, health. Errors are `{"error": "..."}`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::AppState;
use crate::engine::{self, RunInput};
use crate::store::{NewEvent, NewRun, RunFilter, Store, Version, now_millis};

/// An API error: a status and a one-sentence message.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
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
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S>))
        .with_state(state)
}

async fn ingest<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    if state.draining.load(Ordering::SeqCst) {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "flowrun is shutting down; send the event again later".into(),
        ));
    }
    let limit = state.max_body;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the event body is larger than the limit of {limit} bytes"),
        )
    })?;
    let payload: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("the event body is not JSON: {e}"),
        )
    })?;
    let registry = state.registry();
    let received_at = now_millis();
    let fired_at = crate::store::from_millis(received_at);
    let runs: Vec<NewRun> = registry
        .by_event
        .get(&name)
        .map(|wfs| {
            wfs.iter()
                .map(|l| NewRun {
                    id: engine::new_id(),
                    version: Version {
                        hash: l.hash.clone(),
                        name: l.workflow.name.clone(),
                        file: l.file.clone(),
                        source: l.source.clone(),
                    },
                    trigger: RunInput::trigger_for(&l.workflow, fired_at),
                    delivery_id: engine::new_id(),
                })
                .collect()
        })
        .unwrap_or_default();
    let event_id = engine::new_id();
    let run_ids: Vec<String> = runs.iter().map(|r| r.id.clone()).collect();
    let event = NewEvent {
        id: event_id.clone(),
        name,
        payload,
        received_at,
        runs,
    };
    // The 202 only after the event and its runs are committed (fsync'd).
    state.store.ingest(event).await?;
    if !run_ids.is_empty() {
        state.wake.notify_one();
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"event_id": event_id, "runs": run_ids})),
    )
        .into_response())
}

async fn list_runs<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Query(filter): Query<RunFilter>,
) -> Result<Response, ApiError> {
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
        Some(run) => Ok(Json(run).into_response()),
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
        "workflows": registry.all.len(),
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

//! The admin side of projections: who is running, how far behind, and replays.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::ApiError;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use crate::kinds::Kind;
use crate::runner::{self, Projectors, Target};

/// A replay in progress.
#[derive(Clone)]
pub struct ReplayProgress {
    pub processed: Arc<AtomicU64>,
    pub total: u64,
    pub started_at: DateTime<Utc>,
}

/// The state of one projection in this process.
#[derive(Default)]
pub struct State_ {
    failed: Mutex<Option<String>>,
    replay: Mutex<Option<ReplayProgress>>,
    /// Cancels the live projector (a replay pauses it for the swap).
    live: Mutex<Option<CancellationToken>>,
}

/// Every projection this process runs, and how to run them.
#[derive(Clone)]
pub struct Admin {
    pub projectors: Projectors,
    states: Arc<HashMap<Kind, Arc<State_>>>,
    shutdown: CancellationToken,
    /// The live projectors' tasks, so a shutdown can wait for their last commit.
    tasks: TaskTracker,
}

impl Admin {
    /// Starts the live projectors (restarting any that fails) until `shutdown`.
    pub fn start(projectors: Projectors, shutdown: CancellationToken) -> Self {
        let states = Kind::ALL
            .into_iter()
            .map(|k| (k, Arc::new(State_::default())))
            .collect();
        let admin = Self {
            projectors,
            states: Arc::new(states),
            shutdown,
            tasks: TaskTracker::new(),
        };
        for kind in Kind::ALL {
            admin.start_live(kind);
        }
        admin.watch_lag();
        admin
    }

    fn start_live(&self, kind: Kind) {
        let token = self.shutdown.child_token();
        *self.states[&kind]
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
        let (ctx, state) = (self.projectors.clone(), self.states[&kind].clone());
        self.tasks.spawn(async move {
            while !token.is_cancelled() {
                match runner::run(&ctx, kind, &Target::live(kind), &token).await {
                    Ok(()) => *state.failed.lock().unwrap_or_else(|p| p.into_inner()) = None,
                    Err(e) => {
                        error!(projection = kind.name(), error = %format!("{e:#}"), "projector failed; restarting in 1s");
                        *state.failed.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(format!("{e:#}"));
                        tokio::select! {
                            _ = token.cancelled() => {}
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        });
    }

    /// Refreshes the lag gauges every 5 s until shutdown.
    fn watch_lag(&self) {
        let admin = self.clone();
        self.tasks.spawn(async move {
            loop {
                for kind in Kind::ALL {
                    if let Ok(lag) = admin.lag(kind, kind.name()).await {
                        admin
                            .projectors
                            .metrics
                            .lag
                            .get_or_create(&crate::runner::ProjectionMetrics::label(kind))
                            .set(lag);
                    }
                }
                tokio::select! {
                    _ = admin.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
    }

    /// Waits, after shutdown, until every live projector has ended (a batch in progress
    /// commits with its checkpoints first).
    pub async fn stopped(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// `{ name, status, lag, replay, dead_letters }` of one projection.
    pub async fn status(&self, kind: Kind) -> anyhow::Result<Value> {
        let state = &self.states[&kind];
        let replay = state
            .replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let failed = state
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let status = match (&replay, &failed) {
            (Some(_), _) => "replaying",
            (None, Some(_)) => "failed",
            (None, None) => "running",
        };
        let stats = &self.projectors.stats[&kind];
        Ok(json!({
            "name": kind.name(),
            "status": status,
            "lag": self.lag(kind, kind.name()).await?,
            "replay": replay.map(|r| json!({
                "processed": r.processed.load(Ordering::Relaxed),
                "total": r.total,
                "started_at": crate::rfc3339(r.started_at),
            })),
            "applied": stats.applied.get(),
            "dead_letters": stats.dead_lettered.get(),
            "error": failed,
        }))
    }

    /// Records behind: each partition's end minus its checkpoint, summed.
    pub async fn lag(&self, kind: Kind, checkpoint: &str) -> anyhow::Result<i64> {
        let ends = crate::replay::ends(&self.projectors, kind).await?;
        let at = self.projectors.checkpoints(kind, checkpoint).await?;
        Ok(ends
            .iter()
            .map(|(tp, end)| (end - at.get(tp).copied().unwrap_or(0)).max(0))
            .sum())
    }

    /// Starts a replay of `kind` in the background; false when one is running already.
    pub fn start_replay(&self, kind: Kind) -> bool {
        let state = self.states[&kind].clone();
        let mut slot = state.replay.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return false;
        }
        let progress = ReplayProgress {
            processed: Arc::new(AtomicU64::new(0)),
            total: 0,
            started_at: Utc::now(),
        };
        *slot = Some(progress.clone());
        drop(slot);
        let admin = self.clone();
        tokio::spawn(async move {
            let live = admin.states[&kind]
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let result =
                crate::replay::replay(&admin.projectors, kind, progress, &state.replay, live).await;
            *state.replay.lock().unwrap_or_else(|p| p.into_inner()) = None;
            match result {
                Ok(summary) => info!(
                    projection = kind.name(),
                    ?summary,
                    "replay done; new tables swapped in"
                ),
                Err(e) => {
                    error!(projection = kind.name(), error = %format!("{e:#}"), "replay failed; the live tables are untouched")
                }
            }
            admin.start_live(kind);
        });
        true
    }
}

/// `GET /v1/admin/projections` and `POST /v1/admin/projections/{name}/replay`.
pub fn routes(admin: Admin) -> Router {
    Router::new()
        .route("/v1/admin/projections", get(list))
        .route("/v1/admin/projections/{name}/replay", post(replay))
        .with_state(admin)
}

#[utoipa::path(
    get,
    path = "/v1/admin/projections",
    operation_id = "list_projections",
    tag = "admin",
    summary = "Every projection: status, lag, replay progress, dead letters",
    responses((status = 200, description = "the projections", body = crate::openapi::ProjectionList))
)]
pub(crate) async fn list(State(admin): State<Admin>) -> Response {
    let mut items = Vec::new();
    for kind in Kind::ALL {
        match admin.status(kind).await {
            Ok(status) => items.push(status),
            Err(e) => return ApiError::internal(e).into_response(),
        }
    }
    Json(json!({ "items": items })).into_response()
}

#[utoipa::path(
    post,
    path = "/v1/admin/projections/{name}/replay",
    operation_id = "replay_projection",
    tag = "admin",
    summary = "Rebuild a projection from offset 0 in the background",
    params(("name" = String, Path, description = "orders, inventory, accounts, journal or sagas")),
    request_body(content = Option<Object>, content_type = "application/json", description = "`{}` or no body"),
    responses(
        (status = 202, description = "replay started; follow it in GET /v1/admin/projections", body = Object),
        (status = 400, description = "a body other than `{}`", body = api::openapi::ErrorBody),
        (status = 404, description = "no such projection", body = api::openapi::ErrorBody),
        (status = 409, description = "already replaying", body = api::openapi::ErrorBody)
    )
)]
pub(crate) async fn replay(
    State(admin): State<Admin>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(kind) = Kind::from_name(&name) else {
        return ApiError::not_found(format!(
            "no projection {name:?}; see GET /v1/admin/projections"
        ))
        .into_response();
    };
    let trimmed: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if !trimmed.is_empty() && trimmed != b"{}" {
        return ApiError::malformed("the replay body is empty or {}").into_response();
    }
    if !admin.start_replay(kind) {
        return ApiError::new(
            StatusCode::CONFLICT,
            "replay_running",
            format!("{name} is already replaying"),
        )
        .into_response();
    }
    (
        StatusCode::ACCEPTED,
        Json(json!({ "name": name, "status": "replaying" })),
    )
        .into_response()
}

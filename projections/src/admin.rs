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
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};
use utoipa::ToSchema;

use crate::health::{Fault, Health};
use crate::kinds::Kind;
use crate::live::keep_running;
pub use crate::live::LiveSlot;
use crate::projectors::{ProjectionMetrics, Projectors};
use crate::replay::ReplayLock;

/// A replay in progress.
#[derive(Clone)]
pub struct ReplayProgress {
    /// Records applied so far.
    pub processed: Arc<AtomicU64>,
    /// Records to apply (known once the replay has read the log's ends).
    pub total: u64,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// The error the replay is waiting out, if any.
    pub health: Arc<Health>,
}

impl ReplayProgress {
    /// A replay starting now.
    pub fn new() -> Self {
        Self {
            processed: Arc::new(AtomicU64::new(0)),
            total: 0,
            started_at: Utc::now(),
            health: Arc::default(),
        }
    }
}

impl Default for ReplayProgress {
    fn default() -> Self {
        Self::new()
    }
}

/// A replay's progress as the status shows it.
#[derive(Serialize, ToSchema)]
pub struct ReplayStatus {
    pub processed: u64,
    pub total: u64,
    /// RFC 3339.
    pub started_at: String,
}

/// One projection's state (API.md, `GET /v1/admin/projections`).
#[derive(Serialize, ToSchema)]
pub struct ProjectionStatus {
    pub name: &'static str,
    /// `running`, `replaying` or `failed`. A transient error (a database or broker
    /// briefly away) is retried while the status stays `running`.
    pub status: &'static str,
    /// Records behind the log. A checkpoint past the end of its partition counts by how
    /// far past it is (the status is then `failed`), never as 0.
    pub lag: i64,
    pub replay: Option<ReplayStatus>,
    /// Records applied by this process.
    pub applied: u64,
    /// Records this process sent to the dead-letter topic.
    pub dead_letters: u64,
    /// What is wrong now; null when nothing is.
    pub error: Option<Fault>,
}

/// How far a projection is from the end of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lag {
    /// Records between its checkpoints and the ends of their partitions, either way.
    pub records: i64,
    /// Its checkpoints past the end of their partition, described.
    pub beyond: Vec<String>,
}

/// Every projection's state.
#[derive(Serialize, ToSchema)]
pub struct ProjectionList {
    pub items: Vec<ProjectionStatus>,
}

/// The state of one projection in this process.
#[derive(Default)]
pub struct State_ {
    /// The live projector's error, if any.
    health: Arc<Health>,
    replay: Mutex<Option<ReplayProgress>>,
    /// The live projector (a replay stops it for the swap).
    live: LiveSlot,
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

/// Why a replay did not start.
#[derive(Debug)]
pub enum ReplayRefused {
    /// One runs already, in this process or another.
    Running(String),
    /// The database did not answer.
    Failed(anyhow::Error),
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

    /// Starts the live projector of `kind`. The caller makes sure none runs.
    fn start_live(&self, kind: Kind) {
        let token = self.shutdown.child_token();
        let (ctx, state) = (self.projectors.clone(), self.states[&kind].clone());
        let running = ctx
            .metrics
            .running
            .get_or_create(&ProjectionMetrics::label(kind))
            .clone();
        let stop = token.clone();
        let task = self.tasks.spawn(async move {
            running.inc();
            keep_running(&ctx, kind, &state.health, &stop).await;
            running.dec();
        });
        *self.states[&kind]
            .live
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((token, task));
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
                            .get_or_create(&ProjectionMetrics::label(kind))
                            .set(lag.records);
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

    /// The state of one projection: what is true now.
    pub async fn status(&self, kind: Kind) -> ProjectionStatus {
        let state = &self.states[&kind];
        let replay = state
            .replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let lag = self.current_lag(kind).await;
        let mut live = state.health.state();
        if live.is_none() && !lag.beyond.is_empty() {
            // Its projector may not know (librdkafka reports such a checkpoint once) or
            // may run in another process: say it, rather than a lag of 0.
            live = Some((
                Fault {
                    message: format!(
                        "checkpoint past the end of the log: {}; the {} projector cannot read on from there (replay it, or correct the checkpoint)",
                        lag.beyond.join(", "),
                        kind.name()
                    ),
                    since: crate::rfc3339(Utc::now()),
                    transient: false,
                },
                false,
            ));
        }
        let status = match (&replay, &live) {
            (Some(_), _) => "replaying",
            (None, Some((fault, stopped))) if *stopped || !fault.transient => "failed",
            (None, _) => "running",
        };
        let error = match live {
            Some((fault, _)) => Some(fault),
            None => replay.as_ref().and_then(|r| r.health.fault()),
        };
        let stats = &self.projectors.stats[&kind];
        ProjectionStatus {
            name: kind.name(),
            status,
            lag: lag.records,
            replay: replay.map(|r| ReplayStatus {
                processed: r.processed.load(Ordering::Relaxed),
                total: r.total,
                started_at: crate::rfc3339(r.started_at),
            }),
            applied: stats.applied.get(),
            dead_letters: stats.dead_lettered.get(),
            error,
        }
    }

    /// The lag of the live projection now (and its checkpoints past the end of the log),
    /// or the last lag known and nothing else while Kafka or the database does not answer
    /// (the status must answer then, above all).
    async fn current_lag(&self, kind: Kind) -> Lag {
        let gauge = self
            .projectors
            .metrics
            .lag
            .get_or_create(&ProjectionMetrics::label(kind))
            .clone();
        let lag = tokio::time::timeout(Duration::from_secs(3), self.lag(kind, kind.name()));
        match lag.await {
            Ok(Ok(lag)) => {
                gauge.set(lag.records);
                lag
            }
            _ => Lag {
                records: gauge.get(),
                beyond: Vec::new(),
            },
        }
    }

    /// Records between each partition's checkpoint and its end, summed. A checkpoint past
    /// the end counts by how far it is past (it is never 0 then), and is named in
    /// [`Lag::beyond`]. The checkpoints are read before the ends, so a projector moving
    /// on in between never looks past the end.
    pub async fn lag(&self, kind: Kind, checkpoint: &str) -> anyhow::Result<Lag> {
        let at = self.projectors.stored_checkpoints(kind, checkpoint).await?;
        let ends = crate::replay::ends(&self.projectors, kind).await?;
        let mut ends: Vec<_> = ends.into_iter().collect();
        ends.sort();
        let mut lag = Lag {
            records: 0,
            beyond: Vec::new(),
        };
        for ((topic, partition), end) in ends {
            let at = at.get(&(topic.clone(), partition)).copied().unwrap_or(0);
            lag.records += (end - at).abs();
            if at > end {
                lag.beyond.push(format!(
                    "{topic}/{partition} at offset {at} (the log ends at {end})"
                ));
            }
        }
        Ok(lag)
    }

    /// Starts a replay of `kind` in the background, unless one runs already in this
    /// process or (holding its advisory lock) in another.
    pub async fn start_replay(&self, kind: Kind) -> Result<(), ReplayRefused> {
        let state = self.states[&kind].clone();
        let progress = ReplayProgress::new();
        {
            let mut slot = state.replay.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_some() {
                return Err(ReplayRefused::Running(format!(
                    "{} is already replaying",
                    kind.name()
                )));
            }
            *slot = Some(progress.clone());
        }
        let lock = match ReplayLock::try_acquire(&self.projectors, kind).await {
            Ok(Some(lock)) => lock,
            refused => {
                *state.replay.lock().unwrap_or_else(|p| p.into_inner()) = None;
                return Err(match refused {
                    Ok(_) => ReplayRefused::Running(format!(
                        "{} is already replaying in another process",
                        kind.name()
                    )),
                    Err(e) => ReplayRefused::Failed(e),
                });
            }
        };
        let admin = self.clone();
        tokio::spawn(async move {
            let ctx = &admin.projectors;
            let result =
                crate::replay::replay(ctx, kind, lock, progress, &state.replay, Some(&state.live))
                    .await;
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
            // Exactly one live projector afterwards, however far the replay got.
            state.live.stop().await;
            state.health.ok();
            admin.start_live(kind);
        });
        Ok(())
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
    responses((status = 200, description = "the projections", body = ProjectionList))
)]
pub(crate) async fn list(State(admin): State<Admin>) -> Response {
    let mut items = Vec::new();
    for kind in Kind::ALL {
        items.push(admin.status(kind).await);
    }
    Json(ProjectionList { items }).into_response()
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
        (status = 409, description = "already replaying, in this process or another", body = api::openapi::ErrorBody)
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
    match admin.start_replay(kind).await {
        Ok(()) => {}
        Err(ReplayRefused::Running(why)) => {
            return ApiError::new(StatusCode::CONFLICT, "replay_running", why).into_response()
        }
        Err(ReplayRefused::Failed(e)) => return ApiError::internal(e).into_response(),
    }
    (
        StatusCode::ACCEPTED,
        Json(json!({ "name": name, "status": "replaying" })),
    )
        .into_response()
}

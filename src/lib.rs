//! The `tally` binary's library: it wires the crates into one process, so that tests can
//! start the whole app in-process (DESIGN.md §1).
//!
//! [`prepare`] waits for Kafka and PostgreSQL, creates the topics and runs the
//! migrations; [`run`] serves the HTTP API on a listener until `shutdown` resolves.

pub mod config;
pub mod error;
pub mod readiness;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::http::{HeaderName, Request};
use axum::routing::get;
use axum::Router;
use eventlog::{ensure_topics, KafkaConfig, Topics};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use tracing::{info, warn};

use crate::config::CommonArgs;
use crate::error::ApiError;
use crate::readiness::Readiness;

/// The event streams, one per aggregate type: `<prefix>.<stream>.events` / `.commands`.
pub const STREAMS: [&str; 3] = ["order", "inventory", "payment"];

/// The header that carries a request's correlation id, in and out.
pub const CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");

/// Everything the HTTP handlers share.
#[derive(Clone)]
pub struct AppState {
    pub kafka: KafkaConfig,
    pub readiness: Readiness,
}

/// Waits (up to the start-up timeout) for Kafka and PostgreSQL, creates missing topics,
/// and runs the read-model migrations.
pub async fn prepare(common: &CommonArgs) -> anyhow::Result<AppState> {
    let kafka = common.kafka();
    let deadline = Instant::now() + common.startup_timeout();

    retry_until(deadline, "Kafka", || {
        eventlog::check_connection(&kafka, Duration::from_secs(3))
    })
    .await?;
    ensure_topics(
        &kafka,
        &Topics::new(&kafka.topic_prefix).all(&STREAMS, &kafka),
    )
    .await?;
    info!(brokers = %kafka.brokers, prefix = %kafka.topic_prefix, partitions = kafka.partitions, "kafka ready, topics in place");

    let options = common
        .database_url
        .parse()
        .context("DATABASE_URL is not a valid postgres:// URL")?;
    let pool = retry_until(deadline, "PostgreSQL", || {
        projections::connect(Clone::clone(&options), common.database_connections)
    })
    .await?;
    projections::migrate(&pool).await?;
    info!("postgres ready, migrations applied");

    let probe = kafka
        .client()
        .create()
        .context("creating the readiness Kafka client")?;
    Ok(AppState {
        kafka,
        readiness: Readiness {
            kafka: Arc::new(probe),
            pool,
        },
    })
}

async fn retry_until<T, F, Fut>(deadline: Instant, what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(err) if Instant::now() < deadline => {
                warn!(error = %format!("{err:#}"), "{what} not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(err) => {
                return Err(
                    err.context(format!("{what} still unreachable at the start-up deadline"))
                )
            }
        }
    }
}

/// The HTTP API: every route, the correlation id in and out, request tracing, and the
/// API.md error shape for unknown routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(readiness::healthz))
        .route("/readyz", get(readiness::readyz).with_state(state.readiness.clone()))
        .fallback(|| async { ApiError::not_found("no such route; see /openapi.json") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(axum::http::StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this route does not take that method")
        })
        .layer(PropagateRequestIdLayer::new(CORRELATION_ID))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
            let correlation_id = req
                .extensions()
                .get::<RequestId>()
                .and_then(|id| id.header_value().to_str().ok())
                .unwrap_or_default();
            tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), correlation_id)
        }))
        .layer(SetRequestIdLayer::new(CORRELATION_ID, MakeRequestUuid))
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    info!(addr = %listener.local_addr()?, "serving the HTTP API");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")
}

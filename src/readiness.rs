//! `/healthz` and `/readyz`: is the process up, and can it do its work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use eventlog::owner::OwnerStatus;
use eventlog::rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{json, Value};
use sqlx::PgPool;

use api::ApiError;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What readiness checks: a Kafka client kept open for metadata requests, and the pool.
#[derive(Clone)]
pub struct Readiness {
    pub kafka: Arc<BaseConsumer>,
    pub pool: PgPool,
    /// The partition owners of this process (command processors, saga): each must have
    /// joined its group and restored every partition it owns.
    pub processors: Vec<(&'static str, OwnerStatus)>,
    /// Set the moment a shutdown begins: `/readyz` answers 503 from then on.
    pub draining: Arc<AtomicBool>,
}

/// `GET /healthz`: `200` while the process runs.
#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "ops",
    responses((status = 200, description = "the process runs", body = Object)))]
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: `200` when Kafka and PostgreSQL answer and every owner has joined its
/// group and restored the partitions it owns, else `503 not_ready` naming what failed.
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "ops",
    responses(
        (status = 200, description = "Kafka and PostgreSQL answer and owned partitions are restored", body = Object),
        (status = 503, description = "not ready (or shutting down); `details` says what failed", body = api::openapi::ErrorBody)
    ))]
pub async fn readyz(State(ready): State<Readiness>) -> Result<Json<Value>, ApiError> {
    if ready.draining.load(Ordering::SeqCst) {
        return Err(ApiError::not_ready(
            "shutting down: finishing in-flight work; send requests to another instance",
        ));
    }
    let (kafka, postgres) = tokio::join!(
        check_kafka(ready.kafka.clone()),
        check_postgres(&ready.pool)
    );
    let restoring: usize = ready
        .processors
        .iter()
        .map(|(_, s)| s.restoring.load(Ordering::Relaxed))
        .sum();
    let joining: Vec<&str> = ready
        .processors
        .iter()
        .filter(|(_, s)| !s.joined.load(Ordering::Relaxed))
        .map(|(name, _)| *name)
        .collect();
    let partitions = if !joining.is_empty() {
        Err(format!(
            "not yet assigned partitions by the groups of {}",
            joining.join(", ")
        ))
    } else if restoring > 0 {
        Err(format!(
            "{restoring} owned partitions still restoring their state"
        ))
    } else {
        Ok(())
    };
    let checks = json!({
        "kafka": describe(&kafka),
        "postgres": describe(&postgres),
        "partitions": describe(&partitions),
    });
    if kafka.is_ok() && postgres.is_ok() && partitions.is_ok() {
        Ok(Json(json!({ "status": "ready", "checks": checks })))
    } else {
        Err(ApiError::not_ready("a dependency is not answering; see details").with_details(checks))
    }
}

fn describe(result: &Result<(), String>) -> String {
    match result {
        Ok(()) => "ok".into(),
        Err(e) => e.clone(),
    }
}

async fn check_kafka(client: Arc<BaseConsumer>) -> Result<(), String> {
    tokio::task::spawn_blocking(move || client.fetch_metadata(None, CHECK_TIMEOUT).map(|_| ()))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("kafka metadata request failed: {e}"))
}

async fn check_postgres(pool: &PgPool) -> Result<(), String> {
    let query = sqlx::query("SELECT 1").execute(pool);
    match tokio::time::timeout(CHECK_TIMEOUT, query).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("postgres query failed: {e}")),
        Err(_) => Err("postgres did not answer within 2s".into()),
    }
}

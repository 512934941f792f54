//! `/healthz` and `/readyz`: is the process up, and can it do its work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use commands::ProcessorStatus;
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
    /// The command processors of this process, whose partitions must be rebuilt.
    pub processors: Vec<(&'static str, ProcessorStatus)>,
    /// Set the moment a shutdown begins: `/readyz` answers 503 from then on.
    pub draining: Arc<AtomicBool>,
}

/// `GET /healthz`: `200` while the process runs.
#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "ops",
    responses((status = 200, description = "the process runs", body = Object)))]
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: `200` when Kafka and PostgreSQL answer and every owned partition has
/// been rebuilt, else `503 not_ready` naming what failed.
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "ops",
    responses(
        (status = 200, description = "Kafka and PostgreSQL answer and owned partitions are rebuilt", body = Object),
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
    let rebuilding: usize = ready
        .processors
        .iter()
        .map(|(_, s)| s.rebuilding.load(Ordering::Relaxed))
        .sum();
    let partitions = if rebuilding == 0 {
        Ok(())
    } else {
        Err(format!("{rebuilding} owned partitions still rebuilding"))
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

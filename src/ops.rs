//! `/metrics` in the Prometheus (OpenMetrics) text format: every metric family the
//! process's roles registered at start.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use prometheus_client::registry::Registry;

/// What `/metrics` reads.
#[derive(Clone)]
pub struct Ops {
    pub registry: Arc<Registry>,
}

/// `GET /metrics`.
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "ops",
    responses((status = 200, description = "Prometheus / OpenMetrics text format", body = String, content_type = "application/openmetrics-text")))]
pub async fn metrics(State(ops): State<Ops>) -> impl IntoResponse {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &ops.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => api::ApiError::internal(e).into_response(),
    }
}

//! `GET /openapi.json`: the whole HTTP API as OpenAPI 3, generated from the handlers'
//! `#[utoipa::path]` descriptions in each crate and merged here.

use axum::Json;
use serde_json::Value;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tally",
        description = "Event-sourced orders, inventory and payments on an Apache Kafka log. \
            Every error answers `{ \"error\": { \"code\", \"message\", \"details\" } }`; \
            every response carries `X-Correlation-ID`.",
        license(name = "Apache-2.0")
    ),
    paths(crate::readiness::healthz, crate::readiness::readyz, crate::ops::metrics, openapi_json),
    tags(
        (name = "orders", description = "Orders and their fulfilment saga"),
        (name = "inventory", description = "Stock per SKU"),
        (name = "accounts", description = "Payment accounts per customer"),
        (name = "admin", description = "Projections: status and replay"),
        (name = "ops", description = "Health, readiness, metrics, this document")
    )
)]
struct OpsDoc;

/// The merged document.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = OpsDoc::openapi();
    doc.merge(commands::http::CommandRoutesDoc::openapi());
    doc.merge(projections::openapi::QueryRoutesDoc::openapi());
    doc
}

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "ops",
    summary = "This API as OpenAPI 3",
    responses((status = 200, description = "the OpenAPI document", body = Object))
)]
pub async fn openapi_json() -> Json<Value> {
    Json(serde_json::to_value(document()).unwrap_or_default())
}

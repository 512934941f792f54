//! `GET /openapi.json`: the whole HTTP API as OpenAPI 3, generated from the handlers'
//! `#[utoipa::path]` descriptions in each crate and merged here.

use axum::Json;
use serde_json::{json, Value};
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

/// The merged document, with what every `/v1` route may answer besides its own
/// responses: 401 and 403 (with authentication on), 408 and 429; and the bearer scheme.
pub fn document() -> Value {
    let mut doc = OpsDoc::openapi();
    doc.merge(commands::http::CommandRoutesDoc::openapi());
    doc.merge(projections::openapi::QueryRoutesDoc::openapi());
    let mut doc = serde_json::to_value(doc).unwrap_or_default();
    let common = [
        ("401", "no valid bearer token (authentication on)"),
        ("403", "the token's role or customer may not do this"),
        ("408", "the request took longer than --request-timeout-secs"),
        (
            "429",
            "over this client's rate limit: wait Retry-After seconds",
        ),
        ("431", "too many or too large headers"),
    ];
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for op in item.values_mut() {
                let responses = &mut op["responses"];
                for (status, description) in common {
                    let ops_route = !path.starts_with("/v1/");
                    if ops_route && status != "431" {
                        continue;
                    }
                    responses[status] = json!({
                        "description": description,
                        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorBody" } } }
                    });
                }
                if path.starts_with("/v1/") {
                    op["security"] = json!([{ "bearer": [] }, {}]);
                }
            }
        }
    }
    doc["components"]["securitySchemes"] = json!({
        "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
            "description": "claims: sub, exp, role (admin | customer), customer_id (customer tokens; defaults to sub)" }
    });
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
    Json(document())
}

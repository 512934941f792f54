//! Reading request bodies and path ids the way API.md says: 415 for a body that is not
//! JSON-typed, 413 past 65,536 bytes, 400 for anything unreadable or mistyped (unknown
//! fields included), and 400 for a malformed id in a path.

use aggregates::{CustomerId, OrderId, Sku};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::ApiError;

/// Largest accepted request body; exactly this many bytes is still accepted.
pub const MAX_BODY_BYTES: usize = 65_536;

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads a JSON body into `T`. With `optional`, an empty body (any content type) reads as
/// `{}`, for routes such as `place` whose body may be left out.
pub async fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    optional: bool,
) -> Result<T, ApiError> {
    let bytes: Bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body is over {MAX_BODY_BYTES} bytes"),
            )
            .with_details(json!({ "max_bytes": MAX_BODY_BYTES }))
        })?;
    if optional && bytes.iter().all(u8::is_ascii_whitespace) {
        return serde_json::from_str("{}").map_err(|e| malformed(&e));
    }
    if !is_json(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| malformed(&e))
}

fn malformed(err: &serde_json::Error) -> ApiError {
    ApiError::malformed(format!("the request body is not valid: {err}"))
}

/// Parses an `order_id` path segment (a UUID).
pub fn parse_order_id(s: &str) -> Result<OrderId, ApiError> {
    OrderId::parse(s).map_err(|_| {
        ApiError::malformed(format!("order_id {s:?} is not a UUID"))
            .with_details(json!({ "field": "order_id" }))
    })
}

/// Parses a `sku` path segment.
pub fn parse_sku(s: &str) -> Result<Sku, ApiError> {
    Sku::new(s)
        .map_err(|e| ApiError::malformed(e.to_string()).with_details(json!({ "field": "sku" })))
}

/// Parses a `customer_id` path segment.
pub fn parse_customer_id(s: &str) -> Result<CustomerId, ApiError> {
    CustomerId::new(s).map_err(|e| {
        ApiError::malformed(e.to_string()).with_details(json!({ "field": "customer_id" }))
    })
}

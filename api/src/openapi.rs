//! The pieces of the OpenAPI document every route shares: the error shape, a command's
//! answer, and the header and path parameters. Each crate documents its own routes next
//! to their handlers (`#[utoipa::path]`); the binary merges them into `/openapi.json`.

use serde_json::Value;
use utoipa::ToSchema;

/// The pattern of SKUs and customer ids (1 to 64 of `A-Z a-z 0-9 . _ -`).
pub const ID_PATTERN: &str = "^[A-Za-z0-9._-]{1,64}$";

/// Every error: `{ "error": { "code", "message", "details" } }`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong, for programs (`code`, `details`) and people (`message`).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// e.g. `malformed_request`, `rule_violation` (then `details.rule` names the rule).
    pub code: String,
    pub message: String,
    #[schema(value_type = Option<Object>)]
    pub details: Option<Value>,
}

/// A command's answer: the aggregate, its version after the command, and a token that a
/// query can wait for (`X-Consistency-Token`).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct CommandAccepted {
    pub aggregate_id: String,
    #[schema(minimum = 1)]
    pub version: u64,
    pub consistency_token: String,
}

/// The headers every command route reads.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct CommandHeaders {
    /// Apply only if the aggregate is at this version (bare or quoted), else 409.
    #[param(rename = "If-Match", value_type = Option<String>, pattern = r#"^"?[0-9]{1,19}"?$"#)]
    pub if_match: Option<String>,
    /// Makes a retry safe: the same request again gets the first answer.
    #[param(rename = "Idempotency-Key", value_type = Option<String>, min_length = 1, max_length = 128, pattern = "^[ -~]{1,128}$")]
    pub idempotency_key: Option<String>,
}

/// The header a query may carry to read its own writes.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct QueryHeaders {
    /// A command's `consistency_token`: the query waits (up to 10 s) until it is applied.
    #[param(rename = "X-Consistency-Token", value_type = Option<String>)]
    pub consistency_token: Option<String>,
}

/// What every command route may answer besides its success (API.md).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum CommandErrors {
    /// Malformed request: unreadable JSON, unknown fields, wrong types, bad ids or headers.
    #[response(status = 400)]
    Malformed(ErrorBody),
    /// If-Match named another version (`details.current_version`).
    #[response(status = 409)]
    VersionConflict(ErrorBody),
    /// Body over 65,536 bytes.
    #[response(status = 413)]
    PayloadTooLarge(ErrorBody),
    /// A body that is not `application/json`.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// A rule says no (`details.rule`), or the Idempotency-Key was used for another request.
    #[response(status = 422)]
    RuleViolation(ErrorBody),
    /// No outcome within the command timeout (a retry with the same Idempotency-Key is
    /// safe), or not ready.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// What every query route may answer besides its success.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum QueryErrors {
    /// A malformed id, query parameter or consistency token.
    #[response(status = 400)]
    Malformed(ErrorBody),
    /// Not caught up with the consistency token within 10 s.
    #[response(status = 503)]
    NotCaughtUp(ErrorBody),
}

/// No such aggregate.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum NotFound {
    /// No such aggregate.
    #[response(status = 404)]
    NotFound(ErrorBody),
}

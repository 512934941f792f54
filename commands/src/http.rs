//! The command routes of API.md. Everything a request can get wrong is found here, before
//! anything reaches Kafka; what only the aggregate can judge comes back from the processor.

use aggregates::{
    Cents, CustomerId, Inventory, InventoryCommand, Order, OrderCommand, OrderId, OrderLine,
    PaymentAccount, PaymentCommand, Quantity, Sku, ValueError,
};
use api::auth::{require_admin, require_customer, Principal};
use api::openapi::{CommandAccepted, CommandErrors, CommandHeaders, ErrorBody, NotFound};
use api::{json_body, parse_customer_id, parse_order_id, parse_sku, ApiError};
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::bus::{CommandBus, DispatchError};
use crate::idempotency::{self, Answer, Claim};
use crate::stream::CommandStream;
use crate::wire::{CommandEnvelope, CommandResult};
use eventlog::{Code, Outcome};

/// The OpenAPI description of the command routes.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        create_order,
        add_line,
        remove_line,
        place_order,
        cancel_order,
        restock,
        deposit
    ),
    components(schemas(ErrorBody, CommandAccepted))
)]
pub struct CommandRoutesDoc;

/// What the command routes need.
#[derive(Clone)]
pub struct CommandApi {
    pub bus: CommandBus,
    pub pool: PgPool,
    pub metrics: crate::Metrics,
}

/// The command routes, ready to merge into the app's router.
pub fn routes(api: CommandApi) -> Router {
    Router::new()
        .route("/v1/orders", post(create_order))
        .route("/v1/orders/{order_id}/lines", post(add_line))
        .route("/v1/orders/{order_id}/lines/{sku}", delete(remove_line))
        .route("/v1/orders/{order_id}/place", post(place_order))
        .route("/v1/orders/{order_id}/cancel", post(cancel_order))
        .route("/v1/inventory/{sku}/restock", post(restock))
        .route("/v1/accounts/{customer_id}/deposits", post(deposit))
        .with_state(api)
}

/// One order line.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct LineBody {
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    sku: String,
    #[schema(minimum = 1, maximum = 1000)]
    quantity: i64,
    #[schema(minimum = 1, maximum = 100000000)]
    unit_price_cents: i64,
}

/// A new draft order; `order_id` is chosen by the client or generated.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateOrderBody {
    #[serde(default)]
    #[schema(value_type = Option<uuid::Uuid>)]
    order_id: Option<String>,
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    customer_id: String,
    /// One line per SKU, 1 to 50 lines.
    #[schema(min_items = 1, max_items = 50)]
    lines: Vec<LineBody>,
}

/// `{}`: the command takes no fields.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct EmptyBody {}

/// Why the order is cancelled.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    /// Not blank, at most 1,000 characters.
    #[schema(min_length = 1, max_length = 1000, pattern = r"\S")]
    reason: String,
}

/// Units to add on hand.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RestockBody {
    #[schema(minimum = 1, maximum = 1000000)]
    quantity: i64,
}

/// Funds to add.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct DepositBody {
    #[schema(minimum = 1, maximum = 100000000)]
    amount_cents: i64,
}

fn out_of_range(err: ValueError) -> ApiError {
    match err {
        ValueError::InvalidId { .. } => ApiError::malformed(err.to_string()),
        ValueError::OutOfRange { .. } => ApiError::rule_violation(err.rule(), err.to_string()),
    }
}

impl LineBody {
    fn into_line(self) -> Result<OrderLine, ApiError> {
        Ok(OrderLine {
            sku: Sku::new(self.sku).map_err(out_of_range)?,
            quantity: Quantity::line(self.quantity).map_err(out_of_range)?,
            unit_price_cents: Cents::unit_price(self.unit_price_cents).map_err(out_of_range)?,
        })
    }
}

/// Reads the body as JSON (the idempotency fingerprint). A body that is not JSON is
/// answered `400`/`413`/`415` here, before any key is claimed.
async fn read(parts: &Parts, body: Body, optional: bool) -> Result<Value, ApiError> {
    json_body(&parts.headers, body, optional).await
}

/// The request body as `T` (a `400` when it does not fit).
fn typed<T: serde::de::DeserializeOwned>(raw: &Value) -> Result<T, ApiError> {
    serde_json::from_value(raw.clone())
        .map_err(|e| ApiError::malformed(format!("the request body is not valid: {e}")))
}

/// `{}` or no body: anything else (`[]`, `42`, `"x"`, a field) is `400`.
fn empty(raw: &Value) -> Result<(), ApiError> {
    if !raw.is_object() {
        return Err(ApiError::malformed(
            "this command takes no fields: send `{}` or no body",
        ));
    }
    typed::<EmptyBody>(raw).map(|EmptyBody {}| ())
}

#[utoipa::path(
    post,
    path = "/v1/orders",
    operation_id = "create_order",
    tag = "orders",
    summary = "Create a draft order with its lines",
    request_body = CreateOrderBody,
    params(CommandHeaders),
    responses(
        (status = 201, description = "created", body = CommandAccepted),
        CommandErrors
    )
)]
async fn create_order(State(api): State<CommandApi>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let raw = match read(&parts, body, false).await {
        Ok(raw) => raw,
        Err(e) => return e.into_response(),
    };
    let command_id = Uuid::new_v4();
    let parsed = (|| {
        let body: CreateOrderBody = typed(&raw)?;
        let order_id = match &body.order_id {
            Some(id) => parse_order_id(id)?,
            // Derived from the command id, so a retry with the same Idempotency-Key names
            // the same order (and lands on the same partition).
            None => OrderId(command_id),
        };
        let customer_id = CustomerId::new(body.customer_id).map_err(out_of_range)?;
        require_customer(parts.extensions.get::<Principal>(), customer_id.as_str())?;
        let lines = body
            .lines
            .into_iter()
            .map(LineBody::into_line)
            .collect::<Result<_, _>>()?;
        let command = OrderCommand::CreateOrder {
            order_id,
            customer_id,
            lines,
        };
        Ok((order_id.to_string(), command))
    })();
    let derived = raw
        .get("order_id")
        .is_none_or(Value::is_null)
        .then_some(command_id);
    api.submit::<Order>(&parts, &raw, parsed, derived).await
}

#[utoipa::path(
    post,
    path = "/v1/orders/{order_id}/lines",
    operation_id = "add_line",
    tag = "orders",
    summary = "Add a line (or units to an existing line)",
    request_body = LineBody,
    params(("order_id" = uuid::Uuid, Path, description = "the order's UUID"), CommandHeaders),
    responses(
        (status = 200, description = "applied", body = CommandAccepted),
        CommandErrors,
        NotFound
    )
)]
async fn add_line(
    State(api): State<CommandApi>,
    Path(order_id): Path<String>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let raw = match read(&parts, body, false).await {
        Ok(raw) => raw,
        Err(e) => return e.into_response(),
    };
    let parsed = (|| {
        let id = parse_order_id(&order_id)?;
        let line = typed::<LineBody>(&raw)?.into_line()?;
        Ok((id.to_string(), OrderCommand::AddLine(line)))
    })();
    api.submit::<Order>(&parts, &raw, parsed, None).await
}

#[utoipa::path(
    delete,
    path = "/v1/orders/{order_id}/lines/{sku}",
    operation_id = "remove_line",
    tag = "orders",
    summary = "Remove a SKU's line from a draft order",
    request_body (content = Option<EmptyBody>, content_type = "application/json", description = "`{}` or no body"),
    params(("order_id" = uuid::Uuid, Path, description = "the order's UUID"), ("sku" = String, Path, pattern = r"^[A-Za-z0-9._-]{1,64}$"), CommandHeaders),
    responses(
        (status = 200, description = "applied", body = CommandAccepted),
        CommandErrors,
        NotFound
    )
)]
async fn remove_line(
    State(api): State<CommandApi>,
    Path((order_id, sku)): Path<(String, String)>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let raw = match read(&parts, body, true).await {
        Ok(raw) => raw,
        Err(e) => return e.into_response(),
    };
    let parsed = (|| {
        let id = parse_order_id(&order_id)?;
        let sku = parse_sku(&sku)?;
        empty(&raw)?;
        Ok((id.to_string(), OrderCommand::RemoveLine { sku }))
    })();
    api.submit::<Order>(&parts, &raw, parsed, None).await
}

#[utoipa::path(
    post,
    path = "/v1/orders/{order_id}/place",
    operation_id = "place_order",
    tag = "orders",
    summary = "Place the order: starts the fulfilment saga",
    request_body (content = Option<EmptyBody>, content_type = "application/json", description = "`{}` or no body"),
    params(("order_id" = uuid::Uuid, Path, description = "the order's UUID"), CommandHeaders),
    responses(
        (status = 200, description = "applied", body = CommandAccepted),
        CommandErrors,
        NotFound
    )
)]
async fn place_order(
    State(api): State<CommandApi>,
    Path(order_id): Path<String>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let raw = match read(&parts, body, true).await {
        Ok(raw) => raw,
        Err(e) => return e.into_response(),
    };
    let parsed = (|| {
        let id = parse_order_id(&order_id)?;
        empty(&raw)?;
        Ok((id.to_string(), OrderCommand::PlaceOrder))
    })();
    api.submit::<Order>(&parts, &raw, parsed, None).await
}

#[utoipa::path(
    post,
    path = "/v1/orders/{order_id}/cancel",
    operation_id = "cancel_order",
    tag = "orders",
    summary = "Cancel a draft, placed or confirmed order",
    request_body = CancelBody,
    params(("order_id" = uuid::Uuid, Path, description = "the order's UUID"), CommandHeaders),
    responses(
        (status = 200, description = "applied", body = CommandAccepted),
        CommandErrors,
        NotFound
    )
)]
async fn cancel_order(
    State(api): State<CommandApi>,
    Path(order_id): Path<String>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let raw = match read(&parts, body, false).await {
        Ok(raw) => raw,
        Err(e) => return e.into_response(),
    };
    let parsed = (|| {
        let id = parse_order_id(&order_id)?;
        let reason = typed::<CancelBody>(&raw)?.reason;
        Ok((id.to_string(), OrderCommand::CancelOrder { reason }))
    })();
    api.submit::<Order>(&parts, &raw, parsed, None).await
}

#[utoipa::path(
    post,
    path = "/v1/inventory/{sku}/restock",
    operation_id = "restock",
    tag = "inventory",
    summary = "Add units of a SKU on hand",
    request_body = RestockBody,
    params(("sku" = String, Path, pattern = r"^[A-Za-z0-9._-]{1,64}$"), CommandHeaders),
    responses(
        (status = 200, description = "applied", body = CommandAccepted),
        (status = 201, description = "applied, the first time for this aggregate", body = CommandAccepted),
        CommandErrors
    )
)]
async fn restock(
    State(api): State<CommandApi>,
    Path(sku): Path<String>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    if let Err(e) = require_admin(parts.extensions.get::<Principal>(), "restocking") {
        return e.into_response();
    }
    let raw = match read(&parts, body, false).await {
        Ok(raw) => raw,
        Err(e) => return e.into_response(),
    };
    let parsed = (|| {
        let sku = parse_sku(&sku)?;
        let quantity =
            Quantity::restock(typed::<RestockBody>(&raw)?.quantity).map_err(out_of_range)?;
        Ok((sku.to_string(), InventoryCommand::Restock { sku, quantity }))
    })();
    api.submit::<Inventory>(&parts, &raw, parsed, None).await
}

#[utoipa::path(
    post,
    path = "/v1/accounts/{customer_id}/deposits",
    operation_id = "deposit",
    tag = "accounts",
    summary = "Add funds to a customer's account",
    request_body = DepositBody,
    params(("customer_id" = String, Path, pattern = r"^[A-Za-z0-9._-]{1,64}$"), CommandHeaders),
    responses(
        (status = 200, description = "applied", body = CommandAccepted),
        (status = 201, description = "applied, the first time for this aggregate", body = CommandAccepted),
        CommandErrors
    )
)]
async fn deposit(
    State(api): State<CommandApi>,
    Path(customer_id): Path<String>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let customer_id = match parse_customer_id(&customer_id).and_then(|id| {
        // Judged on the very id the command names.
        require_customer(parts.extensions.get::<Principal>(), id.as_str()).map(|()| id)
    }) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let raw = match read(&parts, body, false).await {
        Ok(raw) => raw,
        Err(e) => return e.into_response(),
    };
    let parsed = (|| {
        let amount_cents =
            Cents::deposit(typed::<DepositBody>(&raw)?.amount_cents).map_err(out_of_range)?;
        Ok((
            customer_id.to_string(),
            PaymentCommand::Deposit {
                customer_id,
                amount_cents,
            },
        ))
    })();
    api.submit::<PaymentAccount>(&parts, &raw, parsed, None)
        .await
}

/// A command parsed from a request, or why it could not be.
type Parsed<C> = Result<(String, C), ApiError>;

impl CommandApi {
    /// Checks the headers, claims the Idempotency-Key, sends the command and answers with
    /// its outcome. `command_id` is given when the aggregate id was derived from it.
    async fn submit<A: CommandStream>(
        &self,
        parts: &Parts,
        raw_body: &Value,
        parsed: Parsed<A::Command>,
        command_id: Option<Uuid>,
    ) -> Response {
        let started = std::time::Instant::now();
        // The command's JSON form, made once: for the metric's name and the envelope.
        let parsed = match parsed {
            Ok((id, command)) => match serde_json::to_value(&command) {
                Ok(value) => Ok((id, value)),
                Err(e) => return ApiError::internal(e).into_response(),
            },
            Err(e) => Err(e),
        };
        let name = match &parsed {
            Ok((_, command)) => crate::metrics::command_name(command),
            Err(_) => "invalid".to_string(),
        };
        let response = match self
            .try_submit::<A>(parts, raw_body, parsed, command_id)
            .await
        {
            Ok(answer) => respond(&answer),
            Err(e) => e.into_response(),
        };
        self.metrics.record_request(
            A::STREAM,
            &name,
            response.status().as_u16(),
            started.elapsed().as_secs_f64(),
        );
        response
    }

    async fn try_submit<A: CommandStream>(
        &self,
        parts: &Parts,
        raw_body: &Value,
        parsed: Parsed<Value>,
        command_id: Option<Uuid>,
    ) -> Result<Answer, ApiError> {
        let expected_version = if_match(&parts.headers)?;
        let key = idempotency_key(&parts.headers)?;
        // Only a rule violation is an answer of its own that a key must remember (API.md):
        // a malformed or forbidden request leaves the key free for a corrected retry.
        let parsed = match parsed {
            Err(e) if e.status != StatusCode::UNPROCESSABLE_ENTITY || key.is_none() => {
                return Err(e)
            }
            other => other,
        };
        let actor = parts.extensions.get::<Principal>().map(Principal::actor);
        let principal = actor.clone().unwrap_or_default();
        // The aggregate id derives from the command id (a creation without an order id).
        let derived = command_id.is_some();
        let mut command_id = command_id.unwrap_or_else(Uuid::new_v4);
        if let Some(key) = &key {
            let fingerprint = fingerprint(parts, raw_body);
            match idempotency::claim(&self.pool, &principal, key, &fingerprint)
                .await
                .map_err(ApiError::internal)?
            {
                Claim::Reused => {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "idempotency_key_reused",
                        "this Idempotency-Key was used for another request; use a new key",
                    ))
                }
                Claim::Repeat {
                    answer: Some(answer),
                    ..
                } => return Ok(answer),
                Claim::Repeat {
                    command_id: first, ..
                }
                | Claim::New(first) => {
                    command_id = first;
                }
            }
        }
        let (aggregate_id, mut command) = match parsed {
            Ok(parsed) => parsed,
            Err(rejected) => {
                // A rule violation found before Kafka: the key's answer all the same.
                let answer = Answer {
                    command_id,
                    status: rejected.status.as_u16(),
                    body: rejected.body(),
                };
                if key.is_some() {
                    idempotency::settle(&self.pool, &answer)
                        .await
                        .map_err(ApiError::internal)?;
                }
                return Ok(answer);
            }
        };
        let mut aggregate_id = aggregate_id;
        if derived && aggregate_id != OrderId(command_id).to_string() {
            // The key's first command id names the order: keep them in step.
            aggregate_id = OrderId(command_id).to_string();
            command["CreateOrder"]["order_id"] = json!(aggregate_id);
        }
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        // Every command gets a trace: this request's exported span, the caller's, or new.
        let traceparent = eventlog::trace::request_traceparent(header("traceparent").as_deref());
        let span = tracing::Span::current();
        span.record("trace_id", eventlog::trace::trace_id(&traceparent));
        span.record("command_id", tracing::field::display(command_id));
        span.record("aggregate_id", aggregate_id.as_str());
        tracing::debug!(stream = A::STREAM, "command dispatched");
        let envelope = CommandEnvelope {
            command_id,
            aggregate_id,
            command,
            expected_version,
            idempotent: key.is_some(),
            correlation_id: header("x-correlation-id"),
            traceparent: Some(traceparent),
            actor,
            reply_to: None,
            deadline: None,
        };
        let result = match self.bus.dispatch(A::STREAM, &envelope).await {
            Ok(result) => result,
            // The command may or may not have been applied: the key stays bound to this
            // request and its command id, so a retry gets the first outcome.
            Err(DispatchError::Timeout(after)) => return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "command_timeout",
                format!(
                    "no outcome within {after:?}: the command may or may not have been applied. Retrying with \
                     the same Idempotency-Key is safe: you get the first outcome and nothing is applied twice"
                ),
            )
            .with_details(json!({ "command_id": command_id }))),
            // A failed delivery may still have reached the log, and another request with
            // the same key may carry the same command id: the key stays bound, and a
            // retry of this request gets the first outcome.
            Err(DispatchError::Kafka(e)) => return Err(ApiError::not_ready(format!(
                "the command log did not take the command ({e}); retry later (with the same \
                 Idempotency-Key, a retry is safe)"
            ))),
        };
        let answer = answer(&result);
        if key.is_some() {
            idempotency::settle(&self.pool, &answer)
                .await
                .map_err(ApiError::internal)?;
        }
        Ok(answer)
    }
}

/// The HTTP status of a processor's outcome (API.md): `201` for a creation, `200` for
/// another acceptance, and each refusal's own status.
pub fn status(outcome: &Outcome) -> StatusCode {
    match outcome {
        Outcome::Accepted { created: true, .. } => StatusCode::CREATED,
        Outcome::Accepted { .. } => StatusCode::OK,
        Outcome::Rejected(r) => match r.code {
            Code::MalformedRequest => StatusCode::BAD_REQUEST,
            Code::Forbidden => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::CommandExpired => StatusCode::REQUEST_TIMEOUT,
            Code::VersionConflict => StatusCode::CONFLICT,
            Code::RuleViolation => StatusCode::UNPROCESSABLE_ENTITY,
        },
    }
}

/// A processor's outcome as the HTTP answer: the acceptance body, or the error shape
/// with the rule in `details.rule`.
pub fn answer(result: &CommandResult) -> Answer {
    let body = match &result.outcome {
        Outcome::Accepted {
            aggregate_id,
            version,
            token,
            ..
        } => {
            json!({ "aggregate_id": aggregate_id, "version": version, "consistency_token": token })
        }
        Outcome::Rejected(r) => {
            let mut details = r.details.clone();
            if let Some(rule) = &r.rule {
                let merged = details.get_or_insert_with(|| json!({}));
                if let Some(object) = merged.as_object_mut() {
                    object.insert("rule".to_string(), json!(rule));
                }
            }
            let mut error =
                ApiError::new(status(&result.outcome), r.code.as_str(), r.message.clone());
            error.details = details;
            error.body()
        }
    };
    Answer {
        command_id: result.command_id,
        status: status(&result.outcome).as_u16(),
        body,
    }
}

fn respond(answer: &Answer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    (status, Json(answer.body.clone())).into_response()
}

/// `If-Match: 3` or `If-Match: "3"`.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get("if-match") else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    let bare = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    bare.parse().map(Some).map_err(|_| {
        ApiError::malformed(format!(
            "If-Match must be a version number, bare or quoted; got {text:?}"
        ))
    })
}

/// `Idempotency-Key`: 1..=128 printable ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 128 || !bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(ApiError::malformed(
            "Idempotency-Key must be 1 to 128 printable ASCII characters",
        ));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// What makes two keyed requests the same request: method, path (percent-decoded), the
/// `If-Match` precondition and the body (canonical JSON). Without `If-Match` it is the
/// form keys were stored under before, so retries across an upgrade still match.
fn fingerprint(parts: &Parts, raw_body: &Value) -> String {
    let mut fingerprint = format!(
        "{} {} {}",
        parts.method,
        percent_decoded(parts.uri.path()),
        canonical(raw_body)
    );
    if let Some(version) = parts.headers.get("if-match") {
        let version = String::from_utf8_lossy(version.as_bytes());
        fingerprint.push_str(&format!(" if-match={version}"));
    }
    fingerprint
}

/// `%XX` escapes of a path decoded (as the router and the path extractor decode them).
fn percent_decoded(path: &str) -> String {
    let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16)).map(|d| d as u8);
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(high), Some(low)) => {
                out.push(high << 4 | low);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// JSON with object keys sorted at every level, so equal bodies compare equal.
fn canonical(value: &Value) -> String {
    fn sort(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sort(v)))
                        .collect(),
                )
            }
            Value::Array(items) => Value::Array(items.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    sort(value).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, value.parse().unwrap());
        h
    }

    #[test]
    fn if_match_takes_bare_or_quoted_numbers_only() {
        assert_eq!(if_match(&HeaderMap::new()).unwrap(), None);
        assert_eq!(if_match(&headers("if-match", "3")).unwrap(), Some(3));
        assert_eq!(if_match(&headers("if-match", "\"7\"")).unwrap(), Some(7));
        assert!(if_match(&headers("if-match", "abc")).is_err());
        assert!(if_match(&headers("if-match", "-1")).is_err());
    }

    #[test]
    fn idempotency_keys_are_1_to_128_printable_ascii() {
        assert_eq!(
            idempotency_key(&headers("idempotency-key", "k-1"))
                .unwrap()
                .as_deref(),
            Some("k-1")
        );
        assert!(idempotency_key(&headers("idempotency-key", "")).is_err());
        assert!(idempotency_key(&headers("idempotency-key", &"x".repeat(129))).is_err());
        assert!(idempotency_key(&headers("idempotency-key", &"x".repeat(128))).is_ok());
    }

    #[test]
    fn paths_are_compared_decoded() {
        assert_eq!(
            percent_decoded("/v1/accounts/%61lice/deposits"),
            "/v1/accounts/alice/deposits"
        );
        assert_eq!(percent_decoded("/a%2"), "/a%2");
        assert_eq!(percent_decoded("/a%zz"), "/a%zz");
    }

    #[test]
    fn canonical_json_ignores_key_order() {
        let a: Value = serde_json::from_str(r#"{"b":1,"a":{"y":2,"x":[{"q":1,"p":2}]}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":[{"p":2,"q":1}],"y":2},"b":1}"#).unwrap();
        assert_eq!(canonical(&a), canonical(&b));
    }
}

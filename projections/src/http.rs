//! The query routes of API.md, over the read models. A query may carry a consistency
//! token: it then waits (at most 10 s) until the projection has applied the token's events.

use std::time::Duration;

use aggregates::OrderStatus;
use api::{parse_customer_id, parse_order_id, parse_sku, ApiError, QueryParams};
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use eventlog::{EventEnvelope, Topics};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::kinds::{Kind, Record};
#[allow(unused_imports)]
use crate::openapi::{AccountView, History, InventoryView, OrderPage, OrderView, SagaView};
use crate::orders::{self, OrderRow};
use crate::progress::Progress;
use crate::{accounts, inventory};
use api::auth::{require_admin, require_customer, Principal};
use api::openapi::{ErrorBody, NotFound, QueryErrors, QueryHeaders};

/// How long a query waits for its consistency token.
const TOKEN_WAIT: Duration = Duration::from_secs(10);

/// What the query routes need.
#[derive(Clone)]
pub struct QueryApi {
    pub pool: PgPool,
    pub progress: Progress,
    pub topics: Topics,
}

/// The query routes, ready to merge into the app's router.
pub fn routes(api: QueryApi) -> Router {
    Router::new()
        .route("/v1/orders", get(list_orders))
        .route("/v1/orders/{order_id}", get(get_order))
        .route("/v1/orders/{order_id}/events", get(order_events))
        .route("/v1/orders/{order_id}/saga", get(get_saga))
        .route("/v1/inventory/{sku}", get(get_inventory))
        .route("/v1/inventory/{sku}/events", get(inventory_events))
        .route("/v1/accounts/{customer_id}", get(get_account))
        .route("/v1/accounts/{customer_id}/events", get(account_events))
        .with_state(api)
}

/// The raw query string; read it with [`QueryParams`] (each name once, decoded).
type Params = RawQuery;

fn params(RawQuery(query): Params) -> Result<QueryParams, ApiError> {
    QueryParams::parse(query.as_deref())
}

impl QueryApi {
    /// Waits for the consistency token in `headers`, if any, on projection `kind`.
    async fn caught_up(&self, headers: &HeaderMap, kind: Kind) -> Result<(), ApiError> {
        let Some(value) = headers.get("x-consistency-token") else {
            return Ok(());
        };
        let token = value
            .to_str()
            .ok()
            .and_then(eventlog::ConsistencyToken::decode)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_consistency_token",
                    "X-Consistency-Token is not a token Tally issued",
                )
            })?;
        // The token's stream is read by this projection, or else by its own projection.
        let projection = if kind.streams().contains(&token.stream.as_str()) {
            kind
        } else {
            Kind::ALL
                .into_iter()
                .find(|k| k.streams() == [token.stream.as_str()])
                .unwrap_or(kind)
        };
        let topic = self.topics.events(&token.stream);
        for position in token.positions {
            if !self
                .progress
                .wait_past(
                    projection.name(),
                    &topic,
                    position.partition,
                    position.offset,
                    TOKEN_WAIT,
                )
                .await
            {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_caught_up",
                    "the read model has not caught up with that token within 10 s; retry shortly",
                ));
            }
        }
        Ok(())
    }

    async fn history(
        &self,
        aggregate_type: &str,
        id: &str,
    ) -> Result<Vec<EventEnvelope>, ApiError> {
        let rows: Vec<(Value,)> = sqlx::query_as(
            "SELECT envelope FROM event_journal WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
        )
        .bind(aggregate_type)
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(ApiError::internal)?;
        rows.into_iter()
            .map(|(v,)| serde_json::from_value(v).map_err(ApiError::internal))
            .collect()
    }

    async fn events(
        &self,
        headers: &HeaderMap,
        principal: Option<&Principal>,
        aggregate_type: &str,
        id: &str,
    ) -> Result<Response, ApiError> {
        self.caught_up(headers, Kind::Journal).await?;
        let events = self.history(aggregate_type, id).await?;
        if events.is_empty() {
            return Err(ApiError::not_found(format!("no {aggregate_type} {id}")));
        }
        if aggregate_type == aggregates::streams::ORDER {
            require_customer(principal, order_customer(&events))?;
        }
        Ok(Json(json!({ "events": events })).into_response())
    }
}

/// The customer of an order, from its first event (`OrderCreated`).
fn order_customer(events: &[EventEnvelope]) -> &str {
    events
        .first()
        .and_then(|e| e.payload["customer_id"].as_str())
        .unwrap_or_default()
}

fn with_etag(view: Value) -> Response {
    let etag = format!("\"{}\"", view["version"]);
    let mut response = Json(view).into_response();
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

#[utoipa::path(
    get,
    path = "/v1/orders/{order_id}",
    operation_id = "get_order",
    tag = "orders",
    summary = "An order (or its state after event N)",
    params(("order_id" = uuid::Uuid, Path), ("at_version" = Option<u64>, Query, minimum = 1, description = "the order as it was after event N"), QueryHeaders),
    responses(
        (status = 200, description = "found", body = OrderView),
        QueryErrors,
        NotFound
    )
)]
pub(crate) async fn get_order(
    State(api): State<QueryApi>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
    query: Params,
    headers: HeaderMap,
) -> Response {
    respond(
        async {
            let order_id = parse_order_id(&id)?;
            let params = params(query)?;
            if let Some(at) = params.get("at_version") {
                let at: i64 = at.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                    ApiError::malformed("at_version must be a whole number from 1")
                        .with_details(json!({ "field": "at_version" }))
                })?;
                api.caught_up(&headers, Kind::Journal).await?;
                return order_at_version(&api, principal.as_deref(), order_id.0, at).await;
            }
            api.caught_up(&headers, Kind::Orders).await?;
            let row = sqlx::query(&orders::select("orders", "WHERE order_id = $1"))
                .bind(order_id.0)
                .fetch_optional(&api.pool)
                .await
                .map_err(ApiError::internal)?
                .ok_or_else(|| ApiError::not_found(format!("no order {order_id}")))?;
            let order = orders::from_row(&row).map_err(ApiError::internal)?;
            let customer = order.order.customer_id.as_ref().map(|c| c.as_str());
            require_customer(principal.as_deref(), customer.unwrap_or_default())?;
            Ok(with_etag(order.view()))
        }
        .await,
    )
}

/// `GET /v1/orders/{id}/saga`: the fulfilment saga's status and step timeline.
#[utoipa::path(
    get,
    path = "/v1/orders/{order_id}/saga",
    operation_id = "get_order_saga",
    tag = "orders",
    summary = "The order's fulfilment saga and its step timeline",
    params(("order_id" = uuid::Uuid, Path), QueryHeaders),
    responses(
        (status = 200, description = "found", body = SagaView),
        QueryErrors,
        NotFound
    )
)]
pub(crate) async fn get_saga(
    State(api): State<QueryApi>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    respond(
        async {
            let order_id = parse_order_id(&id)?;
            api.caught_up(&headers, Kind::Sagas).await?;
            let (state, version): (Value, i64) =
                sqlx::query_as("SELECT state, version FROM sagas WHERE saga_id = $1")
                    .bind(order_id.0)
                    .fetch_optional(&api.pool)
                    .await
                    .map_err(ApiError::internal)?
                    .ok_or_else(|| {
                        ApiError::not_found(format!(
                            "order {order_id} has no saga: it was never placed (or the saga projection has not seen it yet)"
                        ))
                    })?;
            let saga: aggregates::fulfilment::Fulfilment =
                serde_json::from_value(state).map_err(ApiError::internal)?;
            let customer = saga.customer_id.as_ref().map(|c| c.as_str());
            require_customer(principal.as_deref(), customer.unwrap_or_default())?;
            Ok(with_etag(crate::saga_views::view(order_id.0, &saga, version)))
        }
        .await,
    )
}

/// The order as it was after event `at`, folded from the journal with the aggregate's code.
async fn order_at_version(
    api: &QueryApi,
    principal: Option<&Principal>,
    order_id: Uuid,
    at: i64,
) -> Result<Response, ApiError> {
    let events = api
        .history(aggregates::streams::ORDER, &order_id.to_string())
        .await?;
    if events.is_empty() {
        return Err(ApiError::not_found(format!("no order {order_id}")));
    }
    require_customer(principal, order_customer(&events))?;
    if at > events.len() as i64 {
        return Err(ApiError::not_found(format!(
            "order {order_id} has no version {at}; it is at {}",
            events.len()
        ))
        .with_details(json!({ "current_version": events.len() })));
    }
    let mut row = OrderRow::default();
    for envelope in events.into_iter().take(at as usize) {
        let record = Record {
            topic: String::new(),
            partition: 0,
            offset: 0,
            envelope,
        };
        row.fold(&record).map_err(ApiError::internal)?;
    }
    Ok(with_etag(row.view()))
}

#[utoipa::path(
    get,
    path = "/v1/orders",
    operation_id = "list_orders",
    tag = "orders",
    summary = "A customer's orders, newest first",
    params(("customer_id" = String, Query, pattern = r"^[A-Za-z0-9._-]{1,64}$"), ("status" = Option<String>, Query, pattern = "^(draft|placed|confirmed|rejected|cancelled)$"), ("limit" = Option<u32>, Query, minimum = 1, maximum = 500), ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"), QueryHeaders),
    responses(
        (status = 200, description = "found", body = OrderPage),
        (status = 422, description = "a parameter out of range (`details.rule`)", body = ErrorBody),
        QueryErrors
    )
)]
pub(crate) async fn list_orders(
    State(api): State<QueryApi>,
    principal: Option<Extension<Principal>>,
    query: Params,
    headers: HeaderMap,
) -> Response {
    respond(async {
        let params = params(query)?;
        let customer = params
            .get("customer_id")
            .ok_or_else(|| ApiError::malformed("customer_id is required").with_details(json!({ "field": "customer_id" })))?;
        let customer = parse_customer_id(customer)?;
        // Judged on the very value the query below uses.
        require_customer(principal.as_deref(), customer.as_str())?;
        let status = match params.get("status") {
            None => None,
            Some(s) => Some(
                serde_json::from_value::<OrderStatus>(json!(s))
                    .map_err(|_| ApiError::malformed(format!("status {s:?} is not one of draft, placed, confirmed, rejected, cancelled")))?,
            ),
        };
        let limit: i64 = match params.get("limit") {
            None => 50,
            Some(l) => {
                let n: i64 = l.parse().map_err(|_| ApiError::malformed("limit must be a whole number"))?;
                if !(1..=500).contains(&n) {
                    return Err(ApiError::rule_violation("limit_out_of_range", "limit must be between 1 and 500"));
                }
                n
            }
        };
        let cursor = params.get("cursor").map(decode_cursor).transpose()?;
        api.caught_up(&headers, Kind::Orders).await?;

        let status_text = status.map(|s| s.to_string());
        let (after_at, after_id) = cursor.unzip();
        let rows = sqlx::query(&orders::select(
            "orders",
            "WHERE customer_id = $1 AND ($2::text IS NULL OR status = $2)
               AND ($3::timestamptz IS NULL OR (created_at, order_id) < ($3, $4))
             ORDER BY created_at DESC, order_id DESC LIMIT $5",
        ))
        .bind(customer.as_str())
        .bind(status_text)
        .bind(after_at)
        .bind(after_id)
        .bind(limit + 1)
        .fetch_all(&api.pool)
        .await
        .map_err(ApiError::internal)?;
        let mut items: Vec<OrderRow> = rows.iter().map(orders::from_row).collect::<Result<_, _>>().map_err(ApiError::internal)?;
        let next_cursor = if items.len() as i64 > limit {
            items.truncate(limit as usize);
            items.last().map(|r| encode_cursor(r.created_at, r.order.order_id.map(|o| o.0).unwrap_or_default()))
        } else {
            None
        };
        let items: Vec<Value> = items.iter().map(OrderRow::view).collect();
        Ok(Json(json!({ "items": items, "next_cursor": next_cursor })).into_response())
    }
    .await)
}

/// An opaque keyset cursor: the last item's `created_at` (µs) and `order_id`.
fn encode_cursor(at: DateTime<Utc>, id: Uuid) -> String {
    format!("c1.{:x}.{}", at.timestamp_micros(), id.simple())
}

fn decode_cursor(s: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let bad = || {
        ApiError::malformed("cursor is not one this API issued")
            .with_details(json!({ "field": "cursor" }))
    };
    let mut parts = s.split('.');
    let (Some("c1"), Some(at), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let at = i64::from_str_radix(at, 16)
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    let id = Uuid::try_parse(id).map_err(|_| bad())?;
    Ok((at, id))
}

#[utoipa::path(
    get,
    path = "/v1/orders/{order_id}/events",
    operation_id = "order_events",
    tag = "orders",
    summary = "The order's events by sequence",
    params(("order_id" = uuid::Uuid, Path), QueryHeaders),
    responses(
        (status = 200, description = "found", body = History),
        QueryErrors,
        NotFound
    )
)]
pub(crate) async fn order_events(
    State(api): State<QueryApi>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    respond(
        async {
            api.events(
                &headers,
                principal.as_deref(),
                "order",
                &parse_order_id(&id)?.to_string(),
            )
            .await
        }
        .await,
    )
}

#[utoipa::path(
    get,
    path = "/v1/inventory/{sku}",
    operation_id = "get_inventory",
    tag = "inventory",
    summary = "Stock of a SKU",
    params(("sku" = String, Path, pattern = r"^[A-Za-z0-9._-]{1,64}$"), QueryHeaders),
    responses(
        (status = 200, description = "found", body = InventoryView),
        QueryErrors,
        NotFound
    )
)]
pub(crate) async fn get_inventory(
    State(api): State<QueryApi>,
    Path(sku): Path<String>,
    headers: HeaderMap,
) -> Response {
    respond(
        async {
            let sku = parse_sku(&sku)?;
            api.caught_up(&headers, Kind::Inventory).await?;
            let row =
                sqlx::query("SELECT sku, on_hand, reserved, version FROM inventory WHERE sku = $1")
                    .bind(sku.as_str())
                    .fetch_optional(&api.pool)
                    .await
                    .map_err(ApiError::internal)?
                    .ok_or_else(|| ApiError::not_found(format!("SKU {sku} was never restocked")))?;
            Ok(with_etag(
                inventory::view(&row).map_err(ApiError::internal)?,
            ))
        }
        .await,
    )
}

#[utoipa::path(
    get,
    path = "/v1/inventory/{sku}/events",
    operation_id = "inventory_events",
    tag = "inventory",
    summary = "The SKU's events by sequence",
    params(("sku" = String, Path, pattern = r"^[A-Za-z0-9._-]{1,64}$"), QueryHeaders),
    responses(
        (status = 200, description = "found", body = History),
        QueryErrors,
        NotFound
    )
)]
pub(crate) async fn inventory_events(
    State(api): State<QueryApi>,
    principal: Option<Extension<Principal>>,
    Path(sku): Path<String>,
    headers: HeaderMap,
) -> Response {
    respond(
        async {
            let sku = parse_sku(&sku)?;
            // Stock history names other customers' orders and quantities.
            require_admin(principal.as_deref(), "stock history")?;
            api.events(
                &headers,
                principal.as_deref(),
                aggregates::streams::INVENTORY,
                sku.as_str(),
            )
            .await
        }
        .await,
    )
}

#[utoipa::path(
    get,
    path = "/v1/accounts/{customer_id}",
    operation_id = "get_account",
    tag = "accounts",
    summary = "A customer's balance",
    params(("customer_id" = String, Path, pattern = r"^[A-Za-z0-9._-]{1,64}$"), QueryHeaders),
    responses(
        (status = 200, description = "found", body = AccountView),
        QueryErrors,
        NotFound
    )
)]
pub(crate) async fn get_account(
    State(api): State<QueryApi>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    respond(
        async {
            let customer = parse_customer_id(&id)?;
            require_customer(principal.as_deref(), customer.as_str())?;
            api.caught_up(&headers, Kind::Accounts).await?;
            let row = sqlx::query(
                "SELECT customer_id, balance_cents, version FROM accounts WHERE customer_id = $1",
            )
            .bind(customer.as_str())
            .fetch_optional(&api.pool)
            .await
            .map_err(ApiError::internal)?
            .ok_or_else(|| ApiError::not_found(format!("account {customer} was never funded")))?;
            Ok(with_etag(accounts::view(&row).map_err(ApiError::internal)?))
        }
        .await,
    )
}

#[utoipa::path(
    get,
    path = "/v1/accounts/{customer_id}/events",
    operation_id = "account_events",
    tag = "accounts",
    summary = "The account's events by sequence",
    params(("customer_id" = String, Path, pattern = r"^[A-Za-z0-9._-]{1,64}$"), QueryHeaders),
    responses(
        (status = 200, description = "found", body = History),
        QueryErrors,
        NotFound
    )
)]
pub(crate) async fn account_events(
    State(api): State<QueryApi>,
    principal: Option<Extension<Principal>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    respond(
        async {
            let customer = parse_customer_id(&id)?;
            require_customer(principal.as_deref(), customer.as_str())?;
            api.events(
                &headers,
                principal.as_deref(),
                "payment_account",
                customer.as_str(),
            )
            .await
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let id = Uuid::from_u128(42);
        assert_eq!(decode_cursor(&encode_cursor(at, id)).unwrap(), (at, id));
        for bad in [
            "",
            "c1",
            "c2.1.00000000000000000000000000000001",
            "c1.zz.1",
            "c1.1.nope",
            "c1.1.2.3",
        ] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }
}

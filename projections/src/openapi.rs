//! The OpenAPI description of the query and admin routes: the views' shapes (API.md) and
//! the routes, whose `#[utoipa::path]` sits on each handler.

#![allow(dead_code)]

use api::openapi::ErrorBody;
use serde_json::Value;
use utoipa::ToSchema;

/// An order line as the order view shows it.
#[derive(ToSchema)]
pub struct OrderLineView {
    pub sku: String,
    pub quantity: u64,
    pub unit_price_cents: u64,
}

/// An order (API.md "order view").
#[derive(ToSchema)]
pub struct OrderView {
    pub order_id: uuid::Uuid,
    pub customer_id: String,
    /// `draft`, `placed`, `confirmed`, `rejected` or `cancelled`.
    pub status: String,
    pub lines: Vec<OrderLineView>,
    pub total_cents: u64,
    pub version: u64,
    /// `insufficient_stock`, `payment_declined` or `timeout` when rejected.
    pub rejection_reason: Option<String>,
    pub cancellation_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// A page of orders.
#[derive(ToSchema)]
pub struct OrderPage {
    pub items: Vec<OrderView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Stock of one SKU.
#[derive(ToSchema)]
pub struct InventoryView {
    pub sku: String,
    pub on_hand: u64,
    pub reserved: u64,
    pub available: u64,
    pub version: u64,
}

/// A customer's payment account.
#[derive(ToSchema)]
pub struct AccountView {
    pub customer_id: String,
    pub balance_cents: u64,
    pub version: u64,
}

/// One step of a saga's timeline.
#[derive(ToSchema)]
pub struct SagaStepView {
    /// e.g. `reserve_stock`, `charge_payment`, `release_stock`.
    pub name: String,
    /// `started`, `completed`, `failed` or `timed_out`.
    pub status: String,
    /// When it reached its status (RFC 3339).
    pub at: String,
    pub started_at: String,
}

/// An order's fulfilment saga.
#[derive(ToSchema)]
pub struct SagaView {
    pub saga_id: uuid::Uuid,
    pub order_id: uuid::Uuid,
    /// `running`, `completed` or `compensated`.
    pub status: String,
    pub steps: Vec<SagaStepView>,
    /// `insufficient_stock`, `payment_declined`, `timeout` or `cancelled`.
    pub failure_reason: Option<String>,
    pub version: u64,
}

/// One stored event.
#[derive(ToSchema)]
pub struct EnvelopeView {
    pub event_id: uuid::Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: u64,
    pub event_type: String,
    #[schema(minimum = 1)]
    pub event_version: u32,
    pub occurred_at: String,
    #[schema(value_type = Object)]
    pub payload: Value,
    #[schema(value_type = Object)]
    pub metadata: Value,
}

/// An aggregate's history, by sequence.
#[derive(ToSchema)]
pub struct History {
    pub events: Vec<EnvelopeView>,
}

/// The OpenAPI description of the query and admin routes.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        crate::http::list_orders,
        crate::http::get_order,
        crate::http::get_saga,
        crate::http::order_events,
        crate::http::get_inventory,
        crate::http::inventory_events,
        crate::http::get_account,
        crate::http::account_events,
        crate::admin::list,
        crate::admin::replay,
    ),
    components(schemas(
        ErrorBody,
        crate::admin::ProjectionList,
        crate::admin::ProjectionStatus,
        crate::admin::ReplayStatus,
        crate::health::Fault
    ))
)]
pub struct QueryRoutesDoc;

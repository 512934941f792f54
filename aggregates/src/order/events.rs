//! What happened to an order. Each event's `event_type` is its struct name and never
//! changes once written; a new shape of an event is a new `event_version`.

use cqrs_es::DomainEvent;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{OrderLine, OrderStatus, RejectionReason};
use crate::values::{Cents, CustomerId, OrderId, Quantity, Sku};

/// Every event of the `order` aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub enum OrderEvent {
    OrderCreated(OrderCreated),
    LineAdded(LineAdded),
    LineRemoved(LineRemoved),
    OrderPlaced(OrderPlaced),
    OrderConfirmed(OrderConfirmed),
    OrderRejected(OrderRejected),
    OrderCancelled(OrderCancelled),
}

/// A draft order was opened with its first lines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderCreated {
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub lines: Vec<OrderLine>,
}

/// Units of a SKU were added: a new line, or more of an existing line at its price.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LineAdded {
    pub sku: Sku,
    pub quantity: Quantity,
    pub unit_price_cents: Cents,
}

/// A SKU's line was taken off a draft order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LineRemoved {
    pub sku: Sku,
}

/// The customer placed the order; it carries what the fulfilment saga needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderPlaced {
    pub customer_id: CustomerId,
    pub lines: Vec<OrderLine>,
    pub total_cents: Cents,
}

/// Stock was reserved and the payment charged: the order is confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderConfirmed {}

/// Fulfilment failed and was compensated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderRejected {
    pub reason: RejectionReason,
}

/// The customer cancelled; a placed or confirmed order is compensated by the saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderCancelled {
    pub reason: String,
    /// The status before the cancellation, which tells the saga what to undo.
    pub previous_status: OrderStatus,
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> String {
        match self {
            OrderEvent::OrderCreated(_) => "OrderCreated",
            OrderEvent::LineAdded(_) => "LineAdded",
            OrderEvent::LineRemoved(_) => "LineRemoved",
            OrderEvent::OrderPlaced(_) => "OrderPlaced",
            OrderEvent::OrderConfirmed(_) => "OrderConfirmed",
            OrderEvent::OrderRejected(_) => "OrderRejected",
            OrderEvent::OrderCancelled(_) => "OrderCancelled",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}

//! What can be asked of an order, and why it can be refused.

use serde::{Deserialize, Serialize};

use super::{OrderLine, OrderStatus, RejectionReason};
use crate::values::{CustomerId, OrderId, Sku};

/// Every command the `order` aggregate handles. The last two are sent by the saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrderCommand {
    CreateOrder {
        order_id: OrderId,
        customer_id: CustomerId,
        lines: Vec<OrderLine>,
    },
    AddLine(OrderLine),
    RemoveLine {
        sku: Sku,
    },
    PlaceOrder,
    CancelOrder {
        reason: String,
    },
    ConfirmOrder,
    RejectOrder {
        reason: RejectionReason,
    },
}

/// Why an order command was refused. Messages are safe to show to users.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("no such order")]
    NotFound,
    #[error("an order with this id already exists")]
    AlreadyExists,
    #[error("an order needs at least one line")]
    NoLines,
    #[error("an order has at most {max} lines")]
    TooManyLines { max: usize },
    #[error("SKU {sku} is named more than once; send one line per SKU")]
    DuplicateSku { sku: Sku },
    #[error("SKU {sku} is already on the order at {existing_cents} cents a unit")]
    PriceMismatch { sku: Sku, existing_cents: u64 },
    #[error("a line holds at most {max} units; SKU {sku} would have {would_be}")]
    LineQuantityExceeded { sku: Sku, max: u64, would_be: u64 },
    #[error("SKU {sku} is not on the order")]
    LineNotFound { sku: Sku },
    #[error("lines can only change while the order is a draft; it is {status}")]
    NotDraft { status: OrderStatus },
    #[error("an order that is {status} cannot be cancelled")]
    NotCancellable { status: OrderStatus },
    #[error("only a placed order can be confirmed or rejected; it is {status}")]
    NotPlaced { status: OrderStatus },
    #[error(
        "a cancellation reason is 1 to {max} characters, not blank, without control characters"
    )]
    InvalidReason { max: usize },
}

impl OrderError {
    /// The rule name reported in `details.rule` of a `422`.
    pub fn rule(&self) -> &'static str {
        match self {
            OrderError::NotFound => "order_not_found",
            OrderError::AlreadyExists => "order_exists",
            OrderError::NoLines => "no_lines",
            OrderError::TooManyLines { .. } => "too_many_lines",
            OrderError::DuplicateSku { .. } => "duplicate_sku",
            OrderError::PriceMismatch { .. } => "price_mismatch",
            OrderError::LineQuantityExceeded { .. } => "quantity_out_of_range",
            OrderError::LineNotFound { .. } => "line_not_found",
            OrderError::NotDraft { .. } => "order_not_draft",
            OrderError::NotCancellable { .. } => "not_cancellable",
            OrderError::NotPlaced { .. } => "order_not_placed",
            OrderError::InvalidReason { .. } => "invalid_reason",
        }
    }

    /// True when the order does not exist (HTTP `404`, not `422`).
    pub fn is_not_found(&self) -> bool {
        matches!(self, OrderError::NotFound)
    }
}

//! The `Order` aggregate: a customer's basket of lines, placed, then confirmed or rejected
//! by the fulfilment saga, or cancelled by the customer.

mod commands;
mod events;
#[cfg(test)]
mod tests;

use std::fmt;

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use commands::{OrderCommand, OrderError};
pub use events::*;

use crate::values::{Cents, CustomerId, OrderId, Quantity, Sku};

/// Most lines on one order.
pub const MAX_LINES: usize = 50;
/// Longest cancellation reason, in characters.
pub const MAX_REASON_CHARS: usize = 1_000;

/// One SKU on an order: how many, at what unit price.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderLine {
    pub sku: Sku,
    pub quantity: Quantity,
    pub unit_price_cents: Cents,
}

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Draft,
    Placed,
    Confirmed,
    Rejected,
    Cancelled,
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OrderStatus::Draft => "draft",
            OrderStatus::Placed => "placed",
            OrderStatus::Confirmed => "confirmed",
            OrderStatus::Rejected => "rejected",
            OrderStatus::Cancelled => "cancelled",
        })
    }
}

/// Why fulfilment rejected an order (API.md names these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectionReason {
    InsufficientStock,
    PaymentDeclined,
    Timeout,
}

/// An order's state, folded from its events. `status` is `None` until it is created.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: Option<OrderId>,
    pub customer_id: Option<CustomerId>,
    pub status: Option<OrderStatus>,
    /// In the order their SKUs were first added.
    pub lines: Vec<OrderLine>,
    pub rejection_reason: Option<RejectionReason>,
    pub cancellation_reason: Option<String>,
}

impl Order {
    /// The sum of quantity × unit price over the lines.
    pub fn total_cents(&self) -> Cents {
        Cents(
            self.lines
                .iter()
                .map(|l| l.quantity.0.saturating_mul(l.unit_price_cents.0))
                .fold(0, u64::saturating_add),
        )
    }

    /// Decides which events a command produces, without changing the order.
    pub fn decide(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        use OrderCommand::*;
        let Some(status) = self.status else {
            return match command {
                CreateOrder {
                    order_id,
                    customer_id,
                    lines,
                } => create(order_id, customer_id, lines),
                _ => Err(OrderError::NotFound),
            };
        };
        let event = match command {
            CreateOrder { .. } => return Err(OrderError::AlreadyExists),
            AddLine(line) => {
                self.require_draft(status)?;
                OrderEvent::LineAdded(self.add_line(line)?)
            }
            RemoveLine { sku } => {
                self.require_draft(status)?;
                if !self.lines.iter().any(|l| l.sku == sku) {
                    return Err(OrderError::LineNotFound { sku });
                }
                OrderEvent::LineRemoved(LineRemoved { sku })
            }
            PlaceOrder => {
                self.require_draft(status)?;
                if self.lines.is_empty() {
                    return Err(OrderError::NoLines);
                }
                OrderEvent::OrderPlaced(OrderPlaced {
                    customer_id: self.customer_id.clone().ok_or(OrderError::NotFound)?,
                    lines: self.lines.clone(),
                    total_cents: self.total_cents(),
                })
            }
            CancelOrder { reason } => {
                if !matches!(
                    status,
                    OrderStatus::Draft | OrderStatus::Placed | OrderStatus::Confirmed
                ) {
                    return Err(OrderError::NotCancellable { status });
                }
                let chars = reason.chars().count();
                // Control characters (a NUL above all) have no place in a reason, and
                // PostgreSQL's jsonb cannot store a NUL: refused here, never in a view.
                if reason.trim().is_empty()
                    || chars > MAX_REASON_CHARS
                    || reason.chars().any(char::is_control)
                {
                    return Err(OrderError::InvalidReason {
                        max: MAX_REASON_CHARS,
                    });
                }
                OrderEvent::OrderCancelled(OrderCancelled {
                    reason,
                    previous_status: status,
                })
            }
            ConfirmOrder => {
                self.require_placed(status)?;
                OrderEvent::OrderConfirmed(OrderConfirmed {})
            }
            RejectOrder { reason } => {
                self.require_placed(status)?;
                OrderEvent::OrderRejected(OrderRejected { reason })
            }
        };
        Ok(vec![event])
    }

    fn require_draft(&self, status: OrderStatus) -> Result<(), OrderError> {
        match status {
            OrderStatus::Draft => Ok(()),
            status => Err(OrderError::NotDraft { status }),
        }
    }

    fn require_placed(&self, status: OrderStatus) -> Result<(), OrderError> {
        match status {
            OrderStatus::Placed => Ok(()),
            status => Err(OrderError::NotPlaced { status }),
        }
    }

    fn add_line(&self, line: OrderLine) -> Result<LineAdded, OrderError> {
        match self.lines.iter().find(|l| l.sku == line.sku) {
            Some(existing) => {
                if existing.unit_price_cents != line.unit_price_cents {
                    return Err(OrderError::PriceMismatch {
                        sku: line.sku,
                        existing_cents: existing.unit_price_cents.0,
                    });
                }
                let would_be = existing.quantity.0 + line.quantity.0;
                if would_be > Quantity::MAX_LINE as u64 {
                    return Err(OrderError::LineQuantityExceeded {
                        sku: line.sku,
                        max: Quantity::MAX_LINE as u64,
                        would_be,
                    });
                }
            }
            None if self.lines.len() >= MAX_LINES => {
                return Err(OrderError::TooManyLines { max: MAX_LINES })
            }
            None => {}
        }
        let OrderLine {
            sku,
            quantity,
            unit_price_cents,
        } = line;
        Ok(LineAdded {
            sku,
            quantity,
            unit_price_cents,
        })
    }
}

fn create(
    order_id: OrderId,
    customer_id: CustomerId,
    lines: Vec<OrderLine>,
) -> Result<Vec<OrderEvent>, OrderError> {
    if lines.is_empty() {
        return Err(OrderError::NoLines);
    }
    if lines.len() > MAX_LINES {
        return Err(OrderError::TooManyLines { max: MAX_LINES });
    }
    for (i, line) in lines.iter().enumerate() {
        if lines[..i].iter().any(|l| l.sku == line.sku) {
            return Err(OrderError::DuplicateSku {
                sku: line.sku.clone(),
            });
        }
    }
    Ok(vec![OrderEvent::OrderCreated(OrderCreated {
        order_id,
        customer_id,
        lines,
    })])
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;
    type Services = ();

    async fn handle(
        &mut self,
        command: OrderCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), OrderError> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    // Total: any event applies to any state without panicking, so an old or odd log
    // always loads.
    fn apply(&mut self, event: OrderEvent) {
        match event {
            OrderEvent::OrderCreated(e) => {
                self.order_id = Some(e.order_id);
                self.customer_id = Some(e.customer_id);
                self.status = Some(OrderStatus::Draft);
                self.lines = e.lines;
            }
            OrderEvent::LineAdded(e) => match self.lines.iter_mut().find(|l| l.sku == e.sku) {
                Some(line) => line.quantity.0 = line.quantity.0.saturating_add(e.quantity.0),
                None => self.lines.push(OrderLine {
                    sku: e.sku,
                    quantity: e.quantity,
                    unit_price_cents: e.unit_price_cents,
                }),
            },
            OrderEvent::LineRemoved(e) => self.lines.retain(|l| l.sku != e.sku),
            OrderEvent::OrderPlaced(_) => self.status = Some(OrderStatus::Placed),
            OrderEvent::OrderConfirmed(_) => self.status = Some(OrderStatus::Confirmed),
            OrderEvent::OrderRejected(e) => {
                self.status = Some(OrderStatus::Rejected);
                self.rejection_reason = Some(e.reason);
            }
            OrderEvent::OrderCancelled(e) => {
                self.status = Some(OrderStatus::Cancelled);
                self.cancellation_reason = Some(e.reason);
            }
        }
    }
}

//! The `Inventory` aggregate: stock of one SKU. It is the only judge of availability, so
//! stock is never oversold: the saga asks it to reserve, and it says yes or no.

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::values::{OrderId, Quantity, Sku};

/// Every command the `inventory` aggregate handles. All but `Restock` come from the saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum InventoryCommand {
    Restock {
        sku: Sku,
        quantity: Quantity,
    },
    /// Holds units for an order; refused as a whole when fewer are available.
    ReserveStock {
        order_id: OrderId,
        quantity: Quantity,
    },
    /// Gives an order's reservation back (compensation).
    ReleaseStock {
        order_id: OrderId,
    },
    /// The order was confirmed: its reserved units leave stock for good.
    SellStock {
        order_id: OrderId,
    },
    /// A confirmed order was cancelled: its sold units come back on hand.
    ReturnStock {
        order_id: OrderId,
        quantity: Quantity,
    },
}

/// Every event of the `inventory` aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub enum InventoryEvent {
    StockRestocked(StockRestocked),
    StockReserved(StockReserved),
    StockReleased(StockReleased),
    StockSold(StockSold),
    StockReturned(StockReturned),
}

/// Units arrived on hand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StockRestocked {
    pub sku: Sku,
    pub quantity: Quantity,
}

macro_rules! order_stock_event {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            pub order_id: OrderId,
            pub quantity: Quantity,
        }
    };
}
order_stock_event!(
    /// Units were held for an order.
    StockReserved
);
order_stock_event!(
    /// An order's held units became available again.
    StockReleased
);
order_stock_event!(
    /// An order's held units left on-hand stock: sold.
    StockSold
);
order_stock_event!(
    /// Units sold to an order came back on hand.
    StockReturned
);

impl DomainEvent for InventoryEvent {
    fn event_type(&self) -> String {
        match self {
            InventoryEvent::StockRestocked(_) => "StockRestocked",
            InventoryEvent::StockReserved(_) => "StockReserved",
            InventoryEvent::StockReleased(_) => "StockReleased",
            InventoryEvent::StockSold(_) => "StockSold",
            InventoryEvent::StockReturned(_) => "StockReturned",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}

/// Why an inventory command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InventoryError {
    #[error("insufficient stock: {requested} requested, {available} available")]
    InsufficientStock { requested: u64, available: u64 },
    #[error("order {order_id} already holds a reservation of this SKU")]
    ReservationExists { order_id: OrderId },
    #[error("order {order_id} holds no reservation of this SKU")]
    ReservationNotFound { order_id: OrderId },
    #[error("on-hand stock would exceed {max} units")]
    StockLimitExceeded { max: u64 },
}

impl InventoryError {
    /// The rule name reported in `details.rule` of a `422`.
    pub fn rule(&self) -> &'static str {
        match self {
            InventoryError::InsufficientStock { .. } => "insufficient_stock",
            InventoryError::ReservationExists { .. } => "reservation_exists",
            InventoryError::ReservationNotFound { .. } => "reservation_not_found",
            InventoryError::StockLimitExceeded { .. } => "stock_limit_exceeded",
        }
    }
}

/// Stock of one SKU. Only open reservations are held, so memory follows orders in flight,
/// not the SKU's whole history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub sku: Option<Sku>,
    pub on_hand: u64,
    pub reserved: u64,
    pub reservations: BTreeMap<OrderId, Quantity>,
}

impl Inventory {
    /// Most units one SKU may have on hand (keeps every sum far from overflow).
    pub const MAX_ON_HAND: u64 = 1_000_000_000_000;

    /// Units that can still be reserved: on hand minus reserved, never negative.
    pub fn available(&self) -> u64 {
        self.on_hand.saturating_sub(self.reserved)
    }

    /// Decides which events a command produces, without changing the stock.
    pub fn decide(&self, command: InventoryCommand) -> Result<Vec<InventoryEvent>, InventoryError> {
        use InventoryCommand::*;
        let event = match command {
            Restock { sku, quantity } => {
                self.check_limit(quantity)?;
                InventoryEvent::StockRestocked(StockRestocked { sku, quantity })
            }
            ReserveStock { order_id, quantity } => {
                if self.reservations.contains_key(&order_id) {
                    return Err(InventoryError::ReservationExists { order_id });
                }
                if quantity.0 > self.available() {
                    return Err(InventoryError::InsufficientStock {
                        requested: quantity.0,
                        available: self.available(),
                    });
                }
                InventoryEvent::StockReserved(StockReserved { order_id, quantity })
            }
            ReleaseStock { order_id } => {
                let quantity = self.reservation(order_id)?;
                InventoryEvent::StockReleased(StockReleased { order_id, quantity })
            }
            SellStock { order_id } => {
                let quantity = self.reservation(order_id)?;
                InventoryEvent::StockSold(StockSold { order_id, quantity })
            }
            ReturnStock { order_id, quantity } => {
                self.check_limit(quantity)?;
                InventoryEvent::StockReturned(StockReturned { order_id, quantity })
            }
        };
        Ok(vec![event])
    }

    fn reservation(&self, order_id: OrderId) -> Result<Quantity, InventoryError> {
        self.reservations
            .get(&order_id)
            .copied()
            .ok_or(InventoryError::ReservationNotFound { order_id })
    }

    fn check_limit(&self, more: Quantity) -> Result<(), InventoryError> {
        if self.on_hand.saturating_add(more.0) > Self::MAX_ON_HAND {
            return Err(InventoryError::StockLimitExceeded {
                max: Self::MAX_ON_HAND,
            });
        }
        Ok(())
    }
}

impl Aggregate for Inventory {
    const TYPE: &'static str = "inventory";
    type Command = InventoryCommand;
    type Event = InventoryEvent;
    type Error = InventoryError;
    type Services = ();

    async fn handle(
        &mut self,
        command: InventoryCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), InventoryError> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: InventoryEvent) {
        match event {
            InventoryEvent::StockRestocked(e) => {
                self.sku = Some(e.sku);
                self.on_hand = self.on_hand.saturating_add(e.quantity.0);
            }
            InventoryEvent::StockReserved(e) => {
                self.reserved = self.reserved.saturating_add(e.quantity.0);
                self.reservations.insert(e.order_id, e.quantity);
            }
            InventoryEvent::StockReleased(e) => {
                self.reserved = self.reserved.saturating_sub(e.quantity.0);
                self.reservations.remove(&e.order_id);
            }
            InventoryEvent::StockSold(e) => {
                self.reserved = self.reserved.saturating_sub(e.quantity.0);
                self.on_hand = self.on_hand.saturating_sub(e.quantity.0);
                self.reservations.remove(&e.order_id);
            }
            InventoryEvent::StockReturned(e) => {
                self.on_hand = self.on_hand.saturating_add(e.quantity.0);
            }
        }
    }
}

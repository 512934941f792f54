//! The catalogue of every event type and version, with its JSON Schema generated from the
//! Rust type. `schemas/json/` holds the checked-in copy; a test fails when they drift.

use schemars::{schema_for, JsonSchema};
use serde_json::Value;

use crate::inventory::*;
use crate::order::*;
use crate::payment::*;
use crate::{Inventory, Order, PaymentAccount};

/// One event type at one version, and the JSON Schema of its payload.
#[derive(Debug, Clone)]
pub struct EventSchema {
    pub aggregate_type: &'static str,
    pub event_type: &'static str,
    pub event_version: &'static str,
    pub schema: Value,
}

impl EventSchema {
    /// Where the schema lives under `schemas/json/` (and its sample under `schemas/samples/`).
    pub fn file_name(&self) -> String {
        format!(
            "{}/{}.v{}.json",
            self.aggregate_type, self.event_type, self.event_version
        )
    }
}

impl EventSchema {
    /// The entry of payload type `T` at version 1. Every event type is at version 1 so
    /// far; a new version adds an entry (and keeps the old one: old samples must still load).
    pub fn v1<T: JsonSchema>(aggregate_type: &'static str, event_type: &'static str) -> Self {
        let schema = serde_json::to_value(schema_for!(T)).unwrap_or(Value::Null);
        EventSchema {
            aggregate_type,
            event_type,
            event_version: "1",
            schema,
        }
    }
}

/// The variant names of an event enum, read from its schema.
pub fn variants<T: JsonSchema>() -> Vec<String> {
    let schema = serde_json::to_value(schema_for!(T)).unwrap_or(Value::Null);
    schema["oneOf"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["required"][0].as_str().map(str::to_string))
        .collect()
}

fn entry<T: JsonSchema>(aggregate_type: &'static str, event_type: &'static str) -> EventSchema {
    EventSchema::v1::<T>(aggregate_type, event_type)
}

/// Every event type of every aggregate, at every version ever written.
pub fn catalogue() -> Vec<EventSchema> {
    use cqrs_es::Aggregate;
    let (o, i, p) = (Order::TYPE, Inventory::TYPE, PaymentAccount::TYPE);
    vec![
        entry::<OrderCreated>(o, "OrderCreated"),
        entry::<LineAdded>(o, "LineAdded"),
        entry::<LineRemoved>(o, "LineRemoved"),
        entry::<OrderPlaced>(o, "OrderPlaced"),
        entry::<OrderConfirmed>(o, "OrderConfirmed"),
        entry::<OrderRejected>(o, "OrderRejected"),
        entry::<OrderCancelled>(o, "OrderCancelled"),
        entry::<StockRestocked>(i, "StockRestocked"),
        entry::<StockReserved>(i, "StockReserved"),
        entry::<StockReleased>(i, "StockReleased"),
        entry::<StockSold>(i, "StockSold"),
        entry::<StockReturned>(i, "StockReturned"),
        entry::<FundsDeposited>(p, "FundsDeposited"),
        entry::<PaymentCharged>(p, "PaymentCharged"),
        entry::<PaymentRefunded>(p, "PaymentRefunded"),
    ]
}

/// The variant names of each event enum, read from the enums' own schemas, so a test can
/// check that the catalogue misses none.
pub fn event_enum_variants() -> Vec<(&'static str, Vec<String>)> {
    use cqrs_es::Aggregate;
    vec![
        (Order::TYPE, variants::<OrderEvent>()),
        (Inventory::TYPE, variants::<InventoryEvent>()),
        (PaymentAccount::TYPE, variants::<PaymentEvent>()),
    ]
}

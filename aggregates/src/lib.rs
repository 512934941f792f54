//! Tally's pure domain: the `Order`, `Inventory` (one per SKU) and `PaymentAccount` (one
//! per customer) aggregates, as cqrs-es aggregates, and the order-fulfilment saga's state
//! machine ([`fulfilment`]) that coordinates them.
//!
//! This is the first crate to read. It holds every business rule of API.md and nothing
//! else: no Kafka, no SQL, no HTTP, no clock. The write side (`commands`) rebuilds these
//! aggregates from the event topics and calls `handle`; the saga runtime (`sagas`) feeds
//! [`fulfilment`] its inputs and sends the commands it decides; the read side
//! (`projections`) folds all their events into views. [`streams`] names their streams.
//!
//! Each aggregate has a `decide(&self, command) -> Result<Vec<Event>, Error>` that is the
//! whole rule book, and `apply` that folds one event into the state. `apply` never fails:
//! the log is the truth, and anything in it must load.

pub mod fulfilment;
pub mod inventory;
pub mod order;
pub mod payment;
pub mod schema;
pub mod streams;
pub mod values;

pub use inventory::{Inventory, InventoryCommand, InventoryError, InventoryEvent};
pub use order::{
    Order, OrderCommand, OrderError, OrderEvent, OrderLine, OrderStatus, RejectionReason,
};
pub use payment::{PaymentAccount, PaymentCommand, PaymentError, PaymentEvent};
pub use values::{Cents, CustomerId, OrderId, Quantity, Sku, ValueError};

//! Stream names, in one place. A stream's topics are `<prefix>.<stream>.events`,
//! `.commands`, `.outcomes` and `.state`; the saga's are `.events`, `.inbox` and `.state`.

/// `Order` aggregates.
pub const ORDER: &str = "order";
/// `Inventory` aggregates, one per SKU.
pub const INVENTORY: &str = "inventory";
/// `PaymentAccount` aggregates, one per customer.
pub const PAYMENT: &str = "payment";
/// The order-fulfilment saga, one per order.
pub const FULFILMENT: &str = "saga.order-fulfilment";

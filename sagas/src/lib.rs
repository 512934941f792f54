//! Tally's order-fulfilment saga orchestrator (DESIGN.md §4): on `OrderPlaced` it reserves
//! stock, charges the account and confirms the order, compensating in reverse on failure,
//! cancellation or timeout, with its own state event-sourced on its topic.
//!
//! The saga itself is a pure state machine beside the aggregates
//! (`aggregates::fulfilment`, read it first, re-exported here as [`fulfilment`]);
//! [`runtime`] runs it on Kafka: one transaction per step, deadlines fired by the
//! partition's owner.

pub use aggregates::fulfilment;
pub use fulfilment::{Fulfilment, FulfilmentEvent, SagaStatus};
pub mod metrics;
pub mod runtime;

pub use metrics::SagaMetrics;
pub use runtime::{SagaConfig, SagaRuntimeStatus};

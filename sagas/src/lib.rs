//! Tally's order-fulfilment saga orchestrator (DESIGN.md §4): on `OrderPlaced` it reserves
//! stock, charges the account and confirms the order, compensating in reverse on failure
//! or timeout, with its own state event-sourced on its topic.
//!
//! Not built yet: see the saga issue. The crate exists so the workspace has its final
//! shape and dependency direction (`aggregates`, `eventlog` ← `sagas`).

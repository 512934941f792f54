//! Tally's write side (DESIGN.md §3): a command processor per aggregate type that owns
//! partitions of its command topic, rebuilds aggregates from the event topic, and appends
//! events, command results and consumed offsets in one Kafka transaction; and the HTTP
//! command routes of API.md.
//!
//! Not built yet: see the write-side issue. The crate exists so the workspace has its
//! final shape and dependency direction (`aggregates`, `eventlog` ← `commands`).

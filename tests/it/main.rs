//! Tally's end-to-end tests, in ONE binary so the app links once (STYLE.md): every
//! module runs against the real Kafka and PostgreSQL that `scripts/test` starts.

mod auth;
mod command_routes;
mod common;
mod crash;
mod event_schemas;
mod limits;
mod log_identity;
mod openapi;
mod ops;
mod otlp;
mod projector_crash;
mod projector_faults;
mod queries;
mod saga_crash;
mod saga_flow;
mod shutdown;
mod state;
mod trace_logs;
mod trust;

//! Tally's read side (DESIGN.md §5): projector workers that fold the event topics into
//! PostgreSQL read models, the query routes over them, read-your-writes, and replay.
//!
//! - [`Kind`]: the projections — `orders`, `inventory`, `accounts` and the event
//!   `journal` — each with its streams, tables and batch `apply` (which folds events with
//!   the aggregates' own `apply`, so a view can never disagree with the write side).
//! - [`runner::run`]: a projector. Each batch of records is ONE database transaction with
//!   the projection's checkpoints, so its effects are exactly-once. It never skips a
//!   valid record: only records that can never apply are dead-lettered, and database or
//!   broker errors are waited out, shown in [`health`].
//! - [`Progress`]: how far each projection has got, so queries carrying a consistency
//!   token wait for it without polling the database.
//! - [`http::routes`]: the query routes; [`admin`]: status, lag and replay.

mod accounts;
pub mod admin;
mod commit;
mod dead_letter;
mod decode;
mod fold;
pub mod health;
pub mod http;
mod inventory;
mod journal;
mod kinds;
mod live;
pub mod openapi;
mod orders;
mod progress;
mod projectors;
pub mod replay;
pub mod runner;
pub mod saga_views;

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

pub use kinds::{Kind, Record};
pub use progress::Progress;
pub use projectors::Projectors;
pub use runner::Target;

/// The read-model migrations, embedded from `schemas/migrations/`.
pub static MIGRATOR: Migrator = sqlx::migrate!("../schemas/migrations");

/// Opens a connection pool to the read-model database.
#[tracing::instrument(skip_all)]
pub async fn connect(options: PgConnectOptions, max_connections: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .context("connecting to PostgreSQL; is it running? (scripts/services up)")
}

/// The `application_name` of the projectors' connections (see `pg_stat_activity`).
pub const APPLICATION_NAME: &str = "tally-projections";

/// The projectors' own pool, apart from queries and idempotency keys, so that neither
/// can starve the other. It connects lazily: a process without projectors opens none.
pub fn projector_pool(options: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options.application_name(APPLICATION_NAME))
}

/// Applies every migration not yet applied. Safe to run on every start and from several
/// processes at once (sqlx takes an advisory lock).
#[tracing::instrument(skip_all)]
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("running read-model migrations")
}

/// RFC 3339 in UTC with microseconds, as every timestamp of the API.
pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

//! Tally's read side: projector workers that fold the event topics into PostgreSQL read
//! models, the query routes over them, and replay (DESIGN.md §5).
//!
//! So far it owns the database: [`connect`] and [`migrate`], which applies the read-model
//! SQL in `schemas/migrations/` (embedded in the binary at build time).

use std::time::Duration;

use anyhow::Context;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

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

/// Applies every migration not yet applied. Safe to run on every start and from several
/// processes at once (sqlx takes an advisory lock).
#[tracing::instrument(skip_all)]
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("running read-model migrations")
}

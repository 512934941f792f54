//! Replay: rebuild a read model from offset 0 into new tables beside the live ones, then
//! swap them in, in one transaction — queries keep being served from the old tables until
//! the swap.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::admin::{LiveSlot, ReplayProgress};
use crate::kinds::Kind;
use crate::progress::CHANNEL;
use crate::projectors::Projectors;
use crate::runner::{self, Target};

const SUFFIX: &str = "__replay";

/// What a replay did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub records: u64,
    pub seconds: f64,
    pub per_second: f64,
}

/// The current end (last stable offset) of every partition `kind` reads.
pub async fn ends(ctx: &Projectors, kind: Kind) -> anyhow::Result<HashMap<(String, i32), i64>> {
    let mut ends = HashMap::new();
    for topic in ctx.topics(kind) {
        for partition in 0..ctx.kafka.partitions {
            let (_, end) = eventlog::watermarks(&ctx.kafka, &topic, partition).await?;
            ends.insert((topic.clone(), partition), end);
        }
    }
    Ok(ends)
}

/// The advisory lock that lets one replay of a projection run at a time, across every
/// process on the database (a CLI replay and an API replay would drop each other's
/// tables). Held on a connection of its own, taken out of the pool, for the replay's
/// duration; a crash releases it with the connection.
pub struct ReplayLock {
    connection: PgConnection,
    key: &'static str,
}

/// The first key of Tally's advisory locks ("taly"); the second is the projection's.
const LOCK_CLASS: i32 = 0x7461_6c79;

impl ReplayLock {
    /// Takes the lock of `kind`; `None` when a replay holds it already.
    pub async fn try_acquire(ctx: &Projectors, kind: Kind) -> anyhow::Result<Option<Self>> {
        let mut connection = ctx
            .pool
            .acquire()
            .await
            .context("a connection for the replay lock")?
            .detach();
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(kind.name())
            .fetch_one(&mut connection)
            .await
            .context("taking the replay lock")?;
        Ok(taken.then_some(Self {
            connection,
            key: kind.name(),
        }))
    }

    async fn release(mut self) {
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
            .bind(LOCK_CLASS)
            .bind(self.key)
            .execute(&mut self.connection)
            .await;
        if let Err(e) = unlocked {
            // Closing the connection below releases it anyway.
            warn!(error = %e, "releasing the replay lock");
        }
        let _ = self.connection.close().await;
    }
}

/// Rebuilds `kind` from offset 0 and swaps the result in, holding `lock`. `live`, when
/// given, is the live projector of this process: it is stopped for the final catch-up
/// and the swap (the caller starts it again). `progress.processed` counts records as
/// they are applied; `slot` receives the total once it is known. A replay that fails
/// drops its tables.
pub async fn replay(
    ctx: &Projectors,
    kind: Kind,
    lock: ReplayLock,
    progress: ReplayProgress,
    slot: &Mutex<Option<ReplayProgress>>,
    live: Option<&LiveSlot>,
) -> anyhow::Result<Summary> {
    let checkpoint = format!("{}{SUFFIX}", kind.name());
    let result = rebuild(ctx, kind, &checkpoint, progress, slot, live).await;
    if result.is_err() {
        if let Err(e) = drop_tables(ctx, kind, &checkpoint).await {
            warn!(projection = kind.name(), error = %format!("{e:#}"), "dropping the tables of a failed replay; the next replay drops them");
        }
    }
    lock.release().await;
    result
}

async fn rebuild(
    ctx: &Projectors,
    kind: Kind,
    checkpoint: &str,
    progress: ReplayProgress,
    slot: &Mutex<Option<ReplayProgress>>,
    live: Option<&LiveSlot>,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    prepare_tables(ctx, kind, checkpoint).await?;

    let first_ends = ends(ctx, kind).await?;
    set_total(slot, &first_ends);
    let never = CancellationToken::new();
    let mut target = Target {
        suffix: SUFFIX.to_string(),
        checkpoint: checkpoint.to_string(),
        until: Some(first_ends),
        processed: Some(progress.processed.clone()),
        health: progress.health.clone(),
    };
    runner::run(ctx, kind, &target, &never)
        .await
        .context("replaying into new tables")?;

    // Stop the live projector, catch up with what arrived meanwhile, and swap.
    if let Some(live) = live {
        live.stop().await;
    }
    let final_ends = ends(ctx, kind).await?;
    set_total(slot, &final_ends);
    target.until = Some(final_ends);
    runner::run(ctx, kind, &target, &never)
        .await
        .context("catching up before the swap")?;
    swap(ctx, kind, checkpoint).await?;

    let records = progress.processed.load(Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    Ok(Summary {
        records,
        seconds,
        per_second: records as f64 / seconds.max(1e-9),
    })
}

fn set_total(slot: &Mutex<Option<ReplayProgress>>, ends: &HashMap<(String, i32), i64>) {
    if let Some(p) = slot.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        p.total = ends.values().sum::<i64>().max(0) as u64;
    }
}

async fn prepare_tables(ctx: &Projectors, kind: Kind, checkpoint: &str) -> anyhow::Result<()> {
    let mut tx = ctx.pool.begin().await?;
    for table in kind.tables() {
        sqlx::query(&format!("DROP TABLE IF EXISTS {table}{SUFFIX}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE {table}{SUFFIX} (LIKE {table} INCLUDING ALL)"
        ))
        .execute(&mut *tx)
        .await?;
    }
    forget_checkpoints(&mut tx, ctx, kind, checkpoint).await?;
    tx.commit().await.context("creating the replay tables")
}

async fn drop_tables(ctx: &Projectors, kind: Kind, checkpoint: &str) -> anyhow::Result<()> {
    let mut tx = ctx.pool.begin().await?;
    for table in kind.tables() {
        sqlx::query(&format!("DROP TABLE IF EXISTS {table}{SUFFIX}"))
            .execute(&mut *tx)
            .await?;
    }
    forget_checkpoints(&mut tx, ctx, kind, checkpoint).await?;
    tx.commit().await.context("dropping the replay tables")
}

async fn forget_checkpoints(
    tx: &mut PgConnection,
    ctx: &Projectors,
    kind: Kind,
    checkpoint: &str,
) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1 AND topic = ANY($2)")
        .bind(checkpoint)
        .bind(ctx.topics(kind))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Renames the replayed tables over the live ones and makes the replay's checkpoints the
/// live ones, in one transaction; then wakes whoever waits on a consistency token (here
/// directly, in other processes through the NOTIFY).
async fn swap(ctx: &Projectors, kind: Kind, checkpoint: &str) -> anyhow::Result<()> {
    let mut tx = ctx.pool.begin().await?;
    for table in kind.tables() {
        for statement in [
            format!("ALTER TABLE {table} RENAME TO {table}__old"),
            format!("ALTER TABLE {table}{SUFFIX} RENAME TO {table}"),
            format!("DROP TABLE {table}__old"),
        ] {
            sqlx::query(&statement).execute(&mut *tx).await?;
        }
    }
    forget_checkpoints(&mut tx, ctx, kind, kind.name()).await?;
    let positions: Vec<(String, i32, i64)> = sqlx::query_as(
        "UPDATE projection_checkpoints SET projection = $1 WHERE projection = $2 AND topic = ANY($3)
         RETURNING topic, partition, next_offset",
    )
    .bind(kind.name())
    .bind(checkpoint)
    .bind(ctx.topics(kind))
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(kind.name())
        .execute(&mut *tx)
        .await?;
    tx.commit()
        .await
        .context("swapping the replayed tables in")?;
    for (topic, partition, next) in positions {
        ctx.progress.advance(kind.name(), &topic, partition, next);
    }
    Ok(())
}

//! Replay: rebuild a read model from offset 0 into new tables beside the live ones, then
//! swap them in, in one transaction — queries keep being served from the old tables until
//! the swap.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::admin::ReplayProgress;
use crate::kinds::Kind;
use crate::runner::{self, Projectors, Target};

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

/// Rebuilds `kind` from offset 0 and swaps the result in. `live`, when given, is the live
/// projector of this process: it is stopped for the final catch-up and the swap (the
/// caller starts it again). `progress.processed` counts records as they are applied;
/// `slot` receives the total once it is known.
pub async fn replay(
    ctx: &Projectors,
    kind: Kind,
    progress: ReplayProgress,
    slot: &Mutex<Option<ReplayProgress>>,
    live: Option<CancellationToken>,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let checkpoint = format!("{}{SUFFIX}", kind.name());
    prepare_tables(ctx, kind, &checkpoint).await?;

    let first_ends = ends(ctx, kind).await?;
    let total: i64 = first_ends.values().sum();
    if let Some(p) = slot.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        p.total = total.max(0) as u64;
    }
    let never = CancellationToken::new();
    let mut target = Target {
        suffix: SUFFIX.to_string(),
        checkpoint: checkpoint.clone(),
        until: Some(first_ends),
        processed: Some(progress.processed.clone()),
    };
    runner::run(ctx, kind, &target, &never)
        .await
        .context("replaying into new tables")?;

    // Stop the live projector, catch up with what arrived meanwhile, and swap.
    if let Some(live) = live {
        live.cancel();
    }
    let final_ends = ends(ctx, kind).await?;
    if let Some(p) = slot.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        p.total = final_ends.values().sum::<i64>().max(0) as u64;
    }
    target.until = Some(final_ends);
    runner::run(ctx, kind, &target, &never)
        .await
        .context("catching up before the swap")?;
    swap(ctx, kind, &checkpoint).await?;

    let records = progress.processed.load(Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    Ok(Summary {
        records,
        seconds,
        per_second: records as f64 / seconds.max(1e-9),
    })
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
    sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1 AND topic = ANY($2)")
        .bind(checkpoint)
        .bind(ctx.topics(kind))
        .execute(&mut *tx)
        .await?;
    tx.commit().await.context("creating the replay tables")
}

async fn swap(ctx: &Projectors, kind: Kind, checkpoint: &str) -> anyhow::Result<()> {
    let mut tx = ctx.pool.begin().await?;
    for table in kind.tables() {
        sqlx::query(&format!("ALTER TABLE {table} RENAME TO {table}__old"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("ALTER TABLE {table}{SUFFIX} RENAME TO {table}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("DROP TABLE {table}__old"))
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("DELETE FROM projection_checkpoints WHERE projection = $1 AND topic = ANY($2)")
        .bind(kind.name())
        .bind(ctx.topics(kind))
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE projection_checkpoints SET projection = $1 WHERE projection = $2 AND topic = ANY($3)",
    )
    .bind(kind.name())
    .bind(checkpoint)
    .bind(ctx.topics(kind))
        .execute(&mut *tx)
        .await?;
    tx.commit().await.context("swapping the replayed tables in")
}

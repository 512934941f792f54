//! Replay: rebuild a read model from offset 0 into new tables beside the live ones, then
//! swap them in, in one transaction — queries keep being served from the old tables until
//! the swap.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::{Connection, PgConnection, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{LiveSlot, ReplayProgress};
use crate::commit::Positions;
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
///
/// The replay's tables are created, dropped and swapped in ON this connection, each time
/// after checking that it still holds the lock, and the connection is asked every few
/// seconds while the replay runs: a lock lost with its connection (a PostgreSQL restart,
/// `idle_session_timeout`, a dropped TCP connection) ends the replay, which then touches
/// no table — they may be another replay's by then.
pub struct ReplayLock {
    connection: PgConnection,
    key: &'static str,
}

/// The first key of Tally's advisory locks ("taly"); the second is the projection's.
const LOCK_CLASS: i32 = 0x7461_6c79;

/// How often a running replay checks that it still holds its lock.
const LOCK_PING: Duration = Duration::from_secs(5);
/// How long that check may take before the lock counts as lost.
const LOCK_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// This replay no longer holds its lock: another may hold it, and own the replay tables.
#[derive(Debug)]
pub struct LockLost(pub String);

impl std::fmt::Display for LockLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the replay lost its lock ({}); it stops without touching the replay tables, which another replay may own now",
            self.0
        )
    }
}

impl std::error::Error for LockLost {}

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

    /// The process id of the lock's PostgreSQL session (for tests and diagnostics).
    pub async fn backend_pid(&mut self) -> anyhow::Result<i32> {
        Ok(sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut self.connection)
            .await?)
    }

    /// Fails with [`LockLost`] unless the lock's session still holds it (within
    /// [`LOCK_PING_TIMEOUT`]).
    async fn check(&mut self) -> anyhow::Result<()> {
        match tokio::time::timeout(LOCK_PING_TIMEOUT, holds(&mut self.connection, self.key)).await {
            Ok(result) => result,
            Err(_) => Err(LockLost(format!(
                "its connection did not answer within {LOCK_PING_TIMEOUT:?}"
            ))
            .into()),
        }
    }

    /// Runs `work`, checking every [`LOCK_PING`] that the lock is still held; fails with
    /// [`LockLost`] (dropping `work`) as soon as it is not.
    async fn while_held<F: Future>(&mut self, work: F) -> anyhow::Result<F::Output> {
        tokio::pin!(work);
        let mut ping = tokio::time::interval(LOCK_PING);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                out = &mut work => return Ok(out),
                _ = ping.tick() => self.check().await?,
            }
        }
    }

    /// A transaction on the lock's connection, once it is known to hold the lock still
    /// (the lock lives exactly as long as that session, so it holds it to the commit).
    async fn begin(&mut self) -> anyhow::Result<Transaction<'_, Postgres>> {
        let mut tx =
            self.connection.begin().await.map_err(|e| {
                anyhow::Error::new(e).context(LockLost("its connection failed".into()))
            })?;
        holds(&mut tx, self.key).await?;
        Ok(tx)
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

/// Fails with [`LockLost`] unless the session of `connection` holds the replay lock of
/// `key` (a two-key advisory lock shows in `pg_locks` as classid, objid, objsubid 2).
async fn holds(connection: &mut PgConnection, key: &str) -> anyhow::Result<()> {
    let held: Result<bool, sqlx::Error> = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
           AND pid = pg_backend_pid() AND classid = ($1::int4)::oid
           AND objid = hashtext($2)::oid AND objsubid = 2)",
    )
    .bind(LOCK_CLASS)
    .bind(key)
    .fetch_one(connection)
    .await;
    match held {
        Ok(true) => Ok(()),
        Ok(false) => Err(LockLost("its session no longer holds it".into()).into()),
        Err(e) => Err(anyhow::Error::new(e).context(LockLost("its connection failed".into()))),
    }
}

/// Rebuilds `kind` from offset 0 and swaps the result in, holding `lock`. `live`, when
/// given, is the live projector of this process: it is stopped for the final catch-up
/// and the swap (the caller starts it again). `progress.processed` counts records as
/// they are applied; `slot` receives the total once it is known. A replay that fails
/// drops its tables, unless it lost its lock.
pub async fn replay(
    ctx: &Projectors,
    kind: Kind,
    mut lock: ReplayLock,
    progress: ReplayProgress,
    slot: &Mutex<Option<ReplayProgress>>,
    live: Option<&LiveSlot>,
) -> anyhow::Result<Summary> {
    let checkpoint = format!("{}{SUFFIX}", kind.name());
    let result = rebuild(ctx, kind, &checkpoint, &mut lock, progress, slot, live).await;
    if result.is_err() {
        if let Err(e) = drop_tables(ctx, kind, &checkpoint, &mut lock).await {
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
    lock: &mut ReplayLock,
    progress: ReplayProgress,
    slot: &Mutex<Option<ReplayProgress>>,
    live: Option<&LiveSlot>,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    prepare_tables(ctx, kind, checkpoint, lock).await?;

    let first_ends = lock.while_held(ends(ctx, kind)).await??;
    set_total(slot, &first_ends);
    let never = CancellationToken::new();
    let mut target = Target {
        suffix: SUFFIX.to_string(),
        checkpoint: checkpoint.to_string(),
        until: Some(first_ends),
        processed: Some(progress.processed.clone()),
        health: progress.health.clone(),
    };
    lock.while_held(runner::run(ctx, kind, &target, &never))
        .await?
        .context("replaying into new tables")?;

    // Stop the live projector, catch up with what arrived meanwhile, and swap.
    if let Some(live) = live {
        live.stop().await;
    }
    let final_ends = lock.while_held(ends(ctx, kind)).await??;
    set_total(slot, &final_ends);
    target.until = Some(final_ends);
    lock.while_held(runner::run(ctx, kind, &target, &never))
        .await?
        .context("catching up before the swap")?;
    swap(ctx, kind, lock, &mut target).await?;

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

/// Creates the replay tables afresh, on the lock's connection, while it holds the lock.
async fn prepare_tables(
    ctx: &Projectors,
    kind: Kind,
    checkpoint: &str,
    lock: &mut ReplayLock,
) -> anyhow::Result<()> {
    let mut tx = lock.begin().await?;
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

/// Drops the replay tables, on the lock's connection, while it holds the lock (a replay
/// that lost it leaves them to whoever holds it now).
async fn drop_tables(
    ctx: &Projectors,
    kind: Kind,
    checkpoint: &str,
    lock: &mut ReplayLock,
) -> anyhow::Result<()> {
    let mut tx = lock.begin().await?;
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

/// The checkpoints of `checkpoint`, locked `FOR UPDATE` when `lock` — in (topic,
/// partition) order, the order projectors take them in, so the two never deadlock.
async fn checkpoints_in(
    tx: &mut PgConnection,
    ctx: &Projectors,
    kind: Kind,
    checkpoint: &str,
    lock: bool,
) -> anyhow::Result<Positions> {
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(&format!(
        "SELECT topic, partition, next_offset FROM projection_checkpoints
         WHERE projection = $1 AND topic = ANY($2)
         ORDER BY topic COLLATE \"C\", partition{}",
        if lock { " FOR UPDATE" } else { "" }
    ))
    .bind(checkpoint)
    .bind(ctx.topics(kind))
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
}

/// The live checkpoints ahead of the replay's, described.
/// Longest the swap's final catch-up may hold the live checkpoint rows.
const SWAP_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(120);

fn ahead_of(live: &Positions, replayed: &Positions) -> Vec<String> {
    let mut ahead: Vec<String> = live
        .iter()
        .filter(|(tp, at)| replayed.get(*tp).is_none_or(|r| r < *at))
        .map(|((topic, partition), at)| {
            let replayed = replayed
                .get(&(topic.clone(), *partition))
                .copied()
                .unwrap_or(0);
            format!("{topic}/{partition}: live at {at}, replay at {replayed}")
        })
        .collect();
    ahead.sort();
    ahead
}

/// Renames the replayed tables over the live ones and makes the replay's checkpoints the
/// live ones, in one transaction on the lock's connection, while it holds the lock; then
/// wakes whoever waits on a consistency token (here directly, in other processes through
/// the NOTIFY).
///
/// A live checkpoint never moves backwards. A live projector this replay could not stop
/// (in another process, or any for a CLI replay) may have gone past the replay's final
/// catch-up. So the live checkpoints are locked first (`FOR UPDATE`: such a projector
/// waits at its next commit, and finds the checkpoints moved afterwards) and, where one is
/// ahead of the replay, the replay catches up to it before the swap goes on.
async fn swap(
    ctx: &Projectors,
    kind: Kind,
    lock: &mut ReplayLock,
    target: &mut Target,
) -> anyhow::Result<()> {
    let never = CancellationToken::new();
    let mut tx = lock.begin().await?;
    let mut live = checkpoints_in(&mut tx, ctx, kind, kind.name(), true).await?;
    // A live checkpoint past the end of the log is the broken value a replay is there to
    // replace (a projector stopped out of range): catch up to the log's end, not to it.
    let log_ends = ends(ctx, kind).await?;
    for (tp, at) in live.iter_mut() {
        if let Some(end) = log_ends.get(tp).filter(|end| *at > **end) {
            warn!(projection = kind.name(), topic = %tp.0, partition = tp.1, live = *at, end, "live checkpoint past the end of the log; the replay's replaces it");
            *at = *end;
        }
    }
    let mut replayed = checkpoints_in(&mut tx, ctx, kind, &target.checkpoint, false).await?;
    let ahead = ahead_of(&live, &replayed);
    if !ahead.is_empty() {
        info!(projection = kind.name(), ahead = %ahead.join("; "), "a live projector is ahead of the replay; catching up before the swap");
        let mut until = replayed.clone();
        for (tp, at) in &live {
            let end = until.entry(tp.clone()).or_insert(0);
            *end = (*end).max(*at);
        }
        target.until = Some(until);
        // Live projectors wait on the rows this transaction holds: bounded, so a broker
        // or database away now fails the replay (and frees them) instead of hanging.
        tokio::time::timeout(SWAP_CATCH_UP, runner::run(ctx, kind, target, &never))
            .await
            .map_err(|_| anyhow::anyhow!("the catch-up before the swap took over {SWAP_CATCH_UP:?}; nothing swapped, replay again"))?
            .context("catching up with a live projector ahead of the replay")?;
    }
    // The replay's checkpoints too, in the same order, before they are renamed (no runner
    // moves them any more; this only keeps the lock order of every writer the same).
    replayed = checkpoints_in(&mut tx, ctx, kind, &target.checkpoint, true).await?;
    let still = ahead_of(&live, &replayed);
    if !still.is_empty() {
        anyhow::bail!(
            "the replay did not catch up with the live checkpoints ({}); nothing swapped",
            still.join("; ")
        );
    }
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
    .bind(&target.checkpoint)
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

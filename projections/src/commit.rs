//! One batch, one PostgreSQL transaction: the records' effects and the checkpoints
//! moving with them. Every database error is retried (never a reason to skip a record:
//! records that can never apply were dead-lettered before this point).

use std::collections::HashMap;

use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::health::{is_transient_db, Backoff};
use crate::kinds::{Kind, Record};
use crate::progress::CHANNEL;
use crate::projectors::Projectors;
use crate::runner::Target;

/// Positions by (topic, partition): the next offset to read.
pub(crate) type Positions = HashMap<(String, i32), i64>;

/// The checkpoints were not where this runner left them: another runner moved them.
#[derive(Debug)]
pub struct CheckpointMoved;

impl std::fmt::Display for CheckpointMoved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the checkpoints moved under this projector (another one runs); re-reading from them",
        )
    }
}

impl std::error::Error for CheckpointMoved {}

/// Commits `records` and the checkpoints moving from `from` to `to`, retrying database
/// errors with backoff — forever, with the error in the target's health — until it
/// commits (true) or `shutdown` (false: nothing committed, the records are read again on
/// the next start). Fails only with [`CheckpointMoved`].
pub(crate) async fn commit_retrying(
    ctx: &Projectors,
    kind: Kind,
    target: &Target,
    records: &[Record],
    (from, to): (&Positions, &Positions),
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut backoff = Backoff::default();
    loop {
        match commit(ctx, kind, target, records, from, to).await {
            Ok(()) => {
                target.health.ok();
                return Ok(true);
            }
            Err(e) if e.downcast_ref::<CheckpointMoved>().is_some() => return Err(e),
            Err(e) => {
                let transient = is_transient_db(&e);
                warn!(projection = kind.name(), checkpoint = %target.checkpoint, transient, error = %format!("{e:#}"), "applying a batch failed; retrying");
                target.health.failing(format!("{e:#}"), transient);
                if !backoff.wait(transient, shutdown).await {
                    return Ok(false);
                }
            }
        }
    }
}

/// One database transaction: the records' effects and the checkpoints moving from `from`
/// to `to`, which must still be at `from` (so two runners never both apply a batch).
async fn commit(
    ctx: &Projectors,
    kind: Kind,
    target: &Target,
    records: &[Record],
    from: &Positions,
    to: &Positions,
) -> anyhow::Result<()> {
    let mut tx = ctx.pool.begin().await?;
    // A read model can always be rebuilt from the log, and its checkpoints commit with it:
    // losing the last commits in a database crash only means reading those records again.
    // So the commit need not wait for the WAL flush.
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    move_checkpoints(&mut tx, &target.checkpoint, from, to).await?;
    if !records.is_empty() {
        kind.apply(&mut tx, &target.suffix, records).await?;
    }
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(&target.checkpoint)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    debug!(
        projection = kind.name(),
        records = records.len(),
        "batch committed"
    );
    Ok(())
}

async fn move_checkpoints(
    tx: &mut PgConnection,
    checkpoint: &str,
    from: &Positions,
    to: &Positions,
) -> anyhow::Result<()> {
    // In (topic, partition) order, the order a replay's swap locks them in: the two never
    // deadlock.
    let mut to: Vec<_> = to.iter().collect();
    to.sort();
    for ((topic, partition), next) in to {
        let old = from.get(&(topic.clone(), *partition)).copied().unwrap_or(0);
        if *next == old {
            continue;
        }
        let moved = sqlx::query(
            "UPDATE projection_checkpoints SET next_offset = $4, updated_at = now()
             WHERE projection = $1 AND topic = $2 AND partition = $3 AND next_offset = $5",
        )
        .bind(checkpoint)
        .bind(topic)
        .bind(partition)
        .bind(next)
        .bind(old)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() != 1 {
            return Err(CheckpointMoved.into());
        }
    }
    Ok(())
}

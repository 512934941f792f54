//! The read side knows which Kafka log it belongs to (ADR 7).
//!
//! PostgreSQL outlives the log easily: delete Kafka's data, start again, and the database
//! still holds the old read models, checkpoints far past the new offsets, and idempotency
//! keys of commands the new log never saw. [`check`] refuses such a database at start;
//! [`reset`] (`tally reset-read-side`) empties it for the current log.

use std::fmt;

use anyhow::Context;
use eventlog::{KafkaConfig, LogIdentity, Topics};
use projections::Kind;
use sqlx::{PgPool, Postgres, Transaction};
use tracing::info;
use uuid::Uuid;

/// What to do when the database belongs to another log; every refusal ends with it.
const WHAT_TO_DO: &str = "To start the read side over on this log, stop every tally process \
    of this topic prefix and run `tally reset-read-side --yes` with the same settings: it \
    empties the read models, checkpoints and idempotency keys, and the projectors then \
    rebuild every view from offset 0 (a replay of the whole log). Or point DATABASE_URL at an \
    empty database, or --kafka-brokers / --topic-prefix back at the log this database was \
    built from";

/// Checks that the database's read side of `kafka.topic_prefix` belongs to `current`, or
/// adopts it for `current` when it has no record of its log yet and nothing in it points
/// past the end of this log. Refuses otherwise ([`Refused`]), saying what happened and
/// what to do; any other error is Kafka or PostgreSQL not answering (worth a retry).
pub async fn check(
    pool: &PgPool,
    kafka: &KafkaConfig,
    current: &LogIdentity,
) -> anyhow::Result<()> {
    let prefix = &kafka.topic_prefix;
    if let Some(stored) = stored(pool, prefix).await? {
        if stored != *current {
            return Err(another_log(kafka, &stored, current));
        }
        return Ok(());
    }
    let beyond = checkpoints_beyond_the_end(pool, kafka).await?;
    if !beyond.is_empty() {
        return Err(Refused(format!(
            "this database holds read models of another Kafka log: it has no record of the log \
             it was built from (it predates log identities), and its checkpoints point past the \
             end of the log at {} (topic prefix '{prefix}', {current}): {}. Serving it would mix \
             two histories and answer reads with consistency tokens too early. {WHAT_TO_DO}.",
            kafka.brokers,
            beyond.join("; "),
        ))
        .into());
    }
    sqlx::query(
        "INSERT INTO log_identity (topic_prefix, cluster_id, log_id) VALUES ($1, $2, $3)
         ON CONFLICT (topic_prefix) DO NOTHING",
    )
    .bind(prefix)
    .bind(&current.cluster_id)
    .bind(current.log_id)
    .execute(pool)
    .await
    .context("recording the log identity")?;
    // Another process may have adopted the database at the same moment: the row is the
    // truth, whoever wrote it.
    match stored(pool, prefix).await? {
        Some(stored) if stored == *current => {
            info!(prefix = %prefix, log = %current, "the read side now records the log it belongs to");
            Ok(())
        }
        Some(stored) => Err(another_log(kafka, &stored, current)),
        None => anyhow::bail!("the log identity of prefix '{prefix}' vanished right after it was written; is another process resetting the read side?"),
    }
}

/// [`check`]'s refusal of a database built from another log: an answer, not a failure to
/// get one, so start-up does not retry it.
#[derive(Debug)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn another_log(kafka: &KafkaConfig, stored: &LogIdentity, current: &LogIdentity) -> anyhow::Error {
    Refused(format!(
        "this database holds read models of another Kafka log: the read side of topic prefix \
         '{}' was built from {stored}, but the brokers at {} now hold {current}. The Kafka data \
         was probably deleted and created afresh (e.g. `.data/kafka` removed), or \
         DATABASE_URL and --kafka-brokers point at different deployments. Serving it would \
         mix two histories and answer reads with consistency tokens too early. {WHAT_TO_DO}.",
        kafka.topic_prefix, kafka.brokers,
    ))
    .into()
}

async fn stored(pool: &PgPool, prefix: &str) -> anyhow::Result<Option<LogIdentity>> {
    let row: Option<(String, Uuid)> =
        sqlx::query_as("SELECT cluster_id, log_id FROM log_identity WHERE topic_prefix = $1")
            .bind(prefix)
            .fetch_optional(pool)
            .await
            .context("reading the log identity")?;
    Ok(row.map(|(cluster_id, log_id)| LogIdentity { cluster_id, log_id }))
}

/// The event topics the projectors of `kafka.topic_prefix` read.
fn projected_topics(kafka: &KafkaConfig) -> Vec<String> {
    let topics = Topics::new(&kafka.topic_prefix);
    let mut names: Vec<String> = Kind::ALL
        .iter()
        .flat_map(|kind| kind.streams())
        .map(|stream| topics.events(stream))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Every checkpoint of this prefix's topics past its partition's end offset (or on a
/// partition the topic does not have), described for the error message.
async fn checkpoints_beyond_the_end(
    pool: &PgPool,
    kafka: &KafkaConfig,
) -> anyhow::Result<Vec<String>> {
    let rows: Vec<(String, String, i32, i64)> = sqlx::query_as(
        "SELECT projection, topic, partition, next_offset FROM projection_checkpoints
         WHERE topic = ANY($1) AND next_offset > 0 ORDER BY topic, partition, projection",
    )
    .bind(projected_topics(kafka))
    .fetch_all(pool)
    .await
    .context("reading the checkpoints")?;
    let mut partitions: Vec<(String, i32)> = rows
        .iter()
        .filter(|(_, _, partition, _)| *partition < kafka.partitions)
        .map(|(_, topic, partition, _)| (topic.clone(), *partition))
        .collect();
    partitions.sort();
    partitions.dedup();
    let ends = eventlog::end_offsets(kafka, partitions).await?;
    Ok(rows
        .into_iter()
        .filter_map(|(projection, topic, partition, next)| {
            match ends.get(&(topic.clone(), partition)) {
                Some(end) if next <= *end => None,
                Some(end) => Some(format!(
                    "projection {projection} is at offset {next} of {topic}/{partition}, which ends at {end}"
                )),
                None => Some(format!(
                    "projection {projection} is at offset {next} of {topic}/{partition}, a partition this log does not have"
                )),
            }
        })
        .collect())
}

/// What `tally reset-read-side` deleted.
#[derive(Debug, Clone)]
pub struct ResetSummary {
    /// Topic prefix whose log the database now belongs to.
    pub prefix: String,
    /// Rows deleted from each read-model table.
    pub tables: Vec<(&'static str, i64)>,
    /// Checkpoints deleted (every projection's, replays' included).
    pub checkpoints: u64,
    /// Idempotency keys deleted; `None` when they were kept, the read side already
    /// belonging to this log (see [`reset`]).
    pub idempotency_keys: Option<u64>,
    /// The log the read side now belongs to.
    pub identity: LogIdentity,
}

impl fmt::Display for ResetSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "reset the read side of topic prefix '{}':", self.prefix)?;
        for (table, rows) in &self.tables {
            writeln!(f, "  {table}: {rows} rows deleted")?;
        }
        writeln!(
            f,
            "  projection_checkpoints: {} deleted (the projectors rebuild from offset 0)",
            self.checkpoints
        )?;
        match self.idempotency_keys {
            Some(deleted) => writeln!(
                f,
                "  idempotency_keys: {deleted} deleted (they belonged to another log, or to none recorded)"
            )?,
            None => writeln!(
                f,
                "  idempotency_keys: kept (the read side already belonged to this log, whose commands \
                 they stand for: a retry with the same key must not apply its command again)"
            )?,
        }
        write!(f, "the read side now belongs to {}", self.identity)
    }
}

/// Empties the read side of this database for `current`: every read-model table and every
/// checkpoint (they describe the emptied tables, whichever prefix wrote them), and records
/// `current` as the log of `kafka.topic_prefix`. One transaction: it all happens or none
/// of it.
///
/// The idempotency keys go only when the recorded log is missing or another: a key maps
/// to a command id, and the command processors dedupe by that id against the log. On the
/// same log a command answered 503 may well have been applied; its retry with the same
/// key must find the key (and the same command id), not get a fresh id and apply twice.
pub async fn reset(
    pool: &PgPool,
    kafka: &KafkaConfig,
    current: &LogIdentity,
) -> anyhow::Result<ResetSummary> {
    let mut tx = pool.begin().await?;
    // Projectors move their checkpoints first and then write their tables. Locking the
    // checkpoints first too waits for every batch in flight and stops new ones before
    // their first write, so no projector deadlocks with the TRUNCATE below; a projector
    // still running then finds its checkpoints gone, fails its batch, restarts, and
    // rebuilds from offset 0.
    sqlx::query("LOCK TABLE projection_checkpoints IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .context("locking the checkpoints")?;
    let recorded: Option<(String, Uuid)> = sqlx::query_as(
        "SELECT cluster_id, log_id FROM log_identity WHERE topic_prefix = $1 FOR UPDATE",
    )
    .bind(&kafka.topic_prefix)
    .fetch_optional(&mut *tx)
    .await
    .context("reading the log identity")?;
    let same_log =
        recorded.is_some_and(|(cluster_id, log_id)| LogIdentity { cluster_id, log_id } == *current);
    let tables = empty_read_models(&mut tx).await?;
    let checkpoints = sqlx::query("DELETE FROM projection_checkpoints")
        .execute(&mut *tx)
        .await
        .context("deleting the checkpoints")?
        .rows_affected();
    let idempotency_keys = if same_log {
        None
    } else {
        let deleted = sqlx::query("DELETE FROM idempotency_keys")
            .execute(&mut *tx)
            .await
            .context("deleting the idempotency keys")?
            .rows_affected();
        Some(deleted)
    };
    sqlx::query(
        "INSERT INTO log_identity (topic_prefix, cluster_id, log_id) VALUES ($1, $2, $3)
         ON CONFLICT (topic_prefix) DO UPDATE
         SET cluster_id = EXCLUDED.cluster_id, log_id = EXCLUDED.log_id, adopted_at = now()",
    )
    .bind(&kafka.topic_prefix)
    .bind(&current.cluster_id)
    .bind(current.log_id)
    .execute(&mut *tx)
    .await
    .context("recording the log identity")?;
    tx.commit().await.context("committing the reset")?;
    let summary = ResetSummary {
        prefix: kafka.topic_prefix.clone(),
        tables,
        checkpoints,
        idempotency_keys,
        identity: current.clone(),
    };
    info!(prefix = %summary.prefix, log = %current, checkpoints, idempotency_keys_deleted = ?idempotency_keys, "read side reset");
    Ok(summary)
}

async fn empty_read_models(
    tx: &mut Transaction<'_, Postgres>,
) -> anyhow::Result<Vec<(&'static str, i64)>> {
    let mut emptied = Vec::new();
    for table in Kind::ALL.iter().flat_map(|kind| kind.tables()) {
        // Table names are Tally's own constants, never input.
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut **tx)
            .await
            .with_context(|| format!("counting the rows of {table}"))?;
        sqlx::query(&format!("TRUNCATE {table}"))
            .execute(&mut **tx)
            .await
            .with_context(|| format!("emptying {table}"))?;
        emptied.push((*table, rows));
    }
    Ok(emptied)
}

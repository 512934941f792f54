//! A projector: reads its event topics `read_committed` from its checkpoints and applies
//! records in batches, each batch ONE PostgreSQL transaction together with the new
//! checkpoints. That makes its effects exactly-once: a crash before the commit leaves the
//! old checkpoint, and the records are read and applied again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use eventlog::rdkafka::consumer::{Consumer, StreamConsumer};
use eventlog::rdkafka::message::OwnedMessage;
use eventlog::rdkafka::producer::{FutureProducer, FutureRecord};
use eventlog::rdkafka::{Message, Offset, TopicPartitionList};
use eventlog::{EventEnvelope, KafkaConfig, Topics};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::kinds::{Kind, Record};
use crate::progress::{Progress, CHANNEL};

/// Most records in one database transaction.
const MAX_BATCH: usize = 5_000;
/// How long a batch keeps gathering records after its first (bounds read-side freshness).
const MAX_GATHER: Duration = Duration::from_millis(20);
/// Attempts at a batch before its records are tried one by one.
const MAX_ATTEMPTS: u32 = 3;

/// What every projector of a process shares.
#[derive(Clone)]
pub struct Projectors {
    pub kafka: KafkaConfig,
    pub pool: PgPool,
    pub progress: Progress,
    pub stats: Arc<HashMap<Kind, Arc<Stats>>>,
    pub metrics: ProjectionMetrics,
    dead_letters: FutureProducer,
}

/// Counters of one projection, for the admin API and metrics (they are the metric
/// families' own counters).
pub struct Stats {
    /// Records applied (or found applied already).
    pub applied: Counter,
    /// Records sent to the dead-letter topic.
    pub dead_lettered: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectionLabels {
    pub projection: String,
}

/// The read side's Prometheus metrics, by projection.
#[derive(Clone, Default)]
pub struct ProjectionMetrics {
    pub applied: Family<ProjectionLabels, Counter>,
    pub dead_letters: Family<ProjectionLabels, Counter>,
    /// Records behind the log, refreshed every few seconds by the admin.
    pub lag: Family<ProjectionLabels, Gauge>,
}

impl ProjectionMetrics {
    /// Registers every family in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tally_projection_applied",
            "Records applied by each projection",
            self.applied.clone(),
        );
        registry.register(
            "tally_dead_letters",
            "Records each projection sent to the dead-letter topic",
            self.dead_letters.clone(),
        );
        registry.register(
            "tally_projection_lag",
            "Records each projection is behind the log",
            self.lag.clone(),
        );
    }

    pub fn label(kind: Kind) -> ProjectionLabels {
        ProjectionLabels {
            projection: kind.name().to_string(),
        }
    }
}

impl Projectors {
    /// Shared state for projectors over `kafka` and `pool`.
    pub fn new(kafka: KafkaConfig, pool: PgPool, progress: Progress) -> anyhow::Result<Self> {
        let dead_letters = kafka
            .producer()
            .set("enable.idempotence", "true")
            .create()
            .context("creating the dead-letter producer")?;
        let metrics = ProjectionMetrics::default();
        let stats = Kind::ALL
            .into_iter()
            .map(|k| {
                let label = ProjectionMetrics::label(k);
                let stats = Stats {
                    applied: metrics.applied.get_or_create(&label).clone(),
                    dead_lettered: metrics.dead_letters.get_or_create(&label).clone(),
                };
                (k, Arc::new(stats))
            })
            .collect();
        Ok(Self {
            kafka,
            pool,
            progress,
            stats: Arc::new(stats),
            metrics,
            dead_letters,
        })
    }

    /// The event topics of `kind`.
    pub fn topics(&self, kind: Kind) -> Vec<String> {
        let topics = Topics::new(&self.kafka.topic_prefix);
        kind.streams().iter().map(|s| topics.events(s)).collect()
    }

    /// The checkpoints of `checkpoint` (a projection name), creating missing ones at 0.
    pub async fn checkpoints(
        &self,
        kind: Kind,
        checkpoint: &str,
    ) -> anyhow::Result<HashMap<(String, i32), i64>> {
        for topic in self.topics(kind) {
            for partition in 0..self.kafka.partitions {
                sqlx::query("INSERT INTO projection_checkpoints (projection, topic, partition, next_offset) VALUES ($1, $2, $3, 0) ON CONFLICT DO NOTHING")
                    .bind(checkpoint).bind(&topic).bind(partition)
                    .execute(&self.pool).await?;
            }
        }
        let rows: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT topic, partition, next_offset FROM projection_checkpoints
             WHERE projection = $1 AND topic = ANY($2) AND partition < $3",
        )
        .bind(checkpoint)
        .bind(self.topics(kind))
        .bind(self.kafka.partitions)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
    }
}

/// Where a projector writes and when it stops.
pub struct Target {
    /// Suffix of its table names (`""` for the live tables).
    pub suffix: String,
    /// The name its checkpoints are kept under.
    pub checkpoint: String,
    /// Stop once every partition reaches these offsets (a replay); `None` runs until shutdown.
    pub until: Option<HashMap<(String, i32), i64>>,
    /// Counts records as they are applied (a replay's progress).
    pub processed: Option<Arc<AtomicU64>>,
}

impl Target {
    /// The live read model.
    pub fn live(kind: Kind) -> Self {
        Self {
            suffix: String::new(),
            checkpoint: kind.name().to_string(),
            until: None,
            processed: None,
        }
    }
}

/// Runs projector `kind` into `target` until shutdown (or the target's end). Returns an
/// error when its checkpoints moved under it (another runner): the caller restarts it,
/// and it carries on from the stored checkpoints.
pub async fn run(
    ctx: &Projectors,
    kind: Kind,
    target: &Target,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut positions = ctx.checkpoints(kind, &target.checkpoint).await?;
    let consumer: StreamConsumer = ctx
        .kafka
        .client()
        .set(
            "group.id",
            format!(
                "{}.projection.{}",
                ctx.kafka.topic_prefix, target.checkpoint
            ),
        )
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .context("creating the projector consumer")?;
    let mut assignment = TopicPartitionList::new();
    for ((topic, partition), next) in &positions {
        assignment.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
    }
    consumer
        .assign(&assignment)
        .context("assigning the event partitions")?;
    let stats = ctx.stats[&kind].clone();

    loop {
        if let Some(until) = &target.until {
            if until
                .iter()
                .all(|(tp, end)| positions.get(tp).is_some_and(|at| at >= end))
            {
                return Ok(());
            }
        }
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            batch = next_batch(&consumer) => batch?,
        };
        if batch.is_empty() {
            // Idle: transaction markers after the last record still take offsets. Move
            // the checkpoints past them, so lag reads 0 and a replay sees its end.
            let moved = past_markers(&consumer, &positions)?;
            if moved != positions {
                commit(ctx, kind, target, &[], &positions, &moved).await?;
                for ((topic, partition), next) in &moved {
                    ctx.progress
                        .advance(&target.checkpoint, topic, *partition, *next);
                }
                positions = moved;
            }
            continue;
        }
        let mut moved = positions.clone();
        let mut records = Vec::with_capacity(batch.len());
        let mut poison = Vec::new();
        for message in &batch {
            moved.insert(
                (message.topic().to_string(), message.partition()),
                message.offset() + 1,
            );
            match message
                .payload()
                .map(serde_json::from_slice::<EventEnvelope>)
            {
                Some(Ok(envelope)) => records.push(Record {
                    topic: message.topic().to_string(),
                    partition: message.partition(),
                    offset: message.offset(),
                    envelope,
                }),
                Some(Err(e)) => poison.push((message, e.to_string())),
                None => poison.push((message, "empty record".to_string())),
            }
        }
        for (message, error) in &poison {
            dead_letter(ctx, kind, message, error).await?;
        }
        apply_with_retries(ctx, kind, target, &records, &positions, &moved).await?;
        for ((topic, partition), next) in &moved {
            ctx.progress
                .advance(&target.checkpoint, topic, *partition, *next);
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            for r in &records {
                let m = &r.envelope.metadata;
                tracing::debug!(
                    projection = kind.name(),
                    aggregate_id = %r.envelope.aggregate_id,
                    event_type = %r.envelope.event_type,
                    sequence = r.envelope.sequence,
                    correlation_id = m.correlation_id.as_deref().unwrap_or_default(),
                    trace_id = m.traceparent.as_deref().and_then(eventlog::trace::trace_id).unwrap_or_default(),
                    "projected"
                );
            }
        }
        stats.applied.inc_by(records.len() as u64);
        if let Some(processed) = &target.processed {
            processed.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        positions = moved;
    }
}

/// The checkpoints moved up to the consumer's positions, where those are further on.
fn past_markers(
    consumer: &StreamConsumer,
    positions: &HashMap<(String, i32), i64>,
) -> anyhow::Result<HashMap<(String, i32), i64>> {
    let mut moved = positions.clone();
    for element in consumer.position()?.elements() {
        if let Offset::Offset(at) = element.offset() {
            let key = (element.topic().to_string(), element.partition());
            if moved.get(&key).is_some_and(|stored| at > *stored) {
                moved.insert(key, at);
            }
        }
    }
    Ok(moved)
}

/// Waits for a first record (up to 250 ms), then takes what else arrives without a 2 ms
/// gap, for at most [`MAX_GATHER`]: batches stay large under load without holding records
/// back (under a steady stream a gap may never come).
async fn next_batch(consumer: &StreamConsumer) -> anyhow::Result<Vec<OwnedMessage>> {
    let mut batch = Vec::new();
    let mut wait = Duration::from_millis(250);
    let mut gathered_by = tokio::time::Instant::now() + wait;
    while batch.len() < MAX_BATCH {
        let until = gathered_by.min(tokio::time::Instant::now() + wait);
        match tokio::time::timeout_at(until, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(m.detach()),
            Ok(Err(e)) => bail!("reading events: {e}"),
            Err(_) => break,
        }
        if batch.len() == 1 {
            gathered_by = tokio::time::Instant::now() + MAX_GATHER;
            wait = Duration::from_millis(2);
        }
    }
    Ok(batch)
}

/// Applies a batch; when it keeps failing, applies its records one at a time and sends
/// the ones that still fail to the dead-letter topic, so one bad record cannot stop the
/// projection and nothing is skipped silently.
async fn apply_with_retries(
    ctx: &Projectors,
    kind: Kind,
    target: &Target,
    records: &[Record],
    from: &HashMap<(String, i32), i64>,
    to: &HashMap<(String, i32), i64>,
) -> anyhow::Result<()> {
    for attempt in 1..=MAX_ATTEMPTS {
        match commit(ctx, kind, target, records, from, to).await {
            Ok(()) => return Ok(()),
            Err(e) if e.downcast_ref::<CheckpointMoved>().is_some() => return Err(e),
            Err(e) => {
                warn!(projection = kind.name(), attempt, error = %format!("{e:#}"), "applying a batch failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
            }
        }
    }
    // One at a time: each record moves its own partition's checkpoint past itself.
    let mut at = from.clone();
    for record in records {
        let tp = (record.topic.clone(), record.partition);
        let mut next = at.clone();
        next.insert(tp.clone(), record.offset + 1);
        if let Err(e) = commit(ctx, kind, target, std::slice::from_ref(record), &at, &next).await {
            if e.downcast_ref::<CheckpointMoved>().is_some() {
                return Err(e);
            }
            let payload = serde_json::to_vec(&record.envelope)?;
            send_dead_letter(
                ctx,
                kind,
                &record.topic,
                record.partition,
                record.offset,
                &payload,
                &format!("{e:#}"),
            )
            .await?;
            commit(ctx, kind, target, &[], &at, &next).await?;
        }
        at = next;
    }
    // Records of partitions that had none left in the batch (poison only) still move.
    commit(ctx, kind, target, &[], &at, to).await
}

/// The checkpoints were not where this runner left them: another runner moved them.
#[derive(Debug)]
struct CheckpointMoved;

impl std::fmt::Display for CheckpointMoved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the checkpoints moved under this projector (another one runs); re-reading from them",
        )
    }
}

impl std::error::Error for CheckpointMoved {}

/// One database transaction: the records' effects and the checkpoints moving from `from`
/// to `to`, which must still be at `from` (so two runners never both apply a batch).
async fn commit(
    ctx: &Projectors,
    kind: Kind,
    target: &Target,
    records: &[Record],
    from: &HashMap<(String, i32), i64>,
    to: &HashMap<(String, i32), i64>,
) -> anyhow::Result<()> {
    let mut tx = ctx.pool.begin().await?;
    // A read model can always be rebuilt from the log, and its checkpoints commit with it:
    // losing the last commits in a database crash only means reading those records again.
    // So the commit need not wait for the WAL flush.
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    for ((topic, partition), next) in to {
        let old = from.get(&(topic.clone(), *partition)).copied().unwrap_or(0);
        if *next == old {
            continue;
        }
        let moved = sqlx::query(
            "UPDATE projection_checkpoints SET next_offset = $4, updated_at = now()
             WHERE projection = $1 AND topic = $2 AND partition = $3 AND next_offset = $5",
        )
        .bind(&target.checkpoint)
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

async fn dead_letter(
    ctx: &Projectors,
    kind: Kind,
    message: &OwnedMessage,
    error: &str,
) -> anyhow::Result<()> {
    warn!(
        projection = kind.name(),
        topic = message.topic(),
        partition = message.partition(),
        offset = message.offset(),
        error,
        "undecodable record; dead-lettered"
    );
    send_dead_letter(
        ctx,
        kind,
        message.topic(),
        message.partition(),
        message.offset(),
        message.payload().unwrap_or_default(),
        error,
    )
    .await
}

async fn send_dead_letter(
    ctx: &Projectors,
    kind: Kind,
    topic: &str,
    partition: i32,
    offset: i64,
    payload: &[u8],
    error: &str,
) -> anyhow::Result<()> {
    let source = format!("{topic}/{partition}/{offset}");
    let headers =
        eventlog::dead_letter_headers(error, &source, &format!("{} projection", kind.name()));
    let dlq = Topics::new(&ctx.kafka.topic_prefix).dead_letters();
    let record = FutureRecord::to(&dlq)
        .partition(0)
        .key(&source)
        .payload(payload)
        .headers(headers);
    ctx.dead_letters
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("writing to the dead-letter topic: {e}"))?;
    ctx.stats[&kind].dead_lettered.inc();
    Ok(())
}

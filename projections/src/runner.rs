//! A projector: reads its event topics `read_committed` from its checkpoints and applies
//! records in batches, each batch ONE PostgreSQL transaction together with the new
//! checkpoints. That makes its effects exactly-once: a crash before the commit leaves the
//! old checkpoint, and the records are read and applied again.
//!
//! It never skips a valid record: records that can never apply are dead-lettered before
//! the transaction; database errors and a broker briefly away are waited out inside,
//! with the error in the projector's [`Health`]; a checkpoint outside the log stops it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use eventlog::rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use eventlog::rdkafka::error::KafkaError;
use eventlog::rdkafka::message::OwnedMessage;
use eventlog::rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::commit::{commit_retrying, Positions};
use crate::dead_letter;
use crate::health::{is_out_of_range, is_transient_kafka, Backoff, Health};
use crate::kinds::{Kind, Record};
use crate::projectors::Projectors;

pub use crate::commit::CheckpointMoved;
pub use crate::projectors::{ProjectionLabels, ProjectionMetrics, Stats};

/// Most records in one database transaction.
const MAX_BATCH: usize = 5_000;
/// How long a batch keeps gathering records after its first (bounds read-side freshness).
const MAX_GATHER: Duration = Duration::from_millis(20);

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
    /// Where the projector reports the error it is waiting out, if any.
    pub health: Arc<Health>,
}

impl Target {
    /// The live read model, reporting to `health`.
    pub fn live(kind: Kind, health: Arc<Health>) -> Self {
        Self {
            suffix: String::new(),
            checkpoint: kind.name().to_string(),
            until: None,
            processed: None,
            health,
        }
    }

    fn reached_end(&self, positions: &Positions) -> bool {
        self.until.as_ref().is_some_and(|until| {
            until
                .iter()
                .all(|(tp, end)| positions.get(tp).is_some_and(|at| at >= end))
        })
    }
}

/// A checkpoint outside the log (before its start or past its end): the projector stops
/// rather than jump, since any jump would skip records without a word.
#[derive(Debug)]
pub struct OutOfRange(pub String);

impl std::fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OutOfRange {}

/// Runs projector `kind` into `target` until shutdown (or the target's end). Returns
/// [`CheckpointMoved`] when another runner moved its checkpoints (the caller restarts it,
/// and it carries on from the stored checkpoints), and [`OutOfRange`] when a checkpoint
/// is outside the log.
pub async fn run(
    ctx: &Projectors,
    kind: Kind,
    target: &Target,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut positions = ctx.checkpoints(kind, &target.checkpoint).await?;
    let run = Run {
        ctx,
        kind,
        target,
        shutdown,
        consumer: consumer(ctx, target, &positions)?,
        streams: ctx.streams(kind),
    };
    // It has read its checkpoints and holds its partitions: an error from before (e.g.
    // the checkpoints unreadable at the last start) is no longer true.
    target.health.ok();
    // Set while the consumer reports errors (a broker away), until it is back.
    let mut kafka_away: Option<Backoff> = None;
    loop {
        if target.reached_end(&positions) {
            return Ok(());
        }
        let (batch, error) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            batch = next_batch(&run.consumer) => batch,
        };
        if error.is_none()
            && kafka_away.is_some()
            && (!batch.is_empty() || broker_back(ctx, kind).await)
        {
            kafka_away = None;
            target.health.ok();
        }
        // The records read before an error are applied first: the error may be the only
        // word about another partition (librdkafka reports a checkpoint outside the log
        // once, then stops fetching that partition), so it is never dropped either.
        if !batch.is_empty() || error.is_none() {
            match run.apply(&batch, &positions).await? {
                Some(moved) => positions = moved,
                None => return Ok(()),
            }
        }
        let Some(e) = error else { continue };
        if is_out_of_range(&e) {
            return Err(out_of_range(ctx, kind, &positions).await);
        }
        // librdkafka reconnects by itself; a later fetch carries on.
        let transient = is_transient_kafka(&e);
        warn!(projection = kind.name(), transient, error = %e, "reading events failed; waiting for the broker");
        target
            .health
            .failing(format!("reading events: {e}"), transient);
        if !kafka_away
            .get_or_insert_with(Backoff::default)
            .wait(transient, shutdown)
            .await
        {
            return Ok(());
        }
    }
}

/// One run of a projector.
struct Run<'a> {
    ctx: &'a Projectors,
    kind: Kind,
    target: &'a Target,
    shutdown: &'a CancellationToken,
    consumer: StreamConsumer,
    /// The stream each topic carries.
    streams: HashMap<String, &'static str>,
}

/// The projector's consumer, assigned at the checkpoints. `auto.offset.reset=error`: a
/// checkpoint outside the log is reported, not silently moved to an end.
fn consumer(
    ctx: &Projectors,
    target: &Target,
    positions: &Positions,
) -> anyhow::Result<StreamConsumer> {
    let group = format!(
        "{}.projection.{}",
        ctx.kafka.topic_prefix, target.checkpoint
    );
    let consumer: StreamConsumer = ctx
        .kafka
        .client()
        .set("group.id", group)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "error")
        .set("fetch.wait.max.ms", "50")
        .create()
        .context("creating the projector consumer")?;
    let mut assignment = TopicPartitionList::new();
    for ((topic, partition), next) in positions {
        assignment.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
    }
    consumer
        .assign(&assignment)
        .context("assigning the event partitions")?;
    Ok(consumer)
}

impl Run<'_> {
    /// Dead-letters the records of `batch` that can never apply, commits the rest with
    /// the checkpoints moved past the batch (and past transaction markers of partitions
    /// without records in it), and answers the new positions; `None` on shutdown.
    async fn apply(
        &self,
        batch: &[OwnedMessage],
        positions: &Positions,
    ) -> anyhow::Result<Option<Positions>> {
        let (ctx, kind, target) = (self.ctx, self.kind, self.target);
        let mut moved = positions.clone();
        let mut records = Vec::with_capacity(batch.len());
        for message in batch {
            let tp = (message.topic().to_string(), message.partition());
            moved.insert(tp, message.offset() + 1);
            match self.decode(message) {
                Ok(record) => records.push(record),
                Err(why) => {
                    let parked =
                        dead_letter::park(ctx, kind, message, &why, &target.health, self.shutdown);
                    if !parked.await {
                        return Ok(None);
                    }
                }
            }
        }
        let in_batch: HashSet<(&str, i32)> =
            batch.iter().map(|m| (m.topic(), m.partition())).collect();
        past_markers(&self.consumer, &mut moved, &in_batch)?;
        if moved == *positions {
            return Ok(Some(moved));
        }
        let span = (positions, &moved);
        if !commit_retrying(ctx, kind, target, &records, span, self.shutdown).await? {
            return Ok(None);
        }
        for ((topic, partition), next) in &moved {
            ctx.progress
                .advance(&target.checkpoint, topic, *partition, *next);
        }
        trace_applied(kind, &records);
        ctx.stats[&kind].applied.inc_by(records.len() as u64);
        if let Some(processed) = &target.processed {
            processed.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        Ok(Some(moved))
    }

    /// The record of `message`, or why it can never apply.
    fn decode(&self, message: &OwnedMessage) -> Result<Record, String> {
        let stream = self
            .streams
            .get(message.topic())
            .copied()
            .unwrap_or_default();
        Ok(Record {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            envelope: crate::decode::decode(stream, message.payload())?,
        })
    }
}

/// Moves `moved` up to the consumer's position for each partition with no records in
/// this batch, where that is further on: transaction markers after a partition's last
/// record still take offsets. Without this a quiet partition ending in a marker never
/// reaches its end while other partitions are busy (a replay would never finish).
fn past_markers(
    consumer: &StreamConsumer,
    moved: &mut Positions,
    in_batch: &HashSet<(&str, i32)>,
) -> anyhow::Result<()> {
    for element in consumer.position()?.elements() {
        if in_batch.contains(&(element.topic(), element.partition())) {
            continue;
        }
        if let Offset::Offset(at) = element.offset() {
            let key = (element.topic().to_string(), element.partition());
            if moved.get(&key).is_some_and(|stored| at > *stored) {
                moved.insert(key, at);
            }
        }
    }
    Ok(())
}

/// Waits for a first record (up to 250 ms), then takes what else arrives without a 2 ms
/// gap, for at most [`MAX_GATHER`]: batches stay large under load without holding records
/// back (under a steady stream a gap may never come). A consumer error ends the batch and
/// comes back with the records read before it: the caller applies them, then deals with
/// the error (it may concern another partition, and may never be reported again).
async fn next_batch(consumer: &StreamConsumer) -> (Vec<OwnedMessage>, Option<KafkaError>) {
    let mut batch = Vec::new();
    let mut wait = Duration::from_millis(250);
    let mut gathered_by = tokio::time::Instant::now() + wait;
    while batch.len() < MAX_BATCH {
        let until = gathered_by.min(tokio::time::Instant::now() + wait);
        match tokio::time::timeout_at(until, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(m.detach()),
            Ok(Err(e)) => return (batch, Some(e)),
            Err(_) => break,
        }
        if batch.len() == 1 {
            gathered_by = tokio::time::Instant::now() + MAX_GATHER;
            wait = Duration::from_millis(2);
        }
    }
    (batch, None)
}

/// Whether the broker answers again (after a consumer error, while idle): one quick
/// question, so the status clears as soon as it is true.
async fn broker_back(ctx: &Projectors, kind: Kind) -> bool {
    let Some(topic) = ctx.topics(kind).into_iter().next() else {
        return true;
    };
    let config = ctx.kafka.client();
    let probe = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create().ok()?;
        consumer
            .fetch_watermarks(&topic, 0, Duration::from_secs(2))
            .ok()
    });
    matches!(probe.await, Ok(Some(_)))
}

/// The error for a consumer that found a checkpoint outside the log, naming it.
async fn out_of_range(ctx: &Projectors, kind: Kind, positions: &Positions) -> anyhow::Error {
    let mut outside = Vec::new();
    let mut sorted: Vec<_> = positions.iter().collect();
    sorted.sort();
    for ((topic, partition), at) in sorted {
        match eventlog::watermarks(&ctx.kafka, topic, *partition).await {
            Ok((low, high)) if *at < low || *at > high => outside.push(format!(
                "{topic}/{partition} at offset {at} (the log holds {low}..{high})"
            )),
            Ok(_) => {}
            Err(_) => outside.push(format!("{topic}/{partition} at offset {at}")),
        }
    }
    OutOfRange(format!(
        "checkpoint outside the log: {}; the {} projector stopped rather than skip records (replay it, or correct the checkpoint)",
        outside.join(", "),
        kind.name()
    ))
    .into()
}

fn trace_applied(kind: Kind, records: &[Record]) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    for r in records {
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

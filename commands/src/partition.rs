//! One owned partition: fence older owners, rebuild its aggregates from the event log,
//! then handle commands in batches, each batch ONE Kafka transaction of events, results
//! and consumed offsets. In-memory state changes only after the commit.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use eventlog::rdkafka::consumer::Consumer;
use eventlog::rdkafka::message::{Message, OwnedHeaders, OwnedMessage};
use eventlog::rdkafka::{Offset, TopicPartitionList};
use eventlog::{
    classify, offset_for_time, read_partition, CommitError, Delivery, EventEnvelope, EventMetadata,
    TxnErrorKind, TxnProducer,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::local::Work;
use crate::processor::Shared;
use crate::stream::{version_conflict, CommandStream};
use crate::wire::{CommandEnvelope, CommandResult, ReplyTo};
use eventlog::{ConsistencyToken, Position};

/// Most commands in one transaction.
const MAX_BATCH: usize = 1_000;
/// Attempts at a batch whose transaction had to be aborted.
const MAX_ATTEMPTS: u32 = 5;

/// One aggregate in memory, with its version (the sequence of its last event).
#[derive(Clone, Default)]
struct Slot<A> {
    state: A,
    version: u64,
}

/// How long a saga's commands are remembered. A saga's step commits its commands with
/// its own state, so it resends one only in the moments around a crash; its ids are
/// deterministic, and this catches those resends.
const SAGA_DEDUP_WINDOW: Duration = Duration::from_secs(900);

/// Outcomes of commands sent with an Idempotency-Key: those keyed over HTTP for the dedup
/// window (`--dedup-window-secs`), the saga's for [`SAGA_DEDUP_WINDOW`].
#[derive(Default)]
struct Seen {
    results: HashMap<Uuid, CommandResult>,
    /// Insertion order per window, oldest first: (when, command id).
    long: VecDeque<(Instant, Uuid)>,
    short: VecDeque<(Instant, Uuid)>,
}

impl Seen {
    /// Remembers `result` for `window` (the long one when `keyed_over_http`, else the
    /// saga's), forgetting what has outlived its window.
    fn insert(&mut self, result: CommandResult, keyed_over_http: bool, window: Duration) {
        let now = Instant::now();
        for (order, window) in [
            (&mut self.long, window),
            (&mut self.short, SAGA_DEDUP_WINDOW),
        ] {
            while let Some((at, id)) = order.front() {
                if now.duration_since(*at) < window {
                    break;
                }
                self.results.remove(id);
                order.pop_front();
            }
        }
        let order = if keyed_over_http {
            &mut self.long
        } else {
            &mut self.short
        };
        order.push_back((now, result.command_id));
        self.results.insert(result.command_id, result);
    }
}

/// What one transaction has built so far.
struct Txn<A> {
    /// Command ids already decided in this batch.
    in_batch: HashSet<Uuid>,
    /// Aggregates as they will be after the commit.
    staged: HashMap<String, Slot<A>>,
    pending: Vec<Pending>,
    event_sends: Vec<Delivery>,
}

impl<A> Default for Txn<A> {
    fn default() -> Self {
        Self {
            in_batch: HashSet::new(),
            staged: HashMap::new(),
            pending: Vec::new(),
            event_sends: Vec::new(),
        }
    }
}

/// Withdraws a worker's in-process registration when it ends.
struct OwnerGuard {
    shared: Arc<Shared>,
    stream: &'static str,
    partition: i32,
}

impl Drop for OwnerGuard {
    fn drop(&mut self) {
        self.shared.local.remove_owner(self.stream, self.partition);
    }
}

/// A command outcome being built inside a transaction.
struct Pending {
    command_id: Uuid,
    idempotent: bool,
    /// It came through the command topic: a request in another process may wait for it.
    remote: bool,
    /// Also write the outcome here (the saga's inbox).
    reply_to: Option<ReplyTo>,
    /// The command's type, for the metrics.
    command: String,
    outcome: Outcome,
}

enum Outcome {
    Done(CommandResult),
    /// Accepted: the body needs the offset of its last event, known after delivery.
    Accepted {
        aggregate_id: String,
        version: u64,
        created: bool,
        last_event: usize,
    },
}

pub(crate) struct PartitionWorker<A: CommandStream> {
    shared: Arc<Shared>,
    partition: i32,
    producer: TxnProducer,
    aggregates: HashMap<String, Slot<A>>,
    seen: Seen,
}

impl<A: CommandStream> PartitionWorker<A> {
    /// Fences the previous owner, rebuilds the partition's aggregates, then resumes the
    /// command partition and serves it until the channel closes (partition revoked).
    pub(crate) async fn run(
        shared: Arc<Shared>,
        partition: i32,
        mut commands: mpsc::Receiver<Work>,
        me: mpsc::Sender<Work>,
        revoked: CancellationToken,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let txn_id = format!("{}-{}-p{partition}", shared.kafka.topic_prefix, A::STREAM);
        let producer = TxnProducer::new(&shared.kafka, &txn_id).await?;
        // Fenced: the previous owner can commit nothing more, so the group's committed
        // offset is final now — start from it, not from what assignment fetched (a
        // retried commit of the old owner may have landed in between: its commands would
        // be decided twice).
        let topic = [shared.topics.commands(A::STREAM)];
        let consumer = shared.clone();
        tokio::task::spawn_blocking(move || {
            eventlog::group::seek_to_committed(&consumer.consumer, &topic, partition)
        })
        .await??;
        let aggregates = rebuild::<A>(&shared, partition).await?;
        let seen = recent_outcomes::<A>(&shared, partition).await?;
        info!(
            stream = A::STREAM,
            partition,
            aggregates = aggregates.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "partition rebuilt; taking commands"
        );
        let mut worker = Self {
            shared,
            partition,
            producer,
            aggregates,
            seen,
        };
        if let Err(e) = worker.shared.resume(partition) {
            // Revoked while rebuilding: the closed channel below ends this worker.
            warn!(stream = A::STREAM, partition, error = %e, "could not resume the partition");
        }
        let left = worker
            .shared
            .rebuilding
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            - 1;
        worker.shared.metrics.set_rebuilding(A::STREAM, left);
        // From now on the API of this process hands commands for this partition straight
        // here; the guard withdraws that when the worker ends, however it ends.
        worker.shared.local.set_owner(A::STREAM, partition, me);
        let _owner = OwnerGuard {
            shared: worker.shared.clone(),
            stream: A::STREAM,
            partition,
        };

        loop {
            let first = tokio::select! {
                biased;
                _ = revoked.cancelled() => break,
                work = commands.recv() => match work {
                    Some(work) => work,
                    None => break,
                },
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match commands.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            if let Err(err) = worker.process(&batch).await {
                // Commands handed over in-process exist nowhere else: send them through
                // the command topic to the next owner, unless the commit may have happened.
                commands.close();
                let mut unsent: Vec<Work> = Vec::new();
                if !CommitError::is_uncertain(&err) {
                    unsent.extend(batch);
                }
                while let Ok(work) = commands.try_recv() {
                    unsent.push(work);
                }
                for work in unsent {
                    if let Work::Direct(envelope) = work {
                        worker.shared.local.bounce(A::STREAM, envelope);
                    }
                }
                return Err(err);
            }
        }
        // Revoked: what is still queued goes to the next owner — commands read from the
        // topic are read again from the committed offset, in-process ones are passed on.
        commands.close();
        while let Ok(work) = commands.try_recv() {
            if let Work::Direct(envelope) = work {
                worker.shared.local.bounce(A::STREAM, envelope);
            }
        }
        info!(stream = A::STREAM, partition, "partition released");
        Ok(())
    }

    async fn process(&mut self, batch: &[Work]) -> anyhow::Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.transact(batch).await {
                Ok((staged, results, decided, events)) => {
                    self.aggregates.extend(staged);
                    for (result, idempotent, keyed_over_http) in results {
                        self.shared.local.complete(&result);
                        if idempotent {
                            self.seen
                                .insert(result, keyed_over_http, self.shared.dedup_window);
                        }
                    }
                    self.shared
                        .metrics
                        .record_batch(A::STREAM, &decided, events);
                    debug!(
                        stream = A::STREAM,
                        partition = self.partition,
                        commands = batch.len(),
                        "batch committed"
                    );
                    return Ok(());
                }
                // Aborting a commit of unknown outcome and deciding the batch again would
                // append its events twice if the commit went through.
                Err(err) if CommitError::is_uncertain(&err) => {
                    return Err(err.context(format!(
                        "{} partition {}: the commit's outcome is unknown; the processor restarts and the log decides",
                        A::STREAM,
                        self.partition
                    )))
                }
                Err(err) => {
                    let kind = CommitError::kafka_error(&err)
                        .map(classify)
                        .unwrap_or(TxnErrorKind::Fatal);
                    if kind == TxnErrorKind::Fatal || attempt >= MAX_ATTEMPTS {
                        return Err(err.context(format!(
                            "{} partition {} gave up a batch of {} ({kind:?}); the processor restarts and rebuilds",
                            A::STREAM,
                            self.partition,
                            batch.len()
                        )));
                    }
                    warn!(stream = A::STREAM, partition = self.partition, attempt, error = %err, "transaction failed; aborting and retrying the batch");
                    if let Err(abort) = self.producer.abort().await {
                        if classify(&abort) == TxnErrorKind::Fatal {
                            return Err(
                                anyhow::Error::new(abort).context("aborting a failed transaction")
                            );
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50 * attempt as u64)).await;
                }
            }
        }
    }

    /// Runs one batch in one transaction. Nothing in `self` changes here: the staged
    /// aggregates and results are returned for the caller to apply after the commit.
    #[allow(clippy::type_complexity)]
    async fn transact(
        &self,
        batch: &[Work],
    ) -> anyhow::Result<(
        HashMap<String, Slot<A>>,
        Vec<(CommandResult, bool, bool)>,
        Vec<(String, u16)>,
        usize,
    )> {
        let topics = &self.shared.topics;
        self.producer.begin().await?;
        let mut txn = Txn::default();
        let mut other_sends = Vec::new();
        let now = Utc::now();

        let mut last_consumed = None;
        for work in batch {
            let message = match work {
                Work::Direct(envelope) => {
                    self.decide(envelope, false, &mut txn, now).await?;
                    continue;
                }
                Work::Consumed(message) => message,
            };
            last_consumed = last_consumed.max(Some(message.offset()));
            let envelope: CommandEnvelope = match message.payload().map(serde_json::from_slice) {
                Some(Ok(envelope)) => envelope,
                other => {
                    let error = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => "empty record".to_string(),
                    };
                    warn!(stream = A::STREAM, partition = self.partition, offset = message.offset(), %error, "undecodable command; dead-lettered");
                    other_sends.push(self.dead_letter(message, &error)?);
                    continue;
                }
            };
            self.decide(&envelope, true, &mut txn, now).await?;
        }

        // Results carry the events' offsets (the consistency token), so the events'
        // deliveries are awaited first; all of it still commits or aborts as one.
        let Txn {
            staged,
            pending,
            event_sends,
            ..
        } = txn;
        let events = event_sends.len();
        let offsets: Vec<i64> = self
            .producer
            .flush(event_sends)
            .await?
            .into_iter()
            .map(|(_, offset)| offset)
            .collect();
        let mut results = Vec::with_capacity(pending.len());
        let mut decided = Vec::with_capacity(pending.len());
        for p in pending {
            let result = match p.outcome {
                Outcome::Done(result) => result,
                Outcome::Accepted {
                    aggregate_id,
                    version,
                    created,
                    last_event,
                } => {
                    let token = ConsistencyToken {
                        stream: A::STREAM.to_string(),
                        positions: vec![Position {
                            partition: self.partition,
                            offset: offsets[last_event],
                        }],
                    };
                    CommandResult {
                        command_id: p.command_id,
                        idempotent: p.idempotent,
                        status: if created { 201 } else { 200 },
                        body: json!({ "aggregate_id": aggregate_id, "version": version, "consistency_token": token.encode() }),
                    }
                }
            };
            let payload = serde_json::to_vec(&result)?;
            let key = result.command_id.to_string();
            // A remote request waits on the results topic.
            if p.remote {
                other_sends.push(self.producer.send(
                    &topics.command_results(),
                    self.partition,
                    &key,
                    &payload,
                    OwnedHeaders::new(),
                )?);
            }
            // A keyed outcome is the record a new owner reloads: the authority for
            // exactly-once, written in the same transaction as the command's events.
            let keyed_over_http = p.idempotent && p.reply_to.is_none();
            if keyed_over_http {
                other_sends.push(self.producer.send(
                    &topics.command_outcomes(A::STREAM),
                    self.partition,
                    &key,
                    &payload,
                    OwnedHeaders::new(),
                )?);
            }
            if let Some(reply) = &p.reply_to {
                other_sends.push(self.producer.send(
                    &reply.topic,
                    reply.partition,
                    &reply.key,
                    &payload,
                    OwnedHeaders::new(),
                )?);
            }
            decided.push((p.command, result.status));
            results.push((result, p.idempotent, keyed_over_http));
        }

        if let Some(last) = last_consumed {
            let mut consumed = TopicPartitionList::new();
            consumed.add_partition_offset(
                &topics.commands(A::STREAM),
                self.partition,
                Offset::Offset(last + 1),
            )?;
            let group = self
                .shared
                .consumer
                .group_metadata()
                .context("no consumer group metadata")?;
            self.producer.send_offsets(consumed, group).await?;
        }
        self.producer
            .commit(other_sends)
            .await
            .map_err(anyhow::Error::new)?;
        Ok((staged, results, decided, events))
    }

    /// Decides one command inside the open transaction: its events are sent, its
    /// aggregate staged and its outcome added to the transaction's pending outcomes.
    async fn decide(
        &self,
        envelope: &CommandEnvelope,
        remote: bool,
        txn: &mut Txn<A>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        let events_topic = self.shared.topics.events(A::STREAM);
        if !txn.in_batch.insert(envelope.command_id) {
            // The same command twice in one batch (say handed over in-process and read
            // from the topic for a request in another process): the first's outcome
            // answers both, so it goes wherever either needs it.
            if let Some(first) = txn
                .pending
                .iter_mut()
                .find(|p| p.command_id == envelope.command_id)
            {
                first.remote |= remote;
                if first.reply_to.is_none() {
                    first.reply_to = envelope.reply_to.clone();
                }
            }
            return Ok(());
        }
        if let Some(previous) = self.seen.results.get(&envelope.command_id) {
            txn.pending.push(Pending {
                command_id: envelope.command_id,
                idempotent: false,
                remote,
                reply_to: envelope.reply_to.clone(),
                command: crate::metrics::command_name(&envelope.command),
                outcome: Outcome::Done(previous.clone()),
            });
            return Ok(());
        }
        let id = envelope.aggregate_id.clone();
        let slot = txn
            .staged
            .get(&id)
            .or_else(|| self.aggregates.get(&id))
            .cloned()
            .unwrap_or_default();
        let rejected = |error: api::ApiError| {
            Outcome::Done(CommandResult {
                command_id: envelope.command_id,
                status: error.status.as_u16(),
                body: error.body(),
                idempotent: envelope.idempotent,
            })
        };
        let outcome = match (
            envelope.expected_version,
            serde_json::from_value::<A::Command>(envelope.command.clone()),
        ) {
            // A customer acts only on its own orders, judged against the write model.
            _ if api::auth::actor_customer(envelope.actor.as_deref()).is_some_and(|customer| {
                slot.state.owner().is_some_and(|owner| owner != customer)
            }) =>
            {
                rejected(api::auth::forbidden(
                    "this token's customer may act only on its own orders",
                ))
            }
            _ if envelope.deadline.is_some_and(|deadline| now > deadline) => {
                rejected(api::ApiError::new(
                    axum::http::StatusCode::REQUEST_TIMEOUT,
                    "command_expired",
                    "the command reached its processor after its deadline; nothing was changed",
                ))
            }
            (Some(expected), _) if expected != slot.version => {
                rejected(version_conflict(expected, slot.version))
            }
            (_, Err(e)) => rejected(api::ApiError::malformed(format!(
                "not a {} command: {e}",
                A::STREAM
            ))),
            (_, Ok(command)) => {
                let mut state = slot.state.clone();
                let sink = EventSink::default();
                match state.handle(command, &(), &sink).await {
                    Err(e) => rejected(A::rejection(&e)),
                    Ok(()) => {
                        let events = sink.collect().await;
                        let metadata = EventMetadata {
                            command_id: Some(envelope.command_id.to_string()),
                            correlation_id: envelope.correlation_id.clone(),
                            causation_id: Some(envelope.command_id.to_string()),
                            actor: envelope.actor.clone(),
                            traceparent: envelope.traceparent.clone(),
                        };
                        let mut version = slot.version;
                        for event in &events {
                            version += 1;
                            let record = EventEnvelope::wrap::<A>(
                                &id,
                                version,
                                event,
                                metadata.clone(),
                                now,
                            )?;
                            let payload = serde_json::to_vec(&record)?;
                            txn.event_sends.push(self.producer.send(
                                &events_topic,
                                self.partition,
                                &id,
                                &payload,
                                record.kafka_headers(),
                            )?);
                        }
                        txn.staged.insert(id.clone(), Slot { state, version });
                        Outcome::Accepted {
                            aggregate_id: id.clone(),
                            version,
                            created: slot.version == 0,
                            last_event: txn.event_sends.len().saturating_sub(1),
                        }
                    }
                }
            }
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            let status = match &outcome {
                Outcome::Done(result) => result.status,
                Outcome::Accepted { created: true, .. } => 201,
                Outcome::Accepted { .. } => 200,
            };
            debug!(
                stream = A::STREAM,
                partition = self.partition,
                command_id = %envelope.command_id,
                aggregate_id = %envelope.aggregate_id,
                correlation_id = envelope.correlation_id.as_deref().unwrap_or_default(),
                trace_id = envelope.traceparent.as_deref().and_then(eventlog::trace::trace_id).unwrap_or_default(),
                actor = envelope.actor.as_deref().unwrap_or_default(),
                status,
                "command decided"
            );
        }
        txn.pending.push(Pending {
            command_id: envelope.command_id,
            idempotent: envelope.idempotent,
            remote,
            reply_to: envelope.reply_to.clone(),
            command: crate::metrics::command_name(&envelope.command),
            outcome,
        });
        Ok(())
    }

    fn dead_letter(&self, message: &OwnedMessage, error: &str) -> anyhow::Result<Delivery> {
        let source = format!(
            "{}/{}/{}",
            message.topic(),
            message.partition(),
            message.offset()
        );
        let headers =
            eventlog::dead_letter_headers(error, &source, &format!("{} processor", A::STREAM));
        let key = message
            .key()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        Ok(self.producer.send(
            &self.shared.topics.dead_letters(),
            0,
            &key,
            message.payload().unwrap_or_default(),
            headers,
        )?)
    }
}

/// Outcomes of keyed commands written to this partition within their windows, so that a
/// retry reaching a new owner is answered, not applied again: HTTP-keyed ones from the
/// stream's outcomes topic over the dedup window, the saga's (and, for logs written
/// before the outcomes topics existed, every keyed one) from the results topic over the
/// saga's window.
async fn recent_outcomes<A: CommandStream>(
    shared: &Shared,
    partition: i32,
) -> anyhow::Result<Seen> {
    let mut seen = Seen::default();
    let sources = [
        (
            shared.topics.command_outcomes(A::STREAM),
            shared.dedup_window,
            true,
        ),
        (shared.topics.command_results(), SAGA_DEDUP_WINDOW, false),
    ];
    for (topic, window, keyed_over_http) in sources {
        let since = Utc::now() - chrono::Duration::from_std(window).unwrap_or_default();
        let from =
            offset_for_time(&shared.kafka, &topic, partition, since.timestamp_millis()).await?;
        read_partition(&shared.kafka, &topic, partition, from, |message| {
            if let Some(Ok(result)) = message
                .payload()
                .map(serde_json::from_slice::<CommandResult>)
            {
                if result.idempotent {
                    seen.insert(result, keyed_over_http, shared.dedup_window);
                }
            }
            Ok(())
        })
        .await
        .with_context(|| format!("reloading recent outcomes from {topic}/{partition}"))?;
    }
    Ok(seen)
}

/// Folds every committed event of the partition into its aggregates.
async fn rebuild<A: CommandStream>(
    shared: &Shared,
    partition: i32,
) -> anyhow::Result<HashMap<String, Slot<A>>> {
    let mut aggregates: HashMap<String, Slot<A>> = HashMap::new();
    let topic = shared.topics.events(A::STREAM);
    read_partition(&shared.kafka, &topic, partition, 0, |message| {
        let envelope: EventEnvelope = serde_json::from_slice(message.payload().unwrap_or_default())
            .with_context(|| {
                format!(
                    "event at {topic}/{partition}/{} is not an envelope",
                    message.offset()
                )
            })?;
        let event = envelope.decode::<A::Event>().with_context(|| {
            format!(
                "event {} at offset {} does not decode",
                envelope.event_type,
                message.offset()
            )
        })?;
        let slot = aggregates.entry(envelope.aggregate_id).or_default();
        if envelope.sequence != slot.version + 1 {
            bail!(
                "sequence gap in {topic}/{partition}: {} after {}",
                envelope.sequence,
                slot.version
            );
        }
        slot.state.apply(event);
        slot.version = envelope.sequence;
        Ok(())
    })
    .await
    .with_context(|| format!("rebuilding {topic}/{partition}"))?;
    Ok(aggregates)
}

//! One owned partition of a command stream, on the partition-owner runtime
//! (`eventlog::owner`): fence older owners, restore the partition's aggregates (local
//! store + changelog, `eventlog::state`), then handle commands in batches, each batch ONE
//! Kafka transaction of events, new aggregate states, results and consumed offsets. The
//! cache and the local store change only after the commit.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use eventlog::owner::{after_failure, Partition};
use eventlog::rdkafka::message::{BorrowedMessage, Message, OwnedHeaders, OwnedMessage};
use eventlog::state::{self, Changed, Kept, PartitionState, RestoreSpec};
use eventlog::{
    offset_for_time, read_partition, CommitError, Delivery, EventEnvelope, EventMetadata,
    TxnProducer,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::local::Work;
use crate::processor::Shared;
use crate::stream::{version_conflict, CommandStream};
use crate::wire::{CommandEnvelope, CommandResult, ReplyTo};
use eventlog::{Code, ConsistencyToken, Outcome, Position};

/// Most commands in one transaction.
const MAX_BATCH: usize = 1_000;

/// One aggregate with its version (the sequence of its last event): what the cache holds
/// and the changelog and local store keep as JSON.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(bound(
    serialize = "A: Serialize",
    deserialize = "A: serde::de::DeserializeOwned"
))]
pub(crate) struct Slot<A> {
    version: u64,
    state: A,
}

/// How long a saga's commands are remembered. A saga's step commits its commands with
/// its own state, so it resends one only in the moments around a crash; its ids are
/// deterministic, and this catches those resends.
const SAGA_DEDUP_WINDOW: Duration = Duration::from_secs(900);

/// How often expired entries of the dedup record are swept from the store.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Fewest entries one sweep may remove; it removes at least twice what was kept since the
/// last one, so the record cannot grow faster than it is swept.
const SWEEP_LIMIT: usize = 10_000;

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
    me: mpsc::Sender<Work>,
}

impl Drop for OwnerGuard {
    fn drop(&mut self) {
        // Only this worker's registration: a newer worker of the partition may have its own.
        self.shared
            .local
            .remove_owner_if(self.stream, self.partition, &self.me);
    }
}

/// An error after the batch's transaction committed: its commands are decided, so they
/// are never handed on to another owner.
#[derive(Debug)]
struct AfterCommit;

impl std::fmt::Display for AfterCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the batch committed, but recording it locally failed")
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
    outcome: Decided,
}

impl Pending {
    /// Its outcome is written to a topic in the command's transaction.
    fn recorded(&self) -> bool {
        self.remote || self.idempotent || self.reply_to.is_some()
    }
}

enum Decided {
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
    owned: Partition,
    partition: i32,
    producer: TxnProducer,
    /// The aggregates, and the dedup record: outcomes of keyed commands (ADR 8, 10).
    aggregates: PartitionState<Slot<A>>,
    last_sweep: Instant,
    /// Entries kept since the last sweep.
    kept_since_sweep: usize,
}

impl<A: CommandStream> PartitionWorker<A> {
    /// Fences the previous owner, restores the partition's aggregates, then resumes the
    /// command partition and serves it until the partition is revoked.
    pub(crate) async fn run(
        shared: Arc<Shared>,
        mut owned: Partition,
        mut commands: mpsc::Receiver<Work>,
        me: mpsc::Sender<Work>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let partition = owned.partition;
        let txn_id = format!("{}-{}-p{partition}", shared.kafka.topic_prefix, A::STREAM);
        let Some(producer) = owned.fence(&shared.kafka, &txn_id).await? else {
            info!(
                stream = A::STREAM,
                partition, "revoked before it was fenced; nothing to hand over"
            );
            return Ok(());
        };
        let topics = &shared.topics;
        let restored = match state::restore(
            RestoreSpec {
                kafka: &shared.kafka,
                config: &shared.state,
                metrics: &shared.state_metrics,
                stream: A::STREAM,
                partition,
                schema: A::STATE_SCHEMA,
                changelog: topics.state(A::STREAM),
                events: topics.events(A::STREAM),
                revoked: &owned.revoked,
            },
            None,
            fold::<A>,
        )
        .await
        {
            Err(_) if owned.revoked.is_cancelled() => return Ok(()),
            restored => restored?,
        };
        let mut aggregates = restored.state;
        if let Some(states) = restored.to_seed {
            seed(&producer, &shared, partition, &mut aggregates, states).await?;
        }
        restore_outcomes::<A>(&shared, partition, &mut aggregates).await?;
        info!(
            stream = A::STREAM,
            partition,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "partition restored; taking commands"
        );
        if !owned.ready() {
            info!(
                stream = A::STREAM,
                partition, "revoked while restoring; nothing to hand over"
            );
            return Ok(());
        }
        let revoked = owned.revoked.clone();
        let mut worker = Self {
            shared,
            owned,
            partition,
            producer,
            aggregates,
            last_sweep: Instant::now(),
            kept_since_sweep: 0,
        };
        // From now on the API of this process hands commands for this partition straight
        // here; the guard withdraws that when the worker ends, however it ends.
        worker
            .shared
            .local
            .set_owner(A::STREAM, partition, me.clone());
        let _owner = OwnerGuard {
            shared: worker.shared.clone(),
            stream: A::STREAM,
            partition,
            me,
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
                if !CommitError::is_uncertain(&err) && err.downcast_ref::<AfterCommit>().is_none() {
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
        if self.last_sweep.elapsed() >= SWEEP_EVERY {
            self.last_sweep = Instant::now();
            let now = Utc::now().timestamp_millis();
            let limit = SWEEP_LIMIT.max(2 * std::mem::take(&mut self.kept_since_sweep));
            let swept = state::blocking(|| self.aggregates.sweep(now, limit))?;
            if swept > 0 {
                debug!(
                    stream = A::STREAM,
                    partition = self.partition,
                    swept,
                    "expired outcomes forgotten"
                );
            }
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.transact(batch).await {
                Ok((changed, next_changelog, results, kept_next, decided, events)) => {
                    let expires_ms =
                        Utc::now().timestamp_millis() + self.shared.dedup_window.as_millis() as i64;
                    let mut kept = Vec::new();
                    for (result, payload, idempotent) in results {
                        self.shared.local.complete(&result);
                        if idempotent {
                            kept.push(Kept {
                                id: result.command_id.as_u128(),
                                expires_ms,
                                bytes: payload,
                            });
                        }
                    }
                    // Committed already: a failure here restarts the owner, which
                    // restores from the changelog and the outcomes topic, and hands
                    // nothing on.
                    self.kept_since_sweep += kept.len();
                    let topic = self.shared.topics.command_outcomes(A::STREAM);
                    let kept = kept_next.map(|next| (kept, topic.as_str(), Some(next)));
                    self.aggregates
                        .commit(changed, next_changelog, kept)
                        .map_err(|e| e.context(AfterCommit))?;
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
                Err(err) => {
                    let what = format!(
                        "{} partition {}: a batch of {}",
                        A::STREAM,
                        self.partition,
                        batch.len()
                    );
                    after_failure(&self.producer, err, attempt, what).await?;
                }
            }
        }
    }

    /// Runs one batch in one transaction. Nothing in `self` changes here: the staged
    /// aggregates and results are returned for the caller to apply after the commit.
    #[allow(clippy::type_complexity)]
    async fn transact(
        &mut self,
        batch: &[Work],
    ) -> anyhow::Result<(
        Vec<Changed<Slot<A>>>,
        Option<(i64, i64)>,
        Vec<(CommandResult, Vec<u8>, bool)>,
        Option<i64>,
        Vec<(String, u16)>,
        usize,
    )> {
        let topics = self.shared.topics.clone();
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

        let Txn {
            staged,
            pending,
            event_sends,
            ..
        } = txn;
        // The new state of each aggregate changed, in the same transaction as its events
        // and sent with them: one produce round trip for both.
        let (changed, state_sends) = state::send_states(
            &self.producer,
            &topics.state(A::STREAM),
            self.partition,
            A::STATE_SCHEMA,
            self.aggregates.events_next(),
            staged,
        )?;
        // Results carry the events' offsets (the consistency token), so the events'
        // deliveries are awaited first; all of it still commits or aborts as one.
        let (events, states) = (event_sends.len(), state_sends.len());
        // The states' deliveries are awaited with the rest at the commit: no round trip
        // of their own. They go first, so their offsets are the first landed.
        let mut sends = state_sends;
        // Where the dedup record's entries go, to know how far its topic is kept.
        let mut outcome_sends = Vec::new();
        let mut pending = Some(pending);
        // An outcome that is a record of this transaction (a remote request's result, a
        // keyed outcome, a saga's reply) carries the events' offsets (the consistency
        // token): the events are delivered first for it. When every outcome is only
        // answered in this process, their offsets come with the commit: one produce
        // round trip fewer (the usual case for HTTP commands without a key).
        let settled = if pending.iter().flatten().any(Pending::recorded) {
            let offsets: Vec<i64> = self
                .producer
                .flush(event_sends)
                .await?
                .into_iter()
                .map(|(_, offset)| offset)
                .collect();
            sends.extend(other_sends);
            let pending = pending.take().unwrap_or_default();
            let settled = self.settle(pending, &offsets, &mut sends, &mut outcome_sends)?;
            Some((offsets, settled))
        } else {
            sends.extend(event_sends);
            sends.extend(other_sends);
            None
        };

        if let Some(last) = last_consumed {
            let topic = topics.commands(A::STREAM);
            self.owned
                .send_offsets(&self.producer, [(topic.as_str(), last + 1)])
                .await?;
        }
        let landed = self
            .producer
            .commit(sends)
            .await
            .map_err(anyhow::Error::new)?;
        let (offsets, (results, decided)) = match settled {
            Some(settled) => settled,
            None => {
                let offsets: Vec<i64> = landed[states..states + events]
                    .iter()
                    .map(|(_, offset)| *offset)
                    .collect();
                let pending = pending.take().unwrap_or_default();
                let settled = self.settle(pending, &offsets, &mut Vec::new(), &mut Vec::new())?;
                (offsets, settled)
            }
        };
        let events_next = offsets
            .last()
            .map_or(self.aggregates.events_next(), |last| last + 1);
        let next_changelog = state::changelog_next(&landed, states, events_next);
        let kept_next = outcome_sends.iter().map(|&i| landed[i].1 + 1).max();
        Ok((changed, next_changelog, results, kept_next, decided, events))
    }

    /// The outcome of each decided command, its token made from the offsets its events
    /// landed at; the records an outcome is written to are sent into `sends` (the
    /// dedup record's positions in it into `outcome_sends`).
    #[allow(clippy::type_complexity)]
    fn settle(
        &self,
        pending: Vec<Pending>,
        offsets: &[i64],
        sends: &mut Vec<Delivery>,
        outcome_sends: &mut Vec<usize>,
    ) -> anyhow::Result<(Vec<(CommandResult, Vec<u8>, bool)>, Vec<(String, u16)>)> {
        let topics = &self.shared.topics;
        let mut results = Vec::with_capacity(pending.len());
        let mut decided = Vec::with_capacity(pending.len());
        for p in pending {
            let result = match p.outcome {
                Decided::Done(result) => result,
                Decided::Accepted {
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
                        outcome: Outcome::Accepted {
                            aggregate_id,
                            version,
                            created,
                            token: token.encode(),
                        },
                    }
                }
            };
            let payload = serde_json::to_vec(&result)?;
            let key = result.command_id.to_string();
            // A remote request waits on the results topic.
            if p.remote {
                sends.push(self.producer.send(
                    &topics.command_results(),
                    self.partition,
                    &key,
                    &payload,
                    OwnedHeaders::new(),
                )?);
            }
            // A keyed outcome (over HTTP, or a saga's) is the record a new owner reloads:
            // the authority for exactly-once, written in the same transaction as the
            // command's events, to a topic this owner alone writes (fenced).
            if p.idempotent {
                outcome_sends.push(sends.len());
                sends.push(self.producer.send(
                    &topics.command_outcomes(A::STREAM),
                    self.partition,
                    &key,
                    &payload,
                    OwnedHeaders::new(),
                )?);
            }
            if let Some(reply) = &p.reply_to {
                sends.push(self.producer.send(
                    &reply.topic,
                    reply.partition,
                    &reply.key,
                    &payload,
                    OwnedHeaders::new(),
                )?);
            }
            decided.push((p.command, crate::http::status(&result.outcome).as_u16()));
            results.push((result, payload, p.idempotent));
        }
        Ok((results, decided))
    }

    /// Decides one command inside the open transaction: its events are sent, its
    /// aggregate staged and its outcome added to the transaction's pending outcomes.
    async fn decide(
        &mut self,
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
        let previous = if envelope.idempotent {
            self.aggregates
                .kept(envelope.command_id.as_u128(), now.timestamp_millis())?
                .and_then(|bytes| match serde_json::from_slice::<CommandResult>(&bytes) {
                    Ok(previous) => Some(previous),
                    Err(e) => {
                        // Written by a version that knew more (a rollback): a repeat
                        // cannot be told from a first, so it is decided again.
                        warn!(stream = A::STREAM, command_id = %envelope.command_id, error = %e, "a kept outcome does not decode; deciding the command");
                        None
                    }
                })
        } else {
            None
        };
        if let Some(previous) = previous {
            txn.pending.push(Pending {
                command_id: envelope.command_id,
                idempotent: false,
                remote,
                reply_to: envelope.reply_to.clone(),
                command: crate::metrics::command_name(&envelope.command),
                outcome: Decided::Done(previous),
            });
            return Ok(());
        }
        let id = envelope.aggregate_id.clone();
        let slot = match txn.staged.get(&id) {
            Some(slot) => slot.clone(),
            None => self.aggregates.get(&id)?.unwrap_or_default(),
        };
        let rejected = |outcome: Outcome| {
            Decided::Done(CommandResult {
                command_id: envelope.command_id,
                outcome,
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
                rejected(Outcome::rejected(
                    Code::Forbidden,
                    "this token's customer may act only on its own orders",
                ))
            }
            _ if envelope.deadline.is_some_and(|deadline| now > deadline) => {
                rejected(Outcome::rejected(
                    Code::CommandExpired,
                    "the command reached its processor after its deadline; nothing was changed",
                ))
            }
            (Some(expected), _) if expected != slot.version => {
                rejected(version_conflict(expected, slot.version))
            }
            (_, Err(e)) => rejected(Outcome::rejected(
                Code::MalformedRequest,
                format!("not a {} command: {e}", A::STREAM),
            )),
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
                        Decided::Accepted {
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
                Decided::Done(result) => result.outcome.refusal().unwrap_or("accepted"),
                Decided::Accepted { .. } => "accepted",
            };
            debug!(
                stream = A::STREAM,
                partition = self.partition,
                command_id = %envelope.command_id,
                aggregate_id = %envelope.aggregate_id,
                correlation_id = envelope.correlation_id.as_deref().unwrap_or_default(),
                trace_id = envelope.traceparent.as_deref().and_then(eventlog::trace::trace_id).unwrap_or_default(),
                actor = envelope.actor.as_deref().unwrap_or_default(),
                outcome = status,
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

/// Brings the dedup record in the store up to date, so that a retry reaching a new owner
/// is answered, not applied again: the outcomes of keyed commands (over HTTP or a saga's)
/// from the stream's outcomes topic over the dedup window, from where the store has kept
/// it to. Then, with no position kept, the saga's window of the shared results topic: the
/// only record of a saga's commands decided by a version before the outcomes topic had
/// them (a log written before the upgrade).
async fn restore_outcomes<A: CommandStream>(
    shared: &Shared,
    partition: i32,
    store: &mut PartitionState<Slot<A>>,
) -> anyhow::Result<()> {
    const CHUNK: usize = 10_000;
    let outcomes = shared.topics.command_outcomes(A::STREAM);
    // Its end: this owner alone writes the topic and has fenced the previous one, so no
    // transaction of it is open; a position past the end means it was recreated.
    let (_, end) = eventlog::watermarks(&shared.kafka, &outcomes, partition).await?;
    if store.kept_next(&outcomes)? > end {
        state::blocking(|| store.forget_kept())?;
    }
    let sources = [
        (outcomes, shared.dedup_window, true),
        (shared.topics.command_results(), SAGA_DEDUP_WINDOW, false),
    ];
    for (topic, window, positioned) in sources {
        let window_ms = window.as_millis() as i64;
        let since = Utc::now().timestamp_millis() - window_ms;
        let mut from = offset_for_time(&shared.kafka, &topic, partition, since).await?;
        if positioned {
            from = from.max(store.kept_next(&topic)?);
        }
        let position = |next: i64| positioned.then_some(next);
        let mut chunk = Vec::new();
        let end = read_partition(&shared.kafka, &topic, partition, from, |message| {
            if let Some(Ok(result)) = message
                .payload()
                .map(serde_json::from_slice::<CommandResult>)
            {
                if result.idempotent {
                    let at = message.timestamp().to_millis().unwrap_or(since + window_ms);
                    chunk.push(Kept {
                        id: result.command_id.as_u128(),
                        expires_ms: at + window_ms,
                        bytes: message.payload().unwrap_or_default().to_vec(),
                    });
                }
            }
            if chunk.len() >= CHUNK {
                let entries = std::mem::take(&mut chunk);
                let next = position(message.offset() + 1);
                state::blocking(|| store.keep(entries, &topic, next))?;
            }
            Ok(())
        })
        .await
        .with_context(|| format!("reloading recent outcomes from {topic}/{partition}"))?;
        state::blocking(|| store.keep(chunk, &topic, position(end)))?;
    }
    Ok(())
}

/// Folds one committed event into the aggregates being rebuilt (a rebuild from the
/// events: schema change, upgrade, `tally rebuild-state`).
fn fold<A: CommandStream>(
    aggregates: &mut HashMap<String, Slot<A>>,
    message: &BorrowedMessage<'_>,
) -> anyhow::Result<bool> {
    let Some((envelope, event)) = state::next_event::<A::Event>(message, |id| {
        aggregates.get(id).map_or(0, |slot| slot.version)
    })?
    else {
        return Ok(false);
    };
    let slot = aggregates.entry(envelope.aggregate_id).or_default();
    slot.state.apply(event);
    slot.version = envelope.sequence;
    Ok(true)
}

/// Writes states folded from events the changelog did not cover to the changelog, in
/// one transaction, then to the local store.
async fn seed<A: CommandStream>(
    producer: &TxnProducer,
    shared: &Shared,
    partition: i32,
    aggregates: &mut PartitionState<Slot<A>>,
    seed: state::Seed<Slot<A>>,
) -> anyhow::Result<()> {
    producer.begin().await?;
    let changelog = shared.topics.state(A::STREAM);
    let (sends, changed) = state::seed(producer, &changelog, partition, A::STATE_SCHEMA, &seed)?;
    let landed = producer.commit(sends).await.map_err(anyhow::Error::new)?;
    info!(
        stream = A::STREAM,
        partition,
        aggregates = changed.len(),
        full = seed.full,
        "states folded from the events written to the changelog"
    );
    match landed.last() {
        Some((_, offset)) => aggregates.committed(changed, offset + 1, seed.events_next),
        None => Ok(()),
    }
}

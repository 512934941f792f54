//! The saga orchestrator on Kafka (DESIGN.md §4), on the partition-owner runtime
//! (`eventlog::owner`). An owner group of the order events and the saga inbox —
//! co-partitioned, and assigned with the `range` strategy so that one member owns
//! partition `n` of both. Per owned partition a worker fences the previous owner
//! (transactional id per partition), restores its sagas (local store + changelog,
//! `eventlog::state`), then runs every step as ONE transaction: saga events, the sagas'
//! new states, outgoing commands (each naming the inbox partition for its reply) and the
//! consumed offsets. Deadlines are in the sagas' state; the owner keeps an index of the
//! running sagas' deadlines and fires them from a timer, as steps of their own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregates::{OrderEvent, OrderId, OrderStatus};
use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use eventlog::owner::{self, after_failure, OwnerSpec, OwnerStatus, Partition};
use eventlog::rdkafka::message::{BorrowedMessage, Message, OwnedMessage};
use eventlog::state::{self, Changed, PartitionState, RestoreSpec, StateConfig, StateMetrics};
use eventlog::{
    partition_for, CommandEnvelope, CommandResult, EventEnvelope, EventMetadata, KafkaConfig,
    ReplyTo, Topics, TxnProducer,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::fulfilment::{Deadlines, Fulfilment, FulfilmentEvent, Input, SagaLine, STREAM};
use crate::metrics::SagaMetrics;
use aggregates::streams;

/// Most inputs in one transaction.
const MAX_BATCH: usize = 500;
/// How often the owner looks for deadlines that passed.
const TICK: Duration = Duration::from_millis(100);
/// How long a busy worker waits for more inputs before it writes a step.
const GATHER: Duration = Duration::from_millis(5);
/// The version of a saga's JSON form in the changelog and local store (ADR 10).
const STATE_SCHEMA: u32 = 1;

/// Settings of the saga orchestrator.
#[derive(Clone)]
pub struct SagaConfig {
    pub kafka: KafkaConfig,
    pub deadlines: Deadlines,
    /// Where and how many sagas each owned partition keeps.
    pub state: StateConfig,
}

/// Handles for the caller: readiness and metrics of a running orchestrator.
#[derive(Clone, Default)]
pub struct SagaRuntimeStatus {
    /// Joined its group, and how many owned partitions are still restoring.
    pub owner: OwnerStatus,
    pub metrics: SagaMetrics,
    pub state_metrics: StateMetrics,
}

struct Shared {
    config: SagaConfig,
    topics: Topics,
    status: SagaRuntimeStatus,
}

/// Runs the orchestrator until `shutdown`, or until a partition worker fails (e.g.
/// fenced), which ends it with that error so the caller can restart it.
pub async fn run(
    config: SagaConfig,
    status: SagaRuntimeStatus,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let topics = Topics::new(&config.kafka.topic_prefix);
    let group = format!("{}.{STREAM}", config.kafka.topic_prefix);
    // `range`: partition n of both topics to the same member, so the order's events and
    // the replies to its saga's commands meet in one worker.
    let spec = OwnerSpec {
        group: group.clone(),
        assignment: "range",
        topics: vec![topics.events(streams::ORDER), topics.inbox(STREAM)],
        name: STREAM,
    };
    let kafka = config.kafka.clone();
    let metrics = status.metrics.clone();
    info!("saga orchestrator started");
    let shared = Arc::new(Shared {
        config,
        topics,
        status: status.clone(),
    });
    owner::run(
        &kafka,
        spec,
        status.owner.clone(),
        move |statistics| metrics.record_lag(&group, statistics),
        shutdown,
        move |partition, inputs, _me| Worker::run(shared.clone(), partition, inputs),
    )
    .await
}

/// One saga as its owner holds it, and as the changelog and local store keep it.
#[derive(Clone, Default, Serialize, Deserialize)]
struct Slot {
    state: Fulfilment,
    version: u64,
    /// Carried from the `OrderPlaced` that started it into every event and command.
    correlation_id: Option<String>,
    traceparent: Option<String>,
}

struct Worker {
    shared: Arc<Shared>,
    owned: Partition,
    partition: i32,
    producer: TxnProducer,
    sagas: PartitionState<Slot>,
    /// Running sagas waiting on a deadline, and the earliest one.
    deadlines: HashMap<String, DateTime<Utc>>,
    /// Running sagas of this partition (for the gauge).
    running: i64,
}

/// One input for one saga, with where it came from.
struct Work {
    saga_id: String,
    input: Input,
    metadata: Option<EventMetadata>,
}

impl Worker {
    async fn run(
        shared: Arc<Shared>,
        mut owned: Partition,
        mut inputs: mpsc::Receiver<OwnedMessage>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let partition = owned.partition;
        let kafka = &shared.config.kafka;
        let txn_id = format!("{}-saga-order-fulfilment-p{partition}", kafka.topic_prefix);
        let Some(producer) = owned.fence(kafka, &txn_id).await? else {
            info!(partition, "saga partition revoked before it was fenced");
            return Ok(());
        };
        let restored = match state::restore(
            RestoreSpec {
                kafka,
                config: &shared.config.state,
                metrics: &shared.status.state_metrics,
                stream: STREAM,
                partition,
                schema: STATE_SCHEMA,
                changelog: shared.topics.state(STREAM),
                events: shared.topics.events(STREAM),
                revoked: &owned.revoked,
            },
            Some(running_index),
            fold,
        )
        .await
        {
            Err(_) if owned.revoked.is_cancelled() => return Ok(()),
            restored => restored?,
        };
        let mut sagas = restored.state;
        if let Some(seed) = restored.to_seed {
            producer.begin().await?;
            let changelog = shared.topics.state(STREAM);
            let (sends, changed) =
                state::seed(&producer, &changelog, partition, STATE_SCHEMA, &seed)?;
            let landed = producer.commit(sends).await.map_err(anyhow::Error::new)?;
            info!(
                partition,
                sagas = changed.len(),
                full = seed.full,
                "sagas folded from the saga events written to the changelog"
            );
            if let Some((_, offset)) = landed.last() {
                sagas.committed(changed, offset + 1, seed.events_next)?;
            }
        }
        // The running sagas (and any with a deadline): their deadlines, and the gauge —
        // from the store's index of them, not from every saga ever run.
        let mut deadlines = HashMap::new();
        let mut running = 0i64;
        state::blocking(|| {
            sagas.indexed(|id, value| {
                let (is_running, at) = unindex(value);
                running += i64::from(is_running);
                if let Some(at) = at {
                    deadlines.insert(id.to_string(), at);
                }
            })
        })?;
        shared.status.metrics.add_running(running);
        info!(
            partition,
            running,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "saga partition restored; resuming"
        );
        if !owned.ready() {
            shared.status.metrics.add_running(-running);
            info!(partition, "saga partition revoked while restoring");
            return Ok(());
        }
        let revoked = owned.revoked.clone();
        let mut worker = Worker {
            shared,
            owned,
            partition,
            producer,
            sagas,
            deadlines,
            running,
        };

        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                biased;
                _ = revoked.cancelled() => break Ok(()),
                message = inputs.recv() => {
                    let Some(message) = message else { break Ok(()) };
                    let mut batch = vec![message];
                    drain(&mut inputs, &mut batch);
                    if batch.len() > 1 {
                        // Busy: a few more milliseconds fill the transaction, and each
                        // transaction costs the broker the same whatever it carries.
                        tokio::time::sleep(GATHER).await;
                        drain(&mut inputs, &mut batch);
                    }
                    if let Err(e) = worker.consume(batch).await {
                        break Err(e);
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = worker.fire_deadlines().await {
                        break Err(e);
                    }
                }
            }
        };
        worker.shared.status.metrics.add_running(-worker.running);
        info!(partition = worker.partition, "saga partition released");
        result
    }

    /// Turns consumed records into inputs and runs them as one step.
    async fn consume(&mut self, batch: Vec<OwnedMessage>) -> anyhow::Result<()> {
        let order_events = self.shared.topics.events(streams::ORDER);
        let mut work = Vec::with_capacity(batch.len());
        let mut consumed: HashMap<String, i64> = HashMap::new();
        for message in &batch {
            consumed.insert(message.topic().to_string(), message.offset() + 1);
            let decoded = if message.topic() == order_events {
                order_input(message)
            } else {
                reply_input(message)
            };
            match decoded {
                Ok(Some(w)) => work.push(w),
                Ok(None) => {}
                Err(e) => warn!(
                    topic = message.topic(),
                    partition = self.partition,
                    offset = message.offset(),
                    error = %format!("{e:#}"),
                    "saga input skipped: it does not decode"
                ),
            }
        }
        self.step(work, consumed).await
    }

    /// Feeds `Tick` to every saga whose deadline has passed.
    async fn fire_deadlines(&mut self) -> anyhow::Result<()> {
        let now = Utc::now();
        let due: Vec<Work> = self
            .deadlines
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(id, _)| Work {
                saga_id: id.clone(),
                input: Input::Tick,
                metadata: None,
            })
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        info!(
            partition = self.partition,
            sagas = due.len(),
            "saga deadlines passed"
        );
        self.step(due, HashMap::new()).await
    }

    /// Runs `work` as one transaction, retrying aborted ones, and applies the outcome.
    async fn step(
        &mut self,
        work: Vec<Work>,
        consumed: HashMap<String, i64>,
    ) -> anyhow::Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.transact(&work, &consumed).await {
                Ok((staged, next_changelog)) => {
                    for (before, c) in &staged {
                        let slot = &c.state;
                        self.running += record(&self.shared.status.metrics, before.as_ref(), slot);
                        match slot.state.next_deadline() {
                            Some(d) => self.deadlines.insert(c.id.clone(), d),
                            None => self.deadlines.remove(&c.id),
                        };
                    }
                    let changed = staged.into_iter().map(|(_, c)| c).collect();
                    self.sagas.commit(changed, next_changelog, None)?;
                    return Ok(());
                }
                Err(err) => {
                    let what = format!(
                        "saga partition {}: a step of {} inputs",
                        self.partition,
                        work.len()
                    );
                    after_failure(&self.producer, err, attempt, what).await?;
                }
            }
        }
    }

    /// One transaction: saga events, the sagas' new states, outgoing commands and
    /// consumed offsets. Answers each changed saga (before, after, its JSON) and the
    /// changelog offset after the last state written.
    #[allow(clippy::type_complexity)]
    async fn transact(
        &mut self,
        work: &[Work],
        consumed: &HashMap<String, i64>,
    ) -> anyhow::Result<(Vec<(Option<Slot>, Changed<Slot>)>, Option<(i64, i64)>)> {
        let topics = &self.shared.topics;
        let kafka = &self.shared.config.kafka;
        let saga_events = topics.events(STREAM);
        let reply_topic = topics.inbox(STREAM);
        let now = Utc::now();
        self.producer.begin().await?;
        let mut staged: HashMap<String, (Option<Slot>, Slot)> = HashMap::new();
        let mut sends = Vec::new();
        let mut event_sends = Vec::new();
        for w in work {
            let (before, mut slot) = match staged.remove(&w.saga_id) {
                Some(both) => both,
                None => {
                    let before = self.sagas.get(&w.saga_id)?;
                    (before.clone(), before.unwrap_or_default())
                }
            };
            if let Some(m) = &w.metadata {
                if slot.state.status.is_none() {
                    slot.correlation_id = m.correlation_id.clone();
                    slot.traceparent = m.traceparent.clone();
                }
            }
            // One span per step, in the trace of the request that placed the order (exported
            // when OTLP is on); the step's log lines carry its fields.
            let span = tracing::info_span!("saga_step", saga_id = %w.saga_id, input = input_name(&w.input));
            if let (false, Some(traceparent)) = (span.is_disabled(), &slot.traceparent) {
                let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(
                    &span,
                    parent_context(traceparent),
                );
            }
            let _step = span.enter();
            let events = slot
                .state
                .run(w.input.clone(), now, self.shared.config.deadlines);
            debug!(
                saga_id = %w.saga_id,
                partition = self.partition,
                input = input_name(&w.input),
                events = events.len(),
                correlation_id = slot.correlation_id.as_deref().unwrap_or_default(),
                trace_id = slot.traceparent.as_deref().and_then(eventlog::trace::trace_id).unwrap_or_default(),
                "saga step"
            );
            if events.is_empty() {
                if slot.version > 0 || before.is_some() {
                    staged.insert(w.saga_id.clone(), (before, slot));
                }
                continue;
            }
            let metadata = EventMetadata {
                command_id: None,
                correlation_id: slot.correlation_id.clone(),
                causation_id: w.metadata.as_ref().and_then(|m| m.command_id.clone()),
                actor: Some("saga:order-fulfilment".into()),
                traceparent: slot.traceparent.clone(),
            };
            for (event, commands) in events {
                slot.version += 1;
                let record = EventEnvelope::wrap::<Fulfilment>(
                    &w.saga_id,
                    slot.version,
                    &event,
                    metadata.clone(),
                    now,
                )?;
                event_sends.push(self.producer.send(
                    &saga_events,
                    self.partition,
                    &w.saga_id,
                    &serde_json::to_vec(&record)?,
                    record.kafka_headers(),
                )?);
                for out in commands {
                    debug!(saga_id = %w.saga_id, command_id = %out.command_id, stream = out.stream, aggregate_id = %out.aggregate_id, "saga sends a command");
                    let envelope = CommandEnvelope {
                        command_id: out.command_id,
                        aggregate_id: out.aggregate_id.clone(),
                        command: out.command,
                        expected_version: None,
                        // The processor keeps the outcome: a replayed step is answered,
                        // not applied again.
                        idempotent: true,
                        correlation_id: slot.correlation_id.clone(),
                        traceparent: slot.traceparent.clone(),
                        actor: Some("saga:order-fulfilment".into()),
                        reply_to: Some(ReplyTo {
                            topic: reply_topic.clone(),
                            partition: self.partition,
                            key: w.saga_id.clone(),
                        }),
                        deadline: out.deadline,
                    };
                    sends.push(self.producer.send(
                        &topics.commands(out.stream),
                        partition_for(&out.aggregate_id, kafka.partitions),
                        &out.aggregate_id,
                        &serde_json::to_vec(&envelope)?,
                        Default::default(),
                    )?);
                }
            }
            staged.insert(w.saga_id.clone(), (before, slot));
        }
        // The new state of each saga that changed, in the same transaction as its events
        // and sent with them (one produce round trip). A saga an input left as it was is
        // not written again.
        let mut befores = Vec::with_capacity(staged.len());
        let changed_sagas = staged.into_iter().filter_map(|(id, (before, slot))| {
            if before.as_ref().is_some_and(|b| b.version == slot.version) {
                return None;
            }
            befores.push(before);
            Some((id, slot))
        });
        let (changed, state_sends) = state::send_states(
            &self.producer,
            &topics.state(STREAM),
            self.partition,
            STATE_SCHEMA,
            self.sagas.events_next(),
            changed_sagas,
        )?;
        let out: Vec<(Option<Slot>, Changed<Slot>)> = befores.into_iter().zip(changed).collect();
        // Nothing here needs where the events land before the commit (a saga's commands
        // carry no token), so every delivery is awaited once, at the commit. The states
        // go first, then the events, so that their offsets are found in `landed`.
        let (states, events) = (state_sends.len(), event_sends.len());
        let sends = state_sends
            .into_iter()
            .chain(event_sends)
            .chain(sends)
            .collect::<Vec<_>>();
        if !consumed.is_empty() {
            self.owned
                .send_offsets(
                    &self.producer,
                    consumed.iter().map(|(t, o)| (t.as_str(), *o)),
                )
                .await?;
        } else if sends.is_empty() && out.is_empty() {
            // Nothing to write: end the empty transaction.
            self.producer.abort().await?;
            return Ok((out, None));
        }
        let landed = self
            .producer
            .commit(sends)
            .await
            .map_err(anyhow::Error::new)?;
        let events_next = landed[states..states + events]
            .last()
            .map_or(self.sagas.events_next(), |(_, offset)| offset + 1);
        let next_changelog = state::changelog_next(&landed, states, events_next);
        self.shared.status.metrics.transaction();
        Ok((out, next_changelog))
    }
}

/// Counts what a committed step changed: saga status transitions and ended steps.
/// Answers the change in running sagas.
fn record(metrics: &SagaMetrics, before: Option<&Slot>, slot: &Slot) -> i64 {
    use crate::fulfilment::StepStatus::Started;
    use crate::SagaStatus::Running;
    let was = before.and_then(|b| b.state.status);
    let delta = match (was, slot.state.status) {
        (was, now) if was == now => 0,
        (Some(Running), Some(end)) => {
            metrics.ended(end);
            -1
        }
        (None, Some(Running)) => {
            metrics.started();
            1
        }
        (Some(_), Some(Running)) => 1,
        _ => 0,
    };
    metrics.add_running(delta);
    let known = before.map(|b| b.state.steps.as_slice()).unwrap_or_default();
    for (i, step) in slot.state.steps.iter().enumerate() {
        let was_open = known.get(i).is_none_or(|s| s.status == Started);
        if was_open && step.status != Started {
            let seconds = (step.at - step.started_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            metrics.step_ended(step.name, step.status, seconds);
        }
    }
    delta
}

/// The OpenTelemetry context a W3C `traceparent` names.
fn parent_context(traceparent: &str) -> opentelemetry::Context {
    use opentelemetry::propagation::TextMapPropagator;
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier)
}

fn input_name(input: &Input) -> &'static str {
    match input {
        Input::Placed { .. } => "order_placed",
        Input::Cancelled => "order_cancelled",
        Input::Reply { ok: true, .. } => "reply_ok",
        Input::Reply { .. } => "reply_refused",
        Input::Tick => "deadline",
    }
}

fn drain(inputs: &mut mpsc::Receiver<OwnedMessage>, batch: &mut Vec<OwnedMessage>) {
    while batch.len() < MAX_BATCH {
        match inputs.try_recv() {
            Ok(m) => batch.push(m),
            Err(_) => break,
        }
    }
}

/// `OrderPlaced` starts a saga; `OrderCancelled` of a placed or confirmed order
/// compensates it. Other order events are not the saga's business.
fn order_input(message: &OwnedMessage) -> anyhow::Result<Option<Work>> {
    let envelope: EventEnvelope = serde_json::from_slice(message.payload().unwrap_or_default())
        .context("not an event envelope")?;
    if !matches!(
        envelope.event_type.as_str(),
        "OrderPlaced" | "OrderCancelled"
    ) {
        return Ok(None);
    }
    let input = match envelope.decode::<OrderEvent>()? {
        OrderEvent::OrderPlaced(placed) => Input::Placed {
            order_id: OrderId::parse(&envelope.aggregate_id)
                .map_err(|e| anyhow!("order id {:?}: {e}", envelope.aggregate_id))?,
            customer_id: placed.customer_id,
            lines: placed
                .lines
                .into_iter()
                .map(|l| SagaLine {
                    sku: l.sku,
                    quantity: l.quantity,
                })
                .collect(),
            total_cents: placed.total_cents,
        },
        OrderEvent::OrderCancelled(c)
            if matches!(
                c.previous_status,
                OrderStatus::Placed | OrderStatus::Confirmed
            ) =>
        {
            Input::Cancelled
        }
        _ => return Ok(None),
    };
    Ok(Some(Work {
        saga_id: envelope.aggregate_id,
        input,
        metadata: Some(envelope.metadata),
    }))
}

/// The outcome of a command the saga sent, keyed by saga id.
fn reply_input(message: &OwnedMessage) -> anyhow::Result<Option<Work>> {
    let Some(key) = message.key() else {
        bail!("a reply without a key (the saga id)");
    };
    let result: CommandResult = serde_json::from_slice(message.payload().unwrap_or_default())
        .context("not a command result")?;
    Ok(Some(Work {
        saga_id: String::from_utf8_lossy(key).into_owned(),
        input: Input::Reply {
            command_id: result.command_id,
            ok: result.outcome.is_accepted(),
            code: result.outcome.refusal().map(String::from),
        },
        metadata: None,
    }))
}

/// The store's index of sagas (ADR 10): the running ones and any waiting on a deadline,
/// valued by that deadline in ms since the epoch (`i64::MAX`: none); negative for a saga
/// that waits on a deadline without running.
fn running_index(slot: &Slot) -> Option<i64> {
    let running = slot.state.status == Some(crate::SagaStatus::Running);
    let deadline = slot.state.next_deadline().map(|d| d.timestamp_millis());
    match (running, deadline) {
        (true, at) => Some(at.unwrap_or(i64::MAX)),
        (false, Some(at)) => Some(-at),
        (false, None) => None,
    }
}

/// What [`running_index`] stored: running, and the deadline.
fn unindex(value: i64) -> (bool, Option<DateTime<Utc>>) {
    let at = |ms: i64| DateTime::<Utc>::from_timestamp_millis(ms);
    match value {
        i64::MAX => (true, None),
        v if v < 0 => (false, at(-v)),
        v => (true, at(v)),
    }
}

/// Folds one committed saga event into the sagas being rebuilt.
fn fold(sagas: &mut HashMap<String, Slot>, message: &BorrowedMessage<'_>) -> anyhow::Result<bool> {
    let Some((envelope, event)) = state::next_event::<FulfilmentEvent>(message, |id| {
        sagas.get(id).map_or(0, |slot| slot.version)
    })?
    else {
        return Ok(false);
    };
    let slot = sagas.entry(envelope.aggregate_id).or_default();
    if slot.version == 0 {
        slot.correlation_id = envelope.metadata.correlation_id.clone();
        slot.traceparent = envelope.metadata.traceparent.clone();
    }
    slot.state.apply(event);
    slot.version = envelope.sequence;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_of_running_sagas_round_trips() {
        let at = DateTime::<Utc>::from_timestamp_millis(1_800_000_000_123).unwrap();
        for (value, running, deadline) in [
            (i64::MAX, true, None),
            (at.timestamp_millis(), true, Some(at)),
            (-at.timestamp_millis(), false, Some(at)),
        ] {
            assert_eq!(unindex(value), (running, deadline));
        }
        // A saga that has not started is not in the index.
        assert_eq!(running_index(&Slot::default()), None);
    }
}

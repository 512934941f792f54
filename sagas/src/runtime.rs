//! The saga orchestrator on Kafka (DESIGN.md §4). A member of the consumer group of the
//! order events and the saga inbox — co-partitioned, and assigned with the `range`
//! strategy so that one member owns partition `n` of both. Per owned partition a worker
//! fences the previous owner (transactional id per partition), rebuilds its sagas from
//! the saga topic, then runs every step as ONE transaction: saga events, outgoing
//! commands (each naming the inbox partition for its reply) and the consumed offsets.
//! Deadlines are in the sagas' state; the owner fires them from a timer, as steps of
//! their own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregates::{OrderEvent, OrderId, OrderStatus};
use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use eventlog::group::{self, Change, Rebalances};
use eventlog::rdkafka::consumer::{Consumer, StreamConsumer};
use eventlog::rdkafka::message::{Message, OwnedMessage};
use eventlog::rdkafka::{Offset, TopicPartitionList};
use eventlog::{
    classify, partition_for, read_partition, CommandEnvelope, CommandResult, CommitError,
    EventEnvelope, EventMetadata, KafkaConfig, ReplyTo, Topics, TxnErrorKind, TxnProducer,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::fulfilment::{Deadlines, Fulfilment, FulfilmentEvent, Input, SagaLine, STREAM};
use crate::metrics::SagaMetrics;

/// How long a stopping processor waits for its workers' current transactions.
const WORKER_STOP_BOUND: Duration = Duration::from_secs(10);
/// Most inputs in one transaction.
const MAX_BATCH: usize = 500;
/// How often the owner looks for deadlines that passed.
const TICK: Duration = Duration::from_millis(100);
/// How long a busy worker waits for more inputs before it writes a step.
const GATHER: Duration = Duration::from_millis(5);
/// Attempts at a batch whose transaction had to be aborted.
const MAX_ATTEMPTS: u32 = 5;

/// Settings of the saga orchestrator.
#[derive(Clone)]
pub struct SagaConfig {
    pub kafka: KafkaConfig,
    pub deadlines: Deadlines,
}

/// Handles for the caller: readiness and metrics of a running orchestrator.
#[derive(Clone, Default)]
pub struct SagaRuntimeStatus {
    /// Partitions assigned but not yet rebuilt.
    pub rebuilding: Arc<AtomicUsize>,
    pub metrics: SagaMetrics,
}

struct Shared {
    config: SagaConfig,
    topics: Topics,
    consumer: StreamConsumer<Rebalances>,
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
    let metrics = status.metrics.clone();
    let lag_group = group.clone();
    // `range`: partition n of both topics to the same member, so the order's events and
    // the replies to its saga's commands meet in one worker.
    let (consumer, mut changes) = group::owner_consumer(
        &config.kafka,
        &group,
        "range",
        &[&topics.events("order"), &topics.saga_inbox()],
        move |statistics| metrics.record_lag(&lag_group, statistics),
    )?;
    let shared = Arc::new(Shared {
        config,
        topics,
        consumer,
        status,
    });
    info!("saga orchestrator started");

    let mut workers: HashMap<i32, (mpsc::Sender<OwnedMessage>, CancellationToken)> = HashMap::new();
    let mut tasks: JoinSet<(i32, anyhow::Result<()>)> = JoinSet::new();
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(change) = changes.recv() => apply(change, &shared, &mut workers, &mut tasks),
            Some(done) = tasks.join_next() => match done {
                Ok((p, Err(e))) if !workers.contains_key(&p) => {
                    warn!(partition = p, error = %format!("{e:#}"), "saga worker of a revoked partition ended with an error");
                }
                Ok((p, Err(e))) => break Err(e.context(format!("saga partition {p} worker failed"))),
                Ok((_, Ok(()))) => {}
                Err(join) => break Err(anyhow!("a saga worker panicked: {join}")),
            },
            message = shared.consumer.recv() => {
                while let Ok(change) = changes.try_recv() {
                    apply(change, &shared, &mut workers, &mut tasks);
                }
                let message = match message {
                    Ok(m) => m.detach(),
                    Err(e) => { error!(error = %e, "saga consumer error"); continue; }
                };
                let partition = message.partition();
                match workers.get(&partition) {
                    Some((worker, _)) => if worker.send(message).await.is_err() {
                        break Err(anyhow!("saga partition {partition} worker stopped"));
                    },
                    // The next owner reads it again from the committed offset.
                    None => debug!(partition, "saga input for a revoked partition dropped"),
                }
            }
        }
    };
    // Each worker ends after its current transaction; one that does not within the
    // bound is aborted (its transaction is then aborted by the next owner's fencing).
    for (_, (_, stop)) in workers.drain() {
        stop.cancel();
    }
    group::stop_workers(&mut tasks, WORKER_STOP_BOUND, STREAM).await;
    shared.status.rebuilding.store(0, Ordering::SeqCst);
    shared.consumer.unsubscribe();
    result
}

fn apply(
    change: Change,
    shared: &Arc<Shared>,
    workers: &mut HashMap<i32, (mpsc::Sender<OwnedMessage>, CancellationToken)>,
    tasks: &mut JoinSet<(i32, anyhow::Result<()>)>,
) {
    match change {
        Change::Assigned(partitions) => {
            info!(?partitions, "saga partitions assigned");
            for p in partitions {
                if workers.contains_key(&p) {
                    continue;
                }
                let (tx, rx) = mpsc::channel(4_096);
                let revoked = CancellationToken::new();
                workers.insert(p, (tx, revoked.clone()));
                shared.status.rebuilding.fetch_add(1, Ordering::SeqCst);
                let shared = shared.clone();
                tasks.spawn(async move { (p, Worker::run(shared, p, rx, revoked).await) });
            }
        }
        Change::Revoked(partitions) => {
            info!(?partitions, "saga partitions revoked");
            for p in partitions {
                if let Some((_, revoked)) = workers.remove(&p) {
                    revoked.cancel();
                }
            }
        }
    }
}

/// One saga as its owner holds it.
#[derive(Clone, Default)]
struct Slot {
    state: Fulfilment,
    version: u64,
    /// Carried from the `OrderPlaced` that started it into every event and command.
    correlation_id: Option<String>,
    traceparent: Option<String>,
}

struct Worker {
    shared: Arc<Shared>,
    partition: i32,
    producer: TxnProducer,
    sagas: HashMap<String, Slot>,
    /// Sagas waiting on a deadline, and the earliest one.
    deadlines: HashMap<String, DateTime<Utc>>,
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
        partition: i32,
        mut inputs: mpsc::Receiver<OwnedMessage>,
        revoked: CancellationToken,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let txn_id = format!(
            "{}-saga-order-fulfilment-p{partition}",
            shared.config.kafka.topic_prefix
        );
        let producer = TxnProducer::new(&shared.config.kafka, &txn_id).await?;
        // Fenced: the previous owner can commit nothing more, so the group's committed
        // offsets are final now — start from them, not from what assignment fetched.
        let topics = [shared.topics.events("order"), shared.topics.saga_inbox()];
        let consumer = shared.clone();
        tokio::task::spawn_blocking(move || {
            group::seek_to_committed(&consumer.consumer, &topics, partition)
        })
        .await??;
        let sagas = rebuild(&shared, partition).await?;
        let deadlines = sagas
            .iter()
            .filter_map(|(id, s)| s.state.next_deadline().map(|d| (id.clone(), d)))
            .collect();
        let running = sagas
            .values()
            .filter(|s| s.state.status == Some(crate::SagaStatus::Running))
            .count();
        shared.status.metrics.add_running(running as i64);
        info!(
            partition,
            sagas = sagas.len(),
            running,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "saga partition rebuilt; resuming"
        );
        let mut worker = Worker {
            shared,
            partition,
            producer,
            sagas,
            deadlines,
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&worker.shared.topics.events("order"), partition);
        tpl.add_partition(&worker.shared.topics.saga_inbox(), partition);
        if let Err(e) = worker.shared.consumer.resume(&tpl) {
            warn!(partition, error = %e, "could not resume the saga partition");
        }
        worker
            .shared
            .status
            .rebuilding
            .fetch_sub(1, Ordering::SeqCst);

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
        let running = worker
            .sagas
            .values()
            .filter(|s| s.state.status == Some(crate::SagaStatus::Running))
            .count();
        worker.shared.status.metrics.add_running(-(running as i64));
        info!(partition, "saga partition released");
        result
    }

    /// Turns consumed records into inputs and runs them as one step.
    async fn consume(&mut self, batch: Vec<OwnedMessage>) -> anyhow::Result<()> {
        let order_events = self.shared.topics.events("order");
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
        let sagas = &self.sagas;
        self.deadlines.retain(
            |id, d| match sagas.get(id).and_then(|s| s.state.next_deadline()) {
                Some(next) => {
                    *d = next;
                    true
                }
                None => false,
            },
        );
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
                Ok(staged) => {
                    for (id, slot) in staged {
                        record(&self.shared.status.metrics, self.sagas.get(&id), &slot);
                        match slot.state.next_deadline() {
                            Some(d) => self.deadlines.insert(id.clone(), d),
                            None => self.deadlines.remove(&id),
                        };
                        self.sagas.insert(id, slot);
                    }
                    return Ok(());
                }
                // Aborting a commit of unknown outcome and running the step again would
                // send its commands and saga events twice if the commit went through.
                Err(err) if CommitError::is_uncertain(&err) => {
                    return Err(err.context(format!(
                        "saga partition {}: the commit's outcome is unknown; the orchestrator restarts and the log decides",
                        self.partition
                    )))
                }
                Err(err) => {
                    let kind = CommitError::kafka_error(&err)
                        .map(classify)
                        .unwrap_or(TxnErrorKind::Fatal);
                    if kind == TxnErrorKind::Fatal || attempt >= MAX_ATTEMPTS {
                        return Err(err.context(format!(
                            "saga partition {} gave up a step of {} inputs ({kind:?}); the orchestrator restarts and rebuilds",
                            self.partition,
                            work.len()
                        )));
                    }
                    warn!(partition = self.partition, attempt, error = %err, "saga transaction failed; aborting and retrying");
                    if let Err(abort) = self.producer.abort().await {
                        if classify(&abort) == TxnErrorKind::Fatal {
                            return Err(anyhow::Error::new(abort)
                                .context("aborting a failed saga transaction"));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50 * attempt as u64)).await;
                }
            }
        }
    }

    /// One transaction: saga events, outgoing commands and consumed offsets.
    async fn transact(
        &self,
        work: &[Work],
        consumed: &HashMap<String, i64>,
    ) -> anyhow::Result<HashMap<String, Slot>> {
        let topics = &self.shared.topics;
        let kafka = &self.shared.config.kafka;
        let saga_events = topics.events(STREAM);
        let reply_topic = topics.saga_inbox();
        let now = Utc::now();
        self.producer.begin().await?;
        let mut staged: HashMap<String, Slot> = HashMap::new();
        let mut sends = Vec::new();
        for w in work {
            let mut slot = staged
                .get(&w.saga_id)
                .or_else(|| self.sagas.get(&w.saga_id))
                .cloned()
                .unwrap_or_default();
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
                sends.push(self.producer.send(
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
            staged.insert(w.saga_id.clone(), slot);
        }
        if !consumed.is_empty() {
            let mut offsets = TopicPartitionList::new();
            for (topic, next) in consumed {
                offsets.add_partition_offset(topic, self.partition, Offset::Offset(*next))?;
            }
            let group = self
                .shared
                .consumer
                .group_metadata()
                .context("no consumer group metadata")?;
            self.producer.send_offsets(offsets, group).await?;
        } else if sends.is_empty() {
            // Nothing to write: end the empty transaction.
            self.producer.abort().await?;
            return Ok(staged);
        }
        self.producer
            .commit(sends)
            .await
            .map_err(anyhow::Error::new)?;
        self.shared.status.metrics.transaction();
        Ok(staged)
    }
}

/// Counts what a committed step changed: saga status transitions and ended steps.
fn record(metrics: &SagaMetrics, before: Option<&Slot>, slot: &Slot) {
    use crate::fulfilment::StepStatus::Started;
    use crate::SagaStatus::Running;
    let was = before.and_then(|b| b.state.status);
    match (was, slot.state.status) {
        (was, now) if was == now => {}
        (Some(Running), Some(end)) => {
            metrics.add_running(-1);
            metrics.ended(end);
        }
        (None, Some(Running)) => {
            metrics.started();
            metrics.add_running(1);
        }
        (Some(_), Some(Running)) => metrics.add_running(1),
        _ => {}
    }
    let known = before.map(|b| b.state.steps.as_slice()).unwrap_or_default();
    for (i, step) in slot.state.steps.iter().enumerate() {
        let was_open = known.get(i).is_none_or(|s| s.status == Started);
        if was_open && step.status != Started {
            let seconds = (step.at - step.started_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            metrics.step_ended(step.name, step.status, seconds);
        }
    }
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
    let error = &result.body["error"];
    let code = error["details"]["rule"]
        .as_str()
        .or_else(|| error["code"].as_str())
        .map(String::from);
    Ok(Some(Work {
        saga_id: String::from_utf8_lossy(key).into_owned(),
        input: Input::Reply {
            command_id: result.command_id,
            ok: (200..300).contains(&result.status),
            code,
        },
        metadata: None,
    }))
}

/// Folds every committed saga event of the partition.
async fn rebuild(shared: &Shared, partition: i32) -> anyhow::Result<HashMap<String, Slot>> {
    let topic = shared.topics.events(STREAM);
    let mut sagas: HashMap<String, Slot> = HashMap::new();
    read_partition(&shared.config.kafka, &topic, partition, 0, |message| {
        let envelope: EventEnvelope = serde_json::from_slice(message.payload().unwrap_or_default())
            .with_context(|| {
                format!(
                    "saga event at {topic}/{partition}/{} is not an envelope",
                    message.offset()
                )
            })?;
        let event: FulfilmentEvent = envelope.decode()?;
        let slot = sagas.entry(envelope.aggregate_id).or_default();
        if envelope.sequence != slot.version + 1 {
            bail!(
                "sequence gap in {topic}/{partition}: {} after {}",
                envelope.sequence,
                slot.version
            );
        }
        if slot.version == 0 {
            slot.correlation_id = envelope.metadata.correlation_id.clone();
            slot.traceparent = envelope.metadata.traceparent.clone();
        }
        slot.state.apply(event);
        slot.version = envelope.sequence;
        Ok(())
    })
    .await
    .with_context(|| format!("rebuilding sagas from {topic}/{partition}"))?;
    Ok(sagas)
}

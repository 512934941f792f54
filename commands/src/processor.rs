//! The command processor of one aggregate type: a member of the consumer group of its
//! command topic. Each partition it is given gets a [`PartitionWorker`] of its own; the
//! rebalance callbacks only pause partitions and pass the news on — all catch-up work
//! happens in the workers, off the callback.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use eventlog::group::{self, Change, Rebalances};
use eventlog::rdkafka::consumer::{Consumer, StreamConsumer};
use eventlog::rdkafka::{Message, TopicPartitionList};
use eventlog::{KafkaConfig, Topics};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::local::{Local, Work};
use crate::metrics::Metrics;
use crate::partition::PartitionWorker;
use crate::stream::CommandStream;

/// How long a stopping processor waits for its workers' current transactions.
const WORKER_STOP_BOUND: Duration = Duration::from_secs(10);
/// Commands buffered per partition before the consumer waits.
const PARTITION_BUFFER: usize = 4_096;

/// Settings of the command processors.
#[derive(Clone)]
pub struct ProcessorConfig {
    pub kafka: KafkaConfig,
    /// How long outcomes of commands with an Idempotency-Key stay in memory.
    pub dedup_window: Duration,
}

/// What the partition workers of one processor share.
pub(crate) struct Shared {
    pub kafka: KafkaConfig,
    pub topics: Topics,
    pub consumer: StreamConsumer<Rebalances>,
    pub local: Local,
    pub dedup_window: Duration,
    pub metrics: Metrics,
    /// Partitions assigned but not yet rebuilt (readiness waits for 0).
    pub rebuilding: Arc<AtomicUsize>,
    stream: &'static str,
}

impl Shared {
    pub(crate) fn resume(&self, partition: i32) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topics.commands(self.stream), partition);
        self.consumer
            .resume(&tpl)
            .context("resuming the command partition")
    }
}

/// Handles for the caller: readiness and metrics of a running processor.
#[derive(Clone, Default)]
pub struct ProcessorStatus {
    /// Partitions assigned but not yet rebuilt, over all processors.
    pub rebuilding: Arc<AtomicUsize>,
    pub metrics: Metrics,
}

/// Runs the processor of aggregate type `A` until `shutdown`, or until a partition hits a
/// fatal error (e.g. fenced), which ends it with that error so the caller can restart it.
pub async fn run<A: CommandStream>(
    config: ProcessorConfig,
    local: Local,
    status: ProcessorStatus,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let topics = Topics::new(&config.kafka.topic_prefix);
    let group = format!("{}.{}.processor", config.kafka.topic_prefix, A::STREAM);
    let metrics = status.metrics.clone();
    let lag_group = group.clone();
    let (consumer, mut changes) = group::owner_consumer(
        &config.kafka,
        &group,
        "cooperative-sticky",
        &[&topics.commands(A::STREAM)],
        move |statistics| metrics.record_lag(&lag_group, statistics),
    )?;
    let shared = Arc::new(Shared {
        kafka: config.kafka.clone(),
        topics,
        consumer,
        local,
        dedup_window: config.dedup_window,
        metrics: status.metrics.clone(),
        rebuilding: status.rebuilding.clone(),
        stream: A::STREAM,
    });
    info!(stream = A::STREAM, "command processor started");

    let mut workers: HashMap<i32, (mpsc::Sender<Work>, CancellationToken)> = HashMap::new();
    let mut tasks: JoinSet<(i32, anyhow::Result<()>)> = JoinSet::new();
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(change) = changes.recv() => apply::<A>(change, &shared, &mut workers, &mut tasks),
            Some(done) = tasks.join_next() => match done {
                // A worker of a partition already revoked may fail its last batch (fenced by
                // the new generation): that is the hand-over, not a fault of this processor.
                Ok((p, Err(e))) if !workers.contains_key(&p) => {
                    warn!(stream = A::STREAM, partition = p, error = %format!("{e:#}"), "worker of a revoked partition ended with an error");
                }
                Ok((p, Err(e))) => break Err(e.context(format!("partition {p} worker failed"))),
                Ok((_, Ok(()))) => {}
                Err(join) => break Err(anyhow!("a partition worker panicked: {join}")),
            },
            message = shared.consumer.recv() => {
                // Apply any rebalance the poll just ran, so the partition's worker exists.
                while let Ok(change) = changes.try_recv() {
                    apply::<A>(change, &shared, &mut workers, &mut tasks);
                }
                let message = match message {
                    Ok(m) => m.detach(),
                    Err(e) => { error!(stream = A::STREAM, error = %e, "consumer error"); continue; }
                };
                let partition = message.partition();
                match workers.get(&partition) {
                    Some((worker, _)) => if worker.send(Work::Consumed(message)).await.is_err() {
                        break Err(anyhow!("partition {partition} worker stopped"));
                    },
                    // Fetched before the partition was revoked: the next owner reads it again
                    // from the committed offset, so dropping it here loses nothing.
                    None => debug!(stream = A::STREAM, partition, "command for a revoked partition dropped"),
                }
            }
        }
    };
    // Each worker ends after its current transaction; one that does not within the
    // bound is aborted (its transaction is then aborted by the next owner's fencing).
    for (_, (_, stop)) in workers.drain() {
        stop.cancel();
    }
    group::stop_workers(&mut tasks, WORKER_STOP_BOUND, A::STREAM).await;
    shared.rebuilding.store(0, Ordering::SeqCst);
    shared.consumer.unsubscribe();
    result
}

fn apply<A: CommandStream>(
    change: Change,
    shared: &Arc<Shared>,
    workers: &mut HashMap<i32, (mpsc::Sender<Work>, CancellationToken)>,
    tasks: &mut JoinSet<(i32, anyhow::Result<()>)>,
) {
    match change {
        Change::Assigned(partitions) => {
            info!(stream = A::STREAM, ?partitions, "partitions assigned");
            for p in partitions {
                let (tx, rx) = mpsc::channel(PARTITION_BUFFER);
                let revoked = CancellationToken::new();
                workers.insert(p, (tx.clone(), revoked.clone()));
                let now = shared.rebuilding.fetch_add(1, Ordering::SeqCst) + 1;
                shared.metrics.set_rebuilding(A::STREAM, now);
                let shared = shared.clone();
                let me = tx.clone();
                tasks.spawn(async move {
                    (
                        p,
                        PartitionWorker::<A>::run(shared, p, rx, me, revoked).await,
                    )
                });
            }
        }
        Change::Revoked(partitions) => {
            info!(stream = A::STREAM, ?partitions, "partitions revoked");
            for p in partitions {
                // The worker stops after its current batch; both senders go.
                shared.local.remove_owner(A::STREAM, p);
                if let Some((_, revoked)) = workers.remove(&p) {
                    revoked.cancel();
                }
            }
        }
    }
}

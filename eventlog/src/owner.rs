//! The partition-owner runtime (ADR 10): what the command processors and the saga
//! orchestrator share, written once. A member of one consumer group; one worker task per
//! owned partition. The runtime does membership, fencing, hand-over and a bounded stop;
//! a worker brings its own restore and `decide`.
//!
//! A worker's life:
//! 1. [`Partition::fence`]: `init_transactions` with the partition's `transactional.id`
//!    (the previous owner can commit nothing more), then a seek to the group's committed
//!    offset — read only now, because a retried commit of the old owner may have landed
//!    between assignment and the fence.
//! 2. Restore its state (see [`crate::state`]).
//! 3. [`Partition::ready`]: resume the paused partition; the process counts as restored.
//! 4. Serve batches, each ONE transaction; on failure, [`after_failure`] says whether to
//!    abort and retry or to give up — never retrying a commit of unknown outcome.
//!
//! Hand-over: a revoked partition's token is cancelled inside the rebalance callback,
//! which waits (bounded) for a worker that is fencing at that moment, so a worker revoked
//! during start-up can never fence the next owner. Results of a worker of an older
//! generation of the same partition never stop the current one.

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance, StreamConsumer,
};
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientContext, Message, Offset, Statistics, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{classify, CommitError, KafkaConfig, TxnErrorKind, TxnProducer};

/// How long a stopping owner waits for its workers' current transactions.
const WORKER_STOP_BOUND: Duration = Duration::from_secs(10);
/// Inputs buffered per partition before the consumer waits.
const PARTITION_BUFFER: usize = 4_096;
/// Attempts at a batch whose transaction had to be aborted.
pub const MAX_ATTEMPTS: u32 = 5;
/// Longest a revocation waits for a worker that is fencing.
const FENCE_WAIT: Duration = Duration::from_secs(35);

/// What one owner group consumes.
pub struct OwnerSpec {
    /// The consumer group.
    pub group: String,
    /// `partition.assignment.strategy`: `range` for co-partitioned topics owned together.
    pub assignment: &'static str,
    /// Topics whose partition `n` one worker owns together.
    pub topics: Vec<String>,
    /// For logs and metrics (`order`, `saga.order-fulfilment`).
    pub name: &'static str,
}

/// Readiness of the owners of a process: joined its group, and no partition restoring.
#[derive(Clone, Default)]
pub struct OwnerStatus {
    /// Partitions assigned but not yet restored.
    pub restoring: Arc<AtomicUsize>,
    /// Partitions owned now.
    pub owned: Arc<AtomicUsize>,
    /// The group has given this member partitions, or an empty assignment that held for
    /// [`EMPTY_SETTLE`] (a member joining a cooperative group gets an empty assignment
    /// first and its partitions in the next round).
    pub joined: Arc<AtomicBool>,
    /// When the last empty assignment came (ms since the epoch; 0: none pending).
    empty_since_ms: Arc<AtomicU64>,
}

/// How long an empty assignment must hold before the member counts as joined with none.
const EMPTY_SETTLE: Duration = Duration::from_secs(3);

impl OwnerStatus {
    pub fn ready(&self) -> bool {
        self.joined() && self.restoring.load(Ordering::SeqCst) == 0
    }

    /// Joined its group: partitions assigned, or an empty assignment that held.
    pub fn joined(&self) -> bool {
        if self.joined.load(Ordering::SeqCst) {
            return true;
        }
        let since = self.empty_since_ms.load(Ordering::SeqCst);
        since > 0 && now_ms().saturating_sub(since) >= EMPTY_SETTLE.as_millis() as u64
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Which partitions are owned now, and which are fencing: shared by the rebalance
/// callbacks and the workers.
#[derive(Default)]
struct Ownership {
    inner: Mutex<Owned>,
    fenced: Condvar,
    generations: AtomicU64,
}

#[derive(Default)]
struct Owned {
    revoked: HashMap<i32, CancellationToken>,
    fencing: HashSet<i32>,
}

/// A change of the partitions this member owns.
enum Change {
    Assigned(Vec<(i32, u64, CancellationToken)>),
    Revoked(Vec<i32>),
}

/// Consumer context of an owner: pauses what it is given, cancels what is taken away
/// (after any fence in progress), and hands librdkafka's statistics to `on_stats`.
pub struct Rebalances {
    ownership: Arc<Ownership>,
    changes: mpsc::UnboundedSender<Change>,
    status: OwnerStatus,
    on_stats: Box<dyn Fn(&Statistics) + Send + Sync>,
}

impl ClientContext for Rebalances {
    fn stats(&self, statistics: Statistics) {
        (self.on_stats)(&statistics);
    }
}

impl ConsumerContext for Rebalances {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked = partitions(tpl);
            let mut owned = self
                .ownership
                .inner
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for p in &revoked {
                if let Some(token) = owned.revoked.remove(p) {
                    token.cancel();
                    self.status.owned.fetch_sub(1, Ordering::SeqCst);
                }
            }
            // A worker inside init_transactions now would fence the next owner if this
            // member let go first: wait for it (it then sees its token cancelled).
            if revoked.iter().any(|p| owned.fencing.contains(p)) {
                drop(owned);
                // The wait blocks this poll; let the runtime move other tasks elsewhere.
                crate::state::blocking(|| self.wait_for_fences(&revoked));
            } else {
                drop(owned);
            }
            let _ = self.changes.send(Change::Revoked(revoked));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if tpl.count() == 0 {
                if !self.status.joined.load(Ordering::SeqCst) {
                    let _ = self.status.empty_since_ms.compare_exchange(
                        0,
                        now_ms(),
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                }
                return;
            }
            if let Err(e) = consumer.pause(tpl) {
                error!(error = %e, "pausing newly assigned partitions failed");
            }
            let mut owned = self
                .ownership
                .inner
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let assigned = partitions(tpl)
                .into_iter()
                .map(|p| {
                    let token = CancellationToken::new();
                    match owned.revoked.insert(p, token.clone()) {
                        Some(old) => old.cancel(),
                        None => {
                            self.status.owned.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    // Counted as restoring before the member counts as joined.
                    self.status.restoring.fetch_add(1, Ordering::SeqCst);
                    let generation = self.ownership.generations.fetch_add(1, Ordering::SeqCst);
                    (p, generation, token)
                })
                .collect();
            self.status.joined.store(true, Ordering::SeqCst);
            let _ = self.changes.send(Change::Assigned(assigned));
        }
    }
}

impl Rebalances {
    fn wait_for_fences(&self, revoked: &[i32]) {
        wait_for(&self.ownership, revoked);
    }
}

/// Waits (bounded) until none of `partitions` is fencing.
fn wait_for(ownership: &Ownership, partitions: &[i32]) {
    let deadline = std::time::Instant::now() + FENCE_WAIT;
    let mut owned = ownership.inner.lock().unwrap_or_else(|p| p.into_inner());
    while partitions.iter().any(|p| owned.fencing.contains(p)) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            warn!(
                ?partitions,
                "a partition is still fencing; letting go anyway"
            );
            break;
        }
        owned = ownership
            .fenced
            .wait_timeout(owned, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    let mut ps: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    ps.sort_unstable();
    ps.dedup();
    ps
}

struct Shared {
    consumer: StreamConsumer<Rebalances>,
    ownership: Arc<Ownership>,
    topics: Vec<String>,
    status: OwnerStatus,
    name: &'static str,
}

/// One owned partition, as its worker sees it.
pub struct Partition {
    pub partition: i32,
    /// Cancelled when the partition is revoked (or the owner stops).
    pub revoked: CancellationToken,
    shared: Arc<Shared>,
    restoring: bool,
}

impl Partition {
    /// Fences older owners of `transactional_id` and seeks to the committed offsets.
    /// `None` when the partition was revoked first: the worker must then end without
    /// writing anything.
    pub async fn fence(
        &self,
        kafka: &KafkaConfig,
        transactional_id: &str,
    ) -> anyhow::Result<Option<TxnProducer>> {
        {
            let mut owned = self
                .shared
                .ownership
                .inner
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if self.revoked.is_cancelled() {
                return Ok(None);
            }
            owned.fencing.insert(self.partition);
        }
        // The mark is released when `init_transactions` has really returned — by the
        // blocking thread that runs it, even if this future is dropped by a stop meanwhile.
        let ownership = self.shared.ownership.clone();
        let partition = self.partition;
        let release = move || {
            let mut owned = ownership.inner.lock().unwrap_or_else(|p| p.into_inner());
            owned.fencing.remove(&partition);
            ownership.fenced.notify_all();
        };
        let producer = TxnProducer::new_then(kafka, transactional_id, release).await?;
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            seek_to_committed(&shared.consumer, &shared.topics, partition)
        })
        .await??;
        Ok((!self.revoked.is_cancelled()).then_some(producer))
    }

    /// Restored: resume the paused partition; the process no longer waits for it. False
    /// when the partition was revoked meanwhile: it is NOT resumed (it may be assigned to
    /// this member again already, for a newer worker that has not fenced yet), and the
    /// worker must end without serving.
    pub fn ready(&mut self) -> bool {
        self.done_restoring();
        let _owned = self
            .shared
            .ownership
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.revoked.is_cancelled() {
            return false;
        }
        let mut tpl = TopicPartitionList::new();
        for topic in &self.shared.topics {
            tpl.add_partition(topic, self.partition);
        }
        if let Err(e) = self.shared.consumer.resume(&tpl) {
            warn!(owner = self.shared.name, partition = self.partition, error = %e, "could not resume the partition");
        }
        true
    }

    fn done_restoring(&mut self) {
        if std::mem::take(&mut self.restoring) {
            self.shared.status.restoring.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Fresh group metadata for `send_offsets_to_transaction` (KIP-447).
    pub fn group_metadata(&self) -> anyhow::Result<ConsumerGroupMetadata> {
        self.shared
            .consumer
            .group_metadata()
            .context("no consumer group metadata")
    }

    /// Adds the next offsets to consume (`topic → offset`) of this partition to the open
    /// transaction, so input and output commit together.
    pub async fn send_offsets<'a>(
        &self,
        producer: &TxnProducer,
        next: impl IntoIterator<Item = (&'a str, i64)>,
    ) -> anyhow::Result<()> {
        let mut offsets = TopicPartitionList::new();
        for (topic, offset) in next {
            offsets.add_partition_offset(topic, self.partition, Offset::Offset(offset))?;
        }
        if offsets.count() == 0 {
            return Ok(());
        }
        producer
            .send_offsets(offsets, self.group_metadata()?)
            .await?;
        Ok(())
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        // A partition revoked while restoring is no longer waited for. One whose worker
        // failed still is, until the owner ends and resets its counts: `rebuild-state` or
        // `/readyz` must not see a failed restore as done.
        if self.revoked.is_cancelled() {
            self.done_restoring();
        }
    }
}

/// Decides what follows a failed transaction at `attempt`: `Ok` to abort it and try the
/// batch again, `Err` to give up (fatal, too many attempts, or a commit of unknown
/// outcome — which is never aborted or retried: the owner restarts and fencing decides).
pub async fn after_failure(
    producer: &TxnProducer,
    err: anyhow::Error,
    attempt: u32,
    what: impl Display,
) -> anyhow::Result<()> {
    if CommitError::is_uncertain(&err) {
        return Err(err.context(format!(
            "{what}: the commit's outcome is unknown; the owner restarts and the log decides"
        )));
    }
    let kind = CommitError::kafka_error(&err)
        .map(classify)
        .unwrap_or(TxnErrorKind::Fatal);
    if kind == TxnErrorKind::Fatal || attempt >= MAX_ATTEMPTS {
        return Err(err.context(format!(
            "{what} gave up ({kind:?}); the owner restarts and restores"
        )));
    }
    warn!(%what, attempt, error = %format!("{err:#}"), "transaction failed; aborting and retrying");
    if let Err(abort) = producer.abort().await {
        if classify(&abort) == TxnErrorKind::Fatal {
            return Err(anyhow::Error::new(abort).context("aborting a failed transaction"));
        }
    }
    tokio::time::sleep(Duration::from_millis(50 * attempt as u64)).await;
    Ok(())
}

/// Runs an owner group until `shutdown`, or until a current worker fails (e.g. fenced),
/// which ends it with that error so the caller can restart it. `spawn` makes the worker
/// of one partition from its [`Partition`], its input channel and a sender into it (for
/// work handed over in-process).
pub async fn run<I, W, Fut>(
    kafka: &KafkaConfig,
    spec: OwnerSpec,
    status: OwnerStatus,
    on_stats: impl Fn(&Statistics) + Send + Sync + 'static,
    shutdown: CancellationToken,
    mut spawn: W,
) -> anyhow::Result<()>
where
    I: From<OwnedMessage> + Send + 'static,
    W: FnMut(Partition, mpsc::Receiver<I>, mpsc::Sender<I>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let ownership = Arc::new(Ownership::default());
    let (changes_tx, mut changes) = mpsc::unbounded_channel();
    let context = Rebalances {
        ownership: ownership.clone(),
        changes: changes_tx,
        status: status.clone(),
        on_stats: Box::new(on_stats),
    };
    let consumer: StreamConsumer<Rebalances> = kafka
        .client()
        .set("group.id", &spec.group)
        .set("statistics.interval.ms", "5000")
        .set("partition.assignment.strategy", spec.assignment)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .create_with_context(context)
        .with_context(|| format!("creating the consumer of group {}", spec.group))?;
    let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .with_context(|| format!("subscribing to {topics:?}"))?;
    let name = spec.name;
    let shared = Arc::new(Shared {
        consumer,
        ownership,
        topics: spec.topics,
        status: status.clone(),
        name,
    });
    info!(owner = name, group = %spec.group, "partition owner started");

    // partition → (generation, input sender)
    let mut workers: HashMap<i32, (u64, mpsc::Sender<I>)> = HashMap::new();
    let mut tasks: JoinSet<(i32, u64, anyhow::Result<()>)> = JoinSet::new();
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(change) = changes.recv() => apply(change, &shared, &mut workers, &mut tasks, &mut spawn),
            Some(done) = tasks.join_next() => match done {
                Ok((p, generation, Err(e))) if workers.get(&p).map(|w| w.0) != Some(generation) => {
                    // A worker of a partition since revoked (or of an older generation of
                    // it) failing its last batch is the hand-over, not a fault.
                    warn!(owner = name, partition = p, generation, error = %format!("{e:#}"), "worker of a revoked partition ended with an error");
                }
                Ok((p, _, Err(e))) => break Err(e.context(format!("{name} partition {p} worker failed"))),
                Ok((p, generation, Ok(()))) => {
                    if workers.get(&p).map(|w| w.0) == Some(generation) {
                        workers.remove(&p);
                    }
                }
                Err(join) => break Err(anyhow!("a {name} worker panicked: {join}")),
            },
            message = shared.consumer.recv() => {
                // Apply any rebalance the poll just ran, so the partition's worker exists.
                while let Ok(change) = changes.try_recv() {
                    apply(change, &shared, &mut workers, &mut tasks, &mut spawn);
                }
                let message = match message {
                    Ok(m) => m.detach(),
                    Err(e) => { error!(owner = name, error = %e, "consumer error"); continue; }
                };
                let partition = message.partition();
                match workers.get(&partition) {
                    Some((_, worker)) => if worker.send(I::from(message)).await.is_err() {
                        // The worker ended (revoked, or failed: its result says which).
                        debug!(owner = name, partition, "input for an ended worker dropped");
                    },
                    // Fetched before the partition was revoked: the next owner reads it again
                    // from the committed offset, so dropping it here loses nothing.
                    None => debug!(owner = name, partition, "input for a revoked partition dropped"),
                }
            }
        }
    };
    // Each worker ends after its current transaction; one that does not within the
    // bound is aborted (its open transaction is then aborted by the next owner's fence).
    {
        let owned = shared
            .ownership
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for token in owned.revoked.values() {
            token.cancel();
        }
    }
    workers.clear();
    stop_workers(&mut tasks, WORKER_STOP_BOUND, name).await;
    // A fence still running in a blocking thread must end before this member lets go.
    let fencing: Vec<i32> = {
        let owned = shared
            .ownership
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        owned.fencing.iter().copied().collect()
    };
    if !fencing.is_empty() {
        let ownership = shared.ownership.clone();
        let _ = tokio::task::spawn_blocking(move || wait_for(&ownership, &fencing)).await;
    }
    shared.consumer.unsubscribe();
    status.joined.store(false, Ordering::SeqCst);
    status.empty_since_ms.store(0, Ordering::SeqCst);
    status.owned.store(0, Ordering::SeqCst);
    status.restoring.store(0, Ordering::SeqCst);
    result
}

fn apply<I, W, Fut>(
    change: Change,
    shared: &Arc<Shared>,
    workers: &mut HashMap<i32, (u64, mpsc::Sender<I>)>,
    tasks: &mut JoinSet<(i32, u64, anyhow::Result<()>)>,
    spawn: &mut W,
) where
    I: Send + 'static,
    W: FnMut(Partition, mpsc::Receiver<I>, mpsc::Sender<I>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    match change {
        Change::Assigned(assigned) => {
            let ps: Vec<i32> = assigned.iter().map(|a| a.0).collect();
            info!(owner = shared.name, partitions = ?ps, "partitions assigned");
            for (p, generation, revoked) in assigned {
                let (tx, rx) = mpsc::channel(PARTITION_BUFFER);
                workers.insert(p, (generation, tx.clone()));
                let partition = Partition {
                    partition: p,
                    revoked,
                    shared: shared.clone(),
                    restoring: true,
                };
                let worker = spawn(partition, rx, tx);
                tasks.spawn(async move { (p, generation, worker.await) });
            }
        }
        Change::Revoked(ps) => {
            info!(owner = shared.name, partitions = ?ps, "partitions revoked");
            for p in ps {
                // Its token is cancelled already; the worker ends after its current batch.
                workers.remove(&p);
            }
        }
    }
}

/// Waits up to `bound` for every worker to end (each finishes its current transaction),
/// then aborts the rest: their open transactions are aborted by the next owner's fencing.
async fn stop_workers<T: 'static>(tasks: &mut JoinSet<T>, bound: Duration, who: &str) {
    let deadline = tokio::time::sleep(bound);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => {
                warn!(who, "workers still busy at the shutdown bound; aborting them");
                break;
            }
            next = tasks.join_next() => if next.is_none() { break },
        }
    }
    tasks.shutdown().await;
}

/// Moves partition `partition` of each of `topics` to the group's committed offset (the
/// beginning when there is none). Blocking: call it off the async runtime.
fn seek_to_committed<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    topics: &[String],
    partition: i32,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(30);
    let mut wanted = TopicPartitionList::new();
    for topic in topics {
        wanted.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(wanted, timeout)
        .with_context(|| format!("reading the committed offsets of partition {partition}"))?;
    for element in committed.elements() {
        let offset = match element.offset() {
            Offset::Offset(at) => Offset::Offset(at),
            _ => Offset::Beginning,
        };
        consumer
            .seek(element.topic(), partition, offset, timeout)
            .with_context(|| format!("seeking {}/{partition} to {offset:?}", element.topic()))?;
    }
    Ok(())
}

//! What the partition owners of a consumer group share — the command processors and the
//! saga orchestrator: a consumer context that pauses newly assigned partitions (until
//! their worker has rebuilt them, off the rebalance callback) and reports every change,
//! and a bounded stop of the workers.

use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{error, warn};

/// A change of the partitions this member owns (partition numbers, deduplicated over
/// the subscribed topics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// Consumer context of a partition owner: pauses what it is given, reports changes on a
/// channel, and hands librdkafka's statistics (`statistics.interval.ms`) to `on_stats`.
pub struct Rebalances {
    changes: mpsc::UnboundedSender<Change>,
    on_stats: Box<dyn Fn(&Statistics) + Send + Sync>,
}

impl Rebalances {
    /// The context, and the receiving end of its changes.
    pub fn new(
        on_stats: impl Fn(&Statistics) + Send + Sync + 'static,
    ) -> (Self, mpsc::UnboundedReceiver<Change>) {
        let (changes, receiver) = mpsc::unbounded_channel();
        let context = Self {
            changes,
            on_stats: Box::new(on_stats),
        };
        (context, receiver)
    }
}

impl ClientContext for Rebalances {
    fn stats(&self, statistics: Statistics) {
        (self.on_stats)(&statistics);
    }
}

impl ConsumerContext for Rebalances {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let _ = self.changes.send(Change::Revoked(partitions(tpl)));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if tpl.count() > 0 {
                if let Err(e) = consumer.pause(tpl) {
                    error!(error = %e, "pausing newly assigned partitions failed");
                }
                let _ = self.changes.send(Change::Assigned(partitions(tpl)));
            }
        }
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    let mut ps: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    ps.sort_unstable();
    ps.dedup();
    ps
}

/// Waits up to `bound` for every worker to end (each finishes its current transaction),
/// then aborts the rest: their open transactions are aborted by the next owner's fencing.
pub async fn stop_workers<T: 'static>(tasks: &mut JoinSet<T>, bound: Duration, who: &str) {
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
/// beginning when there is none). A new owner calls it right after `init_transactions`:
/// the offset librdkafka fetched at assignment may predate a commit of the previous
/// owner that completed before the fence. Blocking: call it off the async runtime.
pub fn seek_to_committed<C: ConsumerContext + 'static>(
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

/// A partition owner's consumer of `topics` in `group`: offsets only ever committed by
/// the owner's transactions, `read_committed`, newly assigned partitions paused, and
/// librdkafka's statistics every 5 s handed to `on_stats`. `assignment` is the
/// `partition.assignment.strategy`.
pub fn owner_consumer(
    kafka: &crate::KafkaConfig,
    group: &str,
    assignment: &str,
    topics: &[&str],
    on_stats: impl Fn(&Statistics) + Send + Sync + 'static,
) -> anyhow::Result<(StreamConsumer<Rebalances>, mpsc::UnboundedReceiver<Change>)> {
    let (context, changes) = Rebalances::new(on_stats);
    let consumer: StreamConsumer<Rebalances> = kafka
        .client()
        .set("group.id", group)
        .set("statistics.interval.ms", "5000")
        .set("partition.assignment.strategy", assignment)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .create_with_context(context)
        .with_context(|| format!("creating the consumer of group {group}"))?;
    consumer
        .subscribe(topics)
        .with_context(|| format!("subscribing to {topics:?}"))?;
    Ok((consumer, changes))
}

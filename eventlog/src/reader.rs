//! Reading one partition `read_committed` up to its last stable offset.

use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::time::Instant;

use crate::KafkaConfig;

/// How long a catch-up read may go without a record or a position change.
const STALL_LIMIT: Duration = Duration::from_secs(30);

fn read_committed(config: &KafkaConfig) -> rdkafka::ClientConfig {
    let mut c = config.client();
    c.set("group.id", "tally-partition-reader")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // A catch-up reads whole partitions: large fetches, fewer round trips.
        .set("max.partition.fetch.bytes", "16777216")
        .set("fetch.max.bytes", "67108864");
    c
}

/// `(low, high)` watermarks of a partition as a `read_committed` reader sees them: `high`
/// is the last stable offset, past which no committed record can yet be read.
pub async fn watermarks(
    config: &KafkaConfig,
    topic: &str,
    partition: i32,
) -> anyhow::Result<(i64, i64)> {
    let consumer: BaseConsumer = read_committed(config)
        .create()
        .context("creating a consumer")?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        // A topic created a moment ago may not have a leader yet: retry for a while.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            match consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10)) {
                Ok(marks) => return Ok(marks),
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(%topic, partition, error = %e, "watermarks not available yet");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("fetching watermarks of {topic}/{partition}"))
                }
            }
        }
    })
    .await?
}

/// Reads `topic`/`partition` from offset `from` with `read_committed`, calling
/// `on_record` for each committed record in order, until the reader's position reaches the
/// last stable offset seen at the start. Returns the next offset to read.
///
/// The partition is assigned with its start offset (not assign-then-seek), and the end
/// is judged by the consumer's position rather than the last record's offset, because
/// transaction markers and aborted records take offsets but are never delivered.
pub async fn read_partition<F>(
    config: &KafkaConfig,
    topic: &str,
    partition: i32,
    from: i64,
    mut on_record: F,
) -> anyhow::Result<i64>
where
    F: FnMut(&BorrowedMessage<'_>) -> anyhow::Result<()>,
{
    let (low, end) = watermarks(config, topic, partition).await?;
    let mut next = from.max(low);
    if next >= end {
        return Ok(next);
    }
    let consumer: StreamConsumer = read_committed(config)
        .create()
        .context("creating a consumer")?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(next))?;
    consumer
        .assign(&assignment)
        .context("assigning the partition")?;

    // Short: the last offsets of a transactional partition are often markers, which only
    // the consumer's position (checked on each tick) shows as read. One timer for the
    // whole read, not one per record: a catch-up reads hundreds of thousands.
    const TICK: Duration = Duration::from_millis(20);
    let mut last_progress = Instant::now();
    let mut progressed = false;
    let tick = tokio::time::sleep(TICK);
    tokio::pin!(tick);
    while next < end {
        tokio::select! {
            biased;
            received = consumer.recv() => match received {
                Ok(message) => {
                    on_record(&message)?;
                    next = message.offset() + 1;
                    progressed = true;
                }
                Err(err) => bail!("reading {topic}/{partition} at {next}: {err}"),
            },
            () = &mut tick => {
                if let Some(position) = position(&consumer, topic, partition)? {
                    if position > next {
                        next = position;
                        progressed = true;
                    }
                }
                if std::mem::take(&mut progressed) {
                    last_progress = Instant::now();
                } else if last_progress.elapsed() > STALL_LIMIT {
                    bail!("reading {topic}/{partition} made no progress at {next} of {end} for {STALL_LIMIT:?}");
                }
                tick.as_mut().reset(tokio::time::Instant::now() + TICK);
            }
        }
    }
    Ok(next)
}

fn position(consumer: &StreamConsumer, topic: &str, partition: i32) -> anyhow::Result<Option<i64>> {
    let positions = consumer
        .position()
        .context("reading the consumer position")?;
    Ok(positions
        .find_partition(topic, partition)
        .and_then(|p| match p.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }))
}

/// The first offset of `topic`/`partition` whose record was written at or after `at_ms`
/// (milliseconds since the epoch), or the end of the partition when none was.
pub async fn offset_for_time(
    config: &KafkaConfig,
    topic: &str,
    partition: i32,
    at_ms: i64,
) -> anyhow::Result<i64> {
    let consumer: BaseConsumer = read_committed(config)
        .create()
        .context("creating a consumer")?;
    let (topic, end) = (
        topic.to_string(),
        watermarks(config, topic, partition).await?.1,
    );
    tokio::task::spawn_blocking(move || {
        let mut query = TopicPartitionList::new();
        query.add_partition_offset(&topic, partition, Offset::Offset(at_ms))?;
        let found = consumer
            .offsets_for_times(query, Duration::from_secs(10))
            .with_context(|| format!("looking up offsets by time in {topic}/{partition}"))?;
        Ok(
            match found.find_partition(&topic, partition).map(|p| p.offset()) {
                Some(Offset::Offset(o)) if o >= 0 => o,
                _ => end,
            },
        )
    })
    .await?
}

/// Records behind the last stable offset per assigned partition, from a librdkafka
/// statistics report: `(topic, partition, lag)`. Offsets are committed by Tally's
/// transactions, which librdkafka's own `consumer_lag` does not see, so the lag is
/// measured from what was handed to the application.
pub fn consumer_lags(statistics: &rdkafka::Statistics) -> Vec<(String, i32, i64)> {
    let mut lags = Vec::new();
    for (topic, t) in &statistics.topics {
        for (partition, p) in &t.partitions {
            let at = p.app_offset.max(p.committed_offset);
            if *partition < 0 || !p.desired || p.ls_offset < 0 || at < 0 {
                continue;
            }
            lags.push((topic.clone(), *partition, (p.ls_offset - at).max(0)));
        }
    }
    lags
}

//! Which Kafka log this is: the cluster's id plus an id Tally writes once into
//! `<prefix>.meta` (ADR 7). Kafka's own topic ids would do, but rdkafka does not expose
//! them without `unsafe`.
//!
//! Several processes may start on a fresh log at once. Each writes a new id only when the
//! meta topic is empty, and then every one of them — winner or not — takes the FIRST
//! record of the topic: a loser adopts the winner's id. The topic is never compacted
//! (compaction would keep the last record of the key, not the first).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use uuid::Uuid;

use crate::{read_partition, watermarks, KafkaConfig, Topics};

/// The key of the one record that matters in `<prefix>.meta`.
pub const LOG_ID_KEY: &str = "log-id";

/// The identity of one Kafka log: a cluster, and the topics of one prefix on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogIdentity {
    /// Kafka's cluster id (new whenever the brokers' storage is formatted afresh).
    pub cluster_id: String,
    /// The id in the first record of `<prefix>.meta` (new whenever the topics are).
    pub log_id: Uuid,
}

impl fmt::Display for LogIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Kafka cluster {}, log id {}",
            self.cluster_id, self.log_id
        )
    }
}

/// The identity of the log the topics of `config.topic_prefix` live on, writing the log
/// id first if the meta topic is still empty. The meta topic must exist
/// ([`Topics::all`] includes it).
pub async fn log_identity(config: &KafkaConfig) -> anyhow::Result<LogIdentity> {
    let cluster_id = cluster_id(config).await?;
    let meta = Topics::new(&config.topic_prefix).meta();
    let log_id = match first_log_id(config, &meta).await? {
        Some(id) => id,
        None => {
            write_log_id(config, &meta).await?;
            first_log_id(config, &meta)
                .await?
                .with_context(|| format!("{meta} is still empty after writing the log id to it"))?
        }
    };
    Ok(LogIdentity { cluster_id, log_id })
}

async fn cluster_id(config: &KafkaConfig) -> anyhow::Result<String> {
    let consumer: BaseConsumer = config
        .client()
        .create()
        .context("creating a Kafka client")?;
    tokio::task::spawn_blocking(move || consumer.client().fetch_cluster_id(Duration::from_secs(10)))
        .await?
        .context("Kafka did not tell its cluster id within 10 s")
}

/// The log id in the first record of `meta`, if it has one.
async fn first_log_id(config: &KafkaConfig, meta: &str) -> anyhow::Result<Option<Uuid>> {
    let (low, end) = watermarks(config, meta, 0).await?;
    if end <= low {
        return Ok(None);
    }
    if low > 0 {
        // Records were deleted from the front: the first id is gone, and a later one
        // would give this log a second identity.
        bail!("{meta} no longer starts at offset 0 (it starts at {low}): its first log id was deleted; the topic must never be compacted or trimmed")
    }
    let mut first = None;
    read_partition(config, meta, 0, 0, |record| {
        if first.is_none() {
            first = Some(parse_log_id(meta, record.key(), record.payload()));
        }
        Ok(())
    })
    .await?;
    first.transpose()
}

fn parse_log_id(meta: &str, key: Option<&[u8]>, payload: Option<&[u8]>) -> anyhow::Result<Uuid> {
    let value = match (key, payload) {
        (Some(k), Some(v)) if k == LOG_ID_KEY.as_bytes() => v,
        _ => bail!("the first record of {meta} is not a `{LOG_ID_KEY}` record; something other than Tally wrote to it"),
    };
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| Uuid::parse_str(s).ok())
        .with_context(|| format!("the first record of {meta} does not hold a log id (a UUID)"))
}

async fn write_log_id(config: &KafkaConfig, meta: &str) -> anyhow::Result<()> {
    let producer: FutureProducer = config
        .producer()
        .set("enable.idempotence", "true")
        .create()
        .context("creating the meta topic producer")?;
    let id = Uuid::new_v4().to_string();
    let record = FutureRecord::to(meta)
        .partition(0)
        .key(LOG_ID_KEY)
        .payload(&id);
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("writing the log id to {meta}: {e}"))?;
    tracing::info!(topic = %meta, log_id = %id, "wrote a log id (the first process to start on this log does)");
    Ok(())
}

/// The high watermark (end offset, read_uncommitted) of each `(topic, partition)`, over
/// one client.
pub async fn end_offsets(
    config: &KafkaConfig,
    partitions: Vec<(String, i32)>,
) -> anyhow::Result<HashMap<(String, i32), i64>> {
    let consumer: BaseConsumer = config
        .client()
        .create()
        .context("creating a Kafka client")?;
    tokio::task::spawn_blocking(move || {
        let mut ends = HashMap::new();
        for (topic, partition) in partitions {
            let (_, high) = consumer
                .fetch_watermarks(&topic, partition, Duration::from_secs(10))
                .with_context(|| format!("fetching the end offset of {topic}/{partition}"))?;
            ends.insert((topic, partition), high);
        }
        Ok(ends)
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_log_id_record_holding_a_uuid_is_a_log_id() {
        let id = Uuid::new_v4();
        let text = id.to_string();
        let key = Some(LOG_ID_KEY.as_bytes());
        assert_eq!(parse_log_id("m", key, Some(text.as_bytes())).unwrap(), id);
        assert!(parse_log_id("m", Some(b"other".as_slice()), Some(text.as_bytes())).is_err());
        assert!(parse_log_id("m", key, Some(b"not a uuid".as_slice())).is_err());
        assert!(parse_log_id("m", key, None).is_err());
    }
}

//! Topic names and creation (DESIGN.md §2).

use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use tracing::info;

use crate::KafkaConfig;

const FOREVER: &str = "-1";
const WEEK_MS: &str = "604800000";
/// How long the keyed outcomes stay on `<stream>.outcomes`; the longest dedup window.
pub const OUTCOMES_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
const DAY_MS: &str = "86400000";

/// The names of every topic, from the configured prefix.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// Topic names under `prefix` (e.g. `tally`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// Events of one stream (`order`, `inventory`, `payment`), keyed by aggregate id.
    pub fn events(&self, stream: &str) -> String {
        format!("{}.{stream}.events", self.prefix)
    }

    /// Commands for one stream, co-partitioned with its events.
    pub fn commands(&self, stream: &str) -> String {
        format!("{}.{stream}.commands", self.prefix)
    }

    /// Outcomes of commands, for the HTTP node that waits.
    pub fn command_results(&self) -> String {
        format!("{}.command-results", self.prefix)
    }

    /// Outcomes of one stream's commands sent over HTTP with an Idempotency-Key, keyed by
    /// command id and co-partitioned with its command topic: the record a new owner of a
    /// partition reloads, so a retry within the dedup window is answered, never applied
    /// again.
    pub fn command_outcomes(&self, stream: &str) -> String {
        format!("{}.{stream}.outcomes", self.prefix)
    }

    /// The latest state of each aggregate (or saga) of one stream, keyed by its id:
    /// compacted, co-partitioned with the stream's events, written in the same
    /// transactions (ADR 10). `stream` is `order`, … or `saga.order-fulfilment`.
    pub fn state(&self, stream: &str) -> String {
        format!("{}.{stream}.state", self.prefix)
    }

    /// Outcomes of the commands the saga sent, keyed by saga (order) id.
    pub fn inbox(&self, saga: &str) -> String {
        format!("{}.{saga}.inbox", self.prefix)
    }

    /// Records that could not be decoded or processed, with the error in headers.
    pub fn dead_letters(&self) -> String {
        format!("{}.dlq", self.prefix)
    }

    /// One partition holding the log id, written once by the first process to start
    /// (see [`log_identity`](crate::log_identity)); kept forever, never compacted.
    pub fn meta(&self) -> String {
        format!("{}.meta", self.prefix)
    }

    /// Every topic Tally uses for these aggregate streams and sagas, with its settings.
    pub fn all(&self, streams: &[&str], sagas: &[&str], config: &KafkaConfig) -> Vec<TopicSpec> {
        let p = config.partitions;
        let mut specs = Vec::new();
        for stream in streams {
            specs.push(TopicSpec::new(self.events(stream), p, FOREVER));
            specs.push(TopicSpec::new(self.commands(stream), p, WEEK_MS));
            // Longer than any dedup window Tally accepts (--dedup-window-secs).
            specs.push(TopicSpec::new(self.command_outcomes(stream), p, WEEK_MS));
            specs.push(TopicSpec::changelog(self.state(stream), p));
        }
        for saga in sagas {
            specs.push(TopicSpec::new(self.events(saga), p, FOREVER));
            specs.push(TopicSpec::new(self.inbox(saga), p, WEEK_MS));
            specs.push(TopicSpec::changelog(self.state(saga), p));
        }
        specs.push(TopicSpec::new(self.command_results(), p, DAY_MS));
        specs.push(TopicSpec::new(self.dead_letters(), 1, FOREVER));
        specs.push(TopicSpec::new(self.meta(), 1, FOREVER));
        specs
    }
}

/// One topic to create: name, partitions and retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    /// `retention.ms`; `-1` keeps records forever (the log is the source of truth).
    pub retention_ms: &'static str,
    /// A compacted changelog: only the latest record of each key is kept.
    pub compacted: bool,
}

impl TopicSpec {
    /// A topic spec; `retention_ms` of `"-1"` keeps records forever.
    pub fn new(name: String, partitions: i32, retention_ms: &'static str) -> Self {
        Self {
            name,
            partitions,
            retention_ms,
            compacted: false,
        }
    }

    /// A compacted state changelog (ADR 10). A takeover reads it whole, so it is kept
    /// close to one record per key: small segments that roll within minutes (the active
    /// segment is never compacted) and a low dirty ratio; deleted keys' tombstones stay a
    /// day, so a reader that was behind still sees them.
    pub fn changelog(name: String, partitions: i32) -> Self {
        Self {
            name,
            partitions,
            retention_ms: FOREVER,
            compacted: true,
        }
    }

    /// The topic settings Tally creates it with.
    pub fn settings(&self) -> Vec<(&'static str, &'static str)> {
        if self.compacted {
            vec![
                ("cleanup.policy", "compact"),
                ("segment.bytes", "16777216"),
                ("segment.ms", "600000"),
                ("min.cleanable.dirty.ratio", "0.1"),
                ("min.compaction.lag.ms", "0"),
                ("delete.retention.ms", DAY_MS),
            ]
        } else {
            vec![
                ("retention.ms", self.retention_ms),
                ("cleanup.policy", "delete"),
            ]
        }
    }
}

/// Fails unless the brokers answer a metadata request within `timeout`.
pub async fn check_connection(config: &KafkaConfig, timeout: Duration) -> anyhow::Result<()> {
    let consumer: BaseConsumer = config
        .client()
        .create()
        .context("creating a Kafka client")?;
    tokio::task::spawn_blocking(move || consumer.fetch_metadata(None, timeout).map(|_| ()))
        .await?
        .with_context(|| "Kafka did not answer; is it running? (scripts/services up)".to_string())
}

/// Creates the topics that are missing and checks the partition counts of those that
/// exist: co-partitioned topics with another count would break single-writer ownership.
pub async fn ensure_topics(config: &KafkaConfig, specs: &[TopicSpec]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = config
        .client()
        .create()
        .context("creating a Kafka admin client")?;
    let new_topics: Vec<NewTopic> = specs
        .iter()
        .map(|s| {
            let mut topic = NewTopic::new(
                &s.name,
                s.partitions,
                TopicReplication::Fixed(config.replication_factor),
            );
            for (key, value) in s.settings() {
                topic = topic.set(key, value);
            }
            topic
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .context("creating topics")?;
    for result in results {
        match result {
            Ok(name) => info!(topic = %name, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("could not create topic {name}: {code}"),
        }
    }
    verify_partitions(config, specs).await
}

async fn verify_partitions(config: &KafkaConfig, specs: &[TopicSpec]) -> anyhow::Result<()> {
    let consumer: BaseConsumer = config
        .client()
        .create()
        .context("creating a Kafka client")?;
    let specs = specs.to_vec();
    tokio::task::spawn_blocking(move || {
        // A topic just created can take a moment to appear in the brokers' metadata.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let metadata = consumer
                .fetch_metadata(None, Duration::from_secs(10))
                .context("fetching topic metadata")?;
            let mut missing = None;
            for spec in &specs {
                let found = metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == spec.name && t.error().is_none())
                    .map(|t| t.partitions().len() as i32);
                match found {
                    Some(n) if n == spec.partitions => {}
                    Some(n) => bail!(
                        "topic {} has {n} partitions but {} are configured; co-partitioned \
                         topics must match: use --partitions {n} or a new --topic-prefix",
                        spec.name,
                        spec.partitions
                    ),
                    None => missing = Some(spec.name.clone()),
                }
            }
            match missing {
                None => return Ok(()),
                Some(name) if std::time::Instant::now() > deadline => {
                    bail!("topic {name} is still missing from the metadata after creation")
                }
                Some(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    })
    .await?
}

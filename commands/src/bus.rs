//! The API side of commands: send a command to its partition of the command topic and
//! wait for its outcome, which comes back through [`Waiters`].

use std::time::Duration;

use anyhow::Context;
use eventlog::rdkafka::consumer::{Consumer, StreamConsumer};
use eventlog::rdkafka::message::OwnedHeaders;
use eventlog::rdkafka::producer::{FutureProducer, FutureRecord};
use eventlog::rdkafka::{Message, Offset, TopicPartitionList};
use eventlog::{partition_for, watermarks, KafkaConfig, Topics};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::waiters::Waiters;
use crate::wire::{CommandEnvelope, CommandResult};

/// Why a command got no outcome.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The command may or may not have been handled.
    #[error("no outcome within {0:?}")]
    Timeout(Duration),
    /// The command never reached the log.
    #[error("could not write the command to Kafka: {0}")]
    Kafka(String),
}

/// Sends commands and waits for their outcomes.
#[derive(Clone)]
pub struct CommandBus {
    producer: FutureProducer,
    topics: Topics,
    partitions: i32,
    waiters: Waiters,
    timeout: Duration,
}

impl CommandBus {
    /// A bus writing to `kafka`'s command topics, waiting up to `timeout` for outcomes.
    pub fn new(kafka: &KafkaConfig, waiters: Waiters, timeout: Duration) -> anyhow::Result<Self> {
        let producer = kafka
            .producer()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .create()
            .context("creating the command producer")?;
        Ok(Self {
            producer,
            topics: Topics::new(&kafka.topic_prefix),
            partitions: kafka.partitions,
            waiters,
            timeout,
        })
    }

    /// Appends the command to its stream's command topic (partitioned like the events, by
    /// aggregate id) and waits for the outcome.
    pub async fn dispatch(
        &self,
        stream: &str,
        command: &CommandEnvelope,
    ) -> Result<CommandResult, DispatchError> {
        let outcome = self.waiters.register(command.command_id);
        let payload =
            serde_json::to_vec(command).map_err(|e| DispatchError::Kafka(e.to_string()))?;
        let topic = self.topics.commands(stream);
        let record = FutureRecord::to(&topic)
            .partition(partition_for(&command.aggregate_id, self.partitions))
            .key(&command.aggregate_id)
            .payload(&payload)
            .headers(OwnedHeaders::new());
        if let Err((err, _)) = self.producer.send(record, self.timeout).await {
            self.waiters.forget(command.command_id);
            return Err(DispatchError::Kafka(err.to_string()));
        }
        match tokio::time::timeout(self.timeout, outcome).await {
            Ok(Ok(result)) => Ok(result),
            _ => {
                self.waiters.forget(command.command_id);
                Err(DispatchError::Timeout(self.timeout))
            }
        }
    }
}

/// Reads every partition of the command-results topic from its current end and hands each
/// outcome to its waiter: the path for commands whose partition another process owns.
/// Returns once the listener is positioned, so no outcome committed after it can be missed.
pub async fn start_results_listener(
    kafka: &KafkaConfig,
    waiters: Waiters,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let topic = Topics::new(&kafka.topic_prefix).command_results();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..kafka.partitions {
        let (_, end) = watermarks(kafka, &topic, partition).await?;
        assignment.add_partition_offset(&topic, partition, Offset::Offset(end))?;
    }
    let consumer: StreamConsumer = kafka
        .client()
        .set(
            "group.id",
            format!("{}.results-listener", kafka.topic_prefix),
        )
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
        .context("creating the results listener")?;
    consumer
        .assign(&assignment)
        .context("assigning the command-results partitions")?;
    Ok(tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = consumer.recv() => m,
            };
            match message {
                Ok(m) => match m.payload().map(serde_json::from_slice::<CommandResult>) {
                    Some(Ok(result)) => waiters.complete(&result),
                    _ => warn!(offset = m.offset(), "undecodable command result skipped"),
                },
                Err(e) => debug!(error = %e, "results listener"),
            }
        }
    }))
}

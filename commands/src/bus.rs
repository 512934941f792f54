//! The API side of commands: send a command to its partition of the command topic and
//! wait for its outcome, which comes back through [`Local`].

use std::time::Duration;

use anyhow::Context;
use eventlog::rdkafka::consumer::{Consumer, StreamConsumer};
use eventlog::rdkafka::message::OwnedHeaders;
use eventlog::rdkafka::producer::{FutureProducer, FutureRecord};
use eventlog::rdkafka::{Message, Offset, TopicPartitionList};
use eventlog::{partition_for, watermarks, KafkaConfig, Topics};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::local::Local;
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
    local: Local,
    timeout: Duration,
}

impl CommandBus {
    /// A bus writing to `kafka`'s command topics, waiting up to `timeout` for outcomes.
    pub fn new(kafka: &KafkaConfig, local: Local, timeout: Duration) -> anyhow::Result<Self> {
        let producer = kafka
            .producer()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .create()
            .context("creating the command producer")?;
        let bus = Self {
            producer,
            topics: Topics::new(&kafka.topic_prefix),
            partitions: kafka.partitions,
            local,
            timeout,
        };
        // Commands a failing local worker could not handle go on through the topic.
        let (bounced, mut to_send) = tokio::sync::mpsc::unbounded_channel();
        bus.local.on_bounce(bounced);
        let sender = bus.clone();
        tokio::spawn(async move {
            while let Some((stream, command)) = to_send.recv().await {
                if let Err(e) = sender.append(stream, &command).await {
                    warn!(command_id = %command.command_id, error = %e, "could not pass a command on; its request will time out");
                }
            }
        });
        Ok(bus)
    }

    fn partition(&self, command: &CommandEnvelope) -> i32 {
        partition_for(&command.aggregate_id, self.partitions)
    }

    /// Writes a command to its partition of the stream's command topic.
    async fn append(&self, stream: &str, command: &CommandEnvelope) -> Result<(), DispatchError> {
        let payload =
            serde_json::to_vec(command).map_err(|e| DispatchError::Kafka(e.to_string()))?;
        let topic = self.topics.commands(stream);
        let record = FutureRecord::to(&topic)
            .partition(self.partition(command))
            .key(&command.aggregate_id)
            .payload(&payload)
            .headers(OwnedHeaders::new());
        self.producer
            .send(record, self.timeout)
            .await
            .map(|_| ())
            .map_err(|(err, _)| DispatchError::Kafka(err.to_string()))
    }

    /// Appends the command to its stream's command topic (partitioned like the events, by
    /// aggregate id) and waits for the outcome.
    pub async fn dispatch(
        &self,
        stream: &'static str,
        command: &CommandEnvelope,
    ) -> Result<CommandResult, DispatchError> {
        let outcome = self.local.register(command.command_id);
        // The owner is in this process: hand the command over, skipping the topic.
        if !self
            .local
            .try_direct(stream, self.partition(command), command)
        {
            if let Err(e) = self.append(stream, command).await {
                self.local.forget(command.command_id);
                return Err(e);
            }
        }
        match tokio::time::timeout(self.timeout, outcome).await {
            Ok(Ok(result)) => Ok(result),
            _ => {
                self.local.forget(command.command_id);
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
    local: Local,
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
                    Some(Ok(result)) => local.complete(&result),
                    _ => warn!(offset = m.offset(), "undecodable command result skipped"),
                },
                Err(e) => debug!(error = %e, "results listener"),
            }
        }
    }))
}

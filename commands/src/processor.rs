//! The command processor of one aggregate type: an owner group of its command topic on
//! the partition-owner runtime (`eventlog::owner`). Each owned partition gets a
//! [`PartitionWorker`]; this module only says what the workers share.

use std::sync::Arc;
use std::time::Duration;

use eventlog::owner::{self, OwnerSpec, OwnerStatus};
use eventlog::rdkafka::message::OwnedMessage;
use eventlog::state::{StateConfig, StateMetrics};
use eventlog::{KafkaConfig, Topics};
use tokio_util::sync::CancellationToken;

use crate::local::{Local, Work};
use crate::metrics::Metrics;
use crate::partition::PartitionWorker;
use crate::stream::CommandStream;

/// Settings of the command processors.
#[derive(Clone)]
pub struct ProcessorConfig {
    pub kafka: KafkaConfig,
    /// How long outcomes of commands with an Idempotency-Key stay in memory.
    pub dedup_window: Duration,
    /// Where and how much aggregate state each owned partition keeps.
    pub state: StateConfig,
}

/// What the partition workers of one processor share.
pub(crate) struct Shared {
    pub kafka: KafkaConfig,
    pub topics: Topics,
    pub local: Local,
    pub dedup_window: Duration,
    pub metrics: Metrics,
    pub state: StateConfig,
    pub state_metrics: StateMetrics,
}

/// Handles for the caller: readiness and metrics of a running processor.
#[derive(Clone, Default)]
pub struct ProcessorStatus {
    /// Joined its group, and how many owned partitions are still restoring.
    pub owner: OwnerStatus,
    pub metrics: Metrics,
    pub state_metrics: StateMetrics,
}

impl From<OwnedMessage> for Work {
    fn from(message: OwnedMessage) -> Self {
        Work::Consumed(message)
    }
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
    let spec = OwnerSpec {
        group: group.clone(),
        assignment: "cooperative-sticky",
        topics: vec![topics.commands(A::STREAM)],
        name: A::STREAM,
    };
    let shared = Arc::new(Shared {
        kafka: config.kafka.clone(),
        topics,
        local,
        dedup_window: config.dedup_window,
        metrics: status.metrics.clone(),
        state: config.state.clone(),
        state_metrics: status.state_metrics.clone(),
    });
    let metrics = status.metrics.clone();
    owner::run(
        &config.kafka,
        spec,
        status.owner.clone(),
        move |statistics| metrics.record_lag(&group, statistics),
        shutdown,
        move |partition, commands, me| {
            PartitionWorker::<A>::run(shared.clone(), partition, commands, me)
        },
    )
    .await
}

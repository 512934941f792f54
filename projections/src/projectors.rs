//! What every projector of a process shares: Kafka settings, the projectors' own
//! connection pool, read-your-writes progress, counters and metrics, and the producer
//! that dead-letters records that can never apply.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use eventlog::rdkafka::producer::FutureProducer;
use eventlog::{KafkaConfig, Topics};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sqlx::PgPool;

use crate::kinds::Kind;
use crate::progress::Progress;

/// What every projector of a process shares.
#[derive(Clone)]
pub struct Projectors {
    /// Where the event topics are.
    pub kafka: KafkaConfig,
    /// The projectors' own pool, apart from queries' and idempotency's, so a flood of
    /// queries cannot starve the projectors (nor the reverse).
    pub pool: PgPool,
    /// How far each projection has got, for read-your-writes.
    pub progress: Progress,
    /// Counters by projection.
    pub stats: Arc<HashMap<Kind, Arc<Stats>>>,
    /// The Prometheus families the counters belong to.
    pub metrics: ProjectionMetrics,
    pub(crate) dead_letters: FutureProducer,
}

/// Counters of one projection, for the admin API and metrics (they are the metric
/// families' own counters).
pub struct Stats {
    /// Records applied (or found applied already).
    pub applied: Counter,
    /// Records sent to the dead-letter topic.
    pub dead_lettered: Counter,
}

/// The labels of the read side's metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectionLabels {
    /// The projection's name.
    pub projection: String,
}

/// The read side's Prometheus metrics, by projection.
#[derive(Clone, Default)]
pub struct ProjectionMetrics {
    pub applied: Family<ProjectionLabels, Counter>,
    pub dead_letters: Family<ProjectionLabels, Counter>,
    /// Records behind the log (a checkpoint past the end counts by how far past it is),
    /// refreshed every few seconds by the admin.
    pub lag: Family<ProjectionLabels, Gauge>,
    /// Live projectors running in this process: 1 each, 0 while a replay swaps or after
    /// a stop; never 2.
    pub running: Family<ProjectionLabels, Gauge>,
}

impl ProjectionMetrics {
    /// Registers every family in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tally_projection_applied",
            "Records applied by each projection",
            self.applied.clone(),
        );
        registry.register(
            "tally_dead_letters",
            "Records each projection sent to the dead-letter topic",
            self.dead_letters.clone(),
        );
        registry.register(
            "tally_projection_lag",
            "Records each projection is behind the log",
            self.lag.clone(),
        );
        registry.register(
            "tally_projectors_running",
            "Live projectors of each projection running in this process",
            self.running.clone(),
        );
    }

    /// The labels of `kind`.
    pub fn label(kind: Kind) -> ProjectionLabels {
        ProjectionLabels {
            projection: kind.name().to_string(),
        }
    }
}

impl Projectors {
    /// Shared state for projectors over `kafka` and `pool`.
    pub fn new(kafka: KafkaConfig, pool: PgPool, progress: Progress) -> anyhow::Result<Self> {
        let dead_letters = kafka
            .producer()
            .set("enable.idempotence", "true")
            .create()
            .context("creating the dead-letter producer")?;
        let metrics = ProjectionMetrics::default();
        let stats = Kind::ALL
            .into_iter()
            .map(|k| {
                let label = ProjectionMetrics::label(k);
                let stats = Stats {
                    applied: metrics.applied.get_or_create(&label).clone(),
                    dead_lettered: metrics.dead_letters.get_or_create(&label).clone(),
                };
                (k, Arc::new(stats))
            })
            .collect();
        Ok(Self {
            kafka,
            pool,
            progress,
            stats: Arc::new(stats),
            metrics,
            dead_letters,
        })
    }

    /// The event topics of `kind`.
    pub fn topics(&self, kind: Kind) -> Vec<String> {
        let topics = Topics::new(&self.kafka.topic_prefix);
        kind.streams().iter().map(|s| topics.events(s)).collect()
    }

    /// The stream each event topic of `kind` carries, by topic.
    pub(crate) fn streams(&self, kind: Kind) -> HashMap<String, &'static str> {
        let topics = Topics::new(&self.kafka.topic_prefix);
        kind.streams()
            .iter()
            .map(|s| (topics.events(s), *s))
            .collect()
    }

    /// The checkpoints of `checkpoint` (a projection name), creating missing ones at 0.
    pub async fn checkpoints(
        &self,
        kind: Kind,
        checkpoint: &str,
    ) -> anyhow::Result<HashMap<(String, i32), i64>> {
        for topic in self.topics(kind) {
            for partition in 0..self.kafka.partitions {
                sqlx::query("INSERT INTO projection_checkpoints (projection, topic, partition, next_offset) VALUES ($1, $2, $3, 0) ON CONFLICT DO NOTHING")
                    .bind(checkpoint).bind(&topic).bind(partition)
                    .execute(&self.pool).await?;
            }
        }
        self.stored_checkpoints(kind, checkpoint).await
    }

    /// The stored checkpoints of `checkpoint`, read only: a reader never waits for a
    /// projector's transaction (the status must answer while a projector is stuck).
    pub async fn stored_checkpoints(
        &self,
        kind: Kind,
        checkpoint: &str,
    ) -> anyhow::Result<HashMap<(String, i32), i64>> {
        let rows: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT topic, partition, next_offset FROM projection_checkpoints
             WHERE projection = $1 AND topic = ANY($2) AND partition < $3",
        )
        .bind(checkpoint)
        .bind(self.topics(kind))
        .bind(self.kafka.partitions)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
    }
}

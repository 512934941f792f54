//! The saga orchestrator's Prometheus metrics: sagas started, ended by status and still
//! running, step durations by step and outcome, transactions, and the consumer lag of
//! its inputs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::fulfilment::{StepName, StepStatus};
use crate::SagaStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LagLabels {
    pub group: String,
    pub topic: String,
    pub partition: String,
}

fn step_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// Handles to every saga metric; clones share the values.
#[derive(Clone)]
pub struct SagaMetrics {
    started: Counter,
    ended: Family<StatusLabels, Counter>,
    running: Gauge,
    steps: Family<StepLabels, Histogram, fn() -> Histogram>,
    transactions: Counter,
    consumer_lag: Family<LagLabels, Gauge>,
}

impl Default for SagaMetrics {
    fn default() -> Self {
        Self {
            started: Counter::default(),
            ended: Family::default(),
            running: Gauge::default(),
            steps: Family::new_with_constructor(step_seconds),
            transactions: Counter::default(),
            consumer_lag: Family::default(),
        }
    }
}

impl SagaMetrics {
    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tally_sagas_started",
            "Fulfilment sagas started by this process",
            self.started.clone(),
        );
        registry.register(
            "tally_sagas_ended",
            "Fulfilment sagas that ended, by final status",
            self.ended.clone(),
        );
        registry.register(
            "tally_sagas_running",
            "Sagas still running in the partitions this process owns",
            self.running.clone(),
        );
        registry.register(
            "tally_saga_step_seconds",
            "Time from a saga step's start to its end, by step and outcome",
            self.steps.clone(),
        );
        registry.register(
            "tally_saga_transactions",
            "Kafka transactions committed by the saga orchestrator",
            self.transactions.clone(),
        );
        registry.register(
            "tally_saga_consumer_lag",
            "Records behind the end of each owned input partition (librdkafka statistics)",
            self.consumer_lag.clone(),
        );
    }

    pub(crate) fn started(&self) {
        self.started.inc();
    }

    pub(crate) fn ended(&self, status: SagaStatus) {
        self.ended
            .get_or_create(&StatusLabels {
                status: status.as_str().to_string(),
            })
            .inc();
    }

    pub(crate) fn add_running(&self, delta: i64) {
        self.running.inc_by(delta);
    }

    pub(crate) fn step_ended(&self, step: StepName, status: StepStatus, seconds: f64) {
        self.steps
            .get_or_create(&StepLabels {
                step: step.as_str().to_string(),
                status: status.as_str().to_string(),
            })
            .observe(seconds);
    }

    pub(crate) fn transaction(&self) {
        self.transactions.inc();
    }

    pub(crate) fn record_lag(&self, group: &str, statistics: &eventlog::rdkafka::Statistics) {
        for (topic, partition, lag) in eventlog::consumer_lags(statistics) {
            self.consumer_lag
                .get_or_create(&LagLabels {
                    group: group.to_string(),
                    topic,
                    partition: partition.to_string(),
                })
                .set(lag);
        }
    }

    /// Sagas that reached `completed` in this process.
    pub fn completed(&self) -> u64 {
        self.ended
            .get_or_create(&StatusLabels {
                status: "completed".into(),
            })
            .get()
    }
}

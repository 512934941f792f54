//! The write side's Prometheus metrics: commands by stream, type and outcome, the
//! latency clients see, events appended, transactions and their sizes, partitions being
//! rebuilt, and the consumer lag of the command topics (from librdkafka's statistics).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub stream: String,
    pub command: String,
    /// `accepted`, `rejected`, `conflict`, `not_found`, `forbidden`, `expired` or `error`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LagLabels {
    pub group: String,
    pub topic: String,
    pub partition: String,
}

fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn batch_sizes() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

/// Handles to every write-side metric; clones share the values.
#[derive(Clone)]
pub struct Metrics {
    commands: Family<CommandLabels, Counter>,
    request_seconds: Family<CommandLabels, Histogram, fn() -> Histogram>,
    events: Family<StreamLabels, Counter>,
    transactions: Family<StreamLabels, Counter>,
    transaction_commands: Family<StreamLabels, Histogram, fn() -> Histogram>,
    consumer_lag: Family<LagLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            commands: Family::default(),
            request_seconds: Family::new_with_constructor(latency),
            events: Family::default(),
            transactions: Family::default(),
            transaction_commands: Family::new_with_constructor(batch_sizes),
            consumer_lag: Family::default(),
        }
    }
}

/// The outcome label of an HTTP status.
pub fn outcome(status: u16) -> &'static str {
    match status {
        200..=299 => "accepted",
        403 => "forbidden",
        404 => "not_found",
        408 => "expired",
        409 => "conflict",
        422 => "rejected",
        _ => "error",
    }
}

/// The command's type from its JSON form (`{"AddLine": {...}}` or `"PlaceOrder"`).
pub fn command_name(command: &serde_json::Value) -> String {
    match command {
        serde_json::Value::String(name) => name.clone(),
        serde_json::Value::Object(map) => map.keys().next().cloned().unwrap_or_default(),
        _ => String::new(),
    }
}

impl Metrics {
    /// Registers every family in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tally_commands",
            "Commands decided by the processors (committed), by stream, type and outcome",
            self.commands.clone(),
        );
        registry.register(
            "tally_command_request_seconds",
            "Time from a command request to its answer, as the client sees it",
            self.request_seconds.clone(),
        );
        registry.register(
            "tally_events_appended",
            "Events appended to the log in committed transactions",
            self.events.clone(),
        );
        registry.register(
            "tally_command_transactions",
            "Kafka transactions committed by the command processors",
            self.transactions.clone(),
        );
        registry.register(
            "tally_command_transaction_commands",
            "Commands per committed transaction",
            self.transaction_commands.clone(),
        );
        registry.register("tally_consumer_lag", "Records behind the end of each owned partition, by consumer group (librdkafka statistics)", self.consumer_lag.clone());
    }

    fn stream(stream: &str) -> StreamLabels {
        StreamLabels {
            stream: stream.to_string(),
        }
    }

    pub(crate) fn record_batch(&self, stream: &str, decided: &[(String, u16)], events: usize) {
        let labels = Self::stream(stream);
        self.transactions.get_or_create(&labels).inc();
        self.transaction_commands
            .get_or_create(&labels)
            .observe(decided.len() as f64);
        self.events.get_or_create(&labels).inc_by(events as u64);
        for (command, status) in decided {
            self.commands
                .get_or_create(&CommandLabels {
                    stream: stream.to_string(),
                    command: command.clone(),
                    outcome: outcome(*status).to_string(),
                })
                .inc();
        }
    }

    pub(crate) fn record_request(&self, stream: &str, command: &str, status: u16, seconds: f64) {
        self.request_seconds
            .get_or_create(&CommandLabels {
                stream: stream.to_string(),
                command: command.to_string(),
                outcome: outcome(status).to_string(),
            })
            .observe(seconds);
    }

    /// Records the consumer lag librdkafka reported for `group`'s partitions.
    pub fn record_lag(&self, group: &str, statistics: &eventlog::rdkafka::Statistics) {
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
}

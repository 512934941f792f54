//! How to reach Kafka.

use rdkafka::ClientConfig;

/// Connection and topic settings shared by every Kafka client Tally makes.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]` of the bootstrap brokers.
    pub brokers: String,
    /// Prefix of every topic name (`tally` gives `tally.order.events`).
    pub topic_prefix: String,
    /// Partitions of each event/command topic; fixed at creation (co-partitioning).
    pub partitions: i32,
    /// Replication factor of created topics (1 on a laptop, 3 in production).
    pub replication_factor: i32,
    /// Extra librdkafka properties for every client, e.g. `security.protocol=SASL_SSL`.
    pub properties: Vec<(String, String)>,
}

impl KafkaConfig {
    /// A config for local development: one broker, prefix `tally`, 4 partitions.
    pub fn local(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic_prefix: "tally".into(),
            partitions: 4,
            replication_factor: 1,
            properties: Vec::new(),
        }
    }

    /// A producer config: [`client`](Self::client) with Java-compatible key hashing, should
    /// anything ever let Kafka pick a partition (Tally always picks its own).
    pub fn producer(&self) -> ClientConfig {
        let mut config = self.client();
        config.set("partitioner", "murmur2_random");
        config
    }

    /// A librdkafka client config with the brokers and the extra properties set.
    pub fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }
}

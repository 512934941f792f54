//! Transactions against the real broker (scripts/services up; TALLY_KAFKA_BROKERS).

use std::time::Duration;

use eventlog::rdkafka::consumer::{Consumer, StreamConsumer};
use eventlog::rdkafka::message::OwnedHeaders;
use eventlog::rdkafka::{Message, Offset, TopicPartitionList};
use eventlog::{
    classify, ensure_topics, read_partition, KafkaConfig, TopicSpec, TxnErrorKind, TxnProducer,
};

/// A config with a topic prefix of its own, so tests never see each other's records.
fn test_config() -> KafkaConfig {
    let brokers = std::env::var("TALLY_KAFKA_BROKERS")
        .expect("TALLY_KAFKA_BROKERS is not set: run `scripts/services up` and export it (scripts/test does both)");
    let mut config = KafkaConfig::local(brokers);
    config.topic_prefix = format!("test-{}", uuid::Uuid::new_v4().simple());
    config.partitions = 1;
    config
}

async fn one_topic(config: &KafkaConfig, name: &str) -> String {
    let topic = format!("{}.{name}", config.topic_prefix);
    ensure_topics(config, &[TopicSpec::new(topic.clone(), 1, "-1")])
        .await
        .unwrap();
    topic
}

async fn send_all(producer: &TxnProducer, topic: &str, values: &[&str]) -> Vec<eventlog::Delivery> {
    values
        .iter()
        .map(|v| {
            producer
                .send(topic, 0, "key", v.as_bytes(), OwnedHeaders::new())
                .unwrap()
        })
        .collect()
}

async fn read_committed_values(config: &KafkaConfig, topic: &str) -> Vec<String> {
    let mut seen = Vec::new();
    read_partition(config, topic, 0, 0, |m| {
        seen.push(String::from_utf8(m.payload().unwrap().to_vec())?);
        Ok(())
    })
    .await
    .unwrap();
    seen
}

/// What a `read_uncommitted` reader finds: proof that aborted records really reached the log.
async fn read_uncommitted_count(config: &KafkaConfig, topic: &str, want: usize) -> usize {
    let consumer: StreamConsumer = config
        .client()
        .set("group.id", "unused")
        .set("isolation.level", "read_uncommitted")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut count = 0;
    while count < want {
        match tokio::time::timeout(Duration::from_secs(10), consumer.recv()).await {
            Ok(Ok(_)) => count += 1,
            _ => break,
        }
    }
    count
}

#[tokio::test]
async fn an_aborted_transaction_is_never_read_and_a_committed_one_is_read_exactly_once() {
    let config = test_config();
    let topic = one_topic(&config, "txn").await;
    let producer = TxnProducer::new(&config, &format!("{}-p0", config.topic_prefix))
        .await
        .unwrap();

    producer.begin().await.unwrap();
    let deliveries = send_all(&producer, &topic, &["aborted-1", "aborted-2", "aborted-3"]).await;
    producer.flush(deliveries).await.unwrap(); // written to the log before the abort
    producer.abort().await.unwrap();

    producer.begin().await.unwrap();
    let deliveries = send_all(&producer, &topic, &["committed-1", "committed-2"]).await;
    let delivered = producer.commit(deliveries).await.unwrap();
    assert_eq!(delivered.len(), 2);

    assert_eq!(
        read_uncommitted_count(&config, &topic, 5).await,
        5,
        "the aborted records were written"
    );
    let seen = read_committed_values(&config, &topic).await;
    assert_eq!(seen, vec!["committed-1", "committed-2"]);
    // A second catch-up from the start finds the same records, once each.
    assert_eq!(read_committed_values(&config, &topic).await, seen);
}

#[tokio::test]
async fn a_newer_producer_with_the_same_transactional_id_fences_the_older_one() {
    let config = test_config();
    let topic = one_topic(&config, "fence").await;
    let id = format!("{}-p0", config.topic_prefix);
    let zombie = TxnProducer::new(&config, &id).await.unwrap();
    zombie.begin().await.unwrap();
    let zombie_sends = send_all(&zombie, &topic, &["zombie"]).await;

    let owner = TxnProducer::new(&config, &id).await.unwrap();
    owner.begin().await.unwrap();
    let sends = send_all(&owner, &topic, &["owner"]).await;
    owner.commit(sends).await.unwrap();

    let err = zombie
        .commit(zombie_sends)
        .await
        .expect_err("a fenced producer must not commit");
    let (eventlog::CommitError::Undelivered(kafka) | eventlog::CommitError::Uncertain(kafka)) =
        &err;
    assert_eq!(
        classify(kafka),
        TxnErrorKind::Fatal,
        "fencing is fatal: {err}"
    );
    assert_eq!(read_committed_values(&config, &topic).await, vec!["owner"]);
}

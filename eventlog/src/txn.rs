//! A transactional producer whose blocking calls run off the async runtime.
//!
//! librdkafka's transaction calls block, so each runs in `spawn_blocking`. Every delivery
//! is awaited before `commit_transaction` (else each commit costs ~100 ms), and errors are
//! sorted into the three classes DESIGN.md §3 names.

use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::future_producer::Delivery;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::TopicPartitionList;
use tracing::debug;

use crate::KafkaConfig;

/// What to do about a Kafka error inside a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnErrorKind {
    /// Try the same call again.
    Retriable,
    /// Abort the transaction and re-run the batch from the last committed state.
    Abortable,
    /// The producer is unusable (e.g. fenced by a newer owner): drop it, give up the work.
    Fatal,
}

/// Sorts a Kafka error from a transactional producer into a [`TxnErrorKind`].
pub fn classify(err: &KafkaError) -> TxnErrorKind {
    match err {
        KafkaError::Transaction(e) if e.is_fatal() => TxnErrorKind::Fatal,
        KafkaError::Transaction(e) if e.txn_requires_abort() => TxnErrorKind::Abortable,
        KafkaError::Transaction(e) if e.is_retriable() => TxnErrorKind::Retriable,
        KafkaError::Transaction(_) => TxnErrorKind::Abortable,
        // A commit whose flush failed leaves a transaction that can still be aborted.
        KafkaError::Flush(_) => TxnErrorKind::Abortable,
        KafkaError::MessageProduction(code) if is_fencing(*code) => TxnErrorKind::Fatal,
        KafkaError::MessageProduction(_) => TxnErrorKind::Abortable,
        _ => TxnErrorKind::Fatal,
    }
}

fn is_fencing(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
    )
}

/// A producer with a `transactional.id`: everything sent between [`begin`](Self::begin)
/// and [`commit`](Self::commit) becomes visible to `read_committed` readers atomically, or
/// not at all.
pub struct TxnProducer {
    producer: FutureProducer,
    transactional_id: String,
    timeout: Duration,
}

impl TxnProducer {
    /// Creates the producer and runs `init_transactions`, which fences any older producer
    /// with the same `transactional_id` and aborts its open transaction.
    pub async fn new(config: &KafkaConfig, transactional_id: &str) -> anyhow::Result<Self> {
        let producer: FutureProducer = config
            .producer()
            .set("transactional.id", transactional_id)
            .set("enable.idempotence", "true")
            .set("linger.ms", "2")
            .set("transaction.timeout.ms", "60000")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .context("creating a transactional producer")?;
        let this = Self {
            producer,
            transactional_id: transactional_id.to_string(),
            timeout: Duration::from_secs(30),
        };
        this.blocking(|p, t| p.init_transactions(t))
            .await
            .with_context(|| format!("init_transactions for {transactional_id}"))?;
        debug!(transactional_id, "transactional producer ready");
        Ok(this)
    }

    /// The `transactional.id` this producer was created with.
    pub fn transactional_id(&self) -> &str {
        &self.transactional_id
    }

    /// Starts a transaction.
    pub async fn begin(&self) -> KafkaResult<()> {
        self.blocking(|p, _| p.begin_transaction()).await
    }

    /// Queues one record in the open transaction; await the returned future (or pass it
    /// to [`commit`](Self::commit)) to learn its offset.
    pub fn send(
        &self,
        topic: &str,
        partition: i32,
        key: &str,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> KafkaResult<DeliveryFuture> {
        let record = FutureRecord::to(topic)
            .partition(partition)
            .key(key)
            .payload(payload)
            .headers(headers);
        self.producer.send_result(record).map_err(|(err, _)| err)
    }

    /// Adds a consumer's offsets to the transaction, so input and output commit together.
    /// `group` must be fresh group metadata from the consumer (KIP-447 fencing).
    pub async fn send_offsets(
        &self,
        offsets: TopicPartitionList,
        group: ConsumerGroupMetadata,
    ) -> KafkaResult<()> {
        self.blocking(move |p, t| p.send_offsets_to_transaction(&offsets, &group, t))
            .await
    }

    /// Awaits every delivery, then commits. On error the caller classifies it and aborts
    /// or drops the producer; the deliveries' offsets are returned on success.
    pub async fn commit(&self, deliveries: Vec<DeliveryFuture>) -> KafkaResult<Vec<Delivery>> {
        let mut delivered = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(d)) => delivered.push(d),
                Ok(Err((err, _))) => return Err(self.fatal_or(err)),
                Err(_) => return Err(self.fatal_or(KafkaError::Canceled)),
            }
        }
        self.blocking(|p, t| p.commit_transaction(t)).await?;
        Ok(delivered)
    }

    /// A failed delivery of a producer that hit a fatal error (e.g. fenced) reports only
    /// "purged"; report the fatal error instead, so the caller gives up rather than retry.
    fn fatal_or(&self, err: KafkaError) -> KafkaError {
        match self.producer.client().fatal_error() {
            Some((code, _)) => KafkaError::MessageProduction(code),
            None => err,
        }
    }

    /// Aborts the open transaction: nothing sent in it is ever seen by `read_committed`.
    pub async fn abort(&self) -> KafkaResult<()> {
        self.blocking(|p, t| p.abort_transaction(t)).await
    }

    async fn blocking<F>(&self, call: F) -> KafkaResult<()>
    where
        F: FnOnce(&FutureProducer, Duration) -> KafkaResult<()> + Send + 'static,
    {
        let producer = self.producer.clone();
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || call(&producer, timeout))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
    }
}

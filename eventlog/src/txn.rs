//! A transactional producer whose blocking calls run off the async runtime.
//!
//! librdkafka's transaction calls block, so each runs in `spawn_blocking`. Every delivery
//! is awaited, and the producer's queue seen empty, before `commit_transaction`: rdkafka's
//! commit first flushes, and a flush that finds anything outstanding polls for up to
//! 100 ms while the background thread serves the very event it waits for — one commit in
//! twenty took 100 ms before this. Errors are sorted into the three classes DESIGN.md §3
//! names.

use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::TopicPartitionList;
use tracing::{debug, warn};

use crate::KafkaConfig;

/// How long a transaction may stay open before the broker aborts it.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

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

/// Why [`TxnProducer::commit`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// A record of the transaction was not delivered, so `commit_transaction` was never
    /// called: nothing is committed; classify the error, abort and re-run the work.
    #[error("a record of the transaction was not delivered: {0}")]
    Undelivered(#[source] KafkaError),
    /// `commit_transaction` itself failed: the transaction may or may not have committed.
    /// Never abort, retry or hand on its work: restart, and let fencing and the log decide
    /// (the next owner's `init_transactions` completes or aborts it).
    #[error("committing the transaction failed; whether it committed is unknown: {0}")]
    Uncertain(#[source] KafkaError),
}

impl CommitError {
    /// Whether `err` (anywhere in its chain) is a commit of unknown outcome.
    pub fn is_uncertain(err: &anyhow::Error) -> bool {
        matches!(
            err.downcast_ref::<CommitError>(),
            Some(CommitError::Uncertain(_))
        )
    }

    /// The Kafka error behind `err`, wherever it sits in the chain, to classify.
    pub fn kafka_error(err: &anyhow::Error) -> Option<&KafkaError> {
        match err.downcast_ref::<CommitError>() {
            Some(CommitError::Undelivered(e) | CommitError::Uncertain(e)) => Some(e),
            None => err.downcast_ref::<KafkaError>(),
        }
    }
}

/// Where a record landed: `(partition, offset)`.
pub type Landed = (i32, i64);

/// The delivery report of one record sent in a transaction.
pub struct Delivery(DeliveryFuture);

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
        Self::new_then(config, transactional_id, || {}).await
    }

    /// [`new`](Self::new), calling `done` on the blocking thread the moment
    /// `init_transactions` returns (or fails) — even if the caller stopped waiting.
    pub async fn new_then(
        config: &KafkaConfig,
        transactional_id: &str,
        done: impl FnOnce() + Send + 'static,
    ) -> anyhow::Result<Self> {
        // Called when dropped: after init_transactions in the blocking thread, or on any
        // earlier return.
        struct OnDrop<F: FnOnce()>(Option<F>);
        impl<F: FnOnce()> Drop for OnDrop<F> {
            fn drop(&mut self) {
                if let Some(f) = self.0.take() {
                    f();
                }
            }
        }
        let done = OnDrop(Some(done));
        let producer: FutureProducer = config
            .producer()
            .set("transactional.id", transactional_id)
            .set("enable.idempotence", "true")
            .set("linger.ms", "0.5")
            // A transaction that follows another on the same partitions briefly meets
            // CONCURRENT_TRANSACTIONS while the broker writes the previous markers; keep
            // the back-off short.
            .set("retry.backoff.ms", "5")
            .set("retry.backoff.max.ms", "50")
            .set(
                "transaction.timeout.ms",
                TRANSACTION_TIMEOUT.as_millis().to_string(),
            )
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .context("creating a transactional producer")?;
        let this = Self {
            producer,
            transactional_id: transactional_id.to_string(),
            timeout: Duration::from_secs(30),
        };
        this.blocking(move |p, t| {
            let result = p.init_transactions(t);
            drop(done);
            result
        })
        .await
        .with_context(|| format!("init_transactions for {transactional_id}"))?;
        debug!(transactional_id, "transactional producer ready");
        Ok(this)
    }

    /// The `transactional.id` this producer was created with.
    pub fn transactional_id(&self) -> &str {
        &self.transactional_id
    }

    /// Starts a transaction. `begin_transaction` changes only local state, but waits for
    /// librdkafka's main thread to do it, with no timeout of its own: it runs bounded,
    /// off the async threads, like every other transactional call.
    pub async fn begin(&self) -> KafkaResult<()> {
        self.blocking(|p, _| p.begin_transaction()).await
    }

    /// Queues one record in the open transaction.
    pub fn send(
        &self,
        topic: &str,
        partition: i32,
        key: &str,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> KafkaResult<Delivery> {
        let record = FutureRecord::to(topic)
            .partition(partition)
            .key(key)
            .payload(payload)
            .headers(headers);
        match self.producer.send_result(record) {
            Ok(future) => Ok(Delivery(future)),
            Err((err, _)) => Err(self.fatal_or(err)),
        }
    }

    /// Waits for each delivery and answers where its record landed.
    pub async fn flush(&self, deliveries: Vec<Delivery>) -> KafkaResult<Vec<Landed>> {
        let mut landed = Vec::with_capacity(deliveries.len());
        // Every record has its report within the transaction timeout (librdkafka bounds
        // `message.timeout.ms` by it); past that the producer is given up, as above.
        let deadline = tokio::time::Instant::now() + TRANSACTION_TIMEOUT + OVERDUE;
        for Delivery(future) in deliveries {
            match tokio::time::timeout_at(deadline, future).await {
                Ok(Ok(Ok(delivery))) => landed.push((delivery.partition, delivery.offset)),
                Ok(Ok(Err((err, _)))) => return Err(self.fatal_or(err)),
                Ok(Err(_)) => return Err(self.fatal_or(KafkaError::Canceled)),
                Err(_) => {
                    warn!("a record's delivery report did not come within the transaction timeout; giving the producer up (its owner restarts and fences it)");
                    return Err(KafkaError::Canceled);
                }
            }
        }
        Ok(landed)
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

    /// Flushes, checks every delivery, then commits; where the records landed is returned
    /// on success. See [`CommitError`] for what the caller may do on failure.
    pub async fn commit(&self, deliveries: Vec<Delivery>) -> Result<Vec<Landed>, CommitError> {
        let landed = self
            .flush(deliveries)
            .await
            .map_err(CommitError::Undelivered)?;
        // Let the background thread serve what is left (e.g. the reports just awaited)
        // so that commit's own flush finds nothing outstanding and does not poll.
        let drained = std::time::Instant::now() + Duration::from_millis(50);
        while self.producer.in_flight_count() > 0 && std::time::Instant::now() < drained {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        // A retriable commit error leaves the outcome to a retry of the commit itself.
        let mut attempts = 0;
        loop {
            match self.blocking(|p, t| p.commit_transaction(t)).await {
                Ok(()) => return Ok(landed),
                Err(e) if classify(&e) == TxnErrorKind::Retriable && attempts < 3 => attempts += 1,
                Err(e) => return Err(CommitError::Uncertain(e)),
            }
        }
    }

    /// Aborts the open transaction: nothing sent in it is ever seen by `read_committed`.
    pub async fn abort(&self) -> KafkaResult<()> {
        self.blocking(|p, t| p.abort_transaction(t)).await
    }

    /// A failed delivery of a producer that hit a fatal error (e.g. fenced) reports only
    /// "purged"; report the fatal error instead, so the caller gives up rather than retry.
    fn fatal_or(&self, err: KafkaError) -> KafkaError {
        match self.producer.client().fatal_error() {
            Some((code, _)) => KafkaError::MessageProduction(code),
            None => err,
        }
    }

    async fn blocking<F>(&self, call: F) -> KafkaResult<()>
    where
        F: FnOnce(&FutureProducer, Duration) -> KafkaResult<()> + Send + 'static,
    {
        bounded(&self.producer, self.timeout, OVERDUE, call).await
    }
}

/// How long past its own timeout a librdkafka call may take before the producer is
/// given up. librdkafka's transactional calls can block past the timeout they are given
/// (seen under fault injection: an abort after an `ILLEGAL_GENERATION` whose group
/// coordinator was then killed never returned, and its partition took no command for
/// minutes while the member kept its assignment).
const OVERDUE: Duration = Duration::from_secs(10);

/// Runs a blocking librdkafka call with `timeout` off the async threads, and gives up on
/// it at `timeout` + `overdue` with [`KafkaError::Canceled`], which [`classify`] calls
/// fatal: the owner restarts, and the next producer's `init_transactions` fences this one
/// (a call still stuck keeps its thread; nothing it could still write can commit).
async fn bounded<F>(
    producer: &FutureProducer,
    timeout: Duration,
    overdue: Duration,
    call: F,
) -> KafkaResult<()>
where
    F: FnOnce(&FutureProducer, Duration) -> KafkaResult<()> + Send + 'static,
{
    let producer = producer.clone();
    let task = tokio::task::spawn_blocking(move || call(&producer, timeout));
    match tokio::time::timeout(timeout + overdue, task).await {
        Ok(result) => result.unwrap_or(Err(KafkaError::Canceled)),
        Err(_) => {
            warn!(
                timeout_ms = timeout.as_millis() as u64,
                "a transactional Kafka call did not return within its timeout; giving the producer up (its owner restarts and fences it)"
            );
            Err(KafkaError::Canceled)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn producer() -> FutureProducer {
        // Creating a client connects to nothing yet; these calls never reach a broker.
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .create()
            .expect("a producer")
    }

    #[tokio::test]
    async fn a_call_stuck_past_its_timeout_gives_the_producer_up() {
        let started = std::time::Instant::now();
        let result = bounded(
            &producer(),
            Duration::from_millis(50),
            Duration::from_millis(100),
            |_, _| {
                std::thread::sleep(Duration::from_secs(3));
                Ok(())
            },
        )
        .await;
        let err = result.expect_err("a stuck call must not be waited for");
        assert_eq!(classify(&err), TxnErrorKind::Fatal, "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "waited {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_call_within_its_bound_answers_as_itself() {
        let p = producer();
        let ok = bounded(
            &p,
            Duration::from_millis(50),
            Duration::from_millis(500),
            |_, t| {
                assert_eq!(t, Duration::from_millis(50), "the call gets its timeout");
                Ok(())
            },
        );
        assert!(ok.await.is_ok());
        let err = bounded(
            &p,
            Duration::from_millis(50),
            Duration::from_millis(500),
            |_, _| {
                Err(KafkaError::MessageProduction(
                    RDKafkaErrorCode::InvalidProducerEpoch,
                ))
            },
        );
        assert!(matches!(
            err.await,
            Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::InvalidProducerEpoch
            ))
        ));
    }
}

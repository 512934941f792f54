//! Building the [`Model`] from a settled system: every event, outcome and dead-letter topic
//! read `read_committed` from its start to its last stable offset (with `eventlog`'s own
//! catch-up reader, so aborted transactions are never seen), and the read-model tables
//! from PostgreSQL. Run it once the faults have stopped and the system has settled: a
//! read while work is in flight judges a moving target.

mod tables;

use std::time::Duration;

use aggregates::streams::{FULFILMENT, INVENTORY, ORDER, PAYMENT};
use anyhow::Context;
use eventlog::rdkafka::consumer::{BaseConsumer, Consumer};
use eventlog::rdkafka::message::{BorrowedMessage, Headers};
use eventlog::rdkafka::Message;
use eventlog::{headers, CommandResult, EventEnvelope, KafkaConfig, Topics};
use sqlx::PgPool;

pub use tables::read_models;

use crate::model::{ClientRecord, DeadLetter, Log, LoggedEvent, LoggedOutcome, Model};

/// The streams whose events, and the command streams whose outcomes, the checker reads.
const EVENT_STREAMS: [&str; 4] = [ORDER, INVENTORY, PAYMENT, FULFILMENT];
const COMMAND_STREAMS: [&str; 3] = [ORDER, INVENTORY, PAYMENT];

/// Reads the log of `kafka`'s prefix and the read models at `database_url`, with the
/// client's record of what it was told.
pub async fn load(
    kafka: &KafkaConfig,
    database_url: &str,
    client: ClientRecord,
) -> anyhow::Result<Model> {
    let log = read_log(kafka).await?;
    let pool = PgPool::connect(database_url)
        .await
        .context("connecting to PostgreSQL")?;
    let read = read_models(&pool).await?;
    pool.close().await;
    let mut model = Model { log, client, read };
    resolve_keys(&mut model);
    Ok(model)
}

/// Every topic the checker judges, read to its end.
pub async fn read_log(kafka: &KafkaConfig) -> anyhow::Result<Log> {
    let topics = Topics::new(kafka.topic_prefix.clone());
    let mut log = Log::default();
    for stream in EVENT_STREAMS {
        let events = read_events(kafka, &topics.events(stream), &mut log.unreadable).await?;
        log.events.insert(stream.to_string(), events);
    }
    for stream in COMMAND_STREAMS {
        let topic = topics.command_outcomes(stream);
        read_outcomes(kafka, &topic, Some(stream), &mut log).await?;
    }
    read_outcomes(kafka, &topics.inbox(FULFILMENT), None, &mut log).await?;
    read_outcomes(kafka, &topics.command_results(), None, &mut log).await?;
    log.dead_letters = read_dead_letters(kafka, &topics.dead_letters()).await?;
    Ok(log)
}

/// How many partitions `topic` has; 0 when it does not exist (nothing was ever written).
async fn partitions(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<i32> {
    let consumer: BaseConsumer = kafka.client().create().context("creating a Kafka client")?;
    let name = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let metadata = consumer
            .fetch_metadata(Some(&name), Duration::from_secs(10))
            .with_context(|| format!("fetching the metadata of {name}"))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
            .map_or(0, |t| t.partitions().len() as i32))
    })
    .await?
}

/// Calls `on_record` for every committed record of every partition of `topic`.
async fn read_topic<F>(kafka: &KafkaConfig, topic: &str, mut on_record: F) -> anyhow::Result<()>
where
    F: FnMut(&BorrowedMessage<'_>),
{
    for partition in 0..partitions(kafka, topic).await? {
        eventlog::read_partition(kafka, topic, partition, 0, |m| {
            on_record(m);
            Ok(())
        })
        .await
        .with_context(|| format!("reading {topic}/{partition}"))?;
    }
    Ok(())
}

fn place(m: &BorrowedMessage<'_>) -> String {
    format!("{}/{}/{}", m.topic(), m.partition(), m.offset())
}

async fn read_events(
    kafka: &KafkaConfig,
    topic: &str,
    unreadable: &mut Vec<String>,
) -> anyhow::Result<Vec<LoggedEvent>> {
    let mut events = Vec::new();
    read_topic(kafka, topic, |m| {
        match serde_json::from_slice::<EventEnvelope>(m.payload().unwrap_or_default()) {
            Ok(envelope) => events.push(LoggedEvent {
                partition: m.partition(),
                offset: m.offset(),
                envelope,
            }),
            Err(e) => unreadable.push(format!("{}: {e}", place(m))),
        }
    })
    .await?;
    Ok(events)
}

/// Outcomes; a record without a value (a tombstone) says nothing and is skipped.
async fn read_outcomes(
    kafka: &KafkaConfig,
    topic: &str,
    stream: Option<&str>,
    log: &mut Log,
) -> anyhow::Result<()> {
    read_topic(kafka, topic, |m| {
        let Some(payload) = m.payload() else { return };
        match serde_json::from_slice::<CommandResult>(payload) {
            Ok(result) => log.outcomes.push(LoggedOutcome {
                topic: topic.to_string(),
                stream: stream.map(str::to_string),
                partition: m.partition(),
                offset: m.offset(),
                result,
            }),
            Err(e) => log.unreadable.push(format!("{}: {e}", place(m))),
        }
    })
    .await
}

async fn read_dead_letters(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<Vec<DeadLetter>> {
    let mut out = Vec::new();
    read_topic(kafka, topic, |m| {
        let source = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == headers::DLQ_SOURCE)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        out.push(DeadLetter {
            offset: m.offset(),
            source,
            payload: m.payload().map(<[u8]>::to_vec),
        });
    })
    .await?;
    Ok(out)
}

/// Gives a keyed ack the command id its key was bound to, so that it is judged by the id
/// its events carry (a retry's correlation id is not the first request's).
pub fn resolve_keys(model: &mut Model) {
    for ack in &mut model.client.acks {
        if ack.command_id.is_some() {
            continue;
        }
        let Some(key) = &ack.idempotency_key else {
            continue;
        };
        if let Some(row) = model.read.idempotency_keys.iter().find(|r| r.holds(key)) {
            ack.command_id = Some(row.command_id);
            ack.correlation_id = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::model::{Ack, KeyRow};

    /// Not part of the suite: a smoke run of `load` against the running services
    /// (`cargo test -p chaos -- --ignored --nocapture`), judging whatever they hold.
    #[tokio::test]
    #[ignore = "reads the running services; CHAOS_PREFIX, CHAOS_DATABASE_URL say which"]
    async fn the_running_system_loads_and_is_judged() {
        let prefix = std::env::var("CHAOS_PREFIX").unwrap_or_else(|_| "tally".into());
        let kafka = KafkaConfig {
            topic_prefix: prefix,
            ..KafkaConfig::local("127.0.0.1:19092")
        };
        let url = std::env::var("CHAOS_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://tally:tally@127.0.0.1:15432/tally".into());
        let model = load(&kafka, &url, ClientRecord::default())
            .await
            .expect("the running system loads");
        let events: usize = model.log.events.values().map(Vec::len).sum();
        println!("{events} events, {} outcomes", model.log.outcomes.len());
        print!("{}", crate::report::render(&crate::check::check(&model), 5));
    }

    #[test]
    fn a_keyed_ack_is_judged_by_its_keys_command_id() {
        let mut model = Model::default();
        model.client.acks.push(Ack {
            stream: None,
            aggregate_id: "SKU-1".into(),
            version: 1,
            command_id: None,
            correlation_id: Some("retry-2".into()),
            idempotency_key: Some("k".into()),
        });
        model.read.idempotency_keys.push(KeyRow {
            key: "k".into(),
            command_id: Uuid::from_u128(5),
            status: Some(201),
            body: None,
        });
        resolve_keys(&mut model);
        assert_eq!(model.client.acks[0].command_id, Some(Uuid::from_u128(5)));
        assert_eq!(model.client.acks[0].correlation_id, None);
    }
}

//! `--workload seed-events`: order events written straight to Kafka, as the command side
//! would have written them (envelopes, keys, partitions), for measuring replay.

use std::time::Instant;

use aggregates::order::{LineAdded, OrderCreated};
use aggregates::{Cents, CustomerId, Order, OrderEvent, OrderId, OrderLine, Quantity, Sku};
use anyhow::Context;
use eventlog::rdkafka::producer::{FutureProducer, FutureRecord};
use eventlog::{partition_for, EventEnvelope, KafkaConfig, Topics};

/// Events per seeded order: one creation and nine lines added.
const EVENTS_PER_ORDER: u64 = 10;

/// Writes `events` order events (orders of ten events) to `<prefix>.order.events`.
pub async fn run(brokers: &str, prefix: &str, partitions: i32, events: u64) -> anyhow::Result<()> {
    let mut kafka = KafkaConfig::local(brokers);
    kafka.topic_prefix = prefix.to_string();
    kafka.partitions = partitions;
    let producer: FutureProducer = kafka
        .producer()
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "lz4")
        .create()
        .context("creating the seeding producer")?;
    let topic = Topics::new(prefix).events("order");
    let started = Instant::now();
    let mut pending = Vec::new();
    for n in 0..events / EVENTS_PER_ORDER {
        let id = OrderId::new_random();
        let key = id.to_string();
        let partition = partition_for(&key, partitions);
        for seq in 1..=EVENTS_PER_ORDER {
            let sku = Sku::new(format!("S{}", (n + seq) % 1000))?;
            let event = if seq == 1 {
                let line = OrderLine {
                    sku,
                    quantity: Quantity(1),
                    unit_price_cents: Cents(100),
                };
                OrderEvent::OrderCreated(OrderCreated {
                    order_id: id,
                    customer_id: CustomerId::new(format!("c{}", n % 10_000))?,
                    lines: vec![line],
                })
            } else {
                OrderEvent::LineAdded(LineAdded {
                    sku: Sku::new(format!("L{seq}"))?,
                    quantity: Quantity(2),
                    unit_price_cents: Cents(50),
                })
            };
            let envelope = EventEnvelope::wrap::<Order>(
                &key,
                seq,
                &event,
                Default::default(),
                chrono::Utc::now(),
            )?;
            let payload = serde_json::to_vec(&envelope)?;
            let record = FutureRecord::to(&topic)
                .partition(partition)
                .key(&key)
                .payload(&payload)
                .headers(envelope.kafka_headers());
            match producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((e, _)) => anyhow::bail!("queueing an event: {e}"),
            }
        }
        if pending.len() >= 50_000 {
            for d in pending.drain(..) {
                d.await.context("delivery canceled")?.map_err(|(e, _)| e)?;
            }
        }
    }
    for d in pending.drain(..) {
        d.await.context("delivery canceled")?.map_err(|(e, _)| e)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({ "workload": "seed-events", "topic": topic, "events": events / EVENTS_PER_ORDER * EVENTS_PER_ORDER, "seconds": (seconds * 10.0).round() / 10.0 })
    );
    Ok(())
}

//! The read side knows which Kafka log it belongs to (ADR 7): a database built from
//! another log is refused at start until `tally reset-read-side`, a database from before
//! log identities is adopted only if its checkpoints fit the log, and processes starting
//! together on a fresh log agree on its id.

use std::time::Duration;

use crate::common::{events_of, new_prefix, order_body, TestApp};
use eventlog::rdkafka::admin::{AdminClient, AdminOptions};
use eventlog::rdkafka::client::DefaultClientContext;
use eventlog::rdkafka::consumer::{BaseConsumer, Consumer};
use eventlog::rdkafka::producer::{FutureProducer, FutureRecord};
use eventlog::{KafkaConfig, Topics};
use serde_json::json;
use sqlx::PgPool;
use tally::config::CommonArgs;
use uuid::Uuid;

async fn pool(common: &CommonArgs) -> PgPool {
    PgPool::connect(&common.database_url).await.unwrap()
}

async fn stored_log_id(pool: &PgPool, prefix: &str) -> Option<Uuid> {
    sqlx::query_scalar("SELECT log_id FROM log_identity WHERE topic_prefix = $1")
        .bind(prefix)
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// Deletes every topic of the prefix, `.meta` included, and waits until the brokers no
/// longer list them: what deleting Kafka's data does to this prefix.
async fn delete_topics(kafka: &KafkaConfig) {
    let names: Vec<String> = Topics::new(&kafka.topic_prefix)
        .all(&tally::STREAMS, &tally::SAGAS, kafka)
        .into_iter()
        .map(|spec| spec.name)
        .collect();
    let admin: AdminClient<DefaultClientContext> = kafka.client().create().unwrap();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    for result in admin
        .delete_topics(&refs, &AdminOptions::new())
        .await
        .unwrap()
    {
        result.unwrap();
    }
    let consumer: BaseConsumer = kafka.client().create().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .unwrap();
        let left = metadata
            .topics()
            .iter()
            .filter(|t| names.iter().any(|n| n == t.name()))
            .count();
        if left == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} topics still listed a minute after deletion"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates an order and reads it back with its consistency token.
async fn create_and_read(app: &TestApp) -> reqwest::StatusCode {
    let id = Uuid::new_v4().to_string();
    let mut body = order_body("log-identity", &[("A", 1, 100)]);
    body["order_id"] = json!(id);
    let (status, created) = app.post("/v1/orders", body, &[]).await;
    assert_eq!(status, 201, "{created}");
    let token = created["consistency_token"].as_str().unwrap().to_string();
    let (status, _, _) = app
        .get(
            &format!("/v1/orders/{id}"),
            &[("X-Consistency-Token", &token)],
        )
        .await;
    status
}

#[tokio::test]
async fn a_database_built_from_another_log_is_refused_until_the_read_side_is_reset() {
    let prefix = new_prefix();
    let app = TestApp::start(&prefix).await;
    for _ in 0..6 {
        assert_eq!(create_and_read(&app).await, 200);
    }
    let kafka = app.kafka.clone();
    app.stop().await;

    // Start over on a new log: same database, the prefix's topics created afresh.
    delete_topics(&kafka).await;
    let (common, _) = crate::common::args(&prefix, 2, "api,commands,projections", &[]).await;
    let started = std::time::Instant::now();
    let err = tally::prepare(&common)
        .await
        .err()
        .expect("a database built from another log is refused");
    assert!(
        started.elapsed() < common.startup_timeout() / 2,
        "a refusal is an answer, not retried until the start-up deadline ({:?})",
        started.elapsed()
    );
    let message = format!("{err:#}");
    assert!(message.contains("another Kafka log"), "{message}");
    assert!(message.contains("tally reset-read-side"), "{message}");

    let summary = tally::reset_read_side(&common).await.unwrap();
    let orders = summary.tables.iter().find(|(t, _)| *t == "orders").unwrap();
    assert_eq!(orders.1, 6, "{summary}");
    assert!(summary.checkpoints > 0, "{summary}");
    assert!(
        summary.idempotency_keys.is_some(),
        "the keys of another log are deleted: {summary}"
    );
    let current = eventlog::log_identity(&kafka).await.unwrap();
    assert_eq!(summary.identity, current);

    let app = TestApp::start(&prefix).await;
    assert_eq!(
        create_and_read(&app).await,
        200,
        "an order on the new log is visible with its own token"
    );
    let (_, _, list) = app.get("/v1/orders?customer_id=log-identity", &[]).await;
    assert_eq!(
        list["items"].as_array().map(Vec::len),
        Some(1),
        "no order of the old log is served: {list}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_database_from_before_log_identities_is_adopted_only_if_its_checkpoints_fit_the_log() {
    let prefix = new_prefix();
    let (common, _) = crate::common::args(&prefix, 2, "api", &[]).await;
    tally::prepare(&common).await.unwrap();
    let kafka = common.kafka();
    let topic = Topics::new(&prefix).events("order");
    let producer: FutureProducer = kafka.producer().create().unwrap();
    for i in 0..3 {
        let payload = format!("record {i}");
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(0)
                    .key("k")
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }

    // The database as it was before log identities: checkpoints, and no record of the log.
    let db = pool(&common).await;
    sqlx::query("DELETE FROM log_identity")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, topic, partition, next_offset)
         VALUES ('orders', $1, 0, 3), ('journal', $1, 0, 2), ('orders', $1, 1, 0)",
    )
    .bind(&topic)
    .execute(&db)
    .await
    .unwrap();
    tally::prepare(&common).await.unwrap();
    let current = eventlog::log_identity(&kafka).await.unwrap();
    assert_eq!(stored_log_id(&db, &prefix).await, Some(current.log_id));

    // One checkpoint past the end of its partition: not this log's.
    sqlx::query("DELETE FROM log_identity")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE projection_checkpoints SET next_offset = 4 WHERE projection = 'orders' AND partition = 0",
    )
    .execute(&db)
    .await
    .unwrap();
    let err = tally::prepare(&common)
        .await
        .err()
        .expect("a checkpoint past the end of the log is refused");
    let message = format!("{err:#}");
    assert!(message.contains("which ends at 3"), "{message}");
    assert!(message.contains("tally reset-read-side"), "{message}");
    assert_eq!(stored_log_id(&db, &prefix).await, None);
}

#[tokio::test]
async fn prepares_racing_on_a_fresh_prefix_agree_on_one_log_id() {
    let prefix = new_prefix();
    let (common, _) = crate::common::args(&prefix, 2, "api", &[]).await;
    let results = futures::future::join_all((0..4).map(|_| tally::prepare(&common))).await;
    for result in results {
        if let Err(err) = result {
            panic!("every racing prepare starts: {err:#}");
        }
    }
    let kafka = common.kafka();
    let identity = eventlog::log_identity(&kafka).await.unwrap();
    let db = pool(&common).await;
    assert_eq!(stored_log_id(&db, &prefix).await, Some(identity.log_id));
    // A later start on the same log still agrees.
    tally::prepare(&common).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resetting_the_read_side_of_the_same_log_keeps_the_idempotency_keys() {
    let prefix = new_prefix();
    let app = TestApp::start(&prefix).await;
    let key = [("idempotency-key", "deposit-before-reset")];
    let deposit = json!({ "amount_cents": 700 });
    let first = app
        .command_ok("/v1/accounts/dora/deposits", deposit.clone(), &key)
        .await;
    // The command was applied, but its answer never came back (a 503 command_timeout):
    // the key has no answer, only the command id.
    let (common, _) = crate::common::args(&prefix, 2, "api,commands,projections", &[]).await;
    let db = pool(&common).await;
    let lost = sqlx::query(
        "UPDATE idempotency_keys SET status = NULL, body = NULL WHERE key = 'deposit-before-reset'",
    )
    .execute(&db)
    .await
    .unwrap();
    assert_eq!(lost.rows_affected(), 1);
    app.stop().await;

    // An operator resets the read side of the SAME log.
    let summary = tally::reset_read_side(&common).await.unwrap();
    assert_eq!(summary.idempotency_keys, None, "{summary}");
    assert!(
        summary.to_string().contains("idempotency_keys: kept"),
        "{summary}"
    );
    let keys: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM idempotency_keys WHERE key = 'deposit-before-reset'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(keys, 1, "the key survives the reset");

    // The client retries with the same key: the first command, not a second one.
    let app = TestApp::start(&prefix).await;
    let (status, again) = app.post("/v1/accounts/dora/deposits", deposit, &key).await;
    assert_eq!(status, 201, "{again}");
    assert_eq!(again, first, "the first outcome");
    assert_eq!(
        events_of(&app.kafka, "payment", "dora").await.len(),
        1,
        "applied once"
    );
    let balance = app
        .eventually("/v1/accounts/dora", Duration::from_secs(30), |v| {
            v["balance_cents"] == 700
        })
        .await;
    assert_eq!(balance["balance_cents"], 700, "{balance}");
    app.stop().await;
}

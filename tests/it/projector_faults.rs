//! Projectors under faults, against the real Kafka and PostgreSQL: a database that drops
//! their connections, records that can never apply, replays under steady traffic, two
//! replays at once, a replay that fails, a replay beside a live projector it cannot stop,
//! a replay that lost its lock, and a checkpoint outside the log (alone, or while another
//! partition is busy).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{database_for, new_prefix, order_body, TestApp};
use clap::Parser;
use eventlog::rdkafka::message::Headers;
use eventlog::rdkafka::producer::{FutureProducer, FutureRecord};
use eventlog::rdkafka::Message;
use serde_json::{json, Value};
use sqlx::PgPool;

fn new_order(customer: &str) -> (String, Value) {
    let id = uuid::Uuid::new_v4().to_string();
    let mut body = order_body(customer, &[("A", 2, 150)]);
    body["order_id"] = json!(id);
    (id, body)
}

/// Creates an order; answers its id and consistency token.
async fn create_order(app: &TestApp, customer: &str) -> (String, String) {
    let (id, body) = new_order(customer);
    let (status, created) = app.post("/v1/orders", body, &[]).await;
    assert_eq!(status, 201, "{created}");
    let token = created["consistency_token"].as_str().unwrap().to_string();
    (id, token)
}

/// The admin status of projection `name`.
async fn status_of(app: &TestApp, name: &str) -> Value {
    let (status, _, body) = app.get("/v1/admin/projections", &[]).await;
    assert_eq!(status, 200, "{body}");
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap()
        .clone()
}

/// Polls the status of `name` until `done` holds, with a deadline.
async fn status_until(
    app: &TestApp,
    name: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let status = status_of(app, name).await;
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never got there: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every record of the dead-letter topic: (payload, `tally-dlq-by` header).
async fn dead_letters(app: &TestApp) -> Vec<(String, String)> {
    let dlq = format!("{}.dlq", app.kafka.topic_prefix);
    let mut dead = Vec::new();
    eventlog::read_partition(&app.kafka, &dlq, 0, 0, |m| {
        let by = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == eventlog::headers::DLQ_BY))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        dead.push((
            String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            by,
        ));
        Ok(())
    })
    .await
    .unwrap();
    dead
}

async fn database(app: &TestApp) -> PgPool {
    PgPool::connect(&database_for(&app.kafka.topic_prefix).await)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_database_connections_are_retried_and_dead_letter_nothing() {
    let app = TestApp::start(&new_prefix()).await;
    let pool = database(&app).await;
    let (first, token) = create_order(&app, "before").await;
    let view = format!("/v1/orders/{first}");
    assert_eq!(
        app.get(&view, &[("X-Consistency-Token", &token)]).await.0,
        200
    );

    // The orders projector's transaction waits on this lock; terminating it while it
    // waits is a connection dropped in the middle of a batch.
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(create_order(&app, &format!("during-{i}")).await.0);
    }
    let (mut terminated, mut seen_transient) = (0, false);
    let deadline = Instant::now() + Duration::from_secs(60);
    while terminated < 5 || !seen_transient {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1 AND wait_event_type = 'Lock'",
        )
        .bind(projections::APPLICATION_NAME)
        .fetch_one(&pool)
        .await
        .unwrap();
        terminated += n;
        let orders = status_of(&app, "orders").await;
        assert_eq!(orders["status"], "running", "{orders}");
        seen_transient |= orders["error"]["transient"] == true;
        assert!(
            Instant::now() < deadline,
            "terminated {terminated} projector connections, transient error seen: {seen_transient}; {orders}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lock.rollback().await.unwrap();

    let orders = status_until(&app, "orders", Duration::from_secs(30), |s| {
        s["error"].is_null() && s["lag"] == 0
    })
    .await;
    assert_eq!(orders["status"], "running");
    assert_eq!(orders["dead_letters"], 0, "{orders}");
    for id in ids {
        assert_eq!(
            app.get(&format!("/v1/orders/{id}"), &[]).await.0,
            200,
            "{id}"
        );
    }
    assert_eq!(dead_letters(&app).await, vec![]);
    app.stop().await;
}

/// An inventory envelope as a writer would store it.
fn inventory_envelope(sku: &str, event_type: &str, version: &str, payload: Value) -> String {
    json!({
        "event_id": uuid::Uuid::new_v4(),
        "aggregate_type": "Inventory",
        "aggregate_id": sku,
        "sequence": 1,
        "event_type": event_type,
        "event_version": version,
        "occurred_at": "2026-01-01T00:00:00.000000Z",
        "payload": payload,
        "metadata": {},
    })
    .to_string()
}

#[tokio::test]
async fn records_that_can_never_apply_are_dead_lettered_and_the_projections_go_on() {
    let app = TestApp::start(&new_prefix()).await;
    let producer: FutureProducer = app.kafka.producer().create().unwrap();
    let topic = format!("{}.inventory.events", app.kafka.topic_prefix);
    let unknown_type = inventory_envelope("GHOST", "StockExploded", "1", json!({}));
    let unknown_version = inventory_envelope(
        "GHOST",
        "StockRestocked",
        "2",
        json!({ "sku": "GHOST", "quantity": 100 }),
    );
    for value in [&unknown_type, &unknown_version] {
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(eventlog::partition_for("GHOST", 2))
                    .key("GHOST")
                    .payload(value),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }

    let (status, restocked) = app
        .post("/v1/inventory/GHOST/restock", json!({ "quantity": 3 }), &[])
        .await;
    assert!(status.is_success(), "{restocked}");
    let token = restocked["consistency_token"].as_str().unwrap().to_string();
    let (status, _, view) = app
        .get("/v1/inventory/GHOST", &[("X-Consistency-Token", &token)])
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["on_hand"], 3, "only the valid restock applies: {view}");

    for name in ["inventory", "journal"] {
        let s = status_until(&app, name, Duration::from_secs(20), |s| s["lag"] == 0).await;
        assert_eq!(
            (&s["status"], &s["dead_letters"], &s["error"]),
            (&json!("running"), &json!(2), &Value::Null),
            "{s}"
        );
    }
    let dead = dead_letters(&app).await;
    for by in ["inventory projection", "journal projection"] {
        let mut parked: Vec<&str> = dead
            .iter()
            .filter(|d| d.1 == by)
            .map(|d| d.0.as_str())
            .collect();
        parked.sort();
        let mut expected = vec![unknown_type.as_str(), unknown_version.as_str()];
        expected.sort();
        assert_eq!(parked, expected, "{by}");
    }
    app.stop().await;
}

/// Restocks `sku` by 1 until `stop`; answers how many succeeded.
fn traffic(app: Arc<TestApp>, sku: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut done = 0;
        while !stop.load(Ordering::Relaxed) {
            let path = format!("/v1/inventory/{sku}/restock");
            let (status, _) = app.post(&path, json!({ "quantity": 1 }), &[]).await;
            done += u64::from(status.is_success());
        }
        done
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_finishes_while_commands_keep_flowing_to_one_partition() {
    let app = Arc::new(TestApp::start_with(&new_prefix(), 4, "api,commands,projections").await);
    // Every partition gets records, each partition's last one followed by a commit marker.
    let mut covered = [false; 4];
    let mut i = 0;
    while covered.iter().any(|c| !c) {
        let sku = format!("Q{i}");
        covered[eventlog::partition_for(&sku, 4) as usize] = true;
        let (status, _) = app
            .post(
                &format!("/v1/inventory/{sku}/restock"),
                json!({ "quantity": 5 }),
                &[],
            )
            .await;
        assert!(status.is_success());
        i += 1;
    }
    status_until(&app, "inventory", Duration::from_secs(20), |s| {
        s["lag"] == 0
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let hot = "HOT".to_string();
    let clients: Vec<_> = (0..3)
        .map(|_| traffic(app.clone(), hot.clone(), stop.clone()))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let response = app
        .http
        .post(app.url("/v1/admin/projections/inventory/replay"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    status_until(&app, "inventory", Duration::from_secs(60), |s| {
        s["replay"].is_null() && s["status"] == "running"
    })
    .await;
    assert!(
        clients.iter().all(|c| !c.is_finished()),
        "the traffic ran throughout the replay"
    );
    stop.store(true, Ordering::Relaxed);
    let mut restocks = 0;
    for c in clients {
        restocks += c.await.unwrap();
    }
    assert!(restocks > 0);
    app.eventually("/v1/inventory/HOT", Duration::from_secs(20), |v| {
        v["on_hand"] == restocks
    })
    .await;
    status_until(&app, "inventory", Duration::from_secs(20), |s| {
        s["lag"] == 0 && s["error"].is_null()
    })
    .await;
    Arc::try_unwrap(app).ok().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_replay_is_refused_in_this_process_and_in_another() {
    let app = TestApp::start(&new_prefix()).await;
    let (id, token) = create_order(&app, "replayed").await;
    assert_eq!(
        app.get(
            &format!("/v1/orders/{id}"),
            &[("X-Consistency-Token", &token)]
        )
        .await
        .0,
        200
    );

    // Holds the first replay in the middle (it builds its tables LIKE the live ones).
    let pool = database(&app).await;
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let replay = app.url("/v1/admin/projections/orders/replay");
    assert_eq!(app.http.post(&replay).send().await.unwrap().status(), 202);
    let second = app.http.post(&replay).send().await.unwrap();
    assert_eq!(second.status(), 409);

    // `tally replay orders` in another process (here: another app instance).
    let database = database_for(&app.kafka.topic_prefix).await;
    let cli = tally::config::Cli::try_parse_from([
        "tally",
        "replay",
        "orders",
        "--topic-prefix",
        &app.kafka.topic_prefix,
        "--partitions",
        "2",
        "--database-url",
        &database,
    ])
    .unwrap();
    let tally::config::Command::Replay(args) = cli.command else {
        unreachable!("parsed replay")
    };
    let refused = tokio::time::timeout(Duration::from_secs(30), tally::replay::run(&args))
        .await
        .expect("the CLI replay answers at once instead of waiting for the first one");
    let error = format!(
        "{:#}",
        refused.expect_err("a second replay must be refused")
    );
    assert!(error.contains("already"), "{error}");

    lock.rollback().await.unwrap();
    status_until(&app, "orders", Duration::from_secs(30), |s| {
        s["replay"].is_null() && s["status"] == "running" && s["lag"] == 0
    })
    .await;
    assert_eq!(app.get(&format!("/v1/orders/{id}"), &[]).await.0, 200);
    app.stop().await;
}

/// The `tally_projectors_running` gauge of `name` in /metrics.
async fn running_projectors(app: &TestApp, name: &str) -> Option<i64> {
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("tally_projectors_running{{projection=\"{name}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_replay_leaves_exactly_one_live_projector() {
    let app = TestApp::start(&new_prefix()).await;
    create_order(&app, "before").await;
    // A view where the replay wants its table: the replay fails before it stops the live
    // projector.
    let pool = database(&app).await;
    sqlx::query("CREATE VIEW orders__replay AS SELECT 1 AS x")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(running_projectors(&app, "orders").await, Some(1));
    let replay = app.url("/v1/admin/projections/orders/replay");
    assert_eq!(app.http.post(&replay).send().await.unwrap().status(), 202);
    status_until(&app, "orders", Duration::from_secs(30), |s| {
        s["replay"].is_null()
    })
    .await;

    let deadline = Instant::now() + Duration::from_secs(10);
    while running_projectors(&app, "orders").await != Some(1) {
        assert!(
            Instant::now() < deadline,
            "{:?} live orders projectors",
            running_projectors(&app, "orders").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // New events still reach the view, exactly once.
    let (id, token) = create_order(&app, "after").await;
    let line = json!({ "sku": "B", "quantity": 1, "unit_price_cents": 10 });
    let (_, added) = app.post(&format!("/v1/orders/{id}/lines"), line, &[]).await;
    let token = added["consistency_token"]
        .as_str()
        .unwrap_or(&token)
        .to_string();
    let (status, _, view) = app
        .get(
            &format!("/v1/orders/{id}"),
            &[("X-Consistency-Token", &token)],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (&view["version"], view["lines"].as_array().map(Vec::len)),
        (&json!(2), Some(2)),
        "{view}"
    );
    let orders = status_of(&app, "orders").await;
    assert_eq!(
        (&orders["status"], &orders["error"]),
        (&json!("running"), &Value::Null),
        "{orders}"
    );
    assert_eq!(running_projectors(&app, "orders").await, Some(1));
    app.stop().await;
}

#[tokio::test]
async fn a_checkpoint_past_the_end_of_the_log_stops_the_projector_without_skipping() {
    let prefix = new_prefix();
    let app = TestApp::start(&prefix).await;
    let (id, token) = create_order(&app, "before").await;
    assert_eq!(
        app.get(
            &format!("/v1/orders/{id}"),
            &[("X-Consistency-Token", &token)]
        )
        .await
        .0,
        200
    );
    app.stop().await;

    let topic = format!("{prefix}.order.events");
    let pool = PgPool::connect(&database_for(&prefix).await).await.unwrap();
    let checkpoint = || {
        sqlx::query_scalar::<_, i64>(
            "SELECT next_offset FROM projection_checkpoints WHERE projection = 'orders' AND topic = $1 AND partition = 0",
        )
        .bind(&topic)
        .fetch_one(&pool)
    };
    sqlx::query("UPDATE projection_checkpoints SET next_offset = 1000 WHERE projection = 'orders' AND topic = $1 AND partition = 0")
        .bind(&topic)
        .execute(&pool)
        .await
        .unwrap();

    let app = TestApp::start(&prefix).await;
    let orders = status_until(&app, "orders", Duration::from_secs(30), |s| {
        s["status"] == "failed"
    })
    .await;
    let message = orders["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("offset 1000"), "{orders}");
    assert_eq!(orders["error"]["transient"], false, "{orders}");
    assert!(
        orders["lag"].as_i64().unwrap_or_default() > 0,
        "a checkpoint past the end is not a lag of 0: {orders}"
    );
    // More events arrive; the checkpoint stays where it was (no jump to the end), while
    // the journal, reading the same topic, takes them in.
    for i in 0..4 {
        create_order(&app, &format!("after-{i}")).await;
    }
    status_until(&app, "journal", Duration::from_secs(20), |s| s["lag"] == 0).await;
    assert_eq!(checkpoint().await.unwrap(), 1000);
    assert_eq!(status_of(&app, "orders").await["status"], "failed");

    // What the status says to do works: a replay rebuilds the view and replaces the
    // broken checkpoint (it does not wait for the log to reach offset 1000).
    let (status, body) = app
        .post("/v1/admin/projections/orders/replay", json!({}), &[])
        .await;
    assert_eq!(status, 202, "{body}");
    let orders = status_until(&app, "orders", Duration::from_secs(60), |s| {
        s["status"] == "running" && s["replay"].is_null() && s["lag"] == 0
    })
    .await;
    assert!(orders["error"].is_null(), "{orders}");
    assert!(checkpoint().await.unwrap() < 1000);
    let (status, _, _) = app.get(&format!("/v1/orders/{id}"), &[]).await;
    assert_eq!(status, 200, "the order from before is in the rebuilt view");
    app.stop().await;
}

/// Parses `tally replay <projection>` for the app's prefix and database.
async fn replay_args(app: &TestApp, projection: &str) -> tally::config::ReplayArgs {
    let database = database_for(&app.kafka.topic_prefix).await;
    let partitions = app.kafka.partitions.to_string();
    let cli = tally::config::Cli::try_parse_from([
        "tally",
        "replay",
        projection,
        "--topic-prefix",
        &app.kafka.topic_prefix,
        "--partitions",
        &partitions,
        "--database-url",
        &database,
    ])
    .unwrap();
    let tally::config::Command::Replay(args) = cli.command else {
        unreachable!("parsed replay")
    };
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_past_the_end_stops_the_projector_while_another_partition_is_busy() {
    let prefix = new_prefix();
    let app = TestApp::start(&prefix).await;
    for i in 0..40 {
        create_order(&app, &format!("busy-{i}")).await;
    }
    status_until(&app, "orders", Duration::from_secs(30), |s| s["lag"] == 0).await;
    app.stop().await;

    // Partition 0 past its end; partition 1 read again from 0, so that it has records
    // waiting when the consumer learns about partition 0 (one report, then nothing).
    let topic = format!("{prefix}.order.events");
    let pool = PgPool::connect(&database_for(&prefix).await).await.unwrap();
    sqlx::query(
        "UPDATE projection_checkpoints SET next_offset = CASE partition WHEN 0 THEN 1000 ELSE 0 END
         WHERE projection = 'orders' AND topic = $1",
    )
    .bind(&topic)
    .execute(&pool)
    .await
    .unwrap();

    let app = Arc::new(TestApp::start(&prefix).await);
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                app.post("/v1/orders", new_order(&format!("more-{i}")).1, &[])
                    .await;
                i += 1;
            }
        })
    };
    let orders = status_until(&app, "orders", Duration::from_secs(30), |s| {
        s["status"] == "failed"
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    busy.await.unwrap();
    let message = orders["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("/0 at offset 1000"), "{orders}");
    assert!(orders["lag"].as_i64().unwrap_or_default() > 0, "{orders}");
    let at: i64 = sqlx::query_scalar(
        "SELECT next_offset FROM projection_checkpoints WHERE projection = 'orders' AND topic = $1 AND partition = 0",
    )
    .bind(&topic)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(at, 1000, "no jump to an end");
    Arc::try_unwrap(app).ok().unwrap().stop().await;
}

/// The live checkpoints of `projection`, by (topic, partition).
async fn live_checkpoints(pool: &PgPool, projection: &str) -> HashMap<(String, i32), i64> {
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT topic, partition, next_offset FROM projection_checkpoints WHERE projection = $1",
    )
    .bind(projection)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cli_replay_beside_a_running_server_never_moves_a_live_checkpoint_backwards() {
    let app = Arc::new(TestApp::start(&new_prefix()).await);
    for sku in ["W0", "W1", "W2", "W3"] {
        app.restock(sku, 5, &[]).await;
    }
    status_until(&app, "inventory", Duration::from_secs(20), |s| {
        s["lag"] == 0
    })
    .await;

    // Every few milliseconds, the live checkpoints; any one lower than the time before
    // is a checkpoint moved backwards.
    let pool = database(&app).await;
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (pool, watching) = (pool.clone(), watching.clone());
        tokio::spawn(async move {
            let mut last: HashMap<(String, i32), i64> = HashMap::new();
            let mut backwards = Vec::new();
            while watching.load(Ordering::Relaxed) {
                for (tp, at) in live_checkpoints(&pool, "inventory").await {
                    if let Some(before) = last.insert(tp.clone(), at) {
                        if at < before {
                            backwards.push(format!("{tp:?}: {before} -> {at}"));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            backwards
        })
    };

    // The server's live projector keeps applying traffic throughout: a CLI replay
    // cannot stop it.
    let stop = Arc::new(AtomicBool::new(false));
    let hot = "HOT".to_string();
    let clients: Vec<_> = (0..3)
        .map(|_| traffic(app.clone(), hot.clone(), stop.clone()))
        .collect();
    // Each commit of the replay waits up to 700 ms (its checkpoint rows locked, released
    // for a moment now and then), the final catch-up's too: meanwhile the live projector
    // gets ahead of the ends the replay caught up to.
    let throttling = Arc::new(AtomicBool::new(true));
    let throttle = {
        let (pool, throttling) = (pool.clone(), throttling.clone());
        tokio::spawn(async move {
            while throttling.load(Ordering::Relaxed) {
                let Ok(mut tx) = pool.begin().await else {
                    continue;
                };
                let _ = sqlx::query(
                    "SELECT 1 FROM projection_checkpoints WHERE projection = 'inventory__replay'
                     ORDER BY topic COLLATE \"C\", partition FOR UPDATE",
                )
                .execute(&mut *tx)
                .await;
                tokio::time::sleep(Duration::from_millis(700)).await;
                let _ = tx.rollback().await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let args = replay_args(&app, "inventory").await;
    tokio::time::timeout(Duration::from_secs(120), tally::replay::run(&args))
        .await
        .expect("the CLI replay finishes")
        .expect("the CLI replay succeeds");
    throttling.store(false, Ordering::Relaxed);
    throttle.await.unwrap();
    // The traffic goes on a moment after the swap, then stops.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut restocks = 0;
    for c in clients {
        restocks += c.await.unwrap();
    }
    assert!(restocks > 0);
    app.eventually("/v1/inventory/HOT", Duration::from_secs(20), |v| {
        v["on_hand"] == restocks
    })
    .await;
    status_until(&app, "inventory", Duration::from_secs(20), |s| {
        s["lag"] == 0 && s["error"].is_null()
    })
    .await;
    watching.store(false, Ordering::Relaxed);
    let backwards = watcher.await.unwrap();
    assert!(
        backwards.is_empty(),
        "live checkpoints moved backwards: {backwards:?}"
    );
    for sku in ["W0", "W1", "W2", "W3"] {
        assert_eq!(
            app.get_ok(&format!("/v1/inventory/{sku}"), &[]).await["on_hand"],
            5
        );
    }
    Arc::try_unwrap(app).ok().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_that_lost_its_lock_touches_no_table() {
    use projections::admin::ReplayProgress;
    use projections::replay::{replay, LockLost, ReplayLock};
    use projections::{Kind, Progress, Projectors};

    let app = TestApp::start(&new_prefix()).await;
    let (id, token) = create_order(&app, "kept").await;
    let view = format!("/v1/orders/{id}");
    assert_eq!(
        app.get(&view, &[("X-Consistency-Token", &token)]).await.0,
        200
    );
    let pool = database(&app).await;
    let projectors = Projectors::new(app.kafka.clone(), pool.clone(), Progress::default()).unwrap();

    // Replay R1 holds the lock; its connection drops (a PostgreSQL restart, an
    // idle_session_timeout, a TCP connection lost), which releases the lock.
    let mut first = ReplayLock::try_acquire(&projectors, Kind::Orders)
        .await
        .unwrap()
        .expect("the lock is free");
    let pid = first.backend_pid().await.unwrap();
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&pool)
        .await
        .unwrap();
    // Replay R2 takes it and starts building its tables.
    let deadline = Instant::now() + Duration::from_secs(10);
    let second = loop {
        if let Some(lock) = ReplayLock::try_acquire(&projectors, Kind::Orders)
            .await
            .unwrap()
        {
            break lock;
        }
        assert!(Instant::now() < deadline, "the lock was never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    sqlx::query("CREATE TABLE orders__replay (LIKE orders INCLUDING ALL)")
        .execute(&pool)
        .await
        .unwrap();
    let before = live_checkpoints(&pool, "orders").await;

    // R1 goes on: it must stop, and touch neither R2's tables nor the live ones.
    let progress = ReplayProgress::new();
    let slot = Mutex::new(Some(progress.clone()));
    let error = replay(&projectors, Kind::Orders, first, progress, &slot, None)
        .await
        .expect_err("a replay without its lock must not go on");
    assert!(error.downcast_ref::<LockLost>().is_some(), "{error:#}");
    assert!(format!("{error:#}").contains("lost its lock"), "{error:#}");
    let replay_table: bool = sqlx::query_scalar("SELECT to_regclass('orders__replay') IS NOT NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(replay_table, "R2's table is still there");
    assert_eq!(live_checkpoints(&pool, "orders").await, before);
    assert_eq!(app.get(&view, &[]).await.0, 200);
    drop(second);
    app.stop().await;
}

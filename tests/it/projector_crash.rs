//! A projector process killed with SIGKILL again and again while events arrive: once it
//! has caught up, every read model equals a fold of the log — nothing lost, nothing doubled.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{database_for, events, new_prefix, order_body, TestApp};
use aggregates::{Inventory, Order};
use cqrs_es::Aggregate;
use serde_json::json;

fn projector(prefix: &str, database: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "serve",
            "--roles",
            "projections",
            "--topic-prefix",
            prefix,
            "--partitions",
            "2",
            "--database-url",
            database,
        ])
        .env("TALLY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting a tally projector")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projector_killed_again_and_again_ends_equal_to_a_fold_of_the_log() {
    let prefix = new_prefix();
    let app = Arc::new(TestApp::start_with(&prefix, 2, "api,commands").await);
    let database = database_for(&prefix).await;
    let mut running = projector(&prefix, &database);

    // 8 clients: orders with a line added and placed, and restocks, 40 rounds each.
    let mut clients = Vec::new();
    for c in 0..8 {
        let app = app.clone();
        clients.push(tokio::spawn(async move {
            for i in 0..40 {
                let id = uuid::Uuid::new_v4().to_string();
                let mut body = order_body("fold", &[("A", 1 + i % 3, 100)]);
                body["order_id"] = json!(id);
                app.post("/v1/orders", body, &[]).await;
                app.post(
                    &format!("/v1/orders/{id}/lines"),
                    json!({ "sku": "B", "quantity": 2, "unit_price_cents": 7 }),
                    &[],
                )
                .await;
                if i % 2 == 0 {
                    app.post(&format!("/v1/orders/{id}/place"), json!({}), &[])
                        .await;
                }
                app.post(
                    &format!("/v1/inventory/S{}/restock", (c + i) % 5),
                    json!({ "quantity": 1 + i }),
                    &[],
                )
                .await;
            }
        }));
    }
    let started = Instant::now();
    while clients.iter().any(|c| !c.is_finished()) && started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(700)).await;
        running.kill().unwrap();
        running.wait().unwrap();
        running = projector(&prefix, &database);
    }
    for c in clients {
        c.await.unwrap();
    }

    // The fold of the log, with the aggregates' own code.
    let mut orders: HashMap<String, (Order, u64)> = HashMap::new();
    for e in events(&app.kafka, "order").await {
        let entry = orders.entry(e.aggregate_id.clone()).or_default();
        entry.0.apply(e.decode().unwrap());
        entry.1 = entry.1.max(e.sequence);
    }
    let mut stock: HashMap<String, Inventory> = HashMap::new();
    for e in events(&app.kafka, "inventory").await {
        stock
            .entry(e.aggregate_id.clone())
            .or_default()
            .apply(e.decode().unwrap());
    }
    let journal_expected =
        events(&app.kafka, "order").await.len() + events(&app.kafka, "inventory").await.len();
    assert_eq!(orders.len(), 320);

    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows: Vec<(uuid::Uuid, i64, i64, String)> =
            sqlx::query_as("SELECT order_id, version, total_cents, status FROM orders")
                .fetch_all(&pool)
                .await
                .unwrap();
        let levels: Vec<(String, i64)> = sqlx::query_as("SELECT sku, on_hand FROM inventory")
            .fetch_all(&pool)
            .await
            .unwrap();
        let journal: i64 = sqlx::query_scalar("SELECT count(*) FROM event_journal")
            .fetch_one(&pool)
            .await
            .unwrap();
        let orders_match = rows.len() == orders.len()
            && rows.iter().all(|(id, version, total, status)| {
                let (order, last) = &orders[&id.to_string()];
                *version as u64 == *last
                    && *total as u64 == order.total_cents().0
                    && Some(status.as_str()) == order.status.map(|s| s.to_string()).as_deref()
            });
        let stock_matches = levels.len() == stock.len()
            && levels
                .iter()
                .all(|(sku, on_hand)| *on_hand as u64 == stock[sku].on_hand);
        if orders_match && stock_matches && journal as usize == journal_expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "read models never matched the log: {} orders of {}, stock match {stock_matches}, journal {journal} of {journal_expected}",
            rows.len(),
            orders.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    running.kill().unwrap();
    running.wait().unwrap();
}

//! The read side end to end: projections into real PostgreSQL, queries, read-your-writes,
//! history, time travel, pagination, poison records, replay.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use crate::common::{events, new_prefix, order_body, TestApp};
use serde_json::{json, Value};

fn new_order(customer: &str) -> (String, Value) {
    let id = uuid::Uuid::new_v4().to_string();
    let mut body = order_body(customer, &[("A", 2, 150), ("B", 1, 99)]);
    body["order_id"] = json!(id);
    (id, body)
}

#[tokio::test]
async fn two_hundred_command_then_query_cycles_with_the_token_read_their_own_writes() {
    let app = TestApp::start(&new_prefix()).await;
    let mut stale = 0;
    for i in 0..100 {
        let (id, body) = new_order("ryw");
        let (status, created) = app.post("/v1/orders", body, &[]).await;
        assert_eq!(status, 201, "{created}");
        let token = created["consistency_token"].as_str().unwrap().to_string();
        let (status, etag, view) = app
            .get(
                &format!("/v1/orders/{id}"),
                &[("X-Consistency-Token", &token)],
            )
            .await;
        stale += (status != 200 || view["version"] != 1) as u32;
        assert_eq!(etag.as_deref(), Some("\"1\""));

        let line = json!({ "sku": format!("X{i}"), "quantity": 1, "unit_price_cents": 10 });
        let (_, added) = app.post(&format!("/v1/orders/{id}/lines"), line, &[]).await;
        let token = added["consistency_token"].as_str().unwrap().to_string();
        let (_, _, view) = app
            .get(
                &format!("/v1/orders/{id}"),
                &[("X-Consistency-Token", &token)],
            )
            .await;
        stale += (view["version"] != 2 || view["lines"].as_array().map(Vec::len) != Some(3)) as u32;
    }
    assert_eq!(stale, 0, "reads with a token must never be stale");
    app.stop().await;
}

#[tokio::test]
async fn views_history_time_travel_and_their_errors() {
    let app = TestApp::start(&new_prefix()).await;
    let (id, body) = new_order("viewer");
    app.post("/v1/orders", body, &[]).await;
    app.post(
        &format!("/v1/orders/{id}/lines"),
        json!({ "sku": "C", "quantity": 3, "unit_price_cents": 7 }),
        &[],
    )
    .await;
    let (_, placed) = app
        .post(&format!("/v1/orders/{id}/place"), json!({}), &[])
        .await;
    let token = placed["consistency_token"].as_str().unwrap().to_string();
    let t = [("X-Consistency-Token", token.as_str())];

    let (status, etag, view) = app.get(&format!("/v1/orders/{id}"), &t).await;
    assert_eq!((status.as_u16(), etag.as_deref()), (200, Some("\"3\"")));
    assert_eq!(view["status"], "placed");
    assert_eq!(view["customer_id"], "viewer");
    assert_eq!(view["total_cents"], 2 * 150 + 99 + 3 * 7);
    assert_eq!(
        view["lines"][2],
        json!({ "sku": "C", "quantity": 3, "unit_price_cents": 7 })
    );
    assert_eq!(view["rejection_reason"], Value::Null);
    assert!(view["created_at"].as_str().unwrap().ends_with('Z'));

    let (status, _, then) = app.get(&format!("/v1/orders/{id}?at_version=1"), &t).await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            then["version"].clone(),
            then["status"].clone(),
            then["total_cents"].clone()
        ),
        (json!(1), json!("draft"), json!(399))
    );
    assert_eq!(
        app.get(&format!("/v1/orders/{id}?at_version=4"), &t)
            .await
            .0,
        404
    );
    assert_eq!(
        app.get(&format!("/v1/orders/{id}?at_version=0"), &t)
            .await
            .0,
        400
    );

    let (status, _, history) = app.get(&format!("/v1/orders/{id}/events"), &t).await;
    assert_eq!(status, 200);
    let types: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, vec!["OrderCreated", "LineAdded", "OrderPlaced"]);
    assert_eq!(history["events"][2]["sequence"], 3);
    assert!(history["events"][0]["metadata"]["command_id"].is_string());

    let unknown = uuid::Uuid::new_v4();
    assert_eq!(app.get(&format!("/v1/orders/{unknown}"), &[]).await.0, 404);
    assert_eq!(
        app.get(&format!("/v1/orders/{unknown}/events"), &[])
            .await
            .0,
        404
    );
    assert_eq!(app.get("/v1/orders/not-a-uuid", &[]).await.0, 400);
    let (status, _, body) = app
        .get(
            &format!("/v1/orders/{id}"),
            &[("X-Consistency-Token", "garbage")],
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (400, Some("invalid_consistency_token"))
    );

    let (_, restocked) = app
        .post(
            "/v1/inventory/SKU-9/restock",
            json!({ "quantity": 12 }),
            &[],
        )
        .await;
    let token = restocked["consistency_token"].as_str().unwrap().to_string();
    let (status, etag, stock) = app
        .get("/v1/inventory/SKU-9", &[("X-Consistency-Token", &token)])
        .await;
    assert_eq!((status.as_u16(), etag.as_deref()), (200, Some("\"1\"")));
    assert_eq!(
        stock,
        json!({ "sku": "SKU-9", "on_hand": 12, "reserved": 0, "available": 12, "version": 1 })
    );
    assert_eq!(app.get("/v1/inventory/NEVER", &[]).await.0, 404);

    let (_, funded) = app
        .post(
            "/v1/accounts/viewer/deposits",
            json!({ "amount_cents": 500 }),
            &[],
        )
        .await;
    let token = funded["consistency_token"].as_str().unwrap().to_string();
    let (_, _, account) = app
        .get("/v1/accounts/viewer", &[("X-Consistency-Token", &token)])
        .await;
    assert_eq!(
        account,
        json!({ "customer_id": "viewer", "balance_cents": 500, "version": 1 })
    );
    let (_, _, history) = app
        .get(
            "/v1/accounts/viewer/events",
            &[("X-Consistency-Token", &token)],
        )
        .await;
    assert_eq!(history["events"][0]["event_type"], "FundsDeposited");
    assert_eq!(app.get("/v1/accounts/bad%20id", &[]).await.0, 400);
    app.stop().await;
}

#[tokio::test]
async fn paging_sees_every_order_once_while_new_ones_arrive() {
    let app = TestApp::start(&new_prefix()).await;
    let mut existing = HashSet::new();
    let mut token = String::new();
    for _ in 0..23 {
        let (id, body) = new_order("pager");
        let (_, created) = app.post("/v1/orders", body, &[]).await;
        token = created["consistency_token"].as_str().unwrap().to_string();
        existing.insert(id);
    }
    // Every earlier order is in the read model once the last one's token is (one partition
    // per order, so wait on each: simplest is to check the list's size).
    app.eventually(
        "/v1/orders?customer_id=pager&limit=500",
        Duration::from_secs(10),
        |b| b["items"].as_array().map(Vec::len) == Some(23),
    )
    .await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/orders?customer_id=pager&limit=5&cursor={c}"),
            None => "/v1/orders?customer_id=pager&limit=5".to_string(),
        };
        let (status, _, page) = app.get(&path, &[("X-Consistency-Token", &token)]).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["order_id"].as_str().unwrap().to_string()),
        );
        // New orders keep arriving between pages.
        app.post("/v1/orders", new_order("pager").1, &[]).await;
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "an order was listed twice");
    assert!(
        existing.is_subset(&unique),
        "an order that existed at the first page was skipped"
    );

    let (status, _, body) = app.get("/v1/orders?customer_id=pager&limit=501", &[]).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (422, Some("rule_violation"))
    );
    assert_eq!(app.get("/v1/orders?limit=5", &[]).await.0, 400);
    assert_eq!(
        app.get("/v1/orders?customer_id=pager&status=weird", &[])
            .await
            .0,
        400
    );
    assert_eq!(
        app.get("/v1/orders?customer_id=pager&cursor=nope", &[])
            .await
            .0,
        400
    );
    let (_, _, drafts) = app
        .get("/v1/orders?customer_id=pager&status=draft&limit=1", &[])
        .await;
    assert_eq!(drafts["items"].as_array().unwrap().len(), 1);
    let (_, _, placed) = app
        .get("/v1/orders?customer_id=pager&status=placed", &[])
        .await;
    assert_eq!(placed["items"], json!([]));
    app.stop().await;
}

#[tokio::test]
async fn a_poison_record_is_dead_lettered_and_the_projection_goes_on() {
    use eventlog::rdkafka::producer::{FutureProducer, FutureRecord};
    let app = TestApp::start(&new_prefix()).await;
    let topic = format!("{}.order.events", app.kafka.topic_prefix);
    let producer: FutureProducer = app.kafka.producer().create().unwrap();
    producer
        .send(
            FutureRecord::to(&topic)
                .partition(0)
                .key("bad")
                .payload("{not an envelope"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();

    let (id, body) = new_order("after-poison");
    let (_, created) = app.post("/v1/orders", body, &[]).await;
    let token = created["consistency_token"].as_str().unwrap().to_string();
    let (status, _, _) = app
        .get(
            &format!("/v1/orders/{id}"),
            &[("X-Consistency-Token", &token)],
        )
        .await;
    assert_eq!(status, 200, "the projection went on past the poison record");

    let status = app
        .eventually("/v1/admin/projections", Duration::from_secs(10), |b| {
            b["items"].as_array().is_some_and(|items| {
                items
                    .iter()
                    .any(|p| p["name"] == "orders" && p["dead_letters"] == 1)
            })
        })
        .await;
    let orders = status["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "orders")
        .unwrap()
        .clone();
    assert_eq!(orders["status"], "running");
    let dlq = format!("{}.dlq", app.kafka.topic_prefix);
    let mut dead = Vec::new();
    eventlog::read_partition(&app.kafka, &dlq, 0, 0, |m| {
        use eventlog::rdkafka::Message;
        dead.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
        Ok(())
    })
    .await
    .unwrap();
    assert!(dead.iter().any(|p| p == "{not an envelope"), "{dead:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_replay_rebuilds_tables_identical_to_the_live_ones() {
    let app = TestApp::start(&new_prefix()).await;
    for i in 0..30 {
        let (id, body) = new_order(&format!("c{}", i % 3));
        app.post("/v1/orders", body, &[]).await;
        if i % 2 == 0 {
            app.post(&format!("/v1/orders/{id}/place"), json!({}), &[])
                .await;
        }
        app.post(
            &format!("/v1/inventory/S{}/restock", i % 4),
            json!({ "quantity": 1 + i }),
            &[],
        )
        .await;
    }
    let caught_up = |b: &Value| {
        b["items"].as_array().is_some_and(|items| {
            items
                .iter()
                .all(|p| p["lag"] == 0 && p["status"] == "running")
        })
    };
    app.eventually("/v1/admin/projections", Duration::from_secs(20), caught_up)
        .await;
    let database = common::database_for(&app.kafka.topic_prefix).await;
    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    let dump = |table: &'static str, key: &'static str| {
        let pool = pool.clone();
        async move {
            let rows: Vec<(Value,)> =
                sqlx::query_as(&format!("SELECT to_jsonb(t) FROM {table} t ORDER BY {key}"))
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            rows.into_iter().map(|r| r.0).collect::<Vec<_>>()
        }
    };
    let before = (
        dump("orders", "order_id").await,
        dump("inventory", "sku").await,
    );
    assert_eq!(before.0.len(), 30);

    for name in ["orders", "inventory"] {
        let response = app
            .http
            .post(app.url(&format!("/v1/admin/projections/{name}/replay")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    let done = |b: &Value| {
        b["items"].as_array().is_some_and(|items| {
            items
                .iter()
                .all(|p| p["replay"].is_null() && p["status"] == "running")
        })
    };
    app.eventually("/v1/admin/projections", Duration::from_secs(30), done)
        .await;
    let after = (
        dump("orders", "order_id").await,
        dump("inventory", "sku").await,
    );
    assert_eq!(
        after, before,
        "the replayed tables differ from the live ones"
    );
    assert_eq!(
        app.http
            .post(app.url("/v1/admin/projections/nope/replay"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // The read model still follows new events after the swap.
    let (id, body) = new_order("after-replay");
    let (_, created) = app.post("/v1/orders", body, &[]).await;
    let token = created["consistency_token"].as_str().unwrap().to_string();
    assert_eq!(
        app.get(
            &format!("/v1/orders/{id}"),
            &[("X-Consistency-Token", &token)]
        )
        .await
        .0,
        200
    );
    assert_eq!(events(&app.kafka, "order").await.len(), 30 + 15 + 1);
    app.stop().await;
}

#[tokio::test]
async fn checkpoints_of_other_topics_in_the_same_database_are_left_alone() {
    let prefix = new_prefix();
    let database = common::database_for(&prefix).await;
    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    tally::prepare(&common::args(&prefix, 2, "api", &[]).await.0)
        .await
        .unwrap();
    sqlx::query("INSERT INTO projection_checkpoints VALUES ('orders', 'another-tally.order.events', 0, 5, now())")
        .execute(&pool)
        .await
        .unwrap();

    let app = TestApp::start(&prefix).await;
    let (id, body) = new_order("neighbour");
    let (_, created) = app.post("/v1/orders", body, &[]).await;
    let token = created["consistency_token"].as_str().unwrap().to_string();
    assert_eq!(
        app.get(
            &format!("/v1/orders/{id}"),
            &[("X-Consistency-Token", &token)]
        )
        .await
        .0,
        200
    );
    let (_, _, status) = app.get("/v1/admin/projections", &[]).await;
    assert!(
        status["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["error"].is_null()),
        "{status}"
    );
    let kept: i64 = sqlx::query_scalar(
        "SELECT next_offset FROM projection_checkpoints WHERE topic = 'another-tally.order.events'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(kept, 5);
    app.stop().await;
}

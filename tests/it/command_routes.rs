//! The write side end to end: HTTP commands, processors, real Kafka.

use crate::common::{events, events_of, new_prefix, order_body, TestApp};
use futures::future::join_all;
use serde_json::{json, Value};

fn order_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn create_order(app: &TestApp, id: &str) {
    let mut body = order_body("alice", &[("A", 1, 100)]);
    body["order_id"] = json!(id);
    let (status, answer) = app.post("/v1/orders", body, &[]).await;
    assert_eq!(status, 201, "{answer}");
}

#[tokio::test]
async fn a_command_answers_after_its_events_are_in_the_log() {
    let app = TestApp::start(&new_prefix()).await;
    let (status, body) = app
        .post("/v1/inventory/SKU-1/restock", json!({ "quantity": 5 }), &[])
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["aggregate_id"], "SKU-1");
    assert_eq!(body["version"], 1);
    assert!(body["consistency_token"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));

    let (status, body) = app
        .post("/v1/inventory/SKU-1/restock", json!({ "quantity": 7 }), &[])
        .await;
    assert_eq!((status.as_u16(), body["version"].clone()), (200, json!(2)));

    let log = events_of(&app.kafka, "inventory", "SKU-1").await;
    let seen: Vec<(u64, &str, Value)> = log
        .iter()
        .map(|e| {
            (
                e.sequence,
                e.event_type.as_str(),
                e.payload["quantity"].clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (1, "StockRestocked", json!(5)),
            (2, "StockRestocked", json!(7))
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn an_order_without_an_id_gets_one_and_the_correlation_id_reaches_the_event() {
    let app = TestApp::start(&new_prefix()).await;
    let (status, body) = app
        .post(
            "/v1/orders",
            order_body("bob", &[("A", 2, 150), ("B", 1, 99)]),
            &[("X-Correlation-ID", "corr-77")],
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["aggregate_id"].as_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    let log = events_of(&app.kafka, "order", &id).await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].event_type, "OrderCreated");
    assert_eq!(log[0].metadata.correlation_id.as_deref(), Some("corr-77"));
    assert!(log[0].metadata.command_id.is_some());
    app.stop().await;
}

#[tokio::test]
async fn of_two_concurrent_commands_with_the_same_if_match_exactly_one_wins() {
    let app = TestApp::start(&new_prefix()).await;
    let id = order_id();
    create_order(&app, &id).await;
    let path = format!("/v1/orders/{id}/lines");
    let (a, b) = tokio::join!(
        app.post(
            &path,
            json!({ "sku": "B", "quantity": 1, "unit_price_cents": 5 }),
            &[("If-Match", "1")]
        ),
        app.post(
            &path,
            json!({ "sku": "C", "quantity": 1, "unit_price_cents": 5 }),
            &[("If-Match", "\"1\"")]
        ),
    );
    let mut statuses = vec![a.0.as_u16(), b.0.as_u16()];
    statuses.sort();
    assert_eq!(statuses, vec![200, 409], "{a:?} {b:?}");
    let conflict = if a.0 == 409 { &a.1 } else { &b.1 };
    assert_eq!(conflict["error"]["code"], "version_conflict");
    assert_eq!(conflict["error"]["details"]["current_version"], 2);
    assert_eq!(events_of(&app.kafka, "order", &id).await.len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_first_answer_and_appends_nothing() {
    let app = TestApp::start(&new_prefix()).await;
    let key = format!("key-{}", uuid::Uuid::new_v4());
    let headers = [("Idempotency-Key", key.as_str())];
    let body = order_body("carol", &[("A", 1, 100)]);
    let first = app.post("/v1/orders", body.clone(), &headers).await;
    assert_eq!(first.0, 201, "{}", first.1);
    let again = app.post("/v1/orders", body.clone(), &headers).await;
    assert_eq!(again, first);

    // Ten concurrent repeats: one answer, one set of events.
    let repeats = join_all((0..10).map(|_| app.post("/v1/orders", body.clone(), &headers))).await;
    assert!(repeats.iter().all(|r| *r == first), "{repeats:?}");
    let id = first.1["aggregate_id"].as_str().unwrap();
    assert_eq!(events_of(&app.kafka, "order", id).await.len(), 1);
    assert_eq!(events(&app.kafka, "order").await.len(), 1);

    // The same key with another body is refused and changes nothing.
    let other = app
        .post(
            "/v1/orders",
            order_body("carol", &[("A", 2, 100)]),
            &headers,
        )
        .await;
    assert_eq!(other.0, 422);
    assert_eq!(other.1["error"]["code"], "idempotency_key_reused");
    assert_eq!(events(&app.kafka, "order").await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_first_uses_of_one_key_create_one_set_of_events() {
    let app = TestApp::start(&new_prefix()).await;
    let key = format!("race-{}", uuid::Uuid::new_v4());
    let headers = [("Idempotency-Key", key.as_str())];
    let answers = join_all((0..8).map(|_| {
        app.post(
            "/v1/inventory/RACE/restock",
            json!({ "quantity": 3 }),
            &headers,
        )
    }))
    .await;
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    assert_eq!(answers[0].0, 201);
    assert_eq!(events_of(&app.kafka, "inventory", "RACE").await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_rejected_command_appends_no_event_and_its_422_is_repeatable() {
    let app = TestApp::start(&new_prefix()).await;
    let id = order_id();
    create_order(&app, &id).await;
    let (status, _) = app
        .post(&format!("/v1/orders/{id}/place"), json!({}), &[])
        .await;
    assert_eq!(status, 200);
    let key = format!("late-line-{}", uuid::Uuid::new_v4());
    let headers = [("Idempotency-Key", key.as_str())];
    let line = json!({ "sku": "B", "quantity": 1, "unit_price_cents": 5 });
    let (status, body) = app
        .post(&format!("/v1/orders/{id}/lines"), line.clone(), &headers)
        .await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["code"], "rule_violation");
    assert_eq!(body["error"]["details"]["rule"], "order_not_draft");
    let again = app
        .post(&format!("/v1/orders/{id}/lines"), line, &headers)
        .await;
    assert_eq!(again, (status, body));
    let types: Vec<String> = events_of(&app.kafka, "order", &id)
        .await
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(types, vec!["OrderCreated", "OrderPlaced"]);
    app.stop().await;
}

#[tokio::test]
async fn bad_input_gets_the_error_shape_and_never_reaches_the_log() {
    let app = TestApp::start(&new_prefix()).await;
    let id = order_id();
    create_order(&app, &id).await;
    let lines = format!("/v1/orders/{id}/lines");
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            app.http
                .post(app.url(&lines))
                .body(r#"{"sku":"A","quantity":1,"unit_price_cents":1}"#),
            415,
            "unsupported_media_type",
        ),
        (
            app.http
                .post(app.url(&lines))
                .json(&json!({ "sku": "A", "quantity": 1, "unit_price_cents": 1, "extra": 1 })),
            400,
            "malformed_request",
        ),
        (
            app.http
                .post(app.url(&lines))
                .json(&json!({ "sku": "A", "quantity": "1", "unit_price_cents": 1 })),
            400,
            "malformed_request",
        ),
        (
            app.http
                .post(app.url(&lines))
                .json(&json!({ "sku": "A", "quantity": 1e30, "unit_price_cents": 1 })),
            400,
            "malformed_request",
        ),
        (
            app.http
                .post(app.url(&lines))
                .header("content-type", "application/json")
                .body("{not json"),
            400,
            "malformed_request",
        ),
        (
            app.http
                .post(app.url(&lines))
                .json(&json!({ "sku": "A", "quantity": 0, "unit_price_cents": 1 })),
            422,
            "rule_violation",
        ),
        (
            app.http
                .post(app.url(&lines))
                .json(&json!({ "sku": "A", "quantity": 1, "unit_price_cents": -4 })),
            422,
            "rule_violation",
        ),
        (
            app.http
                .post(app.url(&lines))
                .json(&json!({ "sku": "bad sku", "quantity": 1, "unit_price_cents": 1 })),
            400,
            "malformed_request",
        ),
        (
            app.http
                .post(app.url("/v1/orders/not-a-uuid/lines"))
                .json(&json!({ "sku": "A", "quantity": 1, "unit_price_cents": 1 })),
            400,
            "malformed_request",
        ),
        (
            app.http
                .post(app.url(&lines))
                .header("content-type", "application/json; charset=utf-8")
                .body(vec![b' '; 65_537]),
            413,
            "payload_too_large",
        ),
        (
            app.http
                .post(app.url(&lines))
                .header("If-Match", "v1")
                .json(&json!({ "sku": "A", "quantity": 1, "unit_price_cents": 1 })),
            400,
            "malformed_request",
        ),
        (
            app.http
                .post(app.url(&lines))
                .header("Idempotency-Key", "")
                .json(&json!({ "sku": "A", "quantity": 1, "unit_price_cents": 1 })),
            400,
            "malformed_request",
        ),
        (
            app.http
                .post(app.url("/v1/inventory/SKU/restock"))
                .json(&json!({ "quantity": 1_000_001 })),
            422,
            "rule_violation",
        ),
        (
            app.http
                .post(app.url("/v1/accounts/a%20b/deposits"))
                .json(&json!({ "amount_cents": 5 })),
            400,
            "malformed_request",
        ),
        (
            app.http
                .post(app.url("/v1/orders"))
                .json(&json!({ "customer_id": "x", "lines": [] })),
            422,
            "rule_violation",
        ),
    ];
    for (request, status, code) in cases {
        let response = request.send().await.unwrap();
        let got = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    // A body of exactly 65,536 bytes is read (and here refused only as a bad body).
    let mut exact = br#"{"sku":"Z","quantity":1,"unit_price_cents":1}"#.to_vec();
    exact.resize(65_536, b' ');
    let response = app
        .http
        .post(app.url(&lines))
        .header("content-type", "application/json")
        .body(exact)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        events(&app.kafka, "order").await.len(),
        2,
        "only the valid line was appended"
    );
    assert!(events(&app.kafka, "inventory").await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn after_a_restart_commands_are_validated_against_the_rebuilt_history() {
    let prefix = new_prefix();
    let app = TestApp::start(&prefix).await;
    let id = order_id();
    create_order(&app, &id).await;
    assert_eq!(
        app.post(&format!("/v1/orders/{id}/place"), json!({}), &[])
            .await
            .0,
        200
    );
    assert_eq!(
        app.post(
            "/v1/accounts/dave/deposits",
            json!({ "amount_cents": 500 }),
            &[]
        )
        .await
        .0,
        201
    );
    app.stop().await;

    let app = TestApp::start(&prefix).await;
    let (status, body) = app
        .post(
            &format!("/v1/orders/{id}/lines"),
            json!({ "sku": "B", "quantity": 1, "unit_price_cents": 5 }),
            &[],
        )
        .await;
    assert_eq!(
        (status.as_u16(), &body["error"]["details"]["rule"]),
        (422, &json!("order_not_draft"))
    );
    let (status, body) = app
        .post(
            "/v1/accounts/dave/deposits",
            json!({ "amount_cents": 1 }),
            &[("If-Match", "1")],
        )
        .await;
    assert_eq!(
        (status.as_u16(), &body["version"]),
        (200, &json!(2)),
        "{body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_fenced_processor_commits_nothing_and_its_successor_rebuilds_and_answers() {
    let prefix = new_prefix();
    let app = TestApp::start_with(&prefix, 1, "api,commands").await;
    let id = order_id();
    create_order(&app, &id).await;

    // A new owner of partition 0 appears: the running processor is now a zombie.
    let usurper = eventlog::TxnProducer::new(&app.kafka, &format!("{prefix}-order-p0"))
        .await
        .unwrap();

    // The zombie's next transaction fails; the processor restarts, fences the usurper in
    // turn, rebuilds from the log, and handles the command exactly once.
    let (status, body) = app
        .post(&format!("/v1/orders/{id}/place"), json!({}), &[])
        .await;
    assert_eq!(
        (status.as_u16(), &body["version"]),
        (200, &json!(2)),
        "{body}"
    );
    let types: Vec<String> = events_of(&app.kafka, "order", &id)
        .await
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(types, vec!["OrderCreated", "OrderPlaced"]);

    usurper.begin().await.unwrap();
    let topic = format!("{prefix}.order.events");
    let send = usurper
        .send(
            &topic,
            0,
            &id,
            b"{}",
            eventlog::rdkafka::message::OwnedHeaders::new(),
        )
        .unwrap();
    let err = usurper
        .commit(vec![send])
        .await
        .expect_err("the usurper was fenced by the restarted processor");
    let (eventlog::CommitError::Undelivered(kafka) | eventlog::CommitError::Uncertain(kafka)) =
        &err;
    assert_eq!(
        eventlog::classify(kafka),
        eventlog::TxnErrorKind::Fatal,
        "{err:?}"
    );
    assert_eq!(
        events_of(&app.kafka, "order", &id).await.len(),
        2,
        "nothing from a fenced producer is visible"
    );
    app.stop().await;
}

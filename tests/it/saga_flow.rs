//! The order-fulfilment saga end to end against real Kafka and PostgreSQL: the happy path,
//! short stock on one line of several, a declined charge, cancelling a confirmed order,
//! a deadline passing while the payment processor is down, and a race for the last units.

use std::time::Duration;

use crate::common::{events, events_of, new_prefix, order_body, TestApp};
use sagas::fulfilment::STREAM;
use serde_json::{json, Value};

const SETTLE: Duration = Duration::from_secs(60);

async fn restock(app: &TestApp, sku: &str, quantity: i64) {
    let (status, body) = app
        .post(
            &format!("/v1/inventory/{sku}/restock"),
            json!({ "quantity": quantity }),
            &[],
        )
        .await;
    assert!(status.is_success(), "restock {sku}: {status} {body}");
}

async fn deposit(app: &TestApp, customer: &str, cents: i64) {
    let (status, body) = app
        .post(
            &format!("/v1/accounts/{customer}/deposits"),
            json!({ "amount_cents": cents }),
            &[],
        )
        .await;
    assert!(status.is_success(), "deposit {customer}: {status} {body}");
}

/// Creates and places an order; answers its id.
async fn place(app: &TestApp, customer: &str, lines: &[(&str, i64, i64)]) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let mut body = order_body(customer, lines);
    body["order_id"] = json!(id);
    let (status, created) = app.post("/v1/orders", body, &[]).await;
    assert_eq!(status, 201, "{created}");
    let (status, placed) = app
        .post(&format!("/v1/orders/{id}/place"), json!({}), &[])
        .await;
    assert_eq!(status, 200, "{placed}");
    id
}

/// The order once the saga has settled it, and its saga once that has ended.
async fn settled(app: &TestApp, id: &str) -> (Value, Value) {
    let saga = app
        .eventually(&format!("/v1/orders/{id}/saga"), SETTLE, |s| {
            s["status"].as_str().is_some_and(|s| s != "running")
        })
        .await;
    let order = app
        .eventually(&format!("/v1/orders/{id}"), SETTLE, |o| {
            o["status"].as_str().is_some_and(|s| s != "placed")
        })
        .await;
    (order, saga)
}

fn steps(saga: &Value) -> Vec<(String, String)> {
    saga["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().into(),
                s["status"].as_str().unwrap().into(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

async fn balance(app: &TestApp, customer: &str) -> i64 {
    let (_, _, v) = app.get(&format!("/v1/accounts/{customer}"), &[]).await;
    v["balance_cents"].as_i64().unwrap()
}

/// Waits until the read models of stock and balances show what the saga did.
async fn eventually_stock(app: &TestApp, sku: &str, want: (i64, i64)) {
    app.eventually(&format!("/v1/inventory/{sku}"), SETTLE, |v| {
        (v["on_hand"].as_i64(), v["reserved"].as_i64()) == (Some(want.0), Some(want.1))
    })
    .await;
}

async fn eventually_balance(app: &TestApp, customer: &str, want: i64) {
    app.eventually(&format!("/v1/accounts/{customer}"), SETTLE, |v| {
        v["balance_cents"].as_i64() == Some(want)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fulfilment_confirms_rejects_and_compensates() {
    let app = TestApp::start_with(&new_prefix(), 2, "api,commands,sagas,projections").await;
    restock(&app, "A", 10).await;
    restock(&app, "B", 2).await;
    deposit(&app, "rich", 100_000).await;
    deposit(&app, "poor", 100).await;

    // Happy path: reserved, charged, confirmed, sold.
    let happy = place(&app, "rich", &[("A", 3, 100), ("B", 1, 50)]).await;
    let (order, saga) = settled(&app, &happy).await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(saga["status"], "completed");
    assert_eq!(saga["failure_reason"], Value::Null);
    assert_eq!(saga["order_id"], happy);
    assert_eq!(
        steps(&saga),
        pairs(&[
            ("reserve_stock", "completed"),
            ("charge_payment", "completed"),
            ("confirm_order", "completed"),
            ("sell_stock", "completed")
        ])
    );
    eventually_stock(&app, "A", (7, 0)).await;
    eventually_stock(&app, "B", (1, 0)).await;
    eventually_balance(&app, "rich", 100_000 - 350).await;

    // One short line of several: nothing stays reserved, nothing is charged.
    let short = place(&app, "rich", &[("A", 2, 100), ("B", 5, 50)]).await;
    let (order, saga) = settled(&app, &short).await;
    assert_eq!(order["status"], "rejected");
    assert_eq!(order["rejection_reason"], "insufficient_stock");
    assert_eq!(saga["status"], "compensated");
    assert_eq!(saga["failure_reason"], "insufficient_stock");
    assert_eq!(
        steps(&saga),
        pairs(&[
            ("reserve_stock", "failed"),
            ("release_stock", "completed"),
            ("reject_order", "completed")
        ])
    );
    eventually_stock(&app, "A", (7, 0)).await;
    eventually_stock(&app, "B", (1, 0)).await;

    // A declined charge: the reserved stock is released.
    let declined = place(&app, "poor", &[("A", 1, 500)]).await;
    let (order, saga) = settled(&app, &declined).await;
    assert_eq!(order["rejection_reason"], "payment_declined");
    assert_eq!(saga["failure_reason"], "payment_declined");
    assert_eq!(
        steps(&saga),
        pairs(&[
            ("reserve_stock", "completed"),
            ("charge_payment", "failed"),
            ("release_stock", "completed"),
            ("reject_order", "completed")
        ])
    );
    eventually_stock(&app, "A", (7, 0)).await;
    assert_eq!(balance(&app, "poor").await, 100);

    // Cancel after confirm: stock returned, money refunded, the saga ends compensated.
    let (status, body) = app
        .post(
            &format!("/v1/orders/{happy}/cancel"),
            json!({ "reason": "changed my mind" }),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let saga = app
        .eventually(&format!("/v1/orders/{happy}/saga"), SETTLE, |s| {
            s["status"] == "compensated"
        })
        .await;
    assert_eq!(saga["failure_reason"], "cancelled");
    assert_eq!(
        steps(&saga)[4..],
        pairs(&[
            ("refund_payment", "completed"),
            ("return_stock", "completed")
        ])
    );
    let (_, _, order) = app.get(&format!("/v1/orders/{happy}"), &[]).await;
    assert_eq!(order["status"], "cancelled");
    eventually_stock(&app, "A", (10, 0)).await;
    eventually_stock(&app, "B", (2, 0)).await;
    eventually_balance(&app, "rich", 100_000).await;

    // Money is conserved in the log too: every charge of a compensated order was refunded.
    let payments = events(&app.kafka, "payment").await;
    let count = |t: &str| payments.iter().filter(|e| e.event_type == t).count();
    assert_eq!((count("PaymentCharged"), count("PaymentRefunded")), (1, 1));

    // An order never placed has no saga.
    let (status, _, body) = app
        .get(&format!("/v1/orders/{}/saga", uuid::Uuid::new_v4()), &[])
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found");
    let (status, _, body) = app.get("/v1/orders/not-a-uuid/saga", &[]).await;
    assert_eq!(status, 400, "{body}");

    // Every role's figures are on /metrics (consumer lag once librdkafka reported it).
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = app
            .http
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.contains("tally_consumer_lag{")
            && metrics.contains("tally_saga_consumer_lag{")
            && metrics.contains("tally_projection_lag{")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for family in [
        "tally_sagas_ended_total{status=\"completed\"} 1",
        "tally_sagas_ended_total{status=\"compensated\"} 3",
        "tally_saga_step_seconds_count{step=\"reserve_stock\",status=\"completed\"}",
        "tally_commands_total{stream=\"order\",command=\"CreateOrder\",outcome=\"accepted\"} 3",
        "tally_commands_total{stream=\"inventory\",command=\"ReserveStock\",outcome=\"rejected\"} 1",
        "tally_commands_total{stream=\"payment\",command=\"ChargePayment\",outcome=\"rejected\"} 1",
        "tally_command_request_seconds_count{stream=\"order\",command=\"PlaceOrder\",outcome=\"accepted\"} 3",
        "tally_events_appended_total{stream=\"payment\"}",
        "tally_command_transaction_commands_count{stream=\"order\"}",
        "tally_saga_transactions_total",
        "tally_projection_lag{projection=\"orders\"}",
        "tally_projection_applied_total{projection=\"sagas\"}",
        "tally_dead_letters_total{projection=\"journal\"} 0",
        "tally_consumer_lag{group=",
        "tally_saga_consumer_lag{group=",
    ] {
        assert!(metrics.contains(family), "{family} missing from /metrics:\n{metrics}");
    }
    app.stop().await;
}

/// The reply the saga of `order` recorded for its charge step (step 1) after the deadline.
async fn late_charge_answer(app: &TestApp, order: &str) -> Value {
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let recorded = events_of(&app.kafka, STREAM, order)
            .await
            .into_iter()
            .find(|e| e.event_type == "ReplyReceived" && e.payload["step"] == 1);
        if let Some(e) = recorded {
            return e.payload["reply"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the saga of {order} never got its charge's late answer"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_charge_past_its_deadline_compensates_and_a_late_payment_processor_charges_nothing() {
    let prefix = new_prefix();
    let timeout = ["--saga-step-timeout-ms", "3000"];
    let main = TestApp::start_with_args(
        &prefix,
        2,
        "api,commands,sagas,projections",
        &[&timeout[..], &["--command-streams", "order,inventory"]].concat(),
    )
    .await;
    let payments = TestApp::start_with_args(
        &prefix,
        2,
        "api,commands",
        &[&timeout[..], &["--command-streams", "payment"]].concat(),
    )
    .await;
    restock(&main, "A", 5).await;
    deposit(&payments, "late", 10_000).await;
    eventually_balance(&main, "late", 10_000).await;
    payments.stop().await;

    // Payment is down: the saga reserves, then waits for the charge until its deadline.
    let id = place(&main, "late", &[("A", 2, 100)]).await;
    let (order, saga) = settled(&main, &id).await;
    assert_eq!(order["status"], "rejected");
    assert_eq!(order["rejection_reason"], "timeout");
    assert_eq!(saga["failure_reason"], "timeout");
    assert_eq!(
        steps(&saga)[..2],
        pairs(&[
            ("reserve_stock", "completed"),
            ("charge_payment", "timed_out")
        ])
    );
    eventually_stock(&main, "A", (5, 0)).await;

    // Payment comes back late: the queued charge has expired. The saga takes in that late
    // answer and refunds nothing: it refunds only a charge that was taken (ADR 9).
    let payments = TestApp::start_with_args(
        &prefix,
        2,
        "api,commands",
        &[&timeout[..], &["--command-streams", "payment"]].concat(),
    )
    .await;
    let answer = late_charge_answer(&main, &id).await;
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["code"], "command_expired", "{answer}");
    let (_, _, saga) = main.get(&format!("/v1/orders/{id}/saga"), &[]).await;
    assert!(
        !steps(&saga)
            .iter()
            .any(|(name, _)| name == "refund_payment"),
        "nothing was charged, so nothing is refunded: {saga}"
    );
    let charged: Vec<_> = events(&main.kafka, "payment")
        .await
        .into_iter()
        .filter(|e| e.event_type == "PaymentCharged")
        .collect();
    assert!(
        charged.is_empty(),
        "nothing may be charged for a timed-out order: {charged:?}"
    );
    assert_eq!(balance(&main, "late").await, 10_000);
    payments.stop().await;
    main.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_orders_race_for_twenty_five_units() {
    let app = std::sync::Arc::new(
        TestApp::start_with(&new_prefix(), 2, "api,commands,sagas,projections").await,
    );
    restock(&app, "LAST", 25).await;
    for c in 0..4 {
        deposit(&app, &format!("racer{c}"), 10_000).await;
    }
    let placing: Vec<_> = (0..40)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                place(&app, &format!("racer{}", i % 4), &[("LAST", 1, 100)]).await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for p in placing {
        ids.push(p.await.unwrap());
    }
    let (mut confirmed, mut rejected) = (0, 0);
    for id in &ids {
        let (order, _) = settled(&app, id).await;
        match order["status"].as_str() {
            Some("confirmed") => confirmed += 1,
            Some("rejected") => {
                assert_eq!(order["rejection_reason"], "insufficient_stock");
                rejected += 1
            }
            other => panic!("unexpected status {other:?}"),
        }
    }
    assert_eq!((confirmed, rejected), (25, 15));
    eventually_stock(&app, "LAST", (0, 0)).await;
    // Available never went below zero: no reservation was ever refused for a reason other
    // than shortage, and the log's reservations never exceed what was on hand.
    let mut available: i64 = 0;
    for e in events(&app.kafka, "inventory").await {
        let q = e.payload["quantity"].as_i64().unwrap_or(0);
        match e.event_type.as_str() {
            "StockRestocked" | "StockReleased" | "StockReturned" => available += q,
            "StockReserved" => available -= q,
            _ => {}
        }
        assert!(available >= 0, "available went below zero at {e:?}");
    }
    let mut total = 0;
    for c in 0..4 {
        total += balance(&app, &format!("racer{c}")).await;
    }
    assert_eq!(
        total,
        40_000 - 25 * 100,
        "balances plus confirmed charges are what was deposited"
    );
}

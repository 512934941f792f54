//! The holes closed by the trust round: access decided on the values the handlers use,
//! rate limits before authentication, idempotency keys per principal that only a
//! command's own outcome uses up, a keyed retry answered after a lost answer and a
//! restart, strict empty bodies, integer event versions.

use std::time::Duration;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{self, events_of, new_prefix, order_body, TallyProcess, TestApp};

const SECRET: &str = "a-test-secret-of-at-least-32-bytes-for-hs256";

/// `Bearer <JWT>` for `role` and `sub`, valid for ten minutes.
fn token(role: &str, sub: &str) -> String {
    let claims = json!({ "sub": sub, "role": role, "exp": chrono::Utc::now().timestamp() + 600 });
    let jwt = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    format!("Bearer {jwt}")
}

async fn status_of(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_reads_only_her_own_orders_however_the_request_is_spelled() {
    let prefix = new_prefix();
    let log = std::env::temp_dir().join(format!("{prefix}-trust.log"));
    let tally = TallyProcess::start(
        &prefix,
        &[],
        &[("TALLY_JWT_HS256_SECRET", SECRET.to_string())],
        &log,
    )
    .await;
    tally.wait_ready().await;
    let (base, http) = (tally.base.clone(), reqwest::Client::new());
    let (alice, bob, admin) = (
        token("customer", "alice"),
        token("customer", "bob"),
        token("admin", "ops"),
    );

    let mut order = order_body("alice", &[("A", 1, 100)]);
    order["order_id"] = json!(uuid::Uuid::new_v4());
    let (status, body) = status_of(
        http.post(format!("{base}/v1/orders"))
            .header("authorization", &alice)
            .json(&order),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = status_of(
        http.post(format!("{base}/v1/accounts/alice/deposits"))
            .header("authorization", &alice)
            .json(&json!({ "amount_cents": 700 })),
    )
    .await;
    assert!(status.is_success());
    let (status, _) = status_of(
        http.post(format!("{base}/v1/inventory/A/restock"))
            .header("authorization", &admin)
            .json(&json!({ "quantity": 3 })),
    )
    .await;
    assert!(status.is_success());
    // Alice sees her order once the read model has it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, page) = status_of(
            http.get(format!("{base}/v1/orders?customer_id=alice"))
                .header("authorization", &alice),
        )
        .await;
        assert_eq!(status, 200, "{page}");
        if page["items"]
            .as_array()
            .is_some_and(|items| items.len() == 1)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "alice's order never listed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Bob: a repeated parameter, however spelled, is refused before anything is read.
    for query in [
        "customer_id=bob&customer_id=alice",
        "customer_id=bob&customer%5Fid=alice",
        "customer%5fid=bob&customer_id=alice",
    ] {
        let (status, body) = status_of(
            http.get(format!("{base}/v1/orders?{query}"))
                .header("authorization", &bob),
        )
        .await;
        assert_eq!(status, 400, "?{query}: {body}");
        assert_eq!(body["error"]["code"], "malformed_request");
    }
    // Percent-encoded names and ids are judged after decoding, GET and HEAD alike.
    for path in [
        "/v1/orders?customer%5Fid=alice",
        "/v1/orders?customer_id=al%69ce",
        "/v1/accounts/al%69ce",
        "/v1/accounts/alice/events",
        "/v1/inventory/A/events",
    ] {
        let (status, body) = status_of(
            http.get(format!("{base}{path}"))
                .header("authorization", &bob),
        )
        .await;
        assert_eq!(status, 403, "GET {path} as bob: {body}");
        let head = http
            .head(format!("{base}{path}"))
            .header("authorization", &bob)
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 403, "HEAD {path} as bob");
    }
    // The admin routes: 403 for a customer on the route itself; other spellings of its
    // path match no route at all (so no data either way).
    let (status, _) = status_of(
        http.get(format!("{base}/v1/admin/projections"))
            .header("authorization", &bob),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = status_of(
        http.post(format!("{base}/v1/admin/projections/orders/replay"))
            .header("authorization", &bob),
    )
    .await;
    assert_eq!(status, 403, "a customer cannot start a replay");
    let (status, _) = status_of(
        http.get(format!("{base}/v1/admin/projections"))
            .header("authorization", &admin),
    )
    .await;
    assert_eq!(status, 200);
    for path in [
        "/v1/%61dmin/projections",
        "/v1/admin/projections/",
        "/V1/admin/projections",
    ] {
        let (status, _) = status_of(
            http.get(format!("{base}{path}"))
                .header("authorization", &bob),
        )
        .await;
        assert_eq!(status, 404, "GET {path} as bob");
    }
    let (status, _) = status_of(
        http.post(format!("{base}/v1/accounts/al%69ce/deposits"))
            .header("authorization", &bob)
            .json(&json!({ "amount_cents": 1 })),
    )
    .await;
    assert_eq!(status, 403, "a deposit is judged on the decoded id");
    // Stock levels stay open to customers; stock history is for admins.
    let (status, _) = status_of(
        http.get(format!("{base}/v1/inventory/A"))
            .header("authorization", &bob),
    )
    .await;
    assert_eq!(status, 200);
    let (status, history) = status_of(
        http.get(format!("{base}/v1/inventory/A/events"))
            .header("authorization", &admin),
    )
    .await;
    assert_eq!(status, 200, "{history}");
    // History carries integer versions.
    assert_eq!(history["events"][0]["event_version"], json!(1));
    assert_eq!(history["events"][0]["sequence"], json!(1));
    assert!(tally.terminate().success());
}

#[tokio::test]
async fn a_flood_of_bad_tokens_is_limited_by_address_before_authentication() {
    let app = TestApp::start_with_args(
        &new_prefix(),
        2,
        "api",
        &[
            "--jwt-hs256-secret",
            SECRET,
            "--rate-limit-per-sec",
            "0.1",
            "--rate-limit-burst",
            "5",
            "--trusted-proxies",
            "127.0.0.1/32",
        ],
    )
    .await;
    let from = |address: &'static str| {
        [
            ("authorization", "Bearer forged.token.here"),
            ("x-forwarded-for", address),
        ]
    };
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(app.get("/v1/inventory/A", &from("203.0.113.1")).await.0);
    }
    assert_eq!(
        &statuses[..5],
        &[StatusCode::UNAUTHORIZED; 5],
        "{statuses:?}"
    );
    assert_eq!(
        &statuses[5..],
        &[StatusCode::TOO_MANY_REQUESTS; 3],
        "bad tokens are limited too: {statuses:?}"
    );
    // Behind a trusted proxy, another client has a bucket of its own.
    assert_eq!(
        app.get("/v1/inventory/A", &from("203.0.113.2")).await.0,
        401
    );

    // A principal has a bucket of its own too: moving address does not escape it.
    let alice = token("customer", "alice");
    let mut last = StatusCode::OK;
    for i in 0..6 {
        let address = format!("198.51.100.{i}");
        last = app
            .get(
                "/v1/inventory/A",
                &[
                    ("authorization", alice.as_str()),
                    ("x-forwarded-for", address.as_str()),
                ],
            )
            .await
            .0;
    }
    assert_eq!(
        last,
        StatusCode::TOO_MANY_REQUESTS,
        "alice's sixth request from a sixth address"
    );
    app.stop().await;
}

#[tokio::test]
async fn x_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let app = TestApp::start_with_args(
        &new_prefix(),
        2,
        "api",
        &["--rate-limit-per-sec", "0.1", "--rate-limit-burst", "3"],
    )
    .await;
    let mut statuses = Vec::new();
    for i in 0..4 {
        let address = format!("192.0.2.{i}");
        statuses.push(
            app.get("/v1/inventory/A", &[("x-forwarded-for", address.as_str())])
                .await
                .0,
        );
    }
    assert_eq!(
        statuses[3],
        StatusCode::TOO_MANY_REQUESTS,
        "a forged header buys no new bucket: {statuses:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_keys_are_per_principal_and_only_own_outcomes_use_them_up() {
    let app = TestApp::start_with_args(
        &new_prefix(),
        2,
        "api,commands",
        &["--jwt-hs256-secret", SECRET],
    )
    .await;
    let (alice, bob) = (token("customer", "alice"), token("customer", "bob"));
    let as_ = |bearer: &str, key: &str| {
        vec![
            ("authorization", bearer.to_string()),
            ("idempotency-key", key.to_string()),
        ]
    };
    let post = |path: String, body: Value, headers: Vec<(&'static str, String)>| {
        let app = &app;
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            app.post(&path, body, &headers).await
        }
    };

    // One key, two principals: two requests, neither sees the other's.
    let (status, first) = post(
        "/v1/orders".to_string(),
        order_body("alice", &[("A", 1, 100)]),
        as_(&alice, "k-1"),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    let (status, bobs) = post(
        "/v1/orders".to_string(),
        order_body("bob", &[("B", 2, 100)]),
        as_(&bob, "k-1"),
    )
    .await;
    assert_eq!(status, 201, "bob's k-1 is not alice's: {bobs}");
    assert_ne!(first["aggregate_id"], bobs["aggregate_id"]);
    let (status, again) = post(
        "/v1/orders".to_string(),
        order_body("alice", &[("A", 1, 100)]),
        as_(&alice, "k-1"),
    )
    .await;
    assert_eq!(
        (status, &again),
        (StatusCode::CREATED, &first),
        "alice's retry gets her first answer"
    );

    // A 403 and a 400 leave the key free for the corrected request.
    let (status, _) = post(
        "/v1/orders".to_string(),
        order_body("bob", &[("A", 1, 100)]),
        as_(&alice, "k-2"),
    )
    .await;
    assert_eq!(status, 403);
    let (status, body) = post(
        "/v1/orders".to_string(),
        order_body("alice", &[("A", 1, 100)]),
        as_(&alice, "k-2"),
    )
    .await;
    assert_eq!(status, 201, "the key was left free after a 403: {body}");
    let (status, _) = post(
        "/v1/orders".to_string(),
        json!({ "customer_id": "alice", "lines": "many" }),
        as_(&alice, "k-3"),
    )
    .await;
    assert_eq!(status, 400);
    let (status, body) = post(
        "/v1/orders".to_string(),
        order_body("alice", &[("A", 1, 100)]),
        as_(&alice, "k-3"),
    )
    .await;
    assert_eq!(status, 201, "the key was left free after a 400: {body}");

    // A 422 found before Kafka uses the key up like one from the processor.
    let order = first["aggregate_id"].as_str().unwrap().to_string();
    let lines = format!("/v1/orders/{order}/lines");
    let zero = json!({ "sku": "C", "quantity": 0, "unit_price_cents": 5 });
    let (status, refused) = post(lines.clone(), zero.clone(), as_(&alice, "k-4")).await;
    assert_eq!(status, 422, "{refused}");
    let (status, repeated) = post(lines.clone(), zero, as_(&alice, "k-4")).await;
    assert_eq!(
        (status, &repeated),
        (StatusCode::UNPROCESSABLE_ENTITY, &refused),
        "the same request, the same answer"
    );
    let (status, reused) = post(
        lines,
        json!({ "sku": "C", "quantity": 2, "unit_price_cents": 5 }),
        as_(&alice, "k-4"),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(
        reused["error"]["code"], "idempotency_key_reused",
        "{reused}"
    );
    assert_eq!(
        events_of(&app.kafka, "order", &order).await.len(),
        1,
        "nothing was added"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyed_retry_whose_answer_was_lost_is_answered_by_a_new_processor_not_applied_again() {
    let prefix = new_prefix();
    let app = TestApp::start_with(&prefix, 2, "api,commands").await;
    let key = [("idempotency-key", "deposit-1")];
    let deposit = json!({ "amount_cents": 500 });
    let first = app
        .command_ok("/v1/accounts/carol/deposits", deposit.clone(), &key)
        .await;
    // The process died between the Kafka commit and storing the key's answer (or the
    // request timed out): the key has no answer.
    let pool = sqlx::PgPool::connect(&common::database_for(&prefix).await)
        .await
        .unwrap();
    let lost = sqlx::query(
        "UPDATE idempotency_keys SET status = NULL, body = NULL WHERE key = 'deposit-1'",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(lost.rows_affected(), 1);
    app.stop().await;

    // A new process (its processors reload the keyed outcomes from the log) gets the retry.
    let app = TestApp::start_with(&prefix, 2, "api,commands").await;
    // Spelled differently, it is the same request.
    let (status, again) = app
        .post("/v1/accounts/%63arol/deposits", deposit, &key)
        .await;
    assert_eq!(status, 201, "{again}");
    assert_eq!(
        again, first,
        "the first outcome, token and version included"
    );
    assert_eq!(
        events_of(&app.kafka, "payment", "carol").await.len(),
        1,
        "applied once"
    );
    let stored: (Option<i16>,) =
        sqlx::query_as("SELECT status FROM idempotency_keys WHERE key = 'deposit-1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        stored.0,
        Some(201),
        "the key's answer is filled in from the processor's record"
    );

    // Keys expire after the documented time, not before.
    for (key, age) in [("old", "25 hours"), ("young", "23 hours")] {
        sqlx::query(&format!(
            "INSERT INTO idempotency_keys (key, fingerprint, command_id, created_at) \
             VALUES ('{key}', 'x', gen_random_uuid(), now() - interval '{age}')"
        ))
        .execute(&pool)
        .await
        .unwrap();
    }
    let expired = commands::idempotency::expire(&pool, 24).await.unwrap();
    assert_eq!(expired, 1, "only the 25-hour-old key expires");
    let left: Vec<String> =
        sqlx::query_scalar("SELECT key FROM idempotency_keys WHERE key IN ('old', 'young')")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(left, ["young"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn place_takes_an_empty_object_or_no_body_and_nothing_else() {
    let app = TestApp::start_with(&new_prefix(), 2, "api,commands").await;
    let order = app.create_order("dora", &[("A", 1, 100)], &[]).await;
    let place = format!("/v1/orders/{order}/place");
    for body in [
        json!([]),
        json!(42),
        json!("x"),
        json!({ "now": true }),
        Value::Null,
    ] {
        let (status, answer) = app.post(&place, body.clone(), &[]).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], "malformed_request");
    }
    assert_eq!(
        events_of(&app.kafka, "order", &order).await.len(),
        1,
        "nothing was placed"
    );
    app.command_ok(&place, json!({}), &[]).await;
    let other = app.create_order("dora", &[("A", 1, 100)], &[]).await;
    let response = app
        .http
        .post(app.url(&format!("/v1/orders/{other}/place")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "no body at all is a place too");
    app.stop().await;
}

#[test]
fn the_dedup_window_must_outlive_the_idempotency_keys() {
    use clap::Parser;
    let run = |extra: &[&str]| {
        let mut argv = vec!["tally", "serve"];
        argv.extend_from_slice(extra);
        let tally::config::Command::Serve(serve) =
            tally::config::Cli::try_parse_from(argv).unwrap().command
        else {
            unreachable!("parsed serve")
        };
        serve.run.validate()
    };
    assert!(
        run(&[]).is_ok(),
        "the defaults keep outcomes 25 h for keys of 24 h"
    );
    let short = run(&["--dedup-window-secs", "900"])
        .unwrap_err()
        .to_string();
    assert!(short.contains("--idempotency-key-hours"), "{short}");
    assert!(run(&[
        "--idempotency-key-hours",
        "48",
        "--dedup-window-secs",
        "176400"
    ])
    .is_ok());
    assert!(
        run(&["--dedup-window-secs", "999999"]).is_err(),
        "longer than the outcomes topic keeps"
    );
}

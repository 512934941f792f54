//! Authentication and authorisation with bearer JWTs against the real app: no token is
//! 401, another customer's order or account is 403 (on the write side too, however new
//! the order), the admin routes need role admin; HS256 and RS256 keys both work.

use std::time::Duration;

use crate::common::{events_of, new_prefix, order_body, TestApp};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};

const SECRET: &str = "a-test-secret-of-at-least-32-bytes-for-hs256";

fn claims(role: &str, sub: &str, exp_in: i64) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({ "sub": sub, "role": role, "exp": now + exp_in })
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn new_order(customer: &str) -> (String, Value) {
    let id = uuid::Uuid::new_v4().to_string();
    let mut body = order_body(customer, &[("A", 1, 100)]);
    body["order_id"] = json!(id);
    (id, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_decide_who_may_do_what() {
    let app = TestApp::start_with_args(
        &new_prefix(),
        2,
        "api,commands,sagas,projections",
        &["--jwt-hs256-secret", SECRET],
    )
    .await;
    let alice = bearer(&hs256(&claims("customer", "alice", 600)));
    let admin = bearer(&hs256(&claims("admin", "ops-1", 600)));
    let as_alice = [("authorization", alice.as_str())];
    let as_admin = [("authorization", admin.as_str())];

    // No token, a forged one, an expired one: 401 in the error shape, and nothing written.
    let (id, body) = new_order("alice");
    let response = app
        .http
        .post(app.url("/v1/orders"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().get("www-authenticate").is_some());
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "unauthorized"
    );
    let forged = bearer(
        &encode(
            &Header::new(Algorithm::HS256),
            &claims("admin", "x", 600),
            &EncodingKey::from_secret(b"another-secret-another-secret-xx"),
        )
        .unwrap(),
    );
    let expired = bearer(&hs256(&claims("customer", "alice", -3600)));
    for token in [forged.as_str(), expired.as_str(), "Bearer not.a.jwt"] {
        let (status, body) = app
            .post("/v1/orders", body.clone(), &[("authorization", token)])
            .await;
        assert_eq!(status, 401, "{body}");
    }
    assert!(
        events_of(&app.kafka, "order", &id).await.is_empty(),
        "a refused request wrote nothing"
    );
    // The ops routes stay open (probes and scrapers carry no token).
    let (status, _, _) = app.get("/healthz", &[]).await;
    assert_eq!(status, 200);

    // A customer acts for itself only.
    let (status, created) = app.post("/v1/orders", body.clone(), &as_alice).await;
    assert_eq!(status, 201, "{created}");
    let (bobs, bobs_body) = new_order("bob");
    let (status, refused) = app.post("/v1/orders", bobs_body.clone(), &as_alice).await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"]["code"], "forbidden");
    let (status, _) = app.post("/v1/orders", bobs_body, &as_admin).await;
    assert_eq!(status, 201, "an admin may create any customer's order");
    // Bob's order is refused to alice by the write model itself, even before any read
    // model has seen it.
    let (status, body) = app
        .post(
            &format!("/v1/orders/{bobs}/cancel"),
            json!({ "reason": "mine now" }),
            &as_alice,
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = app
        .post(
            &format!("/v1/orders/{id}/lines"),
            json!({ "sku": "B", "quantity": 1, "unit_price_cents": 5 }),
            &as_alice,
        )
        .await;
    assert_eq!(status, 200, "alice changes her own order");
    let events = events_of(&app.kafka, "order", &id).await;
    assert_eq!(
        events[0].metadata.actor.as_deref(),
        Some("customer:alice"),
        "the actor is recorded"
    );
    assert_eq!(
        events_of(&app.kafka, "order", &bobs).await.len(),
        1,
        "alice's cancel wrote nothing"
    );

    // Reads: her own order yes, bob's no, lists and accounts only her own.
    let own = app
        .http
        .get(app.url(&format!("/v1/orders/{id}")))
        .header("authorization", &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    for path in [
        format!("/v1/orders/{bobs}"),
        format!("/v1/orders/{bobs}/events"),
        format!("/v1/orders/{bobs}?at_version=1"),
        "/v1/orders?customer_id=bob".to_string(),
        "/v1/accounts/bob".to_string(),
        "/v1/admin/projections".to_string(),
    ] {
        let mut status = StatusCode::NOT_FOUND;
        // The order's read model may lag a moment behind the write side.
        for _ in 0..100 {
            status = app
                .http
                .get(app.url(&path))
                .header("authorization", &alice)
                .send()
                .await
                .unwrap()
                .status();
            if status != StatusCode::NOT_FOUND {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, StatusCode::FORBIDDEN, "GET {path} as alice");
    }
    let (status, _, _) = app.get("/v1/orders?customer_id=alice", &as_alice).await;
    assert_eq!(status, 200);
    let (status, _) = app
        .post(
            "/v1/accounts/alice/deposits",
            json!({ "amount_cents": 500 }),
            &as_alice,
        )
        .await;
    assert!(status.is_success());
    let (status, _) = app
        .post(
            "/v1/accounts/bob/deposits",
            json!({ "amount_cents": 500 }),
            &as_alice,
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = app
        .post(
            "/v1/inventory/A/restock",
            json!({ "quantity": 5 }),
            &as_alice,
        )
        .await;
    assert_eq!(status, 403, "restocking is for admins");

    // The admin routes need an admin.
    let (status, _, body) = app.get("/v1/admin/projections", &as_admin).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = app
        .post(
            "/v1/inventory/A/restock",
            json!({ "quantity": 5 }),
            &as_admin,
        )
        .await;
    assert!(status.is_success());
    let mystery = bearer(&hs256(&claims("auditor", "x", 600)));
    let (status, _, _) = app
        .get("/v1/inventory/A", &[("authorization", mystery.as_str())])
        .await;
    assert_eq!(status, 403, "an unknown role gets nothing");
    app.stop().await;
}

#[tokio::test]
async fn rs256_tokens_are_checked_with_the_public_key() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let public = format!("{fixtures}/jwt-rs256-public.pem");
    let app = TestApp::start_with_args(
        &new_prefix(),
        2,
        "api",
        &[
            "--jwt-rs256-public-key-file",
            &public,
            "--jwt-issuer",
            "https://auth.example",
        ],
    )
    .await;
    let private = std::fs::read(format!("{fixtures}/jwt-rs256-private.pem")).unwrap();
    let key = EncodingKey::from_rsa_pem(&private).unwrap();
    let mut admin = claims("admin", "ops", 600);
    admin["iss"] = json!("https://auth.example");
    let token = bearer(&encode(&Header::new(Algorithm::RS256), &admin, &key).unwrap());
    let (status, _, body) = app
        .get("/v1/inventory/NOPE", &[("authorization", token.as_str())])
        .await;
    assert_eq!(status, 404, "authenticated, and the SKU is unknown: {body}");
    // Another issuer, or an HS256 token, is refused.
    admin["iss"] = json!("https://elsewhere.example");
    let other = bearer(&encode(&Header::new(Algorithm::RS256), &admin, &key).unwrap());
    let hs = bearer(&hs256(&claims("admin", "ops", 600)));
    for token in [other, hs] {
        let (status, _, _) = app
            .get("/v1/inventory/NOPE", &[("authorization", token.as_str())])
            .await;
        assert_eq!(status, 401);
    }
    app.stop().await;
}

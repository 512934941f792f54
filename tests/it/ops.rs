//! The whole app in-process on port 0, against the real Kafka and PostgreSQL.

use crate::common;

use std::net::SocketAddr;

use serde_json::Value;
use tally::config::CommonArgs;

async fn common_args() -> CommonArgs {
    common::args(&common::new_prefix(), 2, "api", &[]).await.0
}

/// Serves the API role only (no processors) and answers its address.
async fn start(state: tally::AppState) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let run = common::args(&common::new_prefix(), 2, "api", &[]).await.1;
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(tally::run(Some(listener), state, run, shutdown));
    addr
}

#[tokio::test]
async fn a_started_app_is_healthy_and_ready_and_has_created_its_topics() {
    let common = common_args().await;
    let state = tally::prepare(&common).await.unwrap();
    let addr = start(state.clone()).await;
    let http = reqwest::Client::new();

    let health = http
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = http
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["kafka"], "ok");
    assert_eq!(body["checks"]["postgres"], "ok");

    let kafka = common.kafka();
    let (_, high) =
        eventlog::watermarks(&kafka, &format!("{}.order.events", kafka.topic_prefix), 1)
            .await
            .expect("the order event topic exists with the configured 2 partitions");
    assert_eq!(high, 0);
}

#[tokio::test]
async fn prepare_twice_is_harmless_and_a_partition_mismatch_is_refused() {
    let mut common = common_args().await;
    tally::prepare(&common).await.unwrap();
    tally::prepare(&common).await.unwrap();
    common.partitions = 3;
    let err = tally::prepare(&common)
        .await
        .err()
        .expect("3 partitions on 2-partition topics");
    assert!(format!("{err:#}").contains("co-partitioned"), "{err:#}");
}

#[tokio::test]
async fn readiness_is_503_in_the_error_shape_when_postgres_is_unreachable() {
    let mut state = tally::prepare(&common_args().await).await.unwrap();
    // Nothing listens on port 1: the pool can never connect.
    state.readiness.pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_millis(500))
        .connect_lazy("postgres://nobody:nothing@127.0.0.1:1/none")
        .unwrap();
    let addr = start(state).await;
    let ready = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_ready");
    assert_eq!(body["error"]["details"]["kafka"], "ok");
    assert_ne!(body["error"]["details"]["postgres"], "ok");
}

#[tokio::test]
async fn every_response_carries_a_correlation_id_and_unknown_routes_get_the_error_shape() {
    let addr = start(tally::prepare(&common_args().await).await.unwrap()).await;
    let http = reqwest::Client::new();

    let echoed = http
        .get(format!("http://{addr}/healthz"))
        .header("X-Correlation-ID", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-correlation-id"], "req-42");

    let missing = http
        .get(format!("http://{addr}/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let generated = missing.headers()["x-correlation-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        uuid::Uuid::parse_str(&generated).is_ok(),
        "generated id {generated}"
    );
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");

    let wrong_method = http
        .post(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    let body: Value = wrong_method.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");

    // A path segment that is not UTF-8 is refused by the framework itself: still our shape.
    let undecodable = http
        .get(format!("http://{addr}/v1/orders/%FF"))
        .send()
        .await
        .unwrap();
    assert_eq!(undecodable.status(), 400);
    assert!(undecodable.headers().contains_key("x-correlation-id"));
    let body: Value = undecodable.json().await.unwrap();
    assert_eq!(body["error"]["code"], "malformed_request");
}

#[tokio::test]
async fn postgres_tls_settings_in_the_url_are_honoured() {
    let mut common = common_args().await;
    let url = format!("{}?sslmode=require", common.database_url);
    common.database_url = url;
    let state = tally::prepare(&common).await.unwrap();
    let (ssl,): (bool,) =
        sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&state.pool)
            .await
            .unwrap();
    assert!(ssl, "sslmode=require must give an encrypted connection");

    let mut common = common_args().await;
    common.database_url = format!("{}?sslmode=disable", common.database_url);
    let state = tally::prepare(&common).await.unwrap();
    let (ssl,): (bool,) =
        sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&state.pool)
            .await
            .unwrap();
    assert!(!ssl, "sslmode=disable must not encrypt");
}

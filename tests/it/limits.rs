//! Rate limits and header limits: a burst past the limit gets 429 with Retry-After in the
//! error shape, probes are never limited, and the client recovers after the wait.

use std::time::Duration;

use crate::common::{new_prefix, TestApp};
use reqwest::StatusCode;
use serde_json::Value;

#[tokio::test]
async fn a_burst_past_the_limit_gets_429_with_retry_after_then_recovers() {
    let app = TestApp::start_with_args(
        &new_prefix(),
        2,
        "api",
        // One request every 4 s after the burst: a slow machine cannot refill it mid-test.
        &["--rate-limit-per-sec", "0.25", "--rate-limit-burst", "10"],
    )
    .await;
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..25 {
        let response = app
            .http
            .get(app.url("/v1/inventory/SKU-1"))
            .send()
            .await
            .unwrap();
        statuses.push(response.status());
        if response.status() == StatusCode::TOO_MANY_REQUESTS && limited.is_none() {
            let retry_after: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let body: Value = response.json().await.unwrap();
            limited = Some((retry_after, body));
        }
    }
    let served = statuses
        .iter()
        .filter(|s| **s == StatusCode::NOT_FOUND)
        .count();
    assert!(
        (10..=11).contains(&served),
        "the burst is served, then limited: {statuses:?}"
    );
    let (retry_after, body) = limited.expect("a 429 came");
    assert!((1..=4).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(body["error"]["details"]["retry_after_ms"].as_u64().unwrap() <= 4000);

    // Probes are never limited.
    let (status, _, _) = app.get("/healthz", &[]).await;
    assert_eq!(status, 200);

    // After the wait the client is served again.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (status, _, _) = app.get("/v1/inventory/SKU-1", &[]).await;
    assert_eq!(status, 404, "served again after Retry-After");
    app.stop().await;
}

#[tokio::test]
async fn too_many_headers_are_refused_in_the_error_shape() {
    let app = TestApp::start_with_args(&new_prefix(), 2, "api", &[]).await;
    let mut request = app.http.get(app.url("/v1/inventory/SKU-1"));
    for i in 0..80 {
        request = request.header(format!("x-filler-{i}"), "x");
    }
    let response = request.send().await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "headers_too_large");
    app.stop().await;
}

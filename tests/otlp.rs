//! With `--otlp-endpoint` set, spans are exported over OTLP/HTTP and continue the
//! caller's trace: the HTTP request's span and the saga's steps carry the trace id the
//! client sent in `traceparent`. The collector here is a stand-in that records what it
//! is sent.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use common::{new_prefix, order_body, TallyProcess};
use serde_json::json;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_in_the_callers_trace() {
    // A stand-in collector: keeps every export request's body.
    let received: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let sink = received.clone();
    let collector = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(body);
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let prefix = new_prefix();
    let log = std::env::temp_dir().join(format!("{prefix}-otlp.log"));
    let tally = TallyProcess::start(
        &prefix,
        &[],
        &[("TALLY_OTLP_ENDPOINT", format!("http://{collector_addr}"))],
        &log,
    )
    .await;
    tally.wait_ready().await;
    let base = tally.base.clone();
    let http = reqwest::Client::new();

    let trace = uuid::Uuid::new_v4();
    let traceparent = format!("00-{}-00f067aa0ba902b7-01", trace.simple());
    let id = uuid::Uuid::new_v4().to_string();
    let mut body = order_body("otlp", &[("O1", 1, 100)]);
    body["order_id"] = json!(id);
    for (path, body) in [
        ("/v1/orders".to_string(), body),
        (format!("/v1/orders/{id}/place"), json!({})),
    ] {
        let status = http
            .post(format!("{base}{path}"))
            .header("traceparent", &traceparent)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_success(), "{path}: {status}");
    }

    // OTLP carries the trace id as its 16 raw bytes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let bodies = received.lock().unwrap().clone();
        let in_trace: Vec<&Bytes> = bodies
            .iter()
            .filter(|b| contains(b, trace.as_bytes()))
            .collect();
        let http_span = in_trace.iter().any(|b| contains(b, b"http"));
        let saga_span = in_trace.iter().any(|b| contains(b, b"saga_step"));
        if http_span && saga_span {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no exported span in trace {trace} from both the HTTP request and the saga ({} export requests received)",
            bodies.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(tally.terminate().success());
}

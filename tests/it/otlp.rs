//! With `--otlp-endpoint` set, spans are exported over OTLP/HTTP and continue the
//! caller's trace: the HTTP request's span and the saga's steps carry the trace id the
//! client sent in `traceparent`. The collector here is a stand-in that records what it
//! is sent.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{new_prefix, order_body, TallyProcess};
use axum::body::Bytes;
use axum::routing::post;
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

    // Without a traceparent from the caller, the command takes the exported HTTP span's
    // trace: its events (and so the saga's spans) are in the trace the collector got.
    let id = uuid::Uuid::new_v4().to_string();
    let mut body = order_body("otlp", &[("O1", 1, 100)]);
    body["order_id"] = json!(id);
    let status = http
        .post(format!("{base}/v1/orders"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success());
    let kafka = eventlog::KafkaConfig {
        brokers: std::env::var("TALLY_KAFKA_BROKERS").unwrap(),
        topic_prefix: prefix.clone(),
        // TallyProcess starts with two partitions.
        partitions: 2,
        replication_factor: 1,
        properties: Vec::new(),
    };
    let created = common::events_of(&kafka, "order", &id).await;
    let traceparent = created[0]
        .metadata
        .traceparent
        .clone()
        .expect("a traceparent");
    let trace_id = eventlog::trace::trace_id(&traceparent).unwrap().to_string();
    let trace = uuid::Uuid::parse_str(&trace_id).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !received
        .lock()
        .unwrap()
        .iter()
        .any(|b| contains(b, trace.as_bytes()) && contains(b, b"http"))
    {
        assert!(
            Instant::now() < deadline,
            "the command's trace {trace_id} is not the exported HTTP span's"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(tally.terminate().success());
}

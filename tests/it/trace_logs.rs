//! One trace id follows an order: sent as `traceparent` with the commands, it appears in
//! the JSON log lines of the HTTP request, the command processor, the saga's steps and
//! the projectors, with the correlation id beside it.

use std::time::{Duration, Instant};

use crate::common::{new_prefix, order_body, TallyProcess};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_id_sent_with_a_command_reaches_the_saga_and_projector_logs() {
    let prefix = new_prefix();
    let log = std::env::temp_dir().join(format!("{prefix}-trace.jsonl"));
    let tally = TallyProcess::start(
        &prefix,
        &["--log-format", "json"],
        &[(
            "TALLY_LOG",
            "info,commands=debug,sagas=debug,projections=debug".into(),
        )],
        &log,
    )
    .await;
    tally.wait_ready().await;
    let base = tally.base.clone();
    let http = reqwest::Client::new();

    let trace = uuid::Uuid::new_v4().simple().to_string();
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    let id = uuid::Uuid::new_v4().to_string();
    let mut body = order_body("tracer", &[("T1", 1, 100)]);
    body["order_id"] = json!(id);
    let send = |path: String, body: Value| {
        http.post(format!("{base}{path}"))
            .header("traceparent", &traceparent)
            .header("x-correlation-id", "corr-trace-test")
            .json(&body)
            .send()
    };
    assert!(send("/v1/orders".into(), body)
        .await
        .unwrap()
        .status()
        .is_success());
    assert!(send(format!("/v1/orders/{id}/place"), json!({}))
        .await
        .unwrap()
        .status()
        .is_success());

    // The saga runs (and rejects: no stock), the projectors apply its events.
    let deadline = Instant::now() + Duration::from_secs(30);
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .filter(|l| l.contains(&trace))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let from = |target: &str| {
            lines
                .iter()
                .any(|l| l["target"].as_str().is_some_and(|t| t.starts_with(target)))
        };
        // The saga's own commands (reserve, reject) carry the trace too.
        let saga_command = lines
            .iter()
            .any(|l| l["message"] == "command decided" && l["actor"] == "saga:order-fulfilment");
        if from("sagas") && from("projections") && from("commands") && saga_command {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "the trace id did not reach every component's logs: {lines:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let saga_step = lines
        .iter()
        .find(|l| l["target"] == "sagas::runtime")
        .unwrap();
    assert_eq!(saga_step["message"], "saga step", "{saga_step}");
    assert_eq!(saga_step["correlation_id"], "corr-trace-test");
    let projected = lines.iter().find(|l| l["message"] == "projected").unwrap();
    assert_eq!(projected["correlation_id"], "corr-trace-test");
    let decided = lines
        .iter()
        .find(|l| l["message"] == "command decided")
        .unwrap();
    assert_eq!(decided["aggregate_id"], id.as_str());
    assert!(decided["command_id"].is_string());
    assert!(tally.terminate().success());
}

//! SIGTERM under load: /readyz turns 503 at once, in-flight requests finish, the process
//! exits within its bound, every command that got a 2xx is in the log exactly once, and a
//! restart carries on — sagas of orders placed before the signal included — with no
//! duplicate.

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{database_for, events, new_prefix, order_body, TallyProcess};
use eventlog::KafkaConfig;
use serde_json::json;

/// Shuts down with a 1.5 s drain and a 20 s bound.
const SHUTDOWN: [&str; 4] = [
    "--shutdown-drain-ms",
    "1500",
    "--shutdown-timeout-secs",
    "20",
];

/// Creates and places orders until `stop`; answers the ids whose creation got a 2xx and
/// those whose place did.
async fn client(
    http: reqwest::Client,
    base: String,
    stop: Arc<AtomicBool>,
) -> (Vec<String>, Vec<String>) {
    let (mut created, mut placed) = (Vec::new(), Vec::new());
    while !stop.load(Ordering::SeqCst) {
        let id = uuid::Uuid::new_v4().to_string();
        let mut body = order_body("term", &[("A", 1, 100)]);
        body["order_id"] = json!(id);
        match http
            .post(format!("{base}/v1/orders"))
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => created.push(id.clone()),
            Ok(r) => assert!(
                r.status() == 503,
                "only 503 may come while stopping, got {}",
                r.status()
            ),
            Err(_) => break, // the listener is closed: the process is going away
        }
        if created.last() == Some(&id) {
            match http
                .post(format!("{base}/v1/orders/{id}/place"))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => placed.push(id),
                Ok(r) => assert!(
                    r.status() == 503,
                    "only 503 may come while stopping, got {}",
                    r.status()
                ),
                Err(_) => break,
            }
        }
    }
    (created, placed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_finishes_in_flight_work_and_a_restart_duplicates_nothing() {
    let prefix = new_prefix();
    let database = database_for(&prefix).await;
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("tally.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let mut tally = TallyProcess::start_on(&prefix, &database, port, &SHUTDOWN, &[], &log);
    tally.wait_ready().await;

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| tokio::spawn(client(http.clone(), base.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &tally.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // /readyz answers 503 at once, while requests are still served during the drain.
    let mut saw_not_ready = false;
    while signalled.elapsed() < Duration::from_millis(1200) {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status() == 503 {
                saw_not_ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        saw_not_ready,
        "/readyz must answer 503 as soon as the shutdown begins"
    );

    let exit = loop {
        if let Some(exit) = tally.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(25),
            "tally did not exit within its bound"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.success(), "a graceful shutdown exits 0, got {exit}");
    stop.store(true, Ordering::SeqCst);
    let (mut created, mut placed) = (Vec::new(), Vec::new());
    for c in clients {
        let (c, p) = c.await.unwrap();
        created.extend(c);
        placed.extend(p);
    }
    assert!(created.len() > 50, "the load ran: {} orders", created.len());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("stopped cleanly"),
        "the process said it stopped cleanly"
    );

    let kafka = KafkaConfig {
        topic_prefix: prefix.clone(),
        partitions: 2,
        ..KafkaConfig::local(std::env::var("TALLY_KAFKA_BROKERS").unwrap())
    };
    let check = |orders: Vec<eventlog::EventEnvelope>, created: &[String], placed: &[String]| {
        let mut per_order: HashMap<&str, Vec<(&str, u64)>> = HashMap::new();
        for e in &orders {
            per_order
                .entry(e.aggregate_id.as_str())
                .or_default()
                .push((e.event_type.as_str(), e.sequence));
        }
        for id in created {
            let events = per_order
                .get(id.as_str())
                .unwrap_or_else(|| panic!("acknowledged order {id} is not in the log"));
            assert_eq!(
                events.iter().filter(|(t, _)| *t == "OrderCreated").count(),
                1,
                "{id}: {events:?}"
            );
        }
        for id in placed {
            let events = &per_order[id.as_str()];
            assert_eq!(
                events.iter().filter(|(t, _)| *t == "OrderPlaced").count(),
                1,
                "{id}: {events:?}"
            );
        }
        for (id, events) in &per_order {
            let sequences: Vec<u64> = events.iter().map(|(_, s)| *s).collect();
            assert_eq!(
                sequences,
                (1..=events.len() as u64).collect::<Vec<_>>(),
                "{id}"
            );
        }
    };
    check(events(&kafka, "order").await, &created, &placed);

    // A restart resumes: the sagas of orders placed before the signal finish (no stock:
    // each is rejected), and nothing is doubled.
    let tally = TallyProcess::start_on(&prefix, &database, port, &SHUTDOWN, &[], &log);
    tally.wait_ready().await;
    for id in placed.iter().rev().take(20) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let view: serde_json::Value = http
                .get(format!("{base}/v1/orders/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if view["status"] == "rejected" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the saga of {id} did not finish after the restart: {view}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let orders = events(&kafka, "order").await;
    check(orders.clone(), &created, &placed);
    for id in &placed {
        let rejections = orders
            .iter()
            .filter(|e| &e.aggregate_id == id && e.event_type == "OrderRejected")
            .count();
        assert!(rejections <= 1, "{id} rejected twice");
    }
    assert!(tally.terminate().success());
}

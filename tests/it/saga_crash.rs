//! The saga orchestrator killed with SIGKILL while it waits on each step in turn — for the
//! reservations, the charge, the confirmation and the sale — and again at random moments
//! under load. Each time the processor the saga waits on is stopped, so the kill lands
//! between two steps; a fresh orchestrator rebuilds from the saga topic and goes on. In
//! the end every saga completed, with one reservation and one charge per order, and stock
//! and money add up.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{events, new_prefix, order_body, TestApp};
use serde_json::{json, Value};

const PARTITIONS: u32 = 2;

/// An orchestrator in a process of its own, so that it can be killed for real.
fn orchestrator(prefix: &str, log: &std::path::Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "serve",
            "--roles",
            "sagas",
            "--topic-prefix",
            prefix,
            "--partitions",
            &PARTITIONS.to_string(),
            // Long enough that nothing here times out: this test is about crashes.
            "--saga-step-timeout-ms",
            "300000",
        ])
        .env("TALLY_LOG", "info")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("starting a tally saga orchestrator")
}

/// Waits until `log` shows `count` orchestrator starts: a kill "under load" is meant for
/// a running orchestrator, not one still starting up.
async fn started(log: &std::path::Path, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("saga orchestrator started")
        .count()
        < count
    {
        assert!(
            std::time::Instant::now() < deadline,
            "orchestrator {count} never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kill(child: &mut Child) {
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// The command processors, one in-process app per stream, each stoppable on its own.
struct Processors {
    prefix: String,
    running: HashMap<&'static str, TestApp>,
}

impl Processors {
    async fn start(&mut self, stream: &'static str) {
        let app = TestApp::start_with_args(
            &self.prefix,
            PARTITIONS,
            "api,commands",
            &["--command-streams", stream],
        )
        .await;
        self.running.insert(stream, app);
    }

    async fn stop(&mut self, stream: &'static str) {
        self.running.remove(stream).expect("running").stop().await;
    }
}

async fn saga(front: &TestApp, id: &str) -> Value {
    front.get(&format!("/v1/orders/{id}/saga"), &[]).await.2
}

/// Waits until every saga's last step is `step`, started (it waits on its answers).
async fn all_waiting_on(front: &TestApp, ids: &[String], step: &str) {
    for id in ids {
        front
            .eventually(
                &format!("/v1/orders/{id}/saga"),
                Duration::from_secs(60),
                |s| {
                    s["steps"]
                        .as_array()
                        .and_then(|steps| steps.last())
                        .is_some_and(|last| last["name"] == step && last["status"] == "started")
                },
            )
            .await;
    }
}

async fn place(front: &TestApp) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let mut body = order_body("crash", &[("S1", 1, 100), ("S2", 2, 10)]);
    body["order_id"] = json!(id);
    let (status, created) = front.post("/v1/orders", body, &[]).await;
    assert_eq!(status, 201, "{created}");
    let (status, placed) = front
        .post(&format!("/v1/orders/{id}/place"), json!({}), &[])
        .await;
    assert_eq!(status, 200, "{placed}");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saga_orchestrator_killed_between_any_two_steps_resumes_without_loss_or_doubling() {
    let prefix = new_prefix();
    let front = TestApp::start_with(&prefix, PARTITIONS, "api,projections").await;
    let mut processors = Processors {
        prefix: prefix.clone(),
        running: HashMap::new(),
    };
    for stream in ["order", "inventory", "payment"] {
        processors.start(stream).await;
    }
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("saga.log");
    let mut saga_process = orchestrator(&prefix, &log);

    for sku in ["S1", "S2"] {
        let (status, _) = front
            .post(
                &format!("/v1/inventory/{sku}/restock"),
                json!({ "quantity": 1000 }),
                &[],
            )
            .await;
        assert!(status.is_success());
    }
    let (status, _) = front
        .post(
            "/v1/accounts/crash/deposits",
            json!({ "amount_cents": 1_000_000 }),
            &[],
        )
        .await;
    assert!(status.is_success());

    // Stop the processor the next step needs, let the sagas reach it, kill the
    // orchestrator there, start a new one, and start the processor the step after needs.
    processors.stop("inventory").await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(place(&front).await);
    }
    let chain: [(&str, &'static str, &'static str); 4] = [
        ("reserve_stock", "payment", "inventory"),
        ("charge_payment", "order", "payment"),
        ("confirm_order", "inventory", "order"),
        ("sell_stock", "", "inventory"),
    ];
    for (step, stop_next, start_now) in chain {
        all_waiting_on(&front, &ids, step).await;
        kill(&mut saga_process);
        saga_process = orchestrator(&prefix, &log);
        if !stop_next.is_empty() {
            processors.stop(stop_next).await;
        }
        processors.start(start_now).await;
    }

    // And at random moments under load.
    let mut more = Vec::new();
    for round in 0..3 {
        // One orchestrator first, then one more after each of the four kills above.
        started(&log, 5 + round as usize).await;
        for _ in 0..8 {
            more.push(place(&front).await);
        }
        tokio::time::sleep(Duration::from_millis(150 * round + 100)).await;
        kill(&mut saga_process);
        saga_process = orchestrator(&prefix, &log);
    }
    ids.extend(more);

    for id in &ids {
        let s = front
            .eventually(
                &format!("/v1/orders/{id}/saga"),
                Duration::from_secs(90),
                |s| s["status"] != "running" && s["status"].is_string(),
            )
            .await;
        assert_eq!(s["status"], "completed", "{s}");
        let (_, _, order) = front.get(&format!("/v1/orders/{id}"), &[]).await;
        let order = if order["status"] == "confirmed" {
            order
        } else {
            front
                .eventually(&format!("/v1/orders/{id}"), Duration::from_secs(30), |o| {
                    o["status"] == "confirmed"
                })
                .await
        };
        assert_eq!(order["total_cents"], 120);
    }
    kill(&mut saga_process);
    assert_eq!(
        saga(&front, &ids[0]).await["steps"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // Exactly one reservation per line and one charge per order: no step ran twice.
    let n = ids.len();
    let inventory = events(&front.kafka, "inventory").await;
    let payments = events(&front.kafka, "payment").await;
    let mut reservations: HashMap<(String, String), usize> = HashMap::new();
    for e in inventory.iter().filter(|e| e.event_type == "StockReserved") {
        *reservations
            .entry((
                e.aggregate_id.clone(),
                e.payload["order_id"].as_str().unwrap().to_string(),
            ))
            .or_default() += 1;
    }
    assert_eq!(reservations.len(), 2 * n);
    assert!(
        reservations.values().all(|c| *c == 1),
        "a doubled reservation: {reservations:?}"
    );
    let charges: Vec<_> = payments
        .iter()
        .filter(|e| e.event_type == "PaymentCharged")
        .collect();
    assert_eq!(charges.len(), n, "one charge per order");
    let sold = inventory
        .iter()
        .filter(|e| e.event_type == "StockSold")
        .count();
    assert_eq!(sold, 2 * n);

    // Stock and money add up in the read models.
    front
        .eventually("/v1/inventory/S1", Duration::from_secs(30), |v| {
            v["on_hand"] == 1000 - n as i64 && v["reserved"] == 0
        })
        .await;
    front
        .eventually("/v1/inventory/S2", Duration::from_secs(30), |v| {
            v["on_hand"] == 1000 - 2 * n as i64 && v["reserved"] == 0
        })
        .await;
    front
        .eventually("/v1/accounts/crash", Duration::from_secs(30), |v| {
            v["balance_cents"] == 1_000_000 - 120 * n as i64
        })
        .await;
    let restarts = std::fs::read_to_string(&log)
        .unwrap()
        .matches("saga orchestrator started")
        .count();
    assert_eq!(restarts, 8, "eight orchestrators ran (seven were killed)");
    // The whole log and every read model, judged by the fault suite's checker: nothing
    // doubled or lost, stock and money add up, every saga ended as its order did.
    crate::common::assert_the_log_holds(&prefix, PARTITIONS).await;
    for (_, app) in processors.running.drain() {
        app.stop().await;
    }
    front.stop().await;
}

/// An orchestrator started with a short deadline, for the restart test.
fn orchestrator_with_deadline(prefix: &str, log: &std::path::Path, deadline_ms: &str) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--roles", "sagas", "--topic-prefix", prefix])
        .args([
            "--partitions",
            &PARTITIONS.to_string(),
            "--saga-step-timeout-ms",
            deadline_ms,
        ])
        .env("TALLY_LOG", "info")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("starting a tally saga orchestrator")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deadline_that_passes_while_the_orchestrator_is_down_fires_after_its_restart() {
    let prefix = new_prefix();
    let front = TestApp::start_with(&prefix, PARTITIONS, "api,projections").await;
    let mut processors = Processors {
        prefix: prefix.clone(),
        running: HashMap::new(),
    };
    for stream in ["order", "inventory", "payment"] {
        processors.start(stream).await;
    }
    let (status, _) = front
        .post("/v1/inventory/S1/restock", json!({ "quantity": 10 }), &[])
        .await;
    assert!(status.is_success());
    let (status, _) = front
        .post(
            "/v1/accounts/crash/deposits",
            json!({ "amount_cents": 10_000 }),
            &[],
        )
        .await;
    assert!(status.is_success());
    processors.stop("payment").await;

    let log = std::env::temp_dir().join(format!("{prefix}-deadline.log"));
    let mut saga_process = orchestrator_with_deadline(&prefix, &log, "3000");
    let id = uuid::Uuid::new_v4().to_string();
    let mut body = order_body("crash", &[("S1", 2, 100)]);
    body["order_id"] = json!(id);
    assert_eq!(front.post("/v1/orders", body, &[]).await.0, 201);
    assert_eq!(
        front
            .post(&format!("/v1/orders/{id}/place"), json!({}), &[])
            .await
            .0,
        200
    );
    all_waiting_on(&front, std::slice::from_ref(&id), "charge_payment").await;

    // The orchestrator dies while the saga waits for the charge; the deadline passes.
    kill(&mut saga_process);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let waiting = saga(&front, &id).await;
    assert_eq!(
        waiting["status"], "running",
        "nobody was there to fire the deadline: {waiting}"
    );

    // A new orchestrator finds the deadline in the saga's state and compensates at once.
    let restarted = std::time::Instant::now();
    let mut saga_process = orchestrator_with_deadline(&prefix, &log, "3000");
    let order = front
        .eventually(&format!("/v1/orders/{id}"), Duration::from_secs(60), |o| {
            o["status"] == "rejected"
        })
        .await;
    assert_eq!(order["rejection_reason"], "timeout");
    let settled = saga(&front, &id).await;
    let steps: Vec<(String, String)> = settled["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        steps[1],
        ("charge_payment".to_string(), "timed_out".to_string()),
        "{settled}"
    );
    assert!(
        restarted.elapsed() < Duration::from_secs(40),
        "fired soon after the restart"
    );
    front
        .eventually("/v1/inventory/S1", Duration::from_secs(30), |v| {
            v["reserved"] == 0 && v["on_hand"] == 10
        })
        .await;
    kill(&mut saga_process);
    for (_, app) in processors.running.drain() {
        app.stop().await;
    }
    front.stop().await;
}

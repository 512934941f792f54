//! Processor processes under load: a second one joins (a rebalance splits the partitions
//! between them), then the first is killed with SIGKILL. Every command that got a 2xx is
//! in the log exactly once, none is in it twice, and every aggregate's sequence stays 1..n.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{events, new_prefix, order_body, TestApp};
use serde_json::json;

const PARTITIONS: u32 = 4;

fn processor(prefix: &str, log: &std::path::Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "serve",
            "--roles",
            "commands",
            "--topic-prefix",
            prefix,
            "--partitions",
            &PARTITIONS.to_string(),
        ])
        .env("TALLY_LOG", "info")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("starting a tally processor")
}

async fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_processor_killed_mid_load_loses_and_doubles_nothing() {
    let prefix = new_prefix();
    let app = Arc::new(TestApp::start_with(&prefix, PARTITIONS, "api").await);
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let (log_a, log_b) = (dir.join("a.log"), dir.join("b.log"));
    let rebuilt = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("partition restored; taking commands")
            .count()
    };
    // a alone owns every partition of the three streams.
    let mut a = processor(&prefix, &log_a);
    wait_for(
        "processor a to own every partition",
        Duration::from_secs(60),
        || rebuilt(&log_a) >= 3 * PARTITIONS as usize,
    )
    .await;

    // 8 clients create orders (keyed by their order id) until told to stop.
    let answered = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (app, answered, stop) = (app.clone(), answered.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            // Bounded all the same: the test never loops forever.
            while !stop.load(Ordering::SeqCst) && answered.load(Ordering::SeqCst) < 20_000 {
                let id = uuid::Uuid::new_v4().to_string();
                let mut body = order_body("crash", &[("A", 1, 100)]);
                body["order_id"] = json!(id);
                let (status, _) = app
                    .post("/v1/orders", body, &[("Idempotency-Key", &id)])
                    .await;
                answered.fetch_add(1, Ordering::SeqCst);
                outcomes.push((id, status.as_u16()));
            }
            outcomes
        }));
    }
    wait_for("the load to get going", Duration::from_secs(60), || {
        answered.load(Ordering::SeqCst) >= 100
    })
    .await;
    // b joins under load: a rebalance splits the partitions between them.
    let mut b = processor(&prefix, &log_b);
    wait_for(
        "processor b to take a share",
        Duration::from_secs(60),
        || rebuilt(&log_b) > 0,
    )
    .await;
    let split_at = answered.load(Ordering::SeqCst);
    wait_for(
        "load on the split partitions",
        Duration::from_secs(60),
        || answered.load(Ordering::SeqCst) >= split_at + 60,
    )
    .await;
    a.kill().expect("SIGKILL processor a");
    a.wait().unwrap();
    // Load goes on until b has taken over the dead one's partitions (after its session
    // times out) and served them.
    let killed_at = answered.load(Ordering::SeqCst);
    wait_for(
        "b to take over every partition of the dead one",
        Duration::from_secs(90),
        || rebuilt(&log_b) >= 3 * PARTITIONS as usize,
    )
    .await;
    let taken_over_at = answered.load(Ordering::SeqCst);
    wait_for("load after the takeover", Duration::from_secs(60), || {
        answered.load(Ordering::SeqCst) >= taken_over_at.max(killed_at) + 60
    })
    .await;
    stop.store(true, Ordering::SeqCst);

    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.extend(client.await.unwrap());
    }
    // Commands that got no answer (503 after the timeout) are retried with their key:
    // the answer is the first outcome, or the command is applied now, once.
    for (id, status) in outcomes.iter_mut().filter(|(_, s)| *s >= 500) {
        let mut body = order_body("crash", &[("A", 1, 100)]);
        body["order_id"] = json!(id);
        *status = app
            .post("/v1/orders", body, &[("Idempotency-Key", id)])
            .await
            .0
            .as_u16();
    }
    b.kill().unwrap();
    b.wait().unwrap();

    let log = events(&app.kafka, "order").await;
    let mut created: HashMap<&str, usize> = HashMap::new();
    let mut sequences: HashMap<&str, Vec<u64>> = HashMap::new();
    for event in &log {
        sequences
            .entry(&event.aggregate_id)
            .or_default()
            .push(event.sequence);
        if event.event_type == "OrderCreated" {
            *created.entry(&event.aggregate_id).or_default() += 1;
        }
    }
    let ok: Vec<&str> = outcomes
        .iter()
        .filter(|(_, s)| *s == 201)
        .map(|(id, _)| id.as_str())
        .collect();
    assert!(
        ok.len() * 100 >= outcomes.len() * 95,
        "most commands succeed: {} of {}",
        ok.len(),
        outcomes.len()
    );
    for id in &ok {
        assert_eq!(
            created.get(id),
            Some(&1),
            "order {id} got a 201 and must be in the log exactly once"
        );
    }
    assert!(
        created.values().all(|n| *n == 1),
        "an order was created twice"
    );
    for (id, seqs) in &sequences {
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, &expected, "sequence of {id} is not 1..n");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

//! Bounded, snapshotted state (issue 11, ADR 10), against real Kafka and processes:
//! - an owner with an EMPTY local store and a 10-entry cache, taking over from one killed
//!   with SIGKILL, answers every command of 1,000 random sequences exactly as a pure model
//!   of the aggregate says (which the old owner did too), and a keyed retry gets its first
//!   answer;
//! - a changelog record of another state schema version is not trusted: the owner folds
//!   the events again (and says so in its metrics);
//! - a process killed while restoring leaves nothing a restart cannot finish.

use std::sync::Arc;
use std::time::Duration;

use aggregates::{Order, OrderCommand};
use cqrs_es::Aggregate;
use eventlog::rdkafka::message::{Header, OwnedHeaders};
use eventlog::rdkafka::producer::{FutureProducer, FutureRecord};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::common::{database_for, new_prefix, TallyProcess};

/// A small deterministic generator (xorshift64*): the same seed, the same sequences.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// One order as the model sees it: the aggregate folded by its own `decide` and `apply`.
#[derive(Default)]
struct Model {
    order: Order,
    version: u64,
}

/// One request of a sequence, and the command the API turns it into.
struct Step {
    method: reqwest::Method,
    path: String,
    body: Option<Value>,
    if_match: Option<u64>,
    command: OrderCommand,
}

fn step(id: &str, model: &Model, rng: &mut Rng) -> Step {
    let sku = ["A", "B", "C", "D"][rng.below(4) as usize];
    let post = reqwest::Method::POST;
    let (method, path, body, command) = match rng.below(5) {
        0 | 1 => {
            let line = json!({ "sku": sku, "quantity": 1 + rng.below(3), "unit_price_cents": 100 });
            let command = serde_json::from_value(json!({ "AddLine": line.clone() })).unwrap();
            (post, format!("/v1/orders/{id}/lines"), Some(line), command)
        }
        2 => (
            reqwest::Method::DELETE,
            format!("/v1/orders/{id}/lines/{sku}"),
            None,
            serde_json::from_value(json!({ "RemoveLine": { "sku": sku } })).unwrap(),
        ),
        3 => (
            post,
            format!("/v1/orders/{id}/place"),
            None,
            OrderCommand::PlaceOrder,
        ),
        _ => (
            post,
            format!("/v1/orders/{id}/cancel"),
            Some(json!({ "reason": "changed my mind" })),
            OrderCommand::CancelOrder {
                reason: "changed my mind".into(),
            },
        ),
    };
    // One step in four names a version: the current one, or (half of those) a wrong one.
    let if_match = match rng.below(8) {
        0 => Some(model.version),
        1 => Some(model.version + 1 + rng.below(3)),
        _ => None,
    };
    Step {
        method,
        path,
        body,
        if_match,
        command,
    }
}

/// What the model says the API answers, and the model after it.
fn expect(model: &mut Model, step: &Step) -> (u16, Option<u64>, Option<String>) {
    if let Some(expected) = step.if_match {
        if expected != model.version {
            return (409, None, Some("version_conflict".into()));
        }
    }
    match model.order.decide(step.command.clone()) {
        Ok(events) => {
            for event in events {
                model.order.apply(event);
                model.version += 1;
            }
            (200, Some(model.version), None)
        }
        Err(e) if e.is_not_found() => (404, None, None),
        Err(e) => (422, None, Some(e.rule().to_string())),
    }
}

async fn send(http: &reqwest::Client, base: &str, step: &Step) -> (u16, Value) {
    let mut request = http.request(step.method.clone(), format!("{base}{}", step.path));
    if let Some(body) = &step.body {
        request = request.json(body);
    } else if step.method == reqwest::Method::POST {
        request = request.json(&json!({}));
    }
    if let Some(v) = step.if_match {
        request = request.header("If-Match", v.to_string());
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Runs 1 to `steps` random steps on each order against `base`, checking every answer
/// against the model; answers the orders as the model has them after.
async fn run_steps(
    base: &str,
    orders: Vec<(String, Model, Rng)>,
    steps: u64,
) -> Vec<(String, Model, Rng)> {
    let http = reqwest::Client::new();
    let gate = Arc::new(Semaphore::new(16));
    let mut tasks = Vec::new();
    for (id, mut model, mut rng) in orders {
        let (http, base, gate) = (http.clone(), base.to_string(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            for _ in 0..1 + rng.below(steps) {
                let step = step(&id, &model, &mut rng);
                let (status, body) = send(&http, &base, &step).await;
                let (want, version, rule) = expect(&mut model, &step);
                let what = format!(
                    "{} {} (If-Match {:?}) → {status} {body}",
                    step.method, step.path, step.if_match
                );
                assert_eq!(status, want, "{what}");
                if let Some(version) = version {
                    assert_eq!(body["version"], json!(version), "{what}");
                }
                if let Some(rule) = rule {
                    let got = body["error"]["details"]["rule"]
                        .as_str()
                        .or(body["error"]["code"].as_str());
                    assert_eq!(got, Some(rule.as_str()), "{what}");
                }
            }
            (id, model, rng)
        }));
    }
    let mut after = Vec::with_capacity(tasks.len());
    for task in tasks {
        after.push(task.await.expect("a sequence failed"));
    }
    after
}

/// A test's prefix, its scratch directory and the log its processes share.
struct Scratch {
    prefix: String,
    dir: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let prefix = new_prefix();
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("tally.log");
        Self { prefix, dir, log }
    }

    /// A state directory of its own, by name.
    fn store(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }
}

fn processor_args(state_dir: &str) -> Vec<&str> {
    vec![
        "--roles",
        "api,commands",
        "--state-dir",
        state_dir,
        "--state-cache-entries",
        "10",
    ]
}

async fn metric(base: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn kill9(process: &mut TallyProcess) {
    process.child.kill().unwrap();
    process.child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_with_an_empty_store_and_a_tiny_cache_answers_as_the_model() {
    let scratch = Scratch::new();
    let (prefix, log) = (&scratch.prefix, &scratch.log);
    let (store_a, store_b) = (&scratch.store("a"), &scratch.store("b"));

    let mut a = TallyProcess::start(prefix, &processor_args(store_a), &[], log).await;
    a.wait_ready().await;
    // 1,000 orders, each created with a key, then 1–3 random steps (with a 10-entry cache,
    // nearly every step reads its order back from the local store).
    let http = reqwest::Client::new();
    let mut orders = Vec::new();
    let mut created = Vec::new();
    for n in 0..1_000u64 {
        let id = uuid::Uuid::new_v4().to_string();
        let body = json!({ "order_id": id, "customer_id": format!("c-{}", n % 50), "lines": [{ "sku": "A", "quantity": 1, "unit_price_cents": 100 }] });
        let response = http
            .post(format!("{}/v1/orders", a.base))
            .header("Idempotency-Key", format!("create-{id}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let answer: Value = response.json().await.unwrap();
        let mut model = Model::default();
        let command = serde_json::from_value(json!({ "CreateOrder": { "order_id": id, "customer_id": format!("c-{}", n % 50), "lines": [{ "sku": "A", "quantity": 1, "unit_price_cents": 100 }] } })).unwrap();
        for event in model.order.decide(command).unwrap() {
            model.order.apply(event);
            model.version += 1;
        }
        created.push((id.clone(), body, answer));
        orders.push((id, model, Rng(0x9E37_79B9_7F4A_7C15 ^ (n + 1))));
    }
    let orders = run_steps(&a.base, orders, 3).await;
    assert!(
        metric(&a.base, "tally_state_cache_misses_total").await > 500.0,
        "a 10-entry cache sends most lookups to the local store"
    );

    // SIGKILL, and the next owner starts with NO local store: it restores from the
    // changelog, never from its own disk.
    kill9(&mut a);
    let b = TallyProcess::start(prefix, &processor_args(store_b), &[], log).await;
    b.wait_ready().await;
    // Every order's state came from the changelog (one record per version until the log
    // cleaner compacts it), and not one event was folded.
    let from_changelog = metric(
        &b.base,
        "tally_state_restored_records_total{stream=\"order\",source=\"changelog\"",
    )
    .await;
    assert!(
        from_changelog >= 1_000.0,
        "{from_changelog} state records restored"
    );
    assert_eq!(
        metric(
            &b.base,
            "tally_state_restored_records_total{stream=\"order\",source=\"events\"",
        )
        .await,
        0.0,
        "a takeover restores from the changelog, never from the event history"
    );
    run_steps(&b.base, orders, 3).await;
    // A keyed retry of each creation gets its first answer.
    for (id, body, first) in created.iter().step_by(10) {
        let again: Value = http
            .post(format!("{}/v1/orders", b.base))
            .header("Idempotency-Key", format!("create-{id}"))
            .json(body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(&again, first);
    }
    b.terminate();
}

/// Writes a changelog record for order `id` by hand, claiming state schema `schema`.
async fn write_state(
    producer: &FutureProducer,
    prefix: &str,
    partition: i32,
    id: &str,
    schema: &str,
    payload: &str,
) {
    producer
        .send(
            FutureRecord::to(&format!("{prefix}.order.state"))
                .partition(partition)
                .key(id)
                .payload(payload)
                .headers(OwnedHeaders::new().insert(Header {
                    key: eventlog::state::SCHEMA_HEADER,
                    value: Some(schema),
                })),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_of_another_schema_version_is_rebuilt_from_the_events() {
    let scratch = Scratch::new();
    let (prefix, log) = (&scratch.prefix, &scratch.log);
    let store = &scratch.store("a");
    let a = TallyProcess::start(prefix, &processor_args(store), &[], log).await;
    a.wait_ready().await;
    let http = reqwest::Client::new();
    let id = uuid::Uuid::new_v4().to_string();
    let created = http
        .post(format!("{}/v1/orders", a.base))
        .json(&json!({ "order_id": id, "customer_id": "c-1", "lines": [{ "sku": "A", "quantity": 1, "unit_price_cents": 100 }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    a.terminate();

    // A snapshot claiming another schema (and a state that is plainly wrong) lands on the
    // changelog after the good one; the local store goes too.
    let kafka = crate::common::args(prefix, 2, "api", &[]).await.0.kafka();
    let producer: FutureProducer = kafka.producer().create().unwrap();
    let partition = eventlog::partition_for(&id, 2);
    write_state(
        &producer,
        prefix,
        partition,
        &id,
        "0",
        r#"{"version":99,"state":{}}"#,
    )
    .await;
    std::fs::remove_dir_all(store).unwrap();

    let b = TallyProcess::start(prefix, &processor_args(store), &[], log).await;
    b.wait_ready().await;
    assert!(metric(&b.base, "tally_state_rebuilds_total{stream=\"order\"").await >= 1.0);
    // Version 1 (the events), not 99 (the foreign snapshot): If-Match 1 is accepted.
    let added = http
        .post(format!("{}/v1/orders/{id}/lines", b.base))
        .header("If-Match", "1")
        .json(&json!({ "sku": "B", "quantity": 1, "unit_price_cents": 100 }))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), StatusCode::OK);
    assert_eq!(added.json::<Value>().await.unwrap()["version"], json!(2));
    b.terminate();
    let logs = std::fs::read_to_string(log).unwrap();
    assert!(
        logs.contains("the changelog holds states of another schema version"),
        "the rebuild is said in the log"
    );

    // `tally rebuild-state`, with every processor stopped, folds the events again for
    // every partition, seeds the changelogs and exits; the next owner goes on from there.
    let database = database_for(prefix).await;
    let rebuilt = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "rebuild-state",
            "--topic-prefix",
            prefix,
            "--partitions",
            "2",
        ])
        .args(["--database-url", &database, "--state-dir", store])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&rebuilt.stderr).to_string()
        + &String::from_utf8_lossy(&rebuilt.stdout);
    assert!(rebuilt.status.success(), "{said}");
    assert!(
        said.contains("every owned partition's state rebuilt"),
        "{said}"
    );
    let c = TallyProcess::start(prefix, &processor_args(store), &[], log).await;
    c.wait_ready().await;
    let placed = http
        .post(format!("{}/v1/orders/{id}/place", c.base))
        .header("If-Match", "2")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), StatusCode::OK);
    c.terminate();

    // A state of the CURRENT schema that does not decode (a corrupt record) lands on the
    // changelog; the local store, trusted, reads it as the changelog's tail. The owner
    // that meets it fails once, and its restart folds the events again instead of failing
    // on it for ever: the next command sees version 3.
    let schema = <Order as commands::CommandStream>::STATE_SCHEMA.to_string();
    write_state(
        &producer,
        prefix,
        partition,
        &id,
        &schema,
        r#"{"version":"three"}"#,
    )
    .await;
    let d = TallyProcess::start(prefix, &processor_args(store), &[], log).await;
    d.wait_ready().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let confirmed = loop {
        let cancelled = http
            .post(format!("{}/v1/orders/{id}/cancel", d.base))
            .header("If-Match", "3")
            .header("Idempotency-Key", format!("cancel-{id}"))
            .json(&json!({ "reason": "corrupt snapshot test" }))
            .send()
            .await
            .unwrap();
        // 503 while the owner restarts; then the one answer.
        if cancelled.status() != StatusCode::SERVICE_UNAVAILABLE {
            break cancelled;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no answer after the rebuild"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(confirmed.status(), StatusCode::OK);
    assert_eq!(
        confirmed.json::<Value>().await.unwrap()["version"],
        json!(4)
    );
    d.terminate();
    let logs = std::fs::read_to_string(log).unwrap();
    assert!(
        logs.contains("a state in the local store did not decode"),
        "the rebuild and its cause are said in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_killed_while_restoring_is_restarted_with_the_same_state() {
    let scratch = Scratch::new();
    let (prefix, log) = (&scratch.prefix, &scratch.log);
    let store = &scratch.store("a");
    let database = database_for(prefix).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let args = processor_args(store);
    let a = TallyProcess::start_on(prefix, &database, port, &args, &[], log);
    a.wait_ready().await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..200 {
        let id = uuid::Uuid::new_v4().to_string();
        let r = http
            .post(format!("{}/v1/orders", a.base))
            .json(&json!({ "order_id": id, "customer_id": "c-1", "lines": [{ "sku": "A", "quantity": 1, "unit_price_cents": 100 }] }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        ids.push(id);
    }
    a.terminate();
    // Killed at several moments of its restore (from an empty store, so it reads the
    // changelog), then started once more and left to finish.
    std::fs::remove_dir_all(store).unwrap();
    for delay_ms in [300u64, 900, 1_500] {
        let mut b = TallyProcess::start_on(prefix, &database, port, &args, &[], log);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        kill9(&mut b);
    }
    let c = TallyProcess::start_on(prefix, &database, port, &args, &[], log);
    c.wait_ready().await;
    // Ready means c restored what it owns; the killed processes' partitions are nobody's
    // until their sessions expire (10 s), so a place may first time out (503). Its keyed
    // retry then gets the place's one answer.
    for id in &ids {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let placed = loop {
            let placed = http
                .post(format!("{}/v1/orders/{id}/place", c.base))
                .header("If-Match", "1")
                .header("Idempotency-Key", format!("place-{id}"))
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            if placed.status() != StatusCode::SERVICE_UNAVAILABLE
                || std::time::Instant::now() > deadline
            {
                break placed;
            }
        };
        assert_eq!(placed.status(), StatusCode::OK, "order {id}");
        assert_eq!(placed.json::<Value>().await.unwrap()["version"], json!(2));
    }
    c.terminate();
}

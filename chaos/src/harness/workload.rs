//! The workload: a bounded request loop (a fixed number of workers, one request at a time
//! each, every request with a timeout) over the API processes that run. It orders (create,
//! add lines, place, cancel) against a few SKUs restocked modestly, so that stock is
//! contended and some sagas must compensate; deposits money; races two writers with the
//! same `If-Match`; and retries keyed requests that timed out or got a `5xx` with the same
//! Idempotency-Key. What it is told becomes the checker's [`ClientRecord`]: every `2xx` in
//! `acks` (with the request's own `X-Correlation-ID`), every keyed request with all its
//! answers in `keyed`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use uuid::Uuid;

use super::rng::Rng;
use crate::model::{Ack, ClientRecord, HttpAnswer, KeyedRequest};

/// Where requests go: the base URLs of the API processes alive now.
pub type Targets = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// The workload's settings.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub seed: u64,
    /// Workers, each with one request in flight at a time.
    pub concurrency: usize,
    /// Each HTTP attempt's timeout (longer than the server's own command timeout).
    pub request_timeout: Duration,
    /// Attempts of a keyed request before it is given up (its answers stay recorded).
    pub max_attempts: usize,
    pub skus: usize,
    pub customers: usize,
    /// Stock each SKU starts with, and money each account.
    pub initial_stock: u64,
    pub initial_deposit_cents: u64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            concurrency: 6,
            request_timeout: Duration::from_secs(15),
            max_attempts: 8,
            skus: 3,
            customers: 6,
            initial_stock: 20,
            initial_deposit_cents: 10_000,
        }
    }
}

/// What the workload did, counted.
#[derive(Debug, Default)]
pub struct Stats {
    /// Commands sent (a keyed command retried counts once).
    pub commands: AtomicU64,
    /// HTTP attempts, retries included.
    pub attempts: AtomicU64,
    pub ok: AtomicU64,
    pub conflicts: AtomicU64,
    pub refusals: AtomicU64,
    pub other_4xx: AtomicU64,
    pub server_errors: AtomicU64,
    pub no_answer: AtomicU64,
    /// Keyed commands that needed more than one attempt.
    pub retried: AtomicU64,
    /// Keyed commands still without an outcome after every attempt.
    pub unresolved: AtomicU64,
    /// `2xx` answers whose body was not `{aggregate_id, version, ...}`.
    pub bad_bodies: AtomicU64,
    pub races: AtomicU64,
    /// Races by how many of the two writers won: 0, 1, 2 (2 is a violation the checker
    /// sees too: two commands acknowledged at one version).
    pub race_winners: [AtomicU64; 3],
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub commands: u64,
    pub attempts: u64,
    pub ok: u64,
    pub conflicts: u64,
    pub refusals: u64,
    pub other_4xx: u64,
    pub server_errors: u64,
    pub no_answer: u64,
    pub retried: u64,
    pub unresolved: u64,
    pub bad_bodies: u64,
    pub races: u64,
    pub race_winners: [u64; 3],
}

impl Stats {
    pub fn counts(&self) -> Counts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            commands: get(&self.commands),
            attempts: get(&self.attempts),
            ok: get(&self.ok),
            conflicts: get(&self.conflicts),
            refusals: get(&self.refusals),
            other_4xx: get(&self.other_4xx),
            server_errors: get(&self.server_errors),
            no_answer: get(&self.no_answer),
            retried: get(&self.retried),
            unresolved: get(&self.unresolved),
            bad_bodies: get(&self.bad_bodies),
            races: get(&self.races),
            race_winners: [
                get(&self.race_winners[0]),
                get(&self.race_winners[1]),
                get(&self.race_winners[2]),
            ],
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One command to send.
#[derive(Debug, Clone)]
struct Cmd {
    /// The stream of the aggregate it writes (`order`, `inventory`, `payment`).
    stream: &'static str,
    path: String,
    body: Value,
    if_match: Option<u64>,
    keyed: bool,
}

/// The workload's client: sends commands, retries keyed ones, records every answer.
pub struct Client {
    config: WorkloadConfig,
    http: reqwest::Client,
    targets: Targets,
    next: AtomicU64,
    record: Mutex<ClientRecord>,
    pub stats: Stats,
}

impl Client {
    pub fn new(config: WorkloadConfig, targets: Targets) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(config.concurrency)
            .build()?;
        Ok(Self {
            config,
            http,
            targets,
            next: AtomicU64::new(1),
            record: Mutex::new(ClientRecord::default()),
            stats: Stats::default(),
        })
    }

    /// What the client was told so far.
    pub fn record(&self) -> ClientRecord {
        self.record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn sku(&self, i: usize) -> String {
        format!("SKU-{}", i + 1)
    }

    /// A SKU's price: fixed per SKU, since adding to a line at another price is refused.
    fn price(i: usize) -> u64 {
        250 * (i as u64 + 1)
    }

    fn customer(&self, i: usize) -> String {
        format!("customer-{}", i + 1)
    }

    /// Stocks every SKU and funds every account, retrying until each is acknowledged or
    /// `patience` runs out: it is also the proof that the command path works end to end.
    pub async fn set_up(&self, patience: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + patience;
        let mut todo: Vec<Cmd> = (0..self.config.skus)
            .map(|i| self.restock(i, self.config.initial_stock, true))
            .chain(
                (0..self.config.customers)
                    .map(|i| self.deposit(i, self.config.initial_deposit_cents, true)),
            )
            .collect();
        while let Some(cmd) = todo.pop() {
            loop {
                let answer = self.send(&cmd).await;
                if (200..300).contains(&answer.status) {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "setting up: {} never acknowledged (last answer {} {})",
                    cmd.path,
                    answer.status,
                    answer.body
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Ok(())
    }

    fn restock(&self, sku: usize, quantity: u64, keyed: bool) -> Cmd {
        Cmd {
            stream: "inventory",
            path: format!("/v1/inventory/{}/restock", self.sku(sku)),
            body: json!({ "quantity": quantity }),
            if_match: None,
            keyed,
        }
    }

    fn deposit(&self, customer: usize, cents: u64, keyed: bool) -> Cmd {
        Cmd {
            stream: "payment",
            path: format!("/v1/accounts/{}/deposits", self.customer(customer)),
            body: json!({ "amount_cents": cents }),
            if_match: None,
            keyed,
        }
    }

    fn line(&self, sku: usize, quantity: u64) -> Value {
        json!({ "sku": self.sku(sku), "quantity": quantity, "unit_price_cents": Self::price(sku) })
    }

    fn order_cmd(path: String, body: Value, if_match: Option<u64>, keyed: bool) -> Cmd {
        Cmd {
            stream: "order",
            path,
            body,
            if_match,
            keyed,
        }
    }

    /// Runs `concurrency` workers until `stop`; each finishes its current operation.
    pub async fn run(self: &Arc<Self>, stop: CancellationToken) {
        let mut workers = tokio::task::JoinSet::new();
        for w in 0..self.config.concurrency {
            let client = Arc::clone(self);
            let stop = stop.clone();
            let mut rng = Rng::stream(self.config.seed, 1 + w as u64);
            workers.spawn(async move {
                while !stop.is_cancelled() {
                    client.operation(&mut rng).await;
                }
            });
        }
        while workers.join_next().await.is_some() {}
        let c = self.stats.counts();
        info!(
            commands = c.commands,
            acknowledged = c.ok,
            "workload stopped"
        );
    }

    /// One operation, picked by weight.
    async fn operation(&self, rng: &mut Rng) {
        match rng.below(100) {
            0..=39 => self.order_flow(rng, true).await,
            40..=49 => self.order_flow(rng, false).await,
            50..=64 => self.if_match_race(rng).await,
            65..=84 => {
                let cmd = self.deposit(
                    rng.below(self.config.customers),
                    rng.range(1_000, 5_000),
                    rng.chance(70),
                );
                self.send(&cmd).await;
            }
            _ => {
                let cmd =
                    self.restock(rng.below(self.config.skus), rng.range(2, 6), rng.chance(70));
                self.send(&cmd).await;
            }
        }
    }

    fn order_id(rng: &mut Rng) -> Uuid {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
        bytes[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }

    /// Creates an order with one or two lines; answers its id and version if created.
    async fn create_order(&self, rng: &mut Rng, keyed: bool) -> Option<(Uuid, u64)> {
        let id = Self::order_id(rng);
        let first = rng.below(self.config.skus);
        let mut lines = vec![self.line(first, rng.range(1, 3))];
        if self.config.skus > 1 && rng.chance(40) {
            let second = (first + 1 + rng.below(self.config.skus - 1)) % self.config.skus;
            lines.push(self.line(second, rng.range(1, 3)));
        }
        let body = json!({
            "order_id": id,
            "customer_id": self.customer(rng.below(self.config.customers)),
            "lines": lines,
        });
        let answer = self
            .send(&Self::order_cmd("/v1/orders".into(), body, None, keyed))
            .await;
        let version = answer.body.get("version").and_then(Value::as_u64);
        match (answer.status, version) {
            (200..=299, Some(v)) => Some((id, v)),
            _ => None,
        }
    }

    /// create → maybe add a line → place → sometimes cancel, racing the saga.
    async fn order_flow(&self, rng: &mut Rng, keyed: bool) {
        let Some((id, _)) = self.create_order(rng, keyed).await else {
            return;
        };
        if rng.chance(40) {
            let body = self.line(rng.below(self.config.skus), rng.range(1, 2));
            let path = format!("/v1/orders/{id}/lines");
            self.send(&Self::order_cmd(path, body, None, keyed)).await;
        }
        if rng.chance(5) {
            self.cancel(id, "changed my mind", keyed).await;
            return;
        }
        let path = format!("/v1/orders/{id}/place");
        self.send(&Self::order_cmd(path, json!({}), None, keyed))
            .await;
        if rng.chance(20) {
            tokio::time::sleep(Duration::from_millis(rng.range(0, 1_500))).await;
            self.cancel(id, "too slow", keyed).await;
        }
    }

    async fn cancel(&self, id: Uuid, reason: &str, keyed: bool) {
        let path = format!("/v1/orders/{id}/cancel");
        self.send(&Self::order_cmd(
            path,
            json!({ "reason": reason }),
            None,
            keyed,
        ))
        .await;
    }

    /// Two writers add a line to one draft order, both with `If-Match` of the version they
    /// read: at most one may win.
    async fn if_match_race(&self, rng: &mut Rng) {
        let Some((id, version)) = self.create_order(rng, true).await else {
            return;
        };
        let path = format!("/v1/orders/{id}/lines");
        let a = Self::order_cmd(
            path.clone(),
            self.line(rng.below(self.config.skus), 1),
            Some(version),
            rng.chance(50),
        );
        let b = Self::order_cmd(
            path,
            self.line(rng.below(self.config.skus), 1),
            Some(version),
            rng.chance(50),
        );
        let (ra, rb) = tokio::join!(self.send(&a), self.send(&b));
        let won = [ra.status, rb.status]
            .iter()
            .filter(|s| (200..300).contains(*s))
            .count();
        bump(&self.stats.races);
        bump(&self.stats.race_winners[won]);
        if won > 1 {
            tracing::error!(order = %id, version, "both If-Match writers won");
        }
        if rng.chance(50) {
            let path = format!("/v1/orders/{id}/place");
            self.send(&Self::order_cmd(path, json!({}), None, true))
                .await;
        }
    }

    /// Sends one command: once, or — keyed — until it gets an answer that is its
    /// command's outcome (or runs out of attempts), every attempt with the same key,
    /// body and correlation id, to whichever API process runs. Answers the last answer.
    async fn send(&self, cmd: &Cmd) -> HttpAnswer {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let correlation = format!("chaos-{}-{n}", self.config.seed);
        let key = cmd
            .keyed
            .then(|| format!("chaos-{}-key-{n}", self.config.seed));
        let attempts = if cmd.keyed {
            self.config.max_attempts
        } else {
            1
        };
        bump(&self.stats.commands);
        let mut answers = Vec::new();
        for attempt in 0..attempts {
            if attempt > 0 {
                let backoff = 250u64 << attempt.min(4);
                tokio::time::sleep(Duration::from_millis(backoff)).await;
            }
            let target = self.target(n as usize + attempt);
            let answer = self
                .attempt(&target, cmd, &correlation, key.as_deref())
                .await;
            self.count(&answer);
            let again = retryable(answer.status);
            debug!(path = %cmd.path, status = answer.status, attempt, "answer");
            answers.push(answer);
            if !again {
                break;
            }
        }
        if answers.len() > 1 {
            bump(&self.stats.retried);
        }
        let last = answers.last().cloned().unwrap_or(HttpAnswer {
            status: 0,
            body: Value::Null,
        });
        if cmd.keyed && retryable(last.status) {
            bump(&self.stats.unresolved);
        }
        let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        if (200..300).contains(&last.status) {
            let id = last.body.get("aggregate_id").and_then(Value::as_str);
            let version = last.body.get("version").and_then(Value::as_u64);
            match (id, version) {
                (Some(id), Some(version)) => record.acks.push(Ack {
                    stream: Some(cmd.stream.to_string()),
                    aggregate_id: id.to_string(),
                    version,
                    command_id: None,
                    correlation_id: Some(correlation),
                    idempotency_key: key.clone(),
                }),
                _ => bump(&self.stats.bad_bodies),
            }
        }
        if let Some(key) = key {
            record.keyed.push(KeyedRequest { key, answers });
        }
        last
    }

    /// The API process for attempt `i`: round robin over those alive (over all of them
    /// when none is, so that the attempt fails and is counted as unanswered).
    fn target(&self, i: usize) -> String {
        let mut urls = (self.targets)();
        urls.sort();
        urls.get(i % urls.len().max(1))
            .cloned()
            .unwrap_or_else(|| "http://127.0.0.1:9".into())
    }

    async fn attempt(
        &self,
        base: &str,
        cmd: &Cmd,
        correlation: &str,
        key: Option<&str>,
    ) -> HttpAnswer {
        bump(&self.stats.attempts);
        let mut request = self
            .http
            .post(format!("{base}{}", cmd.path))
            .header("content-type", "application/json")
            .header("x-correlation-id", correlation)
            .body(cmd.body.to_string());
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        if let Some(v) = cmd.if_match {
            request = request.header("if-match", v.to_string());
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                debug!(path = %cmd.path, "no answer: {e}");
                return HttpAnswer {
                    status: 0,
                    body: Value::Null,
                };
            }
        };
        let status = response.status().as_u16();
        match response.bytes().await {
            Ok(bytes) => HttpAnswer {
                status,
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            },
            // The status came but the body did not: no answer to judge.
            Err(_) => HttpAnswer {
                status: 0,
                body: Value::Null,
            },
        }
    }

    fn count(&self, answer: &HttpAnswer) {
        let s = &self.stats;
        bump(match answer.status {
            0 => &s.no_answer,
            200..=299 => &s.ok,
            409 => &s.conflicts,
            422 => &s.refusals,
            400..=499 => &s.other_4xx,
            _ => &s.server_errors,
        });
    }
}

/// An answer that says nothing of the command's outcome, so a keyed request is sent again:
/// none at all, a timeout, rate limiting or a server error.
fn retryable(status: u16) -> bool {
    status == 0 || status == 408 || status == 429 || status >= 500
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_that_say_nothing_of_the_outcome_are_retried() {
        for status in [0, 408, 429, 500, 503] {
            assert!(retryable(status), "{status}");
        }
        for status in [200, 201, 400, 404, 409, 422] {
            assert!(!retryable(status), "{status}");
        }
    }

    #[test]
    fn order_ids_are_valid_uuids_drawn_from_the_seed() {
        let (mut a, mut b) = (Rng::new(3), Rng::new(3));
        let id = Client::order_id(&mut a);
        assert_eq!(id, Client::order_id(&mut b));
        assert_eq!(id.get_version_num(), 4);
        assert!(id.to_string().parse::<Uuid>().is_ok());
    }
}

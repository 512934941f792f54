//! A `TestApp`: the whole app in-process on port 0 against the real Kafka and PostgreSQL,
//! with a topic prefix of its own, and typed helpers to talk to it and read its log.
#![allow(dead_code)]

use std::net::SocketAddr;

use clap::Parser;
use eventlog::rdkafka::Message;
use eventlog::{read_partition, EventEnvelope, KafkaConfig, Topics};
use reqwest::StatusCode;
use serde_json::Value;
use tally::config::{Cli, Command, CommonArgs, RunArgs};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A fresh topic prefix: tests never see each other's records. It carries its creation
/// time, so that a later run can tell (and drop) the databases of runs long finished.
pub fn new_prefix() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs();
    format!("test-{now}-{}", uuid::Uuid::new_v4().simple())
}

/// Test databases older than this are left over from finished runs.
const STALE_DATABASE_SECS: u64 = 3 * 3600;

/// A database of its own for `prefix` (created on first use), so read models of tests
/// never meet; answers its URL. Safe when tests of one or several runs create databases
/// at once; the first call of a run drops the databases of runs finished long ago.
pub async fn database_for(prefix: &str) -> String {
    use sqlx::Connection;
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let base = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL must point at a running PostgreSQL (scripts/test sets it)");
    let name = format!("t_{}", prefix.replace('-', "_"));
    let mut admin = sqlx::PgConnection::connect(&base)
        .await
        .expect("connecting to DATABASE_URL");
    SWEPT.get_or_init(|| drop_stale_databases(&base)).await;
    // No check-then-create: two tests (or runs) may create the same name at once, and
    // losing that race is as good as winning it.
    if let Err(e) = sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
    {
        let code = e
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned());
        // 42P04 duplicate_database; 23505 when the catalog's unique index sees the race.
        assert!(
            matches!(code.as_deref(), Some("42P04") | Some("23505")),
            "creating test database {name}: {e}"
        );
    }
    let (server, _) = base
        .rsplit_once('/')
        .expect("DATABASE_URL ends in /<database>");
    format!("{server}/{name}")
}

/// Drops the test databases whose prefix says they are older than
/// [`STALE_DATABASE_SECS`] (or that predate timestamped prefixes), so a developer's disk
/// does not fill up run after run. Runs going on at the same time are younger and kept.
async fn drop_stale_databases(base: &str) {
    use sqlx::Connection;
    let Ok(mut admin) = sqlx::PgConnection::connect(base).await else {
        return;
    };
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 't\\_%'")
            .fetch_all(&mut admin)
            .await
            .unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    for name in names {
        let born = name
            .strip_prefix("t_test_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        if born.is_some_and(|at| at + STALE_DATABASE_SECS > now) {
            continue;
        }
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut admin)
            .await;
    }
}

/// Settings from the environment scripts/test exports, for `prefix`, with a database of
/// its own.
pub async fn args(
    prefix: &str,
    partitions: u32,
    roles: &str,
    extra: &[&str],
) -> (CommonArgs, RunArgs) {
    assert!(
        std::env::var_os("TALLY_KAFKA_BROKERS").is_some() && std::env::var_os("DATABASE_URL").is_some(),
        "TALLY_KAFKA_BROKERS and DATABASE_URL must point at running services (scripts/test sets them)"
    );
    let database = database_for(prefix).await;
    let partitions = partitions.to_string();
    let mut argv = vec![
        "tally",
        "serve",
        "--topic-prefix",
        prefix,
        "--partitions",
        &partitions,
        "--roles",
        roles,
        "--command-timeout-secs",
        "20",
        "--database-url",
        &database,
    ];
    argv.extend_from_slice(extra);
    let cli = Cli::try_parse_from(argv).unwrap();
    let Command::Serve(serve) = cli.command else {
        unreachable!("parsed serve")
    };
    (serve.common, serve.run)
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub kafka: KafkaConfig,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestApp {
    /// Starts every role, and waits until it is ready.
    pub async fn start(prefix: &str) -> Self {
        Self::start_with(prefix, 2, "api,commands,projections").await
    }

    pub async fn start_with(prefix: &str, partitions: u32, roles: &str) -> Self {
        Self::start_with_args(prefix, partitions, roles, &[]).await
    }

    /// Starts `roles` with extra `tally serve` arguments.
    pub async fn start_with_args(
        prefix: &str,
        partitions: u32,
        roles: &str,
        extra: &[&str],
    ) -> Self {
        let filter = std::env::var("TALLY_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
        let (common, run) = args(prefix, partitions, roles, extra).await;
        let state = tally::prepare(&common).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(tally::run(Some(listener), state, run, shutdown.clone()));
        let app = Self {
            addr,
            kafka: common.kafka(),
            http: reqwest::Client::new(),
            shutdown,
            task,
        };
        app.wait_ready().await;
        app
    }

    /// Polls `/readyz` until 200 (partitions rebuilt), with a deadline.
    pub async fn wait_ready(&self) {
        wait_ready(&self.http, &self.url(""), 60).await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs JSON with extra headers; answers status and JSON body.
    pub async fn post(
        &self,
        path: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut request = self.http.post(self.url(path)).json(&body);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// POSTs a command that must succeed (2xx), and answers its body.
    pub async fn command_ok(&self, path: &str, body: Value, headers: &[(&str, &str)]) -> Value {
        let (status, answer) = self.post(path, body, headers).await;
        assert!(status.is_success(), "POST {path}: {status} {answer}");
        answer
    }

    /// Creates a draft order of `customer` with `lines` (sku, quantity, unit price);
    /// answers its id.
    pub async fn create_order(
        &self,
        customer: &str,
        lines: &[(&str, i64, i64)],
        headers: &[(&str, &str)],
    ) -> String {
        let created = self
            .command_ok("/v1/orders", order_body(customer, lines), headers)
            .await;
        created["aggregate_id"]
            .as_str()
            .expect("a created order names its id")
            .to_string()
    }

    /// Restocks `quantity` units of `sku`.
    pub async fn restock(&self, sku: &str, quantity: i64, headers: &[(&str, &str)]) {
        self.command_ok(
            &format!("/v1/inventory/{sku}/restock"),
            serde_json::json!({ "quantity": quantity }),
            headers,
        )
        .await;
    }

    /// GETs `path`, which must answer 200; answers its body.
    pub async fn get_ok(&self, path: &str, headers: &[(&str, &str)]) -> Value {
        let (status, _, body) = self.get(path, headers).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    /// Stops the app gracefully and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Every committed event of `stream`, over all partitions.
pub async fn events(kafka: &KafkaConfig, stream: &str) -> Vec<EventEnvelope> {
    let topic = Topics::new(&kafka.topic_prefix).events(stream);
    let mut all = Vec::new();
    for partition in 0..kafka.partitions {
        read_partition(kafka, &topic, partition, 0, |m| {
            all.push(serde_json::from_slice(m.payload().unwrap())?);
            Ok(())
        })
        .await
        .unwrap();
    }
    all
}

/// The committed events of one aggregate, by sequence.
pub async fn events_of(
    kafka: &KafkaConfig,
    stream: &str,
    aggregate_id: &str,
) -> Vec<EventEnvelope> {
    let mut found: Vec<_> = events(kafka, stream)
        .await
        .into_iter()
        .filter(|e| e.aggregate_id == aggregate_id)
        .collect();
    found.sort_by_key(|e| e.sequence);
    found
}

pub fn order_body(customer: &str, lines: &[(&str, i64, i64)]) -> Value {
    let lines: Vec<Value> = lines
        .iter()
        .map(|(sku, q, p)| serde_json::json!({ "sku": sku, "quantity": q, "unit_price_cents": p }))
        .collect();
    serde_json::json!({ "customer_id": customer, "lines": lines })
}

impl TestApp {
    /// GETs `path` with extra headers; answers status, ETag and JSON body.
    pub async fn get(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Option<String>, Value) {
        let mut request = self.http.get(self.url(path));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let etag = response
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        (status, etag, response.json().await.unwrap_or(Value::Null))
    }

    /// Polls `GET path` until `done` holds for its body, with a deadline.
    pub async fn eventually(
        &self,
        path: &str,
        limit: std::time::Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let (_, _, body) = self.get(path, &[]).await;
            if done(&body) {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "GET {path} never satisfied the condition: {body}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// A `tally serve` in a process of its own (to be signalled or killed for real), on a
/// free port, with its own database; its output goes to `log`.
pub struct TallyProcess {
    pub child: std::process::Child,
    pub base: String,
}

impl TallyProcess {
    /// Starts `tally serve` for `prefix` with extra `args` and environment.
    pub async fn start(
        prefix: &str,
        args: &[&str],
        env: &[(&str, String)],
        log: &std::path::Path,
    ) -> Self {
        let database = database_for(prefix).await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(prefix, &database, port, args, env, log)
    }

    /// The same on a given port and database (a restart of the same instance).
    pub fn start_on(
        prefix: &str,
        database: &str,
        port: u16,
        args: &[&str],
        env: &[(&str, String)],
        log: &std::path::Path,
    ) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let listen = format!("127.0.0.1:{port}");
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tally"));
        command
            .args(["serve", "--topic-prefix", prefix, "--partitions", "2"])
            .args(["--database-url", database, "--listen", &listen])
            .args(args)
            .env("TALLY_LOG", "info")
            .stdout(std::process::Stdio::from(out.try_clone().unwrap()))
            .stderr(std::process::Stdio::from(out));
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().expect("starting tally");
        Self {
            child,
            base: format!("http://{listen}"),
        }
    }

    /// Polls `/readyz` until 200, with a deadline.
    pub async fn wait_ready(&self) {
        wait_ready(&reqwest::Client::new(), &self.base, 90).await;
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }
}

/// Polls `<base>/readyz` until it answers 200 (partitions restored), failing the test
/// after `secs` seconds.
pub async fn wait_ready(http: &reqwest::Client, base: &str, secs: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "tally at {base} not ready within {secs} s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Judges every invariant of the fault suite's checker (`chaos`) over the whole log of
/// `prefix` and its read models, until all hold (the read side catches up) or 60 s pass;
/// then fails the test with the checker's report.
pub async fn assert_the_log_holds(prefix: &str, partitions: u32) {
    let kafka = args(prefix, partitions, "api", &[]).await.0.kafka();
    let database = database_for(prefix).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let model = chaos::load::load(&kafka, &database, Default::default())
            .await
            .expect("the checker reads the log and the read models");
        let verdicts = chaos::check::check(&model);
        if verdicts.iter().all(|v| v.passed()) {
            assert!(
                verdicts.iter().any(|v| v.checked > 0),
                "the checker judged nothing"
            );
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the checker finds the log broken:\n{}",
            chaos::report::render(&verdicts, 10)
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

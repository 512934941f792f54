//! Command-line and environment configuration. Only `main` reads the environment (through
//! clap); the library takes these plain values.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use eventlog::KafkaConfig;

/// Tally: event-sourced orders, inventory and payments on an Apache Kafka log.
#[derive(Debug, Parser)]
#[command(
    name = "tally",
    version,
    propagate_version = true,
    after_help = "Logging: TALLY_LOG sets what is logged, as a tracing filter (default `info`; \
                  e.g. `TALLY_LOG=info,eventlog=debug`); --log-format picks text or json."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check Kafka and PostgreSQL, create topics, run migrations, and serve the HTTP API.
    Serve(Box<ServeArgs>),
    /// Create the topics and run the migrations, then exit (for deploy pipelines).
    Init(CommonArgs),
    /// Rebuild one read model from offset 0 into new tables and swap them in, with a
    /// progress bar. Queries keep being served from the old tables meanwhile.
    Replay(ReplayArgs),
    /// Empty this database's read side for the current Kafka log: every read-model table
    /// and every projection checkpoint (and the idempotency keys when the database
    /// belongs to another log: on the same log they still guard retries); then record the log (Kafka's
    /// cluster id and the id in `<prefix>.meta`) as the one the read side belongs to. The
    /// projectors rebuild every view from offset 0 when they next start. For a database
    /// that start refuses because it was built from another log (e.g. after deleting
    /// Kafka's data). Stop every tally process of this prefix first: a running API would
    /// keep answering from what it saw before.
    ResetReadSide(ResetArgs),
    /// Fold every partition's events again into the processors' and sagas' state, and
    /// write it to the state changelogs (superseding what they held), then exit. For a
    /// state suspected wrong, or after a change of an aggregate's state that kept its
    /// schema version. Stop the processes with the `commands` and `sagas` roles first:
    /// this one must own every partition.
    RebuildState(RebuildStateArgs),
}

/// Where and how much aggregate and saga state the owners of a process keep (ADR 10).
#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    /// Directory of the local state stores (one small redb file per owned partition). A
    /// cache: losing it costs a restore from the changelog topics, never correctness.
    /// Give each process its own, on a persistent volume to restart fast.
    #[arg(long, env = "TALLY_STATE_DIR", default_value = ".data/state")]
    pub state_dir: std::path::PathBuf,
    /// Aggregates (or sagas) kept decoded in memory per owned partition; the rest are read
    /// from the local store when needed. Memory is bounded by this, not by history.
    #[arg(long, env = "TALLY_STATE_CACHE_ENTRIES", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub state_cache_entries: u64,
}

impl StateArgs {
    /// The owners' state settings for `log` (stores of another log are not trusted).
    pub fn config(
        &self,
        log: &eventlog::LogIdentity,
        rebuild: bool,
    ) -> eventlog::state::StateConfig {
        eventlog::state::StateConfig {
            dir: self.state_dir.clone(),
            cache_entries: self.state_cache_entries as usize,
            log_id: format!("{}/{}", log.cluster_id, log.log_id),
            rebuild,
        }
    }
}

/// `tally rebuild-state` settings.
#[derive(Debug, Clone, Args)]
pub struct RebuildStateArgs {
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Settings every command needs: where Kafka and PostgreSQL are, and logging.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = "TALLY_KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    pub kafka_brokers: String,
    /// Extra librdkafka properties for every Kafka client, `key=value` (repeatable or
    /// comma-separated), e.g. `security.protocol=SASL_SSL`.
    #[arg(long = "kafka-property", env = "TALLY_KAFKA_PROPERTIES", value_delimiter = ',', value_parser = parse_property)]
    pub kafka_properties: Vec<(String, String)>,
    /// Prefix of every topic name.
    #[arg(long, env = "TALLY_TOPIC_PREFIX", default_value = "tally")]
    pub topic_prefix: String,
    /// Partitions of each event and command topic; fixed once the topics exist.
    #[arg(long, env = "TALLY_PARTITIONS", default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub partitions: i32,
    /// Replication factor of topics Tally creates (3 in production).
    #[arg(long, env = "TALLY_REPLICATION_FACTOR", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=16))]
    pub replication_factor: i32,
    /// PostgreSQL URL of the read models.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://tally:tally@127.0.0.1:15432/tally"
    )]
    pub database_url: String,
    /// Most PostgreSQL connections this process opens.
    #[arg(long, env = "TALLY_DATABASE_CONNECTIONS", default_value_t = 16)]
    pub database_connections: u32,
    /// PostgreSQL connections of the projectors, a pool of their own apart from the one
    /// queries and idempotency keys use: one for each of the five projectors and one for
    /// status and replays.
    #[arg(long, env = "TALLY_PROJECTION_CONNECTIONS", default_value_t = 6, value_parser = clap::value_parser!(u32).range(2..=256))]
    pub projection_connections: u32,
    /// How long to keep retrying Kafka and PostgreSQL at start-up, in seconds.
    #[arg(long, env = "TALLY_STARTUP_TIMEOUT_SECS", default_value_t = 60)]
    pub startup_timeout_secs: u64,
    /// Log format: human `text` or one `json` object per line.
    #[arg(long, env = "TALLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export traces over OTLP/HTTP to this collector (e.g. `http://localhost:4318`);
    /// off when unset.
    #[arg(long, env = "TALLY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of exported traces.
    #[arg(long, env = "TALLY_OTLP_SERVICE_NAME", default_value = "tally")]
    pub otlp_service_name: String,
}

/// `tally serve` settings.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address the HTTP API listens on (port 0 picks a free port).
    #[arg(long, env = "TALLY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `tally replay` settings.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// The projection to rebuild.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(projections::Kind::ALL.map(projections::Kind::name)))]
    pub projection: String,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `tally reset-read-side` settings.
#[derive(Debug, Clone, Args)]
pub struct ResetArgs {
    /// Confirms that the read models and checkpoints (and, for another log, the
    /// idempotency keys) in this database are to be deleted; without it nothing is touched.
    #[arg(long)]
    pub yes: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// What this process does, and how long it waits.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Roles this process plays, comma-separated: `api` serves HTTP, `commands` runs the
    /// command processors, `sagas` the fulfilment saga, `projections` the projectors.
    /// More processes with `commands` or `sagas` split the partitions.
    #[arg(
        long,
        env = "TALLY_ROLES",
        value_enum,
        value_delimiter = ',',
        default_value = "api,commands,sagas,projections"
    )]
    pub roles: Vec<Role>,
    /// The command processors the `commands` role runs: `order`, `inventory`, `payment`.
    #[arg(
        long,
        env = "TALLY_COMMAND_STREAMS",
        value_delimiter = ',',
        default_value = "order,inventory,payment",
        value_parser = ["order", "inventory", "payment"]
    )]
    pub command_streams: Vec<String>,
    /// How long the saga waits for a reservation or a charge before it compensates with
    /// reason `timeout`, in milliseconds.
    #[arg(long, env = "TALLY_SAGA_STEP_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub saga_step_timeout_ms: u64,
    /// On SIGTERM/SIGINT, how long to keep serving (with /readyz answering 503) so load
    /// balancers stop sending requests, in milliseconds.
    #[arg(long, env = "TALLY_SHUTDOWN_DRAIN_MS", default_value_t = 0)]
    pub shutdown_drain_ms: u64,
    /// On SIGTERM/SIGINT, the most time to finish in-flight requests and transactions
    /// before exiting anyway, in seconds.
    #[arg(long, env = "TALLY_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,
    /// Turns authentication on: bearer JWTs signed HS256 with this secret. Off (neither
    /// this nor the RS256 key set) lets every request through.
    #[arg(long, env = "TALLY_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<String>,
    /// Turns authentication on: bearer JWTs signed RS256, checked with the RSA public key
    /// in this PEM file.
    #[arg(
        long,
        env = "TALLY_JWT_RS256_PUBLIC_KEY_FILE",
        conflicts_with = "jwt_hs256_secret"
    )]
    pub jwt_rs256_public_key_file: Option<std::path::PathBuf>,
    /// With authentication on, also require this `iss` claim.
    #[arg(long, env = "TALLY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Requests a second each client may send on average (its token's principal, or its
    /// IP address without authentication); past it: 429 with Retry-After. 0 turns the
    /// limit off.
    #[arg(long, env = "TALLY_RATE_LIMIT_PER_SEC", default_value_t = 10_000.0)]
    pub rate_limit_per_sec: f64,
    /// Requests each client may send at once, above the rate.
    #[arg(long, env = "TALLY_RATE_LIMIT_BURST", default_value_t = 20_000)]
    pub rate_limit_burst: u32,
    /// Longest a request may take before it is answered 408 (commands wait at most
    /// --command-timeout-secs, token queries 10 s).
    #[arg(long, env = "TALLY_REQUEST_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub request_timeout_secs: u64,
    /// With authentication on, also require this `aud` claim.
    #[arg(long, env = "TALLY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// How long a command request waits for its outcome before answering 503, in seconds.
    #[arg(long, env = "TALLY_COMMAND_TIMEOUT_SECS", default_value_t = 10)]
    pub command_timeout_secs: u64,
    /// How long processors remember the outcome of every command sent with an
    /// Idempotency-Key, in seconds: the authority for exactly-once, so it must outlive the
    /// HTTP key by at least an hour (--idempotency-key-hours). At most 7 days.
    #[arg(long, env = "TALLY_DEDUP_WINDOW_SECS", default_value_t = 25 * 3600)]
    pub dedup_window_secs: u64,
    /// How long an Idempotency-Key and its answer are kept, in hours (API.md: at least 24).
    #[arg(long, env = "TALLY_IDEMPOTENCY_KEY_HOURS", default_value_t = 24, value_parser = clap::value_parser!(u32).range(24..=24 * 6))]
    pub idempotency_key_hours: u32,
    /// Proxies (CIDRs, comma-separated) whose `X-Forwarded-For` names the client for the
    /// per-address rate limit, e.g. `10.0.0.0/8,192.168.1.7/32`. Empty: the peer address
    /// is the client (behind a proxy, every client then shares the proxy's allowance).
    #[arg(long, env = "TALLY_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    #[command(flatten)]
    pub state: StateArgs,
}

/// A role of a Tally process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// The HTTP API.
    Api,
    /// The command processors (write side).
    Commands,
    /// The order-fulfilment saga orchestrator.
    Sagas,
    /// The projectors (read side).
    Projections,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

impl RunArgs {
    /// Refuses settings that would break a guarantee, saying which to change.
    pub fn validate(&self) -> anyhow::Result<()> {
        let key_secs = u64::from(self.idempotency_key_hours) * 3600;
        anyhow::ensure!(
            self.dedup_window_secs >= key_secs + 3600,
            "--dedup-window-secs {} must outlive --idempotency-key-hours {} by an hour (at least {}): \
             a retry whose key still exists must find the processor's record of its command",
            self.dedup_window_secs,
            self.idempotency_key_hours,
            key_secs + 3600
        );
        anyhow::ensure!(
            self.dedup_window_secs <= eventlog::OUTCOMES_RETENTION.as_secs(),
            "--dedup-window-secs {} is longer than the command-outcomes topic keeps records ({} s)",
            self.dedup_window_secs,
            eventlog::OUTCOMES_RETENTION.as_secs()
        );
        Ok(())
    }

    /// The token checker these settings describe; `None` when authentication is off.
    pub fn authenticator(&self) -> anyhow::Result<Option<api::auth::Authenticator>> {
        let auth = match (&self.jwt_hs256_secret, &self.jwt_rs256_public_key_file) {
            (Some(secret), _) => {
                anyhow::ensure!(
                    secret.len() >= 32,
                    "TALLY_JWT_HS256_SECRET must be at least 32 bytes; generate one with `openssl rand -base64 48`"
                );
                api::auth::Authenticator::hs256(secret.as_bytes())
            }
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!("reading the RS256 public key {}: {e}", path.display())
                })?;
                api::auth::Authenticator::rs256(&pem).map_err(anyhow::Error::msg)?
            }
            (None, None) => return Ok(None),
        };
        let auth = match &self.jwt_issuer {
            Some(issuer) => auth.with_issuer(issuer),
            None => auth,
        };
        Ok(Some(match &self.jwt_audience {
            Some(audience) => auth.with_audience(audience),
            None => auth,
        }))
    }
}

impl CommonArgs {
    /// The Kafka settings these arguments describe.
    pub fn kafka(&self) -> KafkaConfig {
        KafkaConfig {
            brokers: self.kafka_brokers.clone(),
            topic_prefix: self.topic_prefix.clone(),
            partitions: self.partitions,
            replication_factor: self.replication_factor,
            properties: self.kafka_properties.clone(),
        }
    }

    /// How long start-up waits for Kafka and PostgreSQL.
    pub fn startup_timeout(&self) -> Duration {
        Duration::from_secs(self.startup_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_properties_are_key_value_pairs() {
        assert_eq!(
            parse_property("a.b = c").unwrap(),
            ("a.b".into(), "c".into())
        );
        assert!(parse_property("novalue").is_err());
        assert!(parse_property("=x").is_err());
    }

    #[test]
    fn serve_has_working_defaults() {
        let cli = Cli::try_parse_from(["tally", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(args.common.kafka().partitions, 4);
    }

    #[test]
    fn reset_read_side_takes_a_confirmation() {
        let cli = Cli::try_parse_from(["tally", "reset-read-side", "--yes"]).unwrap();
        let Command::ResetReadSide(args) = cli.command else {
            panic!("not reset-read-side")
        };
        assert!(args.yes);
        let cli = Cli::try_parse_from(["tally", "reset-read-side"]).unwrap();
        let Command::ResetReadSide(args) = cli.command else {
            panic!("not reset-read-side")
        };
        assert!(!args.yes);
    }

    #[test]
    fn zero_partitions_is_refused() {
        assert!(Cli::try_parse_from(["tally", "serve", "--partitions", "0"]).is_err());
    }

    #[test]
    fn replay_takes_only_a_projection_that_exists_and_names_them_all() {
        for kind in projections::Kind::ALL {
            assert!(
                Cli::try_parse_from(["tally", "replay", kind.name()]).is_ok(),
                "{}",
                kind.name()
            );
        }
        let err = Cli::try_parse_from(["tally", "replay", "order"])
            .expect_err("an unknown projection is refused")
            .to_string();
        for kind in projections::Kind::ALL {
            assert!(err.contains(kind.name()), "{err}");
        }
    }

    #[test]
    fn the_help_names_the_log_filter_variable() {
        use clap::CommandFactory;
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("TALLY_LOG"), "{help}");
    }
}

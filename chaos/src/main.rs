//! `chaos check`: reads a settled Tally's whole log and read models, prints each
//! invariant PASS or FAIL, and exits non-zero on any failure.
//!
//! `chaos run`: the harness (started by `scripts/chaos`, which brings up its own Kafka and
//! PostgreSQL and builds the binaries): Tally processes with split roles, a workload and a
//! nemesis for the duration, a bounded settle, then the check and one report; non-zero on
//! any violation or on a kind of fault asked for and never injected.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use chaos::harness::nemesis::Infra;
use chaos::harness::plan::{FaultKind, Pace};
use chaos::harness::processes::TallySettings;
use chaos::harness::run::RunConfig;
use chaos::harness::workload::WorkloadConfig;
use chaos::model::ClientRecord;
use clap::{Parser, Subcommand};
use eventlog::KafkaConfig;

#[derive(Parser)]
#[command(name = "chaos", about = "Tally's fault-injection suite")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Judge every invariant over the log and the read models.
    Check(CheckArgs),
    /// Run Tally processes under a workload and injected faults, then judge the log.
    Run(Box<RunArgs>),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The `tally` binary to run (a copy that no rebuild swaps under the run).
    #[arg(long)]
    tally: PathBuf,
    /// The run directory: Tally's logs and state, the schedule, the client record, the report.
    #[arg(long)]
    dir: PathBuf,
    /// Kafka bootstrap brokers (the harness's own Kafka).
    #[arg(long, env = "TALLY_KAFKA_BROKERS")]
    brokers: String,
    /// How many brokers that Kafka has (brokers are faulted one at a time).
    #[arg(long, default_value_t = 1)]
    broker_count: usize,
    /// PostgreSQL database of this run's read models (Tally's connections to it are faulted).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Topic prefix of this run.
    #[arg(long)]
    prefix: String,
    /// Seed of the fault schedule and of the workload's choices.
    #[arg(long)]
    seed: u64,
    /// How long the workload runs and faults are injected.
    #[arg(long, default_value_t = 150)]
    seconds: u64,
    /// Kinds of fault to inject, comma-separated: kill, pause, storm, broker, pg-kill,
    /// pg-restart. Each must be injected at least once or the run fails.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill,pause,storm,broker,pg-kill,pg-restart"
    )]
    faults: Vec<FaultKind>,
    /// Shortest and longest gap between two faults, in seconds.
    #[arg(long, default_value_t = 4)]
    min_gap_secs: u64,
    #[arg(long, default_value_t = 12)]
    max_gap_secs: u64,
    /// `scripts/services`, which kills and restarts brokers and PostgreSQL.
    #[arg(long)]
    services: PathBuf,
    /// Port of the API-only process; the process with every role listens on the next.
    #[arg(long, default_value_t = 28080)]
    base_port: u16,
    /// The most seconds the system gets to settle after the faults stop.
    #[arg(long, default_value_t = 180)]
    settle_secs: u64,
    /// Workload workers (requests in flight at once).
    #[arg(long, default_value_t = 6)]
    concurrency: usize,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    #[arg(long, default_value_t = 1)]
    replication_factor: i32,
    /// The saga's step deadline, short so that a run settles soon.
    #[arg(long, default_value_t = 15_000)]
    saga_step_timeout_ms: u64,
    /// The command line that replays this run, shown in the report.
    #[arg(long, default_value = "")]
    replay: String,
    /// Violations shown per failed invariant.
    #[arg(long, default_value_t = 10)]
    show: usize,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// Kafka bootstrap brokers.
    #[arg(long, env = "TALLY_KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    brokers: String,
    /// PostgreSQL holding the read models.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://tally:tally@127.0.0.1:15432/tally"
    )]
    database_url: String,
    /// Prefix of every topic name.
    #[arg(long, env = "TALLY_TOPIC_PREFIX", default_value = "tally")]
    prefix: String,
    /// Extra librdkafka property (`key=value`), repeatable (SASL/SSL settings go here).
    #[arg(long = "kafka-property", value_parser = key_value)]
    kafka_properties: Vec<(String, String)>,
    /// The workload's record of what it was told (JSON: `acks`, `keyed`); without it only
    /// the acknowledgements the log itself holds are judged.
    #[arg(long)]
    client_record: Option<PathBuf>,
    /// Violations shown per failed invariant.
    #[arg(long, default_value_t = 10)]
    show: usize,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Check(args) => check(args).await,
        Command::Run(args) => run(*args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CHAOS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let replay = if args.replay.is_empty() {
        format!("chaos run --seed {} --seconds {}", args.seed, args.seconds)
    } else {
        args.replay.clone()
    };
    let config = RunConfig {
        tally: TallySettings {
            binary: args.tally,
            dir: args.dir.clone(),
            brokers: args.brokers,
            prefix: args.prefix,
            database_url: args.database_url.clone(),
            partitions: args.partitions,
            replication_factor: args.replication_factor,
            saga_step_timeout_ms: args.saga_step_timeout_ms,
        },
        seed: args.seed,
        duration: std::time::Duration::from_secs(args.seconds),
        kinds: args.faults,
        pace: Pace {
            min_gap_ms: args.min_gap_secs * 1000,
            max_gap_ms: args.max_gap_secs.max(args.min_gap_secs) * 1000,
            ..Pace::default()
        },
        infra: Infra {
            services: args.services,
            brokers: args.broker_count,
            database_url: args.database_url,
        },
        base_port: args.base_port,
        settle: std::time::Duration::from_secs(args.settle_secs),
        workload: WorkloadConfig {
            seed: args.seed,
            concurrency: args.concurrency,
            ..WorkloadConfig::default()
        },
        replay,
    };
    let report = chaos::harness::run::run(config).await?;
    let text = report.render(args.show);
    std::fs::write(args.dir.join("faults.txt"), report.fault_log())?;
    std::fs::write(args.dir.join("report.txt"), &text)?;
    println!(
        "\nfault log (from the start of the workload)\n{}",
        report.fault_log()
    );
    print!("{text}");
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let client = match &args.client_record {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a client record", path.display()))?
        }
        None => ClientRecord::default(),
    };
    let kafka = KafkaConfig {
        topic_prefix: args.prefix.clone(),
        properties: args.kafka_properties.clone(),
        ..KafkaConfig::local(args.brokers.clone())
    };
    let model = chaos::load::load(&kafka, &args.database_url, client).await?;
    let verdicts = chaos::check::check(&model);
    print!(
        "{}",
        chaos::report::render_summary(&chaos::check::summarize(&model))
    );
    print!("{}", chaos::report::render(&verdicts, args.show));
    Ok(if verdicts.iter().all(|v| v.passed()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed_and_parses_the_settings() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "chaos",
            "check",
            "--brokers",
            "b:1",
            "--database-url",
            "postgres://x",
            "--prefix",
            "run-7",
            "--kafka-property",
            "security.protocol=SSL",
        ])
        .expect("the arguments parse");
        let Command::Check(args) = cli.command else {
            panic!("not check")
        };
        assert_eq!(
            (
                args.brokers.as_str(),
                args.database_url.as_str(),
                args.prefix.as_str()
            ),
            ("b:1", "postgres://x", "run-7")
        );
        assert_eq!(
            args.kafka_properties,
            vec![("security.protocol".to_string(), "SSL".to_string())]
        );
        assert!(Cli::try_parse_from(["chaos", "check", "--kafka-property", "nokey"]).is_err());
    }

    #[test]
    fn run_takes_its_seed_and_fault_kinds_and_refuses_unknown_kinds() {
        let base = [
            "chaos",
            "run",
            "--tally",
            "t",
            "--dir",
            "d",
            "--brokers",
            "b:1",
            "--database-url",
            "postgres://x",
            "--prefix",
            "p",
            "--seed",
            "5",
            "--services",
            "s",
        ];
        let cli = Cli::try_parse_from(base.iter().chain(&["--faults", "kill,broker"]))
            .expect("the arguments parse");
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.seed, 5);
        assert_eq!(args.faults, vec![FaultKind::Kill, FaultKind::Broker]);
        let all = Cli::try_parse_from(base).expect("the default kinds parse");
        let Command::Run(args) = all.command else {
            panic!("not run")
        };
        assert_eq!(args.faults, FaultKind::ALL.to_vec());
        assert!(Cli::try_parse_from(base.iter().chain(&["--faults", "reboot"])).is_err());
    }
}

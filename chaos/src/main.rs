//! `chaos check`: reads a settled Tally's whole log and read models, prints each
//! invariant PASS or FAIL, and exits non-zero on any failure.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
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
    let Command::Check(args) = Cli::parse().command;
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
        let Command::Check(args) = cli.command;
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
}

//! `tally`: a thin CLI over the library (see `src/lib.rs`).

use anyhow::Context;
use clap::Parser;
use tally::config::{Cli, Command, Role};

/// mimalloc rather than glibc's malloc: a profile under load showed ~15% of the process in
/// glibc's malloc and free (many threads, many small short-lived buffers); see ADR 10.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let telemetry = tally::telemetry::init(&args.common)?;
            let state = tally::prepare(&args.common).await?;
            let listener = match args.run.roles.contains(&Role::Api) {
                true => Some(
                    tokio::net::TcpListener::bind(args.listen)
                        .await
                        .with_context(|| {
                            format!(
                                "binding {}; is another tally running? (--listen)",
                                args.listen
                            )
                        })?,
                ),
                false => None,
            };
            let shutdown = tokio_util::sync::CancellationToken::new();
            let trigger = shutdown.clone();
            let bound = std::time::Duration::from_millis(
                args.run.shutdown_drain_ms + 1000 * args.run.shutdown_timeout_secs,
            );
            tokio::spawn(async move {
                shutdown_signal().await;
                trigger.cancel();
                // Whatever is still running then is abandoned: transactions left open are
                // aborted by the next owner, and nothing uncommitted was acknowledged.
                tokio::time::sleep(bound).await;
                tracing::error!(bound_ms = bound.as_millis() as u64, "shutdown did not finish within the bound (--shutdown-timeout-secs); exiting anyway");
                std::process::exit(1);
            });
            let result = tally::run(listener, state, args.run, shutdown).await;
            telemetry.shutdown().await;
            result
        }
        Command::Init(common) => {
            let _telemetry = tally::telemetry::init(&common)?;
            tally::prepare(&common).await.map(|_| ())
        }
        Command::RebuildState(args) => {
            let _telemetry = tally::telemetry::init(&args.common)?;
            tally::rebuild_state(&args).await
        }
        Command::Replay(args) => {
            let _telemetry = tally::telemetry::init(&args.common)?;
            tally::replay::run(&args).await
        }
        Command::ResetReadSide(args) => {
            let _telemetry = tally::telemetry::init(&args.common)?;
            anyhow::ensure!(
                args.yes,
                "this deletes every read model and projection checkpoint (and the idempotency \
                 keys, when the database belongs to another log) in the database at \
                 --database-url, so that the projectors rebuild from offset 0 \
                 of the log at --kafka-brokers (topic prefix '{}'). Stop every tally process \
                 of this prefix, then run again with --yes",
                args.common.topic_prefix
            );
            let summary = tally::reset_read_side(&args.common).await?;
            println!("{summary}");
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        // Installing the handler fails only if the runtime cannot watch signals at all.
        tokio::signal::ctrl_c()
            .await
            .expect("installing the Ctrl-C handler");
    };
    #[cfg(unix)]
    let term = async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler")
            .recv()
            .await;
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

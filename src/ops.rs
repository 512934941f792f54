//! `/metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use commands::ProcessorStatus;
use sagas::SagaMetrics;

/// What `/metrics` reads: the command processors and the saga orchestrator of this process.
#[derive(Clone, Default)]
pub struct Ops {
    pub processors: Vec<(&'static str, ProcessorStatus)>,
    pub sagas: Option<SagaMetrics>,
}

/// A metric family: name, type, help, and how to read it from a processor's status.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ProcessorStatus) -> u64,
);

/// `GET /metrics`.
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "ops",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(State(ops): State<Ops>) -> impl IntoResponse {
    let processors = &ops.processors;
    let mut out = String::new();
    let families: [Family; 4] = [
        (
            "tally_command_transactions_total",
            "counter",
            "Kafka transactions committed by the command processors.",
            |s| s.metrics.transactions(),
        ),
        (
            "tally_commands_total",
            "counter",
            "Commands handled in committed transactions.",
            |s| s.metrics.commands(),
        ),
        (
            "tally_command_batch_max",
            "gauge",
            "Most commands one transaction carried.",
            |s| s.metrics.largest_batch(),
        ),
        (
            "tally_partitions_rebuilding",
            "gauge",
            "Owned partitions still being rebuilt from the log.",
            |s| s.rebuilding.load(Ordering::Relaxed) as u64,
        ),
    ];
    for (name, kind, help, read) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (stream, status) in processors {
            let _ = writeln!(out, "{name}{{stream=\"{stream}\"}} {}", read(status));
        }
    }
    if let Some(sagas) = &ops.sagas {
        sagas.render(&mut out);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

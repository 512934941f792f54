//! Logs and traces: `tracing` to stdout (text or JSON), and — when an OTLP endpoint is
//! configured — spans exported over OTLP/HTTP, parented on the caller's `traceparent`.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{CommonArgs, LogFormat};

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered (at exit).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

/// Installs the global subscriber: the `TALLY_LOG` filter (default `info`), the log format,
/// and the OTLP exporter when `--otlp-endpoint` is set.
pub fn init(common: &CommonArgs) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_env("TALLY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let fmt: Box<dyn Layer<_> + Send + Sync> = match common.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_ansi(ansi).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .boxed(),
    };
    let endpoint = common
        .otlp_endpoint
        .as_deref()
        .filter(|e| !e.trim().is_empty());
    let provider = endpoint
        .map(|e| exporter(e, &common.otlp_service_name))
        .transpose()?;
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("tally"))
            .boxed()
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .init();
    match endpoint {
        Some(e) => tracing::info!(endpoint = e, "exporting traces over OTLP/HTTP"),
        None => tracing::debug!("no OTLP endpoint: traces are not exported"),
    }
    Ok(Telemetry { provider })
}

fn exporter(endpoint: &str, service: &str) -> anyhow::Result<SdkTracerProvider> {
    let url = match endpoint.trim_end_matches('/') {
        e if e.ends_with("/v1/traces") => e.to_string(),
        e => format!("{e}/v1/traces"),
    };
    let service = service.to_string();
    // The blocking HTTP client owns a runtime of its own: build it off the async one.
    std::thread::spawn(move || -> anyhow::Result<SdkTracerProvider> {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(url.clone())
            .build()
            .map_err(|e| anyhow::anyhow!("the OTLP exporter for {url}: {e}"))?;
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service)
                    .build(),
            )
            .build())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("building the OTLP exporter panicked"))?
}

/// The OpenTelemetry context a W3C `traceparent` names (empty when there is none).
pub fn parent_context(headers: &axum::http::HeaderMap) -> opentelemetry::Context {
    struct Headers<'a>(&'a axum::http::HeaderMap);
    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(|k| k.as_str()).collect()
        }
    }
    TraceContextPropagator::new().extract(&Headers(headers))
}

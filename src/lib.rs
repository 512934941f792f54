//! The `tally` binary's library: it wires the crates into one process, so that tests can
//! start the whole app in-process (DESIGN.md §1).
//!
//! [`prepare`] waits for Kafka and PostgreSQL, creates the topics, runs the migrations
//! and checks that the database's read side belongs to this Kafka log; [`run`] plays the
//! configured roles (HTTP API, command processors) until `shutdown` is cancelled.

pub mod config;
pub mod identity;
pub mod openapi;
pub mod ops;
pub mod readiness;
pub mod replay;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aggregates::{Inventory, Order, PaymentAccount};
use anyhow::Context;
use api::ApiError;
use axum::http::{HeaderName, Request};
use axum::routing::get;
use axum::Router;
use commands::processor::{self, ProcessorConfig, ProcessorStatus};
use commands::{CommandBus, CommandStream, Local};
use eventlog::{ensure_topics, KafkaConfig, Topics};
use sagas::fulfilment::Deadlines;
use sagas::{SagaConfig, SagaRuntimeStatus};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::{error, info, warn};

use crate::config::{CommonArgs, Role, RunArgs};
use crate::readiness::Readiness;

/// The event streams, one per aggregate type: `<prefix>.<stream>.events` / `.commands`.
pub const STREAMS: [&str; 3] = [Order::STREAM, Inventory::STREAM, PaymentAccount::STREAM];

/// The sagas, each with its own stream: `<prefix>.<saga>.events` / `.inbox` / `.state`.
pub const SAGAS: [&str; 1] = [aggregates::streams::FULFILMENT];

/// The header that carries a request's correlation id, in and out.
pub const CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");

/// The connections every role starts from.
#[derive(Clone)]
pub struct AppState {
    pub kafka: KafkaConfig,
    /// Queries, idempotency keys, readiness.
    pub pool: PgPool,
    /// The projectors' own pool (opened lazily, so only processes that project use it).
    pub projector_pool: PgPool,
    pub readiness: Readiness,
    /// Which log this is (ADR 7): local state stores of another log are thrown away.
    pub log: eventlog::LogIdentity,
}

/// Waits (up to the start-up timeout) for Kafka and PostgreSQL, creates missing topics,
/// runs the read-model migrations, and refuses a database whose read side belongs to
/// another Kafka log (see [`identity::check`]).
pub async fn prepare(common: &CommonArgs) -> anyhow::Result<AppState> {
    let (state, log, deadline) = open(common).await?;
    // Under the start-up deadline like the rest, and retried: a broker or database blip
    // right now is not a reason to fail. A refusal is an answer, and final.
    let deadline = deadline.max(Instant::now() + IDENTITY_CHECK_AT_LEAST);
    let (pool, kafka, current) = (&state.pool, &state.kafka, &log);
    let checked = retry_until(deadline, "the log identity check", || async move {
        let check = identity::check(pool, kafka, current);
        match tokio::time::timeout_at(deadline, check).await {
            Ok(Err(e)) if e.downcast_ref::<identity::Refused>().is_some() => Ok(Err(e)),
            Ok(result) => result.map(Ok),
            Err(_) => Err(anyhow::anyhow!(
                "Kafka or PostgreSQL did not answer before the start-up deadline"
            )),
        }
    })
    .await?;
    checked?;
    Ok(state)
}

/// The least time the log identity check gets, however long the rest of start-up took.
const IDENTITY_CHECK_AT_LEAST: Duration = Duration::from_secs(15);

/// `tally rebuild-state`: owns every partition of every command stream and of the saga
/// with `rebuild` set — each folds its events and seeds its changelog — then stops. It
/// refuses to finish while another member of a group holds partitions.
pub async fn rebuild_state(args: &config::RebuildStateArgs) -> anyhow::Result<()> {
    let (state, log, _) = open(&args.common).await?;
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let (local, metrics) = (Local::default(), commands::Metrics::default());
    let state_metrics = eventlog::state::StateMetrics::default();
    let config = ProcessorConfig {
        kafka: state.kafka.clone(),
        dedup_window: Duration::from_secs(25 * 3600),
        state: args.state.config(&log, true),
    };
    let mut owners: Vec<_> = spawn_processors(
        &mut tasks,
        &config,
        &local,
        &shutdown,
        &metrics,
        &state_metrics,
        |_| true,
    )
    .into_iter()
    .map(|(_, status)| status.owner)
    .collect();
    let sagas = SagaConfig {
        kafka: state.kafka.clone(),
        deadlines: Deadlines {
            step: chrono::Duration::seconds(30),
        },
        state: args.state.config(&log, true),
    };
    owners.push(spawn_sagas(&mut tasks, sagas, &shutdown, &state_metrics).owner);
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let restoring: usize = owners
            .iter()
            .map(|o| o.restoring.load(std::sync::atomic::Ordering::SeqCst))
            .sum();
        let partitions = state.kafka.partitions as usize;
        let all_owned = owners
            .iter()
            .all(|o| o.owned.load(std::sync::atomic::Ordering::SeqCst) == partitions);
        if all_owned && owners.iter().all(|o| o.ready()) {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120) || all_owned,
            "after 2 minutes this process still does not own every partition: stop every \
             process with the commands or sagas role of this prefix, then run rebuild-state again"
        );
        info!(
            restoring,
            elapsed_s = started.elapsed().as_secs(),
            "rebuilding state from the events"
        );
    }
    info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "every owned partition's state rebuilt and its changelog seeded"
    );
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// `tally reset-read-side`: empties this database's read models and checkpoints (and its
/// idempotency keys, unless the read side belonged to this log already), and records the
/// current Kafka log as theirs (see [`identity::reset`]).
pub async fn reset_read_side(common: &CommonArgs) -> anyhow::Result<identity::ResetSummary> {
    let (state, log, _) = open(common).await?;
    identity::reset(&state.pool, &state.kafka, &log).await
}

/// What [`prepare`] does before the identity check; answers the log's identity and the
/// start-up deadline too.
async fn open(common: &CommonArgs) -> anyhow::Result<(AppState, eventlog::LogIdentity, Instant)> {
    let kafka = common.kafka();
    let deadline = Instant::now() + common.startup_timeout();

    retry_until(deadline, "Kafka", || {
        eventlog::check_connection(&kafka, Duration::from_secs(3))
    })
    .await?;
    ensure_topics(
        &kafka,
        &Topics::new(&kafka.topic_prefix).all(&STREAMS, &SAGAS, &kafka),
    )
    .await?;
    let log = retry_until(deadline, "Kafka", || eventlog::log_identity(&kafka)).await?;
    info!(brokers = %kafka.brokers, prefix = %kafka.topic_prefix, partitions = kafka.partitions, %log, "kafka ready, topics in place");

    let options = common
        .database_url
        .parse()
        .context("DATABASE_URL is not a valid postgres:// URL")?;
    let pool = retry_until(deadline, "PostgreSQL", || {
        projections::connect(Clone::clone(&options), common.database_connections)
    })
    .await?;
    let projector_pool = projections::projector_pool(options, common.projection_connections);
    projections::migrate(&pool).await?;
    info!("postgres ready, migrations applied");

    let probe = kafka
        .client()
        .create()
        .context("creating the readiness Kafka client")?;
    let readiness = Readiness {
        kafka: Arc::new(probe),
        pool: pool.clone(),
        processors: Vec::new(),
        draining: Default::default(),
    };
    let state = AppState {
        kafka,
        pool,
        projector_pool,
        readiness,
        log: log.clone(),
    };
    Ok((state, log, deadline))
}

async fn retry_until<T, F, Fut>(deadline: Instant, what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(err) if Instant::now() < deadline => {
                warn!(error = %format!("{err:#}"), "{what} not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(err) => {
                return Err(
                    err.context(format!("{what} still unreachable at the start-up deadline"))
                )
            }
        }
    }
}

/// Plays `settings.roles` until `shutdown` is cancelled: the HTTP API on `listener` (which
/// the `api` role needs) and the command processors.
pub async fn run(
    listener: Option<TcpListener>,
    mut state: AppState,
    settings: RunArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    settings.validate()?;
    let local = Local::default();
    let mut tasks = JoinSet::new();
    // Workers stop only after the HTTP server has drained, so that in-flight requests
    // still get their commands processed; they finish their current transaction.
    let workers = CancellationToken::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = commands::Metrics::default();
    metrics.register(&mut registry);
    let state_metrics = eventlog::state::StateMetrics::default();
    state_metrics.register(&mut registry);
    let mut statuses = Vec::new();
    if settings.roles.contains(&Role::Commands) {
        let config = ProcessorConfig {
            kafka: state.kafka.clone(),
            dedup_window: Duration::from_secs(settings.dedup_window_secs),
            state: settings.state.config(&state.log, false),
        };
        statuses = spawn_processors(
            &mut tasks,
            &config,
            &local,
            &workers,
            &metrics,
            &state_metrics,
            |stream| settings.command_streams.iter().any(|s| s == stream),
        );
    }
    state.readiness.processors = statuses
        .iter()
        .map(|(name, s)| (*name, s.owner.clone()))
        .collect();
    if settings.roles.contains(&Role::Sagas) {
        let config = SagaConfig {
            kafka: state.kafka.clone(),
            deadlines: Deadlines {
                step: chrono::Duration::milliseconds(settings.saga_step_timeout_ms as i64),
            },
            state: settings.state.config(&state.log, false),
        };
        let status = spawn_sagas(&mut tasks, config, &workers, &state_metrics);
        state
            .readiness
            .processors
            .push(("saga", status.owner.clone()));
        status.metrics.register(&mut registry);
    }

    let progress = projections::Progress::default();
    let admin = if settings.roles.contains(&Role::Projections) {
        let projectors = projections::Projectors::new(
            state.kafka.clone(),
            state.projector_pool.clone(),
            progress.clone(),
        )?;
        projectors.metrics.register(&mut registry);
        Some(projections::admin::Admin::start(
            projectors,
            workers.clone(),
        ))
    } else {
        None
    };

    let admin_handle = admin.clone();
    let auth = settings.authenticator()?.map(Arc::new);
    if settings.roles.contains(&Role::Api) && auth.is_none() {
        warn!("AUTHENTICATION IS OFF: every request is let through. Set TALLY_JWT_HS256_SECRET or TALLY_JWT_RS256_PUBLIC_KEY_FILE before exposing this API");
    }
    if settings.roles.contains(&Role::Api) {
        let listener = listener.context("the api role needs a listener")?;
        commands::start_results_listener(&state.kafka, local.clone(), workers.clone()).await?;
        let bus = CommandBus::new(
            &state.kafka,
            local,
            Duration::from_secs(settings.command_timeout_secs),
        )?;
        let commands = commands::http::CommandApi {
            bus,
            pool: state.pool.clone(),
            metrics: metrics.clone(),
        };
        tokio::spawn(progress.clone().listen(state.pool.clone(), workers.clone()));
        let queries = projections::http::QueryApi {
            pool: state.pool.clone(),
            progress,
            topics: Topics::new(&state.kafka.topic_prefix),
        };
        let mut routes = commands::http::routes(commands).merge(projections::http::routes(queries));
        if let Some(admin) = admin {
            // Decided on the route the router matched, however its path was spelled.
            routes = routes.merge(
                projections::admin::routes(admin)
                    .route_layer(axum::middleware::from_fn(api::auth::admin_only)),
            );
        }
        tokio::spawn(commands::idempotency::expire_periodically(
            state.pool.clone(),
            settings.idempotency_key_hours,
            Duration::from_secs(600),
            workers.clone(),
        ));
        let draining = state.readiness.draining.clone();
        let limits = Limits {
            auth,
            rate: (settings.rate_limit_per_sec > 0.0).then(|| {
                api::limits::RateLimits::new(
                    settings.rate_limit_per_sec,
                    settings.rate_limit_burst,
                    settings.trusted_proxies.clone(),
                )
            }),
            request_timeout: Duration::from_secs(settings.request_timeout_secs),
        };
        let app = router(
            state,
            limits,
            ops::Ops {
                registry: Arc::new(registry),
            },
            routes,
        );
        info!(addr = %listener.local_addr()?, roles = ?settings.roles, "serving the HTTP API");
        let stop = shutdown.clone();
        let drain = Duration::from_millis(settings.shutdown_drain_ms);
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            stop.cancelled().await;
            draining.store(true, std::sync::atomic::Ordering::SeqCst);
            info!(
                drain_ms = drain.as_millis() as u64,
                "shutting down: /readyz answers 503; serving until the drain period ends"
            );
            tokio::time::sleep(drain).await;
            info!("no longer accepting connections; finishing in-flight requests");
        })
        .await
        .context("serving HTTP")?;
    } else {
        info!(roles = ?settings.roles, "running without the HTTP API");
        shutdown.cancelled().await;
        state
            .readiness
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
    info!("stopping processors, sagas and projectors after their current transaction");
    workers.cancel();
    while tasks.join_next().await.is_some() {}
    if let Some(admin) = admin_handle {
        admin.stopped().await;
    }
    info!("stopped cleanly");
    Ok(())
}

/// Runs the saga orchestrator, restarting it (it rebuilds from the log) when it fails.
fn spawn_sagas(
    tasks: &mut JoinSet<()>,
    config: SagaConfig,
    shutdown: &CancellationToken,
    state_metrics: &eventlog::state::StateMetrics,
) -> SagaRuntimeStatus {
    let status = SagaRuntimeStatus {
        state_metrics: state_metrics.clone(),
        ..Default::default()
    };
    let handle = status.clone();
    supervise(tasks, "saga orchestrator", shutdown, move |shutdown| {
        sagas::runtime::run(config.clone(), handle.clone(), shutdown)
    });
    status
}

/// The processor of each command stream `wanted` accepts, each restarted when it fails.
fn spawn_processors(
    tasks: &mut JoinSet<()>,
    config: &ProcessorConfig,
    local: &Local,
    shutdown: &CancellationToken,
    metrics: &commands::Metrics,
    state_metrics: &eventlog::state::StateMetrics,
    wanted: impl Fn(&str) -> bool,
) -> Vec<(&'static str, ProcessorStatus)> {
    type Spawn = fn(
        &mut JoinSet<()>,
        &ProcessorConfig,
        &Local,
        &CancellationToken,
        &commands::Metrics,
        &eventlog::state::StateMetrics,
    ) -> (&'static str, ProcessorStatus);
    let streams: [(&str, Spawn); 3] = [
        (Order::STREAM, spawn_processor::<Order>),
        (Inventory::STREAM, spawn_processor::<Inventory>),
        (PaymentAccount::STREAM, spawn_processor::<PaymentAccount>),
    ];
    streams
        .into_iter()
        .filter(|(stream, _)| wanted(stream))
        .map(|(_, spawn)| spawn(tasks, config, local, shutdown, metrics, state_metrics))
        .collect()
}

/// Runs `run` until `shutdown`, restarting it when it fails (it restores from the log):
/// after 1 s, doubling up to a minute while it keeps failing, and from 1 s again after a
/// run that lasted a minute. The cause is logged with what to do about it.
fn supervise<F, Fut>(
    tasks: &mut JoinSet<()>,
    name: &'static str,
    shutdown: &CancellationToken,
    mut run: F,
) where
    F: FnMut(CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    const FIRST: Duration = Duration::from_secs(1);
    const LONGEST: Duration = Duration::from_secs(60);
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        let mut backoff = FIRST;
        loop {
            let started = Instant::now();
            let result = run(shutdown.clone()).await;
            if shutdown.is_cancelled() {
                return;
            }
            if started.elapsed() >= LONGEST {
                backoff = FIRST;
            }
            match result {
                Err(e) => error!(
                    component = name,
                    error = %format!("{e:#}"),
                    restart_in_ms = backoff.as_millis() as u64,
                    "failed; restarting (it restores its partitions from Kafka). If this repeats, the error names what to fix: Kafka reachable, topics present, the state directory writable"
                ),
                Ok(()) => warn!(component = name, restart_in_ms = backoff.as_millis() as u64, "stopped without being asked; restarting"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(LONGEST);
        }
    });
}

/// Runs the processor of `A`, restarting it (it rebuilds from the log) when it fails.
fn spawn_processor<A: CommandStream>(
    tasks: &mut JoinSet<()>,
    config: &ProcessorConfig,
    local: &Local,
    shutdown: &CancellationToken,
    metrics: &commands::Metrics,
    state_metrics: &eventlog::state::StateMetrics,
) -> (&'static str, ProcessorStatus) {
    let status = ProcessorStatus {
        metrics: metrics.clone(),
        state_metrics: state_metrics.clone(),
        ..Default::default()
    };
    let (config, local, handle) = (config.clone(), local.clone(), status.clone());
    supervise(tasks, A::STREAM, shutdown, move |shutdown| {
        processor::run::<A>(config.clone(), local.clone(), handle.clone(), shutdown)
    });
    (A::STREAM, status)
}

/// Who may call, how often, and for how long.
pub struct Limits {
    /// `None`: authentication is off.
    pub auth: Option<Arc<api::auth::Authenticator>>,
    /// `None`: no rate limit.
    pub rate: Option<api::limits::RateLimits>,
    pub request_timeout: Duration,
}

/// The HTTP API: every route, the correlation id in and out, request tracing, and the
/// API.md error shape for unknown routes.
/// `routes` are the command, query and admin routes this process serves.
pub fn router(state: AppState, limits: Limits, ops: ops::Ops, routes: Router) -> Router {
    Router::new()
        .route("/healthz", get(readiness::healthz))
        .route(
            "/readyz",
            get(readiness::readyz).with_state(state.readiness.clone()),
        )
        .route("/metrics", get(ops::metrics).with_state(ops))
        .route("/openapi.json", get(openapi::openapi_json))
        .merge(routes)
        .fallback(|| async { ApiError::not_found("no such route; see /openapi.json") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        // Innermost first: the principal's bucket needs authentication, which needs the
        // address's bucket to have let the request through (bad tokens are limited too).
        .layer(axum::middleware::from_fn_with_state(
            limits.rate.clone(),
            api::limits::limit_by_principal,
        ))
        .layer(axum::middleware::from_fn_with_state(
            limits.auth,
            api::auth::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            limits.rate,
            api::limits::limit_by_address,
        ))
        .layer(axum::middleware::from_fn(api::limits::header_limits))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ))
        .layer(axum::middleware::map_response(api::client_errors_in_shape))
        .layer(PropagateRequestIdLayer::new(CORRELATION_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request<_>| {
                    let correlation_id = req
                        .extensions()
                        .get::<RequestId>()
                        .and_then(|id| id.header_value().to_str().ok())
                        .unwrap_or_default();
                    // A command route fills in the rest, so every line of its path carries them.
                    let span = tracing::info_span!(
                        "http",
                        method = %req.method(),
                        path = %req.uri().path(),
                        correlation_id,
                        trace_id = tracing::field::Empty,
                        command_id = tracing::field::Empty,
                        aggregate_id = tracing::field::Empty,
                    );
                    // Exported spans continue the caller's trace.
                    if !span.is_disabled() {
                        let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(
                            &span,
                            telemetry::parent_context(req.headers()),
                        );
                    }
                    span
                })
                // A 503 from /readyz while partitions rebuild, or a command timing out, is news for
                // an operator, not an error in Tally: real faults are logged where they happen.
                .on_failure(DefaultOnFailure::new().level(tracing::Level::WARN)),
        )
        .layer(SetRequestIdLayer::new(CORRELATION_ID, MakeRequestUuid))
}

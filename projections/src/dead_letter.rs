//! Parking a record that can never apply in the dead-letter topic, with the error, its
//! source and who gave up on it in its headers (API.md, Dead letters).

use std::time::Duration;

use eventlog::rdkafka::message::OwnedMessage;
use eventlog::rdkafka::producer::FutureRecord;
use eventlog::rdkafka::Message;
use eventlog::Topics;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::health::{Backoff, Health};
use crate::kinds::Kind;
use crate::projectors::Projectors;

/// Sends `message` to the dead-letter topic, retrying while Kafka is away; false when
/// `shutdown` came first (the record is read again on the next start).
pub(crate) async fn park(
    ctx: &Projectors,
    kind: Kind,
    message: &OwnedMessage,
    error: &str,
    health: &Health,
    shutdown: &CancellationToken,
) -> bool {
    warn!(
        projection = kind.name(),
        topic = message.topic(),
        partition = message.partition(),
        offset = message.offset(),
        error,
        "a record that can never apply; dead-lettered"
    );
    let mut backoff = Backoff::default();
    loop {
        match send(ctx, kind, message, error).await {
            Ok(()) => return true,
            Err(e) => {
                warn!(projection = kind.name(), error = %format!("{e:#}"), "dead-lettering failed; retrying");
                health.failing(format!("{e:#}"), true);
                if !backoff.wait(true, shutdown).await {
                    return false;
                }
            }
        }
    }
}

async fn send(
    ctx: &Projectors,
    kind: Kind,
    message: &OwnedMessage,
    error: &str,
) -> anyhow::Result<()> {
    let source = format!(
        "{}/{}/{}",
        message.topic(),
        message.partition(),
        message.offset()
    );
    let headers =
        eventlog::dead_letter_headers(error, &source, &format!("{} projection", kind.name()));
    let dlq = Topics::new(&ctx.kafka.topic_prefix).dead_letters();
    let record = FutureRecord::to(&dlq)
        .partition(0)
        .key(&source)
        .payload(message.payload().unwrap_or_default())
        .headers(headers);
    ctx.dead_letters
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("writing to the dead-letter topic: {e}"))?;
    ctx.stats[&kind].dead_lettered.inc();
    Ok(())
}

//! Idempotency keys, kept in PostgreSQL: which key a principal first used for which
//! request, the command id it was given, and the answer once known.
//!
//! Keys are per principal (with authentication on), so one customer can neither probe nor
//! squat another's keys; without authentication every caller is the same principal `""`.
//! Only a command's own outcome uses up a key ([`uses_up_key`]); an answer that says
//! the command was not applied releases the claim, so a corrected retry may use the key
//! again. A `503` never does: the command may have reached the log.
//!
//! The HTTP key is the convenience; the processor's record of command ids and outcomes is
//! the authority for exactly-once, and it outlives the key (see `--dedup-window-secs`):
//! a retry whose key has no stored answer yet (a `503 command_timeout`, or a process that
//! died between the Kafka commit and the write here) is sent again with the SAME command
//! id, and the processor answers it with the first outcome instead of applying it again.

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// The HTTP answer to a keyed command: what its key remembers and answers a retry with.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub command_id: Uuid,
    pub status: u16,
    pub body: Value,
}

/// What a key is to this request.
#[derive(Debug, PartialEq)]
pub enum Claim {
    /// First use: send the command with this id.
    New(Uuid),
    /// Seen with the same request: send again with the same id (the processor answers
    /// with the first outcome), or answer with the stored outcome when there is one.
    Repeat {
        command_id: Uuid,
        answer: Option<Answer>,
    },
    /// Seen with another method, path or body.
    Reused,
}

/// Does an answer with this status use up its key? Only the command's own outcome does
/// (API.md): `2xx`, `409`, `422`. A processor's `400`, `403`, `404` or `408` (a
/// refusal that applied nothing) leaves the key free for a corrected retry.
pub fn uses_up_key(status: u16) -> bool {
    (200..300).contains(&status) || status == 409 || status == 422
}

/// Where `principal`'s `key` is stored. Without a principal (authentication off) it is
/// the key itself, as it always was; with one, the principal and the key joined by a
/// character no key may contain (keys are printable ASCII). The table and its primary
/// key are unchanged, so processes of the previous version keep working during a rolling
/// upgrade.
fn scoped(principal: &str, key: &str) -> String {
    if principal.is_empty() {
        key.to_string()
    } else {
        format!("{principal}\u{1f}{key}")
    }
}

/// Claims `principal`'s `key` for the request whose fingerprint is `fingerprint`.
pub async fn claim(
    pool: &PgPool,
    principal: &str,
    key: &str,
    fingerprint: &str,
) -> sqlx::Result<Claim> {
    let stored_key = scoped(principal, key);
    let fresh = Uuid::new_v4();
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (key, fingerprint, command_id) VALUES ($1, $2, $3)
         ON CONFLICT (key) DO NOTHING RETURNING command_id",
    )
    .bind(&stored_key)
    .bind(fingerprint)
    .bind(fresh)
    .fetch_optional(pool)
    .await?;
    if inserted.is_some() {
        return match legacy(pool, principal, key, fingerprint).await? {
            Some(first) => {
                // The same request, keyed before keys were per principal: its answer.
                release(pool, fresh).await?;
                Ok(first)
            }
            None => Ok(Claim::New(fresh)),
        };
    }
    let stored: Option<(String, Uuid, Option<i16>, Option<Value>)> = sqlx::query_as(
        "SELECT fingerprint, command_id, status, body FROM idempotency_keys WHERE key = $1",
    )
    .bind(&stored_key)
    .fetch_optional(pool)
    .await?;
    let Some((stored, command_id, status, body)) = stored else {
        // Released (or expired) between the insert and the read: claim it afresh.
        return Box::pin(claim(pool, principal, key, fingerprint)).await;
    };
    if stored != fingerprint {
        return Ok(Claim::Reused);
    }
    Ok(repeat(command_id, status, body))
}

fn repeat(command_id: Uuid, status: Option<i16>, body: Option<Value>) -> Claim {
    let answer = match (status, body) {
        (Some(status), Some(body)) => Some(Answer {
            command_id,
            status: status as u16,
            body,
        }),
        _ => None,
    };
    Claim::Repeat { command_id, answer }
}

/// The same request under the same key from before keys were per principal (stored
/// unscoped, its fingerprint ending in the caller): a retry across the upgrade gets
/// the first command id and answer, not a second application.
async fn legacy(
    pool: &PgPool,
    principal: &str,
    key: &str,
    fingerprint: &str,
) -> sqlx::Result<Option<Claim>> {
    if principal.is_empty() {
        return Ok(None);
    }
    let found: Option<(Uuid, Option<i16>, Option<Value>)> = sqlx::query_as(
        "SELECT command_id, status, body FROM idempotency_keys WHERE key = $1 AND fingerprint = $2",
    )
    .bind(key)
    .bind(format!("{fingerprint} {principal}"))
    .fetch_optional(pool)
    .await?;
    Ok(found.map(|(command_id, status, body)| repeat(command_id, status, body)))
}

/// Settles the first answer to the key that holds `result.command_id`: stores it when
/// it [`uses_up_key`], else releases the claim (only while it is still unanswered).
pub async fn settle(pool: &PgPool, result: &Answer) -> sqlx::Result<()> {
    if !uses_up_key(result.status) {
        return release(pool, result.command_id).await;
    }
    sqlx::query(
        "UPDATE idempotency_keys SET status = $2, body = $3
         WHERE command_id = $1 AND status IS NULL",
    )
    .bind(result.command_id)
    .bind(result.status as i16)
    .bind(&result.body)
    .execute(pool)
    .await?;
    Ok(())
}

/// Frees the claim of `command_id`, which got no answer of its own.
pub async fn release(pool: &PgPool, command_id: Uuid) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM idempotency_keys WHERE command_id = $1 AND status IS NULL")
        .bind(command_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Deletes keys older than `hours` (API.md keeps them at least 24 hours).
pub async fn expire(pool: &PgPool, hours: u32) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(hours => $1)",
    )
    .bind(hours as i32)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Expires keys older than `hours` every `every`, until `shutdown`.
pub async fn expire_periodically(
    pool: PgPool,
    hours: u32,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        match expire(&pool, hours).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, hours, "expired idempotency keys"),
            Err(e) => {
                tracing::warn!(error = %e, "expiring idempotency keys failed; trying again later")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

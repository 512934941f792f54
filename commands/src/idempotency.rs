//! Idempotency keys, kept in PostgreSQL: which key a principal first used for which
//! request, the command id it was given, and the answer once known.
//!
//! Keys are per principal (with authentication on), so one customer can neither probe nor
//! squat another's keys; without authentication every caller is the same principal `""`.
//! Only a command's own outcome uses up a key ([`uses_up_key`]); any other answer
//! releases the claim, so a corrected retry may use the key again.
//!
//! The HTTP key is the convenience; the processor's record of command ids and outcomes is
//! the authority for exactly-once, and it outlives the key (see `--dedup-window-secs`):
//! a retry whose key has no stored answer yet (a `503 command_timeout`, or a process that
//! died between the Kafka commit and the write here) is sent again with the SAME command
//! id, and the processor answers it with the first outcome instead of applying it again.

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::wire::CommandResult;

/// What a key is to this request.
#[derive(Debug, PartialEq)]
pub enum Claim {
    /// First use: send the command with this id.
    New(Uuid),
    /// Seen with the same request: send again with the same id (the processor answers
    /// with the first outcome), or answer with the stored outcome when there is one.
    Repeat {
        command_id: Uuid,
        answer: Option<CommandResult>,
    },
    /// Seen with another method, path or body.
    Reused,
}

/// Does an answer with this status use up its key? Only the command's own outcome does
/// (API.md): `2xx`, `409`, `422`. A `400`, `401`, `403`, `404`, `408`, `413`, `415`,
/// `429` or `503` leaves the key free for a corrected retry.
pub fn uses_up_key(status: u16) -> bool {
    (200..300).contains(&status) || status == 409 || status == 422
}

/// Claims `principal`'s `key` for the request whose fingerprint is `fingerprint`.
pub async fn claim(
    pool: &PgPool,
    principal: &str,
    key: &str,
    fingerprint: &str,
) -> sqlx::Result<Claim> {
    let fresh = Uuid::new_v4();
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (principal, key, fingerprint, command_id) VALUES ($1, $2, $3, $4)
         ON CONFLICT (principal, key) DO NOTHING RETURNING command_id",
    )
    .bind(principal)
    .bind(key)
    .bind(fingerprint)
    .bind(fresh)
    .fetch_optional(pool)
    .await?;
    if let Some(id) = inserted {
        return Ok(Claim::New(id));
    }
    let stored: Option<(String, Uuid, Option<i16>, Option<Value>)> = sqlx::query_as(
        "SELECT fingerprint, command_id, status, body FROM idempotency_keys
         WHERE principal = $1 AND key = $2",
    )
    .bind(principal)
    .bind(key)
    .fetch_optional(pool)
    .await?;
    let Some((stored, command_id, status, body)) = stored else {
        // Released (or expired) between the insert and the read: claim it afresh.
        return Box::pin(claim(pool, principal, key, fingerprint)).await;
    };
    if stored != fingerprint {
        return Ok(Claim::Reused);
    }
    let answer = match (status, body) {
        (Some(status), Some(body)) => Some(CommandResult {
            command_id,
            status: status as u16,
            body,
            idempotent: true,
        }),
        _ => None,
    };
    Ok(Claim::Repeat { command_id, answer })
}

/// Settles the key's first answer: stores it when it [`uses_up_key`], else releases the
/// claim (only if it is still this command's and still unanswered).
pub async fn settle(
    pool: &PgPool,
    principal: &str,
    key: &str,
    result: &CommandResult,
) -> sqlx::Result<()> {
    let query = if uses_up_key(result.status) {
        sqlx::query(
            "UPDATE idempotency_keys SET status = $4, body = $5
             WHERE principal = $1 AND key = $2 AND command_id = $3 AND status IS NULL",
        )
        .bind(principal)
        .bind(key)
        .bind(result.command_id)
        .bind(result.status as i16)
        .bind(&result.body)
    } else {
        release_query(principal, key, result.command_id)
    };
    query.execute(pool).await?;
    Ok(())
}

/// Frees a claim that got no answer of its own (the command was never sent).
pub async fn release(
    pool: &PgPool,
    principal: &str,
    key: &str,
    command_id: Uuid,
) -> sqlx::Result<()> {
    release_query(principal, key, command_id)
        .execute(pool)
        .await?;
    Ok(())
}

fn release_query<'q>(
    principal: &'q str,
    key: &'q str,
    command_id: Uuid,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(
        "DELETE FROM idempotency_keys
         WHERE principal = $1 AND key = $2 AND command_id = $3 AND status IS NULL",
    )
    .bind(principal)
    .bind(key)
    .bind(command_id)
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

//! Idempotency keys, kept in PostgreSQL: which key was first used for which request, the
//! command id it was given, and the answer once known. A key is global, so reuse with
//! another path or body is caught whichever aggregate it names.

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

/// Claims `key` for the request whose fingerprint is `fingerprint`.
pub async fn claim(pool: &PgPool, key: &str, fingerprint: &str) -> sqlx::Result<Claim> {
    let fresh = Uuid::new_v4();
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (key, fingerprint, command_id) VALUES ($1, $2, $3)
         ON CONFLICT (key) DO NOTHING RETURNING command_id",
    )
    .bind(key)
    .bind(fingerprint)
    .bind(fresh)
    .fetch_optional(pool)
    .await?;
    if let Some(id) = inserted {
        return Ok(Claim::New(id));
    }
    let (stored, command_id, status, body): (String, Uuid, Option<i16>, Option<Value>) =
        sqlx::query_as(
            "SELECT fingerprint, command_id, status, body FROM idempotency_keys WHERE key = $1",
        )
        .bind(key)
        .fetch_one(pool)
        .await?;
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

/// Stores the answer given to a key's first request.
pub async fn record(pool: &PgPool, key: &str, result: &CommandResult) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE idempotency_keys SET status = $2, body = $3 WHERE key = $1 AND status IS NULL",
    )
    .bind(key)
    .bind(result.status as i16)
    .bind(&result.body)
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes keys older than `hours` (API.md keeps them at least 24 hours).
pub async fn expire(pool: &PgPool, hours: i32) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(hours => $1)",
    )
    .bind(hours)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

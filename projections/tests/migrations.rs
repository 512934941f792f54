//! Migrations against the real PostgreSQL (scripts/services up; DATABASE_URL).

use sqlx::PgPool;

#[sqlx::test(migrations = false)]
async fn migrations_create_the_checkpoint_table_and_run_twice_harmlessly(pool: PgPool) {
    projections::migrate(&pool).await.unwrap();
    projections::migrate(&pool).await.unwrap();

    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, projections::MIGRATOR.iter().count());

    sqlx::query("INSERT INTO projection_checkpoints (projection, topic, partition, next_offset) VALUES ('orders', 't', 0, 42)")
        .execute(&pool)
        .await
        .unwrap();
    let next: i64 = sqlx::query_scalar(
        "SELECT next_offset FROM projection_checkpoints WHERE projection = 'orders'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(next, 42);

    let negative =
        sqlx::query("INSERT INTO projection_checkpoints VALUES ('orders', 't', 1, -1, now())")
            .execute(&pool)
            .await;
    assert!(negative.is_err(), "a negative offset must be refused");
}

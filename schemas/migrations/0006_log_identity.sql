-- Which Kafka log the read side of each topic prefix belongs to (ADR 7): Kafka's cluster
-- id and the log id Tally writes once into `<prefix>.meta`. Start refuses a database whose
-- row names another log: its read models, checkpoints and idempotency keys describe a
-- history that is not this log's. `tally reset-read-side` empties them and rewrites the row.
CREATE TABLE log_identity (
    topic_prefix text        PRIMARY KEY,
    cluster_id   text        NOT NULL,
    log_id       uuid        NOT NULL,
    adopted_at   timestamptz NOT NULL DEFAULT now()
);

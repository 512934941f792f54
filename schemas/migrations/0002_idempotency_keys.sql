-- Idempotency-Key registry of the command API. `fingerprint` is the method, path and
-- canonical JSON body of the first request; `status`/`body` its answer once known.
CREATE TABLE idempotency_keys (
    key         text        PRIMARY KEY,
    fingerprint text        NOT NULL,
    command_id  uuid        NOT NULL,
    status      smallint,
    body        jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

-- The fulfilment saga read model (projection `sagas`): one row per saga (= order), with
-- the saga's folded state; `GET /v1/orders/{id}/saga` renders its timeline from it.
CREATE TABLE sagas (
    saga_id        uuid        PRIMARY KEY,
    status         text        NOT NULL,
    failure_reason text,
    state          jsonb       NOT NULL,
    version        bigint      NOT NULL,
    updated_at     timestamptz NOT NULL
);
CREATE INDEX sagas_by_status ON sagas (status);

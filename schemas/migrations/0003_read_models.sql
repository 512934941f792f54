-- Read models, written only by the projectors (projections crate). Each row carries the
-- aggregate's `version` (sequence of the last event applied), which makes re-applying an
-- event a no-op.

CREATE TABLE orders (
    order_id            uuid        PRIMARY KEY,
    customer_id         text        NOT NULL,
    status              text        NOT NULL,
    lines               jsonb       NOT NULL,
    total_cents         bigint      NOT NULL,
    version             bigint      NOT NULL,
    rejection_reason    text,
    cancellation_reason text,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);
-- A customer's orders, newest first, ties by order id (the list's keyset cursor).
CREATE INDEX orders_by_customer ON orders (customer_id, created_at DESC, order_id DESC);

CREATE TABLE inventory (
    sku        text        PRIMARY KEY,
    on_hand    bigint      NOT NULL,
    reserved   bigint      NOT NULL,
    version    bigint      NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE accounts (
    customer_id   text        PRIMARY KEY,
    balance_cents bigint      NOT NULL,
    version       bigint      NOT NULL,
    updated_at    timestamptz NOT NULL
);

-- Every envelope, for history and time travel.
CREATE TABLE event_journal (
    aggregate_type text    NOT NULL,
    aggregate_id   text    NOT NULL,
    sequence       bigint  NOT NULL,
    envelope       jsonb   NOT NULL,
    topic          text    NOT NULL,
    "partition"    integer NOT NULL,
    "offset"       bigint  NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

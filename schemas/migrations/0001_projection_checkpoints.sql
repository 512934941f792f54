-- Where each projection has got to in each partition. A projector writes its read-model
-- changes and its checkpoint in ONE transaction, which is what makes its effects
-- exactly-once; on start it seeks every partition to `next_offset`.
CREATE TABLE projection_checkpoints (
    projection  text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL CHECK (partition >= 0),
    next_offset bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);

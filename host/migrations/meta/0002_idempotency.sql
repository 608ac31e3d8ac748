-- First answers of writes sent with an Idempotency-Key, for 24 hours. The
-- answer is kept as the token and time only: the rest is re-rendered from
-- the (identical) request, so no participant id is stored here.
CREATE TABLE idempotency (
    tenant_id  text NOT NULL,
    key        text NOT NULL,
    body_hash  bytea NOT NULL,
    token      text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key)
);

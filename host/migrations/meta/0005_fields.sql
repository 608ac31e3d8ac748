-- Field tokens. One tokenize call seals its values as one field set
-- (token -> value) through the encryption host, like a record; here each
-- token only points at its set. A dtk_ token can sit in several sets (the
-- same value tokenized again), all of which hold the same value.
CREATE TABLE field_sets (
    id               text PRIMARY KEY,
    tenant_id        text NOT NULL REFERENCES tenants (id),
    study_id         text NOT NULL REFERENCES studies (id),
    participant_hash bytea,
    key_ref          text NOT NULL,
    blob_ref         text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    deleted          boolean NOT NULL DEFAULT false
);
CREATE INDEX field_sets_by_participant ON field_sets (study_id, participant_hash);

CREATE TABLE field_tokens (
    token  text NOT NULL,
    set_id text NOT NULL REFERENCES field_sets (id) ON DELETE CASCADE,
    PRIMARY KEY (token, set_id)
);

-- Idempotent writes other than record creation keep their whole first
-- answer (answers that could hold a participant id or value never do).
ALTER TABLE idempotency ADD COLUMN answer jsonb;

-- BLOB tokens: like records, only a keyed hash of the participant; the
-- plaintext digest is returned once, never stored.
CREATE TABLE blobs (
    token            text PRIMARY KEY,
    tenant_id        text NOT NULL REFERENCES tenants (id),
    study_id         text NOT NULL REFERENCES studies (id),
    participant_hash bytea NOT NULL,
    key_ref          text NOT NULL,
    blob_ref         text NOT NULL,
    size             bigint NOT NULL,
    content_type     text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    deleted          boolean NOT NULL DEFAULT false
);
CREATE INDEX blobs_by_participant ON blobs (study_id, participant_hash);

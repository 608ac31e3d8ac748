-- The API host's metadata: who may do what, and what each token means.
-- Participant ids appear only as keyed hashes; record content lives only in
-- the encrypted envelope on the blob nodes.
CREATE TABLE tenants (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    deleted    boolean NOT NULL DEFAULT false
);

CREATE TABLE api_keys (
    id           text PRIMARY KEY,
    tenant_id    text NOT NULL REFERENCES tenants (id),
    role         text NOT NULL CHECK (role IN ('admin', 'writer', 'reader', 'auditor')),
    name         text,
    studies      text[],
    can_link     boolean NOT NULL DEFAULT false,
    secret_hash  bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    last_used_at timestamptz,
    revoked      boolean NOT NULL DEFAULT false
);

CREATE TABLE studies (
    id             text PRIMARY KEY,
    tenant_id      text NOT NULL REFERENCES tenants (id),
    name           text NOT NULL,
    kek_id         text NOT NULL,
    require_reason boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    deleted        boolean NOT NULL DEFAULT false
);
CREATE INDEX studies_by_tenant ON studies (tenant_id);

CREATE TABLE records (
    token            text PRIMARY KEY,
    tenant_id        text NOT NULL REFERENCES tenants (id),
    study_id         text NOT NULL REFERENCES studies (id),
    participant_hash bytea NOT NULL,
    version          integer NOT NULL,
    key_ref          text NOT NULL,
    blob_ref         text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    deleted          boolean NOT NULL DEFAULT false
);
CREATE INDEX records_by_participant ON records (study_id, participant_hash);

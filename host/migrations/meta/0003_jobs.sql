-- Jobs the maintenance worker runs (deletions now; rotation and scrubbing
-- later). A worker leases a job; a lease that runs out lets another take it
-- over, so a crashed worker's job resumes.
CREATE TABLE jobs (
    id          text PRIMARY KEY,
    tenant_id   text NOT NULL,
    kind        text NOT NULL,
    target      text NOT NULL,
    state       text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),
    done        bigint NOT NULL DEFAULT 0,
    total       bigint NOT NULL DEFAULT 0,
    errors      integer NOT NULL DEFAULT 0,
    receipt     jsonb,
    lease_until timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz
);
CREATE INDEX jobs_waiting ON jobs (state, created_at);

-- A failed attempt waits before the next (exponential back-off, so a key or
-- encryption host that is down for minutes does not use up a deletion's
-- attempts), and a job's updates come only from the worker that holds its
-- lease (a worker whose lease ran out cannot overwrite its successor).
ALTER TABLE jobs ADD COLUMN not_before timestamptz;
ALTER TABLE jobs ADD COLUMN lease_holder text;

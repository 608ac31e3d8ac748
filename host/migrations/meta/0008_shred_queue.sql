-- Sealed objects that must be destroyed: a deleted record or BLOB, the old
-- version of a corrected record. A row is written in the same transaction
-- that unlinks the object, so nothing unlinked is ever forgotten: the API
-- host destroys it at once and removes the row; if that fails (or the API
-- host dies first) the maintenance worker finishes the job. A study's KEK
-- rotation first destroys what is queued of the study, so it never rewraps
-- a key that is to be destroyed.
CREATE TABLE shred_queue (
    study_id  text NOT NULL,
    key_ref   text NOT NULL,
    blob_ref  text NOT NULL,
    queued_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key_ref, blob_ref)
);
CREATE INDEX shred_queue_by_age ON shred_queue (queued_at);
CREATE INDEX shred_queue_by_study ON shred_queue (study_id);

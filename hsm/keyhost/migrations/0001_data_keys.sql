-- One row per record's keys. Deliberately no timestamp, serial or other
-- ordering column: nothing here may be joined to blob rows by time.
CREATE TABLE data_keys (
    key_ref      bytea    PRIMARY KEY,
    kek_id       text     NOT NULL,
    kek_version  integer  NOT NULL,
    wrapped_enc  bytea    NOT NULL,
    wrapped_mac  bytea    NOT NULL,
    nonce        bytea    NOT NULL,
    format       smallint NOT NULL
);
CREATE INDEX data_keys_by_kek ON data_keys (kek_id, kek_version);

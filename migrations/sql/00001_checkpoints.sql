-- +goose Up
CREATE SCHEMA IF NOT EXISTS changefeed;

-- The cdc-publisher's own record of the last LSN it confirmed to the slot.
-- It is written after Kafka acknowledged everything up to confirmed_lsn and
-- before that LSN is sent to PostgreSQL as the flush position, so at any time
-- confirmed_lsn >= the slot's confirmed_flush_lsn. A slot found ahead of it,
-- or missing while a row exists, means changes may have been skipped.
CREATE TABLE changefeed.cdc_checkpoint (
    slot_name     text PRIMARY KEY,
    confirmed_lsn pg_lsn NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- The couch-follower's checkpoint per database: a seq such that it and every
-- change before it in feed order were acknowledged by Kafka. seq is opaque.
CREATE TABLE changefeed.couch_checkpoint (
    source      text NOT NULL,
    db          text NOT NULL,
    seq         text NOT NULL,
    db_identity text NOT NULL DEFAULT '',
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, db)
);

-- +goose Down
DROP TABLE changefeed.couch_checkpoint;
DROP TABLE changefeed.cdc_checkpoint;

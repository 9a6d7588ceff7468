-- +goose Up
-- The cluster and WAL history a cdc checkpoint belongs to. An LSN means
-- something only on the cluster (system_identifier) and timeline that wrote
-- it: after a restore from backup, a move to another cluster or a failover,
-- a copied checkpoint would make the publisher skip changes. NULL in rows
-- written before this migration: the publisher fills them in on its next
-- start (it cannot check those rows, and says so in its log).
ALTER TABLE changefeed.cdc_checkpoint
    ADD COLUMN system_identifier numeric(20,0),
    ADD COLUMN timeline integer;

-- +goose Down
ALTER TABLE changefeed.cdc_checkpoint
    DROP COLUMN timeline,
    DROP COLUMN system_identifier;

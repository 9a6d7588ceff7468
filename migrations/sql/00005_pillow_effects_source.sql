-- +goose Up
-- Once records an effect per (pillow, document, state read), the document
-- named by its source as everywhere else: the same id and revision in two
-- Couch databases (replicas) or a Couch and a SQL copy are different
-- documents. Rows recorded before keep their (id, version) key under an
-- empty source; an effect whose stub is redelivered just after the upgrade
-- can run once more.
ALTER TABLE changefeed.pillow_effects
    ADD COLUMN data_source_type text NOT NULL DEFAULT '',
    ADD COLUMN data_source_name text NOT NULL DEFAULT '';

ALTER TABLE changefeed.pillow_effects
    DROP CONSTRAINT pillow_effects_pkey,
    ADD CONSTRAINT pillow_effects_pkey
        PRIMARY KEY (pillow, data_source_type, data_source_name, document_id, version);

-- +goose Down
DELETE FROM changefeed.pillow_effects e
USING changefeed.pillow_effects f
WHERE e.pillow = f.pillow AND e.document_id = f.document_id AND e.version = f.version
  AND (e.done_at, e.data_source_type, e.data_source_name) < (f.done_at, f.data_source_type, f.data_source_name);

ALTER TABLE changefeed.pillow_effects
    DROP CONSTRAINT pillow_effects_pkey,
    ADD CONSTRAINT pillow_effects_pkey PRIMARY KEY (pillow, document_id, version);

ALTER TABLE changefeed.pillow_effects
    DROP COLUMN data_source_name,
    DROP COLUMN data_source_type;

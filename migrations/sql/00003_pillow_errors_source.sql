-- +goose Up
-- A pillow can read the same document_id from two sources (HQ's Couch→SQL
-- migration keeps ids), so an error row names its document by
-- (data_source_type, data_source_name, document_id), as the stub does.
ALTER TABLE changefeed.pillow_errors
    ADD COLUMN data_source_type text NOT NULL DEFAULT '',
    ADD COLUMN data_source_name text NOT NULL DEFAULT '';

-- Existing rows carry their source in the stub they recorded.
UPDATE changefeed.pillow_errors
SET data_source_type = coalesce(stub->>'data_source_type', ''),
    data_source_name = coalesce(stub->>'data_source_name', '');

ALTER TABLE changefeed.pillow_errors
    DROP CONSTRAINT pillow_errors_pillow_processor_document_id_key,
    ADD CONSTRAINT pillow_errors_document_key
        UNIQUE (pillow, processor, data_source_type, data_source_name, document_id);

-- +goose Down
-- Rows of one id from several sources collapse to the most recent one.
DELETE FROM changefeed.pillow_errors e
USING changefeed.pillow_errors f
WHERE e.pillow = f.pillow AND e.processor = f.processor AND e.document_id = f.document_id
  AND (e.updated_at, e.id) < (f.updated_at, f.id);

ALTER TABLE changefeed.pillow_errors
    DROP CONSTRAINT pillow_errors_document_key,
    ADD CONSTRAINT pillow_errors_pillow_processor_document_id_key
        UNIQUE (pillow, processor, document_id);

ALTER TABLE changefeed.pillow_errors
    DROP COLUMN data_source_name,
    DROP COLUMN data_source_type;

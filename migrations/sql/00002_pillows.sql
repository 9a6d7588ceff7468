-- +goose Up
-- Per-document processor failures (HQ's PillowError). One row per
-- (pillow, processor, document): a newer failure of the same document
-- replaces the older one's version and keeps counting attempts.
CREATE TABLE changefeed.pillow_errors (
    id            bigserial PRIMARY KEY,
    pillow        text NOT NULL,
    processor     text NOT NULL DEFAULT '',
    document_id   text NOT NULL,
    version       text NOT NULL,
    stub          jsonb NOT NULL,
    error_type    text NOT NULL,
    error_message text NOT NULL,
    attempts      integer NOT NULL DEFAULT 1,
    next_attempt  timestamptz NOT NULL,
    dead          boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (pillow, processor, document_id)
);
CREATE INDEX pillow_errors_due ON changefeed.pillow_errors (pillow, next_attempt) WHERE NOT dead;

-- Side effects that must happen once per document version. The row is
-- written in the same transaction as the effect when the effect is in
-- PostgreSQL, so the effect and its record commit or roll back together.
CREATE TABLE changefeed.pillow_effects (
    pillow      text NOT NULL,
    document_id text NOT NULL,
    version     text NOT NULL,
    done_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pillow, document_id, version)
);

-- +goose Down
DROP TABLE changefeed.pillow_effects;
DROP TABLE changefeed.pillow_errors;

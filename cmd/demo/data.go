package main

// schema is a small slice of CommCare HQ's SQL tables.
const schema = `
CREATE TABLE IF NOT EXISTS form_processor_commcarecasesql (
    case_id   text PRIMARY KEY,
    domain    text NOT NULL,
    type      text NOT NULL,
    name      text,
    owner_id  text,
    closed    boolean NOT NULL DEFAULT false,
    deleted   boolean NOT NULL DEFAULT false,
    modified_on timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS form_processor_commcarecaseindexsql (
    id            bigserial PRIMARY KEY,
    case_id       text NOT NULL,
    domain        text NOT NULL,
    referenced_id text NOT NULL,
    identifier    text NOT NULL
);
ALTER TABLE form_processor_commcarecaseindexsql REPLICA IDENTITY FULL;
CREATE TABLE IF NOT EXISTS form_processor_xforminstancesql (
    form_id  text PRIMARY KEY,
    domain   text NOT NULL,
    xmlns    text,
    doc_type text NOT NULL DEFAULT 'XFormInstance'
);
-- Routed by doc_type: a DELETE must carry it.
ALTER TABLE form_processor_xforminstancesql REPLICA IDENTITY FULL;
`

// routingYAML maps the demo tables to topics (see cdc/testdata/routing.yaml).
const routingYAML = `
tables:
  - table: form_processor_commcarecasesql
    topic: case-sql
    data_source_name: case-sql
    document_type: CommCareCase
    id_column: case_id
    domain_column: domain
    subtype_column: type
    deletion:
      column: deleted
  - table: form_processor_commcarecaseindexsql
    topic: case-sql
    data_source_name: case-sql
    document_type: CommCareCase
    domain_column: domain
    parent:
      id_column: case_id
  - table: form_processor_xforminstancesql
    topic: form-sql
    data_source_name: form-sql
    document_type_column: doc_type
    id_column: form_id
    domain_column: domain
    subtype_column: xmlns
    deletion:
      doc_type_suffix: -Deleted
`

// esMarker is where -es-url adds an Elasticsearch processor.
const esMarker = "#elasticsearch\n"

// pillowsYAML: one pillow per source, both into reporting tables.
const pillowsYAML = `
stores:
  postgres:
    - url: ${CHANGEFEED_SOURCE_URL}
      tables:
        - {source: case-sql, table: form_processor_commcarecasesql, id_column: case_id, type_column: type, domain_column: domain, deleted_column: deleted}
  couch:
    - url: ${CHANGEFEED_COUCH_URL}
      databases: [commcarehq]
pillows:
  - name: case-report
    topics: [case-sql]
    batch: {max_stubs: 500, max_wait: 50ms}
    processors:
      - postgres:
          table: report_cases
          columns:
            - {name: domain, type: text}
            - {name: name, type: text}
            - {name: owner_id, type: text}
            - {name: closed, type: boolean}
#elasticsearch
  - name: user-report
    topics: [commcare-user]
    batch: {max_stubs: 500, max_wait: 50ms}
    processors:
      - postgres:
          table: report_users
          columns:
            - {name: domain, type: text}
            - {name: username, type: text}
`

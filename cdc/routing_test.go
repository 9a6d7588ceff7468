package cdc

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseRoutingValid(t *testing.T) {
	r, err := ParseRouting("routing.yaml", []byte(`
topics: [custom]
document_type_topics:
  Widget: widgets
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
  - table: hq.form_processor_commcarecaseindexsql
    document_type: CommCareCase
    domain_column: domain
    parent:
      id_column: case_id
  - table: forms
    document_type_column: doc_type
    id_column: form_id
    deletion:
      doc_type_suffix: -Deleted
`))
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Tables) != 3 {
		t.Fatalf("tables = %d", len(r.Tables))
	}
	c := r.Table("public", "form_processor_commcarecasesql")
	if c == nil || c.Topic != "case-sql" || c.DataSourceName != "case-sql" || c.DeletedColumn != "deleted" || c.IsChild() {
		t.Fatalf("case route = %+v", c)
	}
	idx := r.Table("hq", "form_processor_commcarecaseindexsql")
	if idx == nil || !idx.IsChild() || idx.docIDColumn() != "case_id" || idx.DataSourceName != "form_processor_commcarecaseindexsql" {
		t.Fatalf("index route = %+v", idx)
	}
	if got := r.topicFor("Widget"); got != "widgets" {
		t.Fatalf("topicFor(Widget) = %q", got)
	}
	if got := r.topicFor("XFormInstance"); got != TopicFormSQL {
		t.Fatalf("topicFor(XFormInstance) = %q", got)
	}
	if got := r.topicFor("Unknown"); got != TopicMeta {
		t.Fatalf("topicFor(Unknown) = %q", got)
	}
	topics := strings.Join(r.Topics(), ",")
	for _, want := range []string{"case-sql", "form-sql", "sms", "ledger", "location", "meta", "custom", "widgets"} {
		if !strings.Contains(topics, want) {
			t.Errorf("Topics() = %s, lacks %s", topics, want)
		}
	}
}

func TestParseRoutingErrors(t *testing.T) {
	tests := []struct {
		name string
		yaml string
		want []string // substrings of the error
	}{
		{"unknown top-level field", "tabels: []", []string{"bad.yaml", "tabels"}},
		{"unknown table field", `
tables:
  - table: cases
    document_type: C
    id_column: id
    domian_column: d`, []string{"bad.yaml", "table public.cases", "field domian_column: unknown"}},
		{"unknown nested field", `
tables:
  - table: cases
    document_type: C
    id_column: id
    deletion: {colum: x}`, []string{"table public.cases", "field deletion.colum: unknown"}},
		{"missing table", `
tables:
  - document_type: C
    id_column: id`, []string{"table #1", "field table: required"}},
		{"bad table name", `
tables:
  - table: a.b.c
    document_type: C
    id_column: id`, []string{"field table", "a.b.c"}},
		{"own schema", `
tables:
  - table: changefeed.cdc_checkpoint
    document_type: C
    id_column: slot_name`, []string{"table changefeed.cdc_checkpoint", "field table"}},
		{"no document type", `
tables:
  - table: cases
    id_column: id`, []string{"table public.cases", "field document_type: required"}},
		{"both document types", `
tables:
  - table: cases
    document_type: C
    document_type_column: t
    id_column: id`, []string{"table public.cases", "document_type_column"}},
		{"no id", `
tables:
  - table: cases
    document_type: C`, []string{"table public.cases", "field id_column: required"}},
		{"id and parent", `
tables:
  - table: idx
    document_type: C
    id_column: id
    parent: {id_column: case_id}`, []string{"table public.idx", "parent.id_column"}},
		{"empty parent", `
tables:
  - table: idx
    document_type: C
    parent: {}`, []string{"table public.idx", "field parent.id_column: required"}},
		{"child with deletion", `
tables:
  - table: idx
    document_type: C
    parent: {id_column: case_id}
    deletion: {column: deleted}`, []string{"table public.idx", "field deletion"}},
		{"suffix without type column", `
tables:
  - table: cases
    document_type: C
    id_column: id
    deletion: {doc_type_suffix: -Deleted}`, []string{"table public.cases", "field deletion.doc_type_suffix"}},
		{"empty deletion", `
tables:
  - table: cases
    document_type: C
    id_column: id
    deletion: {}`, []string{"table public.cases", "field deletion"}},
		{"bad topic", `
tables:
  - table: cases
    topic: "no spaces"
    document_type: C
    id_column: id`, []string{"table public.cases", "field topic"}},
		{"duplicate table", `
tables:
  - table: cases
    document_type: C
    id_column: id
  - table: public.cases
    document_type: C
    id_column: id`, []string{"table public.cases", "listed twice"}},
		{"bad extra topic", `topics: ["a b"]`, []string{"bad.yaml", "field topics"}},
		{"bad default topic", `default_topic: "?"`, []string{"field default_topic"}},
		{"not yaml", "tables: [", []string{"bad.yaml"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseRouting("bad.yaml", []byte(tt.yaml))
			if err == nil {
				t.Fatal("no error")
			}
			if !errors.Is(err, ErrConfig) {
				t.Errorf("error %v is not ErrConfig", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

func TestLoadRoutingMissingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nope.yaml")
	_, err := LoadRouting(path)
	if !errors.Is(err, ErrConfig) || !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), path) {
		t.Fatalf("err = %v", err)
	}
}

func TestLoadRoutingExample(t *testing.T) {
	r, err := LoadRouting("testdata/routing.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Tables) == 0 {
		t.Fatal("example routes no table")
	}
}

package pillowconf

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/pillows"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

var exampleEnv = env(map[string]string{
	"CHANGEFEED_SOURCE_URL": "postgres://u:secret@127.0.0.1:1/app",
	"CHANGEFEED_COUCH_URL":  "http://127.0.0.1:5984",
})

func TestParseExample(t *testing.T) {
	data, err := os.ReadFile("testdata/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	f, err := Parse(data, exampleEnv)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(f.Names(), ","); got != "case-report,form-sms" {
		t.Fatalf("names = %s", got)
	}
	p, _ := f.Find("case-report")
	if u := f.Stores.Postgres[0].URL; u != "postgres://u:secret@127.0.0.1:1/app" {
		t.Fatalf("env not expanded: %s", u)
	}
	if p.Batch.MaxStubs != 500 || p.Processors[0].Postgres.Columns[1].Field != "owner.id" {
		t.Fatalf("pillow = %+v", p)
	}
	m, err := jsonOf(&p.Processors[1].Elasticsearch.Mapping)
	if err != nil || string(m) != `{"properties":{"name":{"type":"keyword"}}}` {
		t.Fatalf("mapping = %s, %v", m, err)
	}
}

// Errors name the pillow and the field.
func TestParseErrors(t *testing.T) {
	base := `stores:
  postgres:
    - url: postgres://x
      tables: [{source: cases, table: cases, id_column: id}]
pillows:
`
	tests := []struct{ name, yaml, want string }{
		{"no topics", "  - name: p1\n    processors: [{custom: x}]\n", "pillow p1: topics"},
		{"no processors", "  - name: p1\n    topics: [t]\n", "pillow p1: processors"},
		{"two kinds", "  - name: p1\n    topics: [t]\n    processors: [{custom: x, postgres: {table: a, columns: [{name: c}]}}]\n", "pillow p1: processors[0]: exactly one"},
		{"sink table", "  - name: p1\n    topics: [t]\n    processors: [{postgres: {columns: [{name: c}]}}]\n", "pillow p1: processors[0].postgres.table"},
		{"es index", "  - name: p1\n    topics: [t]\n    processors: [{elasticsearch: {urls: [http://x]}}]\n", "pillow p1: processors[0].elasticsearch.index"},
		{"duplicate", "  - name: p1\n    topics: [t]\n    processors: [{custom: x}]\n  - name: p1\n    topics: [t]\n    processors: [{custom: x}]\n", "pillow p1: name: defined twice"},
		{"unknown key", "  - name: p1\n    topic: [t]\n    processors: [{custom: x}]\n", "field topic not found"},
		{"bad duration", "  - name: p1\n    topics: [t]\n    batch: {max_wait: soon}\n    processors: [{custom: x}]\n", "soon"},
		{"negative", "  - name: p1\n    topics: [t]\n    retry: {max_attempts: -1}\n    processors: [{custom: x}]\n", "pillow p1: retry.max_attempts"},
		{"missing env", "  - name: p1\n    topics: [\"${NOPE}\"]\n    processors: [{custom: x}]\n", "NOPE"},
		// Two pillows in one consumer group would split its partitions.
		{"shared group", "  - name: p1\n    topics: [t]\n    processors: [{custom: x}]\n  - name: p2\n    group: p1\n    topics: [u]\n    processors: [{custom: x}]\n", `pillow p2: group: consumer group "p1" is already pillow p1's`},
		{"shared explicit group", "  - name: p1\n    group: g\n    topics: [t]\n    processors: [{custom: x}]\n  - name: p2\n    group: g\n    topics: [t]\n    processors: [{custom: x}]\n", `pillow p2: group: consumer group "g"`},
		// A second document would otherwise be ignored silently.
		{"second document", "  - name: p1\n    topics: [t]\n    processors: [{custom: x}]\n---\npillows:\n  - name: p2\n    topics: [t]\n    processors: [{custom: x}]\n", "line 9: a second YAML document"},
		{"env not a number", "  - name: p1\n    topics: [t]\n    batch:\n      max_stubs: ${N}\n    processors: [{custom: x}]\n", "cannot unmarshal !!str `many`"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(base+tt.yaml), env(map[string]string{"N": "many"}))
			if err == nil || !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
		})
	}
	dup := "stores:\n  postgres:\n    - url: x\n      tables: [{source: a, table: a, id_column: id}, {source: a, table: b, id_column: id}]\npillows: [{name: p, topics: [t], processors: [{custom: x}]}]\n"
	if _, err := Parse([]byte(dup), env(nil)); err == nil || !strings.Contains(err.Error(), "stores.postgres[0].tables[1].source") {
		t.Fatalf("duplicate source: %v", err)
	}
}

// ${VAR} works in numeric and boolean fields; string fields keep the text
// of a number as it is.
func TestParseEnvTypes(t *testing.T) {
	yml := `stores:
  postgres:
    - url: ${URL}
      tables: [{source: cases, table: cases, id_column: id}]
pillows:
  - name: p1
    topics: [t]
    dedup_size: ${DEDUP}
    batch:
      max_stubs: ${MAX}
      max_wait: ${WAIT}
    retry: {max_attempts: "${ATTEMPTS}", dead_letter_topic: "${DLT}"}
    processors:
      - elasticsearch:
          urls: [http://x]
          index: i
          password: ${PW}
          refresh: ${REFRESH}
`
	f, err := Parse([]byte(yml), env(map[string]string{"URL": "postgres://x", "DEDUP": "1000", "MAX": "250", "WAIT": "50ms",
		"ATTEMPTS": "7", "DLT": "0012", "PW": "12345", "REFRESH": "true"}))
	if err != nil {
		t.Fatal(err)
	}
	p := f.Pillows[0]
	es := p.Processors[0].Elasticsearch
	if p.DedupSize != 1000 || p.Batch.MaxStubs != 250 || p.Batch.MaxWait != Duration(50*time.Millisecond) ||
		p.Retry.MaxAttempts != 7 || p.Retry.DeadLetterTopic != "0012" || es.Password != "12345" || !es.Refresh {
		t.Fatalf("pillow = %+v, es = %+v", p, es)
	}
}

type nopProc struct{ name string }

func (p nopProc) Name() string                                   { return p.name }
func (p nopProc) Process(context.Context, []*doc.Document) error { return nil }

// Build wires stores, sinks and custom processors without connecting.
func TestBuild(t *testing.T) {
	data, err := os.ReadFile("testdata/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	f, err := Parse(data, exampleEnv)
	if err != nil {
		t.Fatal(err)
	}
	var gotOpts map[string]string
	reg := Registry{"sms-once": func(_ context.Context, e Env) (pillows.Processor, error) {
		if err := e.Options.Decode(&gotOpts); err != nil {
			return nil, err
		}
		return nopProc{e.Name}, nil
	}}
	b, err := Build(context.Background(), f, nil, Deps{DefaultPostgresURL: "postgres://u@127.0.0.1:1/rep", Registry: reg})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if len(b.Pillows) != 2 {
		t.Fatalf("%d pillows", len(b.Pillows))
	}
	cr, sms := b.Pillows[0], b.Pillows[1]
	if cr.Group != "case-report" || len(cr.Processors) != 2 || len(cr.Stores) != 2 {
		t.Fatalf("case-report = %+v", cr)
	}
	if sms.Group != "form-sms-v2" || sms.Processors[0].Name() != "sms" || gotOpts["template"] == "" || sms.Retry.DeadLetterTopic != "form-sms-dead-letter" {
		t.Fatalf("form-sms = %+v opts %v", sms, gotOpts)
	}
	if _, err := Build(context.Background(), f, []string{"nope"}, Deps{Registry: reg}); err == nil || !strings.Contains(err.Error(), `no pillow named "nope"`) {
		t.Fatalf("unknown name: %v", err)
	}
	if _, err := Build(context.Background(), f, []string{"form-sms"}, Deps{}); err == nil || !strings.Contains(err.Error(), "pillow form-sms: processors[0].custom") {
		t.Fatalf("unregistered custom: %v", err)
	}
}

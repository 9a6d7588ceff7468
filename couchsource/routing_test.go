package couchsource

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestCouchDefaultRouting(t *testing.T) {
	r, err := LoadRouting("")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		docType, topic, domainField, subtypeField string
		deleted                                   bool
	}{
		{"CommCareCase", "case", "domain", "type", false},
		{"CommCareCase-Deleted", "case", "domain", "type", true},
		{"XFormInstance", "form", "domain", "xmlns", false},
		{"XFormArchived", "form", "domain", "xmlns", false},
		{"CommCareUser", "commcare-user", "domain", "", false},
		{"CommCareUser-Deleted", "commcare-user", "domain", "", true},
		{"WebUser", "web-user", "domain", "", false},
		{"Group", "group", "domain", "", false},
		{"Domain", "domain", "name", "", false},
		{"Application", "app", "domain", "", false},
		{"Application-Deleted", "app", "domain", "", true},
		{"SomethingElse", "meta", "domain", "", false},
		{"", "meta", "domain", "", false},
		{"Whatever-Deleted", "meta", "domain", "", true},
	}
	for _, tt := range tests {
		rule, deleted := r.Route(tt.docType)
		if rule.Topic != tt.topic || rule.DomainField != tt.domainField || rule.SubtypeField != tt.subtypeField || deleted != tt.deleted {
			t.Errorf("Route(%q) = %+v, %v; want topic %s domain %s subtype %s deleted %v",
				tt.docType, rule, deleted, tt.topic, tt.domainField, tt.subtypeField, tt.deleted)
		}
	}
	want := []string{"app", "case", "commcare-user", "domain", "form", "group", "meta", "web-user"}
	if got := r.Topics(); !slices.Equal(got, want) {
		t.Fatalf("Topics = %v, want %v", got, want)
	}
	keep := r.fields()
	for _, f := range []string{"_id", "_rev", "_deleted", "doc_type", "domain", "name", "type", "xmlns"} {
		if !keep[f] {
			t.Errorf("projection lacks %q", f)
		}
	}
}

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "routing.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestCouchLoadRoutingFile(t *testing.T) {
	p := writeFile(t, `
default_topic: other
document_type_topics:
  CommCareCase: cases-v2
  MyDoc: my-topic
document_fields:
  MyDoc: {domain_field: project, subtype_field: kind}
include_design_docs: true
selector:
  doc_type: {"$in": [MyDoc]}
`)
	r, err := LoadRouting(p)
	if err != nil {
		t.Fatal(err)
	}
	if rule, _ := r.Route("MyDoc"); rule != (Rule{Topic: "my-topic", DomainField: "project", SubtypeField: "kind"}) {
		t.Errorf("MyDoc = %+v", rule)
	}
	if rule, _ := r.Route("CommCareCase"); rule.Topic != "cases-v2" || rule.SubtypeField != "type" {
		t.Errorf("CommCareCase = %+v (topic replaced, default fields kept)", rule)
	}
	if rule, _ := r.Route("Unmapped"); rule.Topic != "other" {
		t.Errorf("default topic = %s", rule.Topic)
	}
	if rule, _ := r.Route("WebUser"); rule.Topic != "web-user" {
		t.Errorf("defaults lost: WebUser = %s", rule.Topic)
	}
	if !r.IncludeDesignDocs || r.Selector == nil {
		t.Errorf("include_design_docs/selector not read: %+v", r)
	}
	if !r.fields()["project"] || !r.fields()["kind"] {
		t.Error("projection lacks the file's fields")
	}
	empty, err := LoadRouting(writeFile(t, ""))
	if err != nil {
		t.Fatalf("empty file: %v", err)
	}
	if rule, _ := empty.Route("CommCareCase"); rule.Topic != "case" {
		t.Errorf("empty file lost defaults: %+v", rule)
	}
}

func TestCouchLoadRoutingErrors(t *testing.T) {
	tests := []struct {
		name, body string
		want       []string // substrings of the error
	}{
		{"bad topic", "document_type_topics:\n  MyDoc: \"bad topic\"\n", []string{"document_type_topics", "MyDoc", "bad topic"}},
		{"bad default", "default_topic: \"a/b\"\n", []string{"default_topic"}},
		{"deleted type", "document_type_topics:\n  MyDoc-Deleted: x\n", []string{"MyDoc-Deleted", "base doc_type"}},
		{"bad field", "document_fields:\n  MyDoc: {domain_field: \"a\\\"b\"}\n", []string{"document_fields", "MyDoc", "domain_field"}},
		{"unknown key", "tables: []\n", []string{"tables"}},
		{"not yaml", "document_type_topics: [\n", []string{"yaml"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := writeFile(t, tt.body)
			_, err := LoadRouting(p)
			if !errors.Is(err, ErrRouting) {
				t.Fatalf("err = %v, want ErrRouting", err)
			}
			for _, s := range append(tt.want, p) {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not mention %q", err, s)
				}
			}
		})
	}
	if _, err := LoadRouting("/nonexistent/routing.yaml"); !errors.Is(err, ErrRouting) || !strings.Contains(err.Error(), "/nonexistent/routing.yaml") {
		t.Errorf("missing file: %v", err)
	}
}

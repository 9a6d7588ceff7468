package couchsource

import (
	"errors"
	"regexp"
	"testing"

	"github.com/changefeed/changefeed/internal/fuzzcheck"
)

var lineRE = regexp.MustCompile(`line \d+`)

// FuzzLoadRouting: whatever the file holds, loading it does not panic, and
// a rejection is an ErrRouting naming a line.
func FuzzLoadRouting(f *testing.F) {
	for _, s := range []string{
		"default_topic: meta\ndocument_type_topics:\n  MyDoc: my-topic\ndocument_fields:\n  MyDoc: {domain_field: project, subtype_field: kind}\ninclude_design_docs: false\nselector: {doc_type: {\"$in\": [CommCareCase, XFormInstance]}}\n",
		"document_type_topics:\n  X-Deleted: t\n",
		"document_type_topics:\n  \"\": t\n",
		"document_type_topics:\n  X: \"bad topic\"\n",
		"document_fields:\n  X: {domain_field: \"a\\\"b\"}\n",
		"default_topic: [a]\n",
		"unknown: 1\n",
		"selector: &a [*a]\n",
		"a: &a [*a, *a]\nb: &b [*a, *a]\n",
		"- x\n",
		"",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var r *Routing
		var err error
		fuzzcheck.Bounded(t, 4<<20+4096*uint64(len(b)), "loading", func() { r, err = parseRouting("fuzz.yaml", b) })
		if err != nil {
			if !errors.Is(err, ErrRouting) || !lineRE.MatchString(err.Error()) {
				t.Fatalf("error without ErrRouting or a line: %v", err)
			}
			return
		}
		r.Topics()
		r.fields()
		r.Route("CommCareCase-Deleted")
	})
}

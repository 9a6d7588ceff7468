package cdc

import (
	"errors"
	"os"
	"regexp"
	"testing"

	"github.com/changefeed/changefeed/internal/fuzzcheck"
)

var lineRE = regexp.MustCompile(`line \d+`)

// FuzzParseRouting: whatever the file holds, parsing it does not panic, and
// a rejection is an ErrConfig naming a line.
func FuzzParseRouting(f *testing.F) {
	example, err := os.ReadFile("testdata/routing.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(example)
	f.Add([]byte(testRoutingYAML))
	for _, s := range []string{
		"tables:\n  - table: a.b.c\n    document_type: T\n    id_column: id\n",
		"tables:\n  - table: t\n    document_type: T\n    id_column: id\n  - table: public.t\n    document_type: T\n    id_column: id\n",
		"tables:\n  - {table: t, document_type: T, document_type_column: c, id_column: id}\n",
		"tables:\n  - {table: t, document_type: T, parent: {}}\n",
		"tables:\n  - {table: t, document_type: T, id_column: id, deletion: x}\n",
		"tables:\n  - [t]\n  - {tabel: t}\n",
		"tables:\n  - {table: changefeed.x, document_type: T, id_column: id}\n",
		"topics: [\"a b\"]\n",
		"default_topic: \"\"\ndocument_type_topics: {X: \"\"}\n",
		"tables: &a [*a]\n",
		"",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var r *Routing
		var err error
		fuzzcheck.Bounded(t, 4<<20+4096*uint64(len(b)), "parsing", func() { r, err = ParseRouting("fuzz.yaml", b) })
		if err != nil {
			if !errors.Is(err, ErrConfig) || !lineRE.MatchString(err.Error()) {
				t.Fatalf("error without ErrConfig or a line: %v", err)
			}
			return
		}
		r.Topics()
		for i := range r.Tables {
			r.Tables[i].columns()
		}
	})
}

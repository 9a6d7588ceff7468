package pillowconf

import (
	"errors"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/changefeed/changefeed/internal/fuzzcheck"
)

var lineRE = regexp.MustCompile(`line \d+`)

// FuzzParse: whatever the file holds, parsing it does not panic, and a
// rejection is an ErrConfig naming a line.
func FuzzParse(f *testing.F) {
	example, err := os.ReadFile("testdata/example.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(example)
	for _, s := range []string{
		"pillows:\n  - name: p1\n    topics: [t]\n    processors: [{custom: x}]\n  - name: p1\n    topics: [t]\n    processors: [{custom: x}]\n",
		"pillows:\n  - name: p\n    topics: [t]\n    batch: {max_wait: 1x}\n    processors: [{custom: x}]\n",
		"pillows:\n  - name: p\n    topics: [t]\n    batch: {max_stubs: -1}\n    processors: [{postgres: {table: a, columns: [{name: \"\"}]}}]\n",
		"stores:\n  postgres:\n    - url: ${UNSET}\n      tables: []\n",
		"stores:\n  couch:\n    - url: x\n    - url: y\npillows: []\n",
		"pillows: &a [*a]\n",
		"a: b: c\n",
		"",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var err error
		fuzzcheck.Bounded(t, 4<<20+4096*uint64(len(b)), "parsing", func() { _, err = Parse(b, exampleEnv) })
		if err != nil && (!errors.Is(err, ErrConfig) || !lineRE.MatchString(err.Error())) {
			t.Fatalf("error without ErrConfig or a line: %v", err)
		}
	})
}

// The file is decoded from a re-encoding (after ${VAR} expansion): errors
// still name the lines of the file, comments and blank lines included.
func TestParseErrorsNameFileLines(t *testing.T) {
	for in, want := range map[string]string{
		"# c\n\n\npillows:\n\n  # x\n  - name: p\n\n    topics: [t]\n    bogus: 1\n    processors: [{custom: x}]\n":    "line 10: field bogus",
		"# c\n\npillows:\n  - name: p\n\n    topics: [t]\n    batch: {max_stubs: -1}\n    processors: [{custom: x}]\n": "line 7: pillow p: batch.max_stubs",
		"stores:\n  postgres:\n    - url: x\n      tables:\n        - {table: t, id_column: id}\n":                     "line 5: stores.postgres[0].tables[0].source",
		"stores: {}\n\npillows: []\n": "line 3: pillows: at least one pillow",
	} {
		_, err := Parse([]byte(in), exampleEnv)
		if err == nil || !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%q) = %v, want %q", in, err, want)
		}
	}
}

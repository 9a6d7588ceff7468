package couchsource

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/changefeed/changefeed/internal/fuzzcheck"
)

// The follower never decodes a whole document: the projection (project.go)
// rewrites the _changes response while it streams, and kivik decodes the
// rewritten rows (encoding/json). FuzzProject compares that pipeline with
// a full encoding/json decode of the same bytes: value by value, the rows
// decode to the same values, except that each document ("doc" members
// outside documents in feed mode, the top-level object in document mode)
// holds only the wanted fields, a wanted value longer than maxFieldLen
// reads as null; the stream fails at the same value, or not at all.
//
// Deliberate differences, which the reference applies too: nesting deeper
// than maxOuterDepth outside documents is refused (a change row nests four
// levels).

// refValue is the reference: a raw JSON value as the follower should see it
// after projection.
func refValue(raw json.RawMessage, isDoc bool, depth int) (any, error) {
	raw = bytes.TrimLeft(raw, " \t\r\n")
	if len(raw) == 0 {
		return nil, errors.New("empty value")
	}
	switch {
	case depth > maxOuterDepth && !isDoc:
		return nil, errors.New("nested too deep outside a document")
	case raw[0] == '{' && isDoc:
		var m map[string]json.RawMessage
		if err := json.Unmarshal(raw, &m); err != nil {
			return nil, err
		}
		out := map[string]any{}
		for k, v := range m {
			if !testKeep[k] {
				continue
			}
			var c bytes.Buffer
			if err := json.Compact(&c, v); err != nil {
				return nil, err
			}
			if c.Len() > maxFieldLen {
				out[k] = nil
				continue
			}
			d := json.NewDecoder(&c)
			d.UseNumber()
			var x any
			if err := d.Decode(&x); err != nil {
				return nil, err
			}
			out[k] = x
		}
		return out, nil
	case raw[0] == '{':
		var m map[string]json.RawMessage
		if err := json.Unmarshal(raw, &m); err != nil {
			return nil, err
		}
		out := make(map[string]any, len(m))
		for k, v := range m {
			x, err := refValue(v, k == "doc", depth+1)
			if err != nil {
				return nil, err
			}
			out[k] = x
		}
		return out, nil
	case raw[0] == '[':
		var a []json.RawMessage
		if err := json.Unmarshal(raw, &a); err != nil {
			return nil, err
		}
		out := make([]any, len(a))
		for i, v := range a {
			x, err := refValue(v, false, depth+1)
			if err != nil {
				return nil, err
			}
			out[i] = x
		}
		return out, nil
	}
	d := json.NewDecoder(bytes.NewReader(raw))
	d.UseNumber()
	var x any
	err := d.Decode(&x)
	return x, err
}

// decodeValues decodes a stream of JSON values as kivik reads a feed: one
// after the other, whitespace between them.
func decodeValues(r io.Reader, each func(json.RawMessage) (any, error)) ([]any, error) {
	d := json.NewDecoder(r)
	d.UseNumber()
	var out []any
	for {
		var raw json.RawMessage
		err := d.Decode(&raw)
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		v, err := each(raw)
		if err != nil {
			return out, err
		}
		out = append(out, v)
	}
}

func checkProject(t *testing.T, in []byte, docMode bool, chunked bool) {
	want, wantErr := decodeValues(bytes.NewReader(in), func(raw json.RawMessage) (any, error) {
		return refValue(raw, docMode, 0)
	})

	var src io.Reader = bytes.NewReader(in)
	if chunked {
		src = iotest.HalfReader(src)
	}
	out := bytes.NewBuffer(make([]byte, 0, len(in)+4096))
	var projErr error
	// The projection's memory does not grow with the input: its buffers,
	// a key and one kept value.
	fuzzcheck.Bounded(t, 1<<20, "projection", func() {
		pr := projectStream(io.NopCloser(src), testKeep, docMode)
		_, projErr = out.ReadFrom(pr)
		pr.Close()
	})
	if len(in) > 0 && out.Len() > len(in)+16 {
		t.Fatalf("projection of %d bytes wrote %d", len(in), out.Len())
	}
	got, gotErr := decodeValues(bytes.NewReader(out.Bytes()), func(raw json.RawMessage) (any, error) {
		var x any
		d := json.NewDecoder(bytes.NewReader(raw))
		d.UseNumber()
		err := d.Decode(&x)
		return x, err
	})
	if projErr != nil {
		if !errors.Is(projErr, errSyntax) {
			t.Fatalf("projection error %v is not errSyntax", projErr)
		}
		gotErr = projErr
	}
	if (gotErr == nil) != (wantErr == nil) {
		t.Fatalf("input %q\nprojected %q\nerror %v, encoding/json %v", in, out.Bytes(), gotErr, wantErr)
	}
	if len(got) < len(want) || gotErr == nil && len(got) != len(want) {
		t.Fatalf("input %q\nprojected %q\n%d values (%v), encoding/json %d (%v)", in, out.Bytes(), len(got), gotErr, len(want), wantErr)
	}
	for i := range want {
		if !reflect.DeepEqual(got[i], want[i]) {
			t.Fatalf("input %q\nvalue %d:\n got %#v\nwant %#v", in, i, got[i], want[i])
		}
	}
}

func FuzzProject(f *testing.F) {
	row := func(doc string) string {
		return `{"seq":"1-g1AAAA","id":"a","changes":[{"rev":"1-x"}],"doc":` + doc + "}\n"
	}
	for _, s := range []string{
		row(`{"_id":"a","_rev":"1-x","doc_type":"CommCareCase","domain":"d","type":"patient","name":"n","p":{"doc_type":"no"}}`),
		row(`{"_id":"b","_rev":"2-y","_deleted":true}`) + "\n\n" + `{"last_seq":"2-g1AAAA","pending":0}` + "\n",
		`{"results":[{"id":"a","doc":{"doc_type":"Group","domain":"d"},"seq":1},{"id":"b","doc":null,"seq":2}],"last_seq":2}`,
		row(`{"doc\u005ftype":"Esc","domain":"a\\\"b\\","type":"x\\","d\u006fc_type":"E2"}`),
		row(`{"doc_type":"A","doc_type":"B","DOC_TYPE":"C","domain":null,"domain":{"a":[1,2]}}`),
		row(`{"doc_type":"` + strings.Repeat("x", maxFieldLen+1) + `","domain":"d"}`),
		row(`{"doc_type":"A","doc_type":"` + strings.Repeat("y", maxFieldLen) + `"}`),
		row(`{"x":` + strings.Repeat("[", 10001) + strings.Repeat("]", 10001) + `,"doc_type":"deep"}`),
		row(`{"doc_type":` + strings.Repeat("[", 10000) + strings.Repeat("]", 10000) + `}`),
		strings.Repeat("[", 17) + strings.Repeat("]", 17),
		row("{\"doc_type\":\"a\xff\xfe\",\"x\":\"\x00\",\"domain\":\"\\ud800\"}"),
		row(`{"n":1e999,"m":-0.0e-0,"doc_type":12345678901234567890123,"domain":tru}`),
		row(`{"x":[1,2,`),
		`{"seq":1,"id":"a","doc":{"doc_type":"X","domain":"d`,
		row(`{"x":{"a" "b"},"doc_type":"t"}`) + row(`{"x":["a":1],"doc_type":"t"}`),
		row(`{"x":nul,"doc_type":"t"}`) + row(`{"x":01,"doc_type":"t"}`) + row(`{"x":"\q","doc_type":"t"}`),
		`{"do\u0063":{"doc_type":"A","big":"` + strings.Repeat("z", 100) + `"}}`,
		`{"doc":{"doc_type":"A"}} {"doc":{}}` + "\n" + `{"a":1}x` + "\n",
		"<html><body>502 Bad Gateway</body></html>",
		`1 2 "three" null [true,false]`,
		"",
	} {
		f.Add([]byte(s), false, false)
		f.Add([]byte(s), true, true)
	}
	f.Fuzz(func(t *testing.T, in []byte, docMode, chunked bool) {
		checkProject(t, in, docMode, chunked)
	})
}

// TestCouchProjectFuzzSeeds names the seed inputs in failures.
func TestCouchProjectRejectsLikeEncodingJSON(t *testing.T) {
	for i, in := range []string{
		`{"doc":{"x":tru,"doc_type":"t"}}`,
		`{"doc":{"x":{"a" "b"},"doc_type":"t"}}`,
		"{\"doc\":{\"x\":\"\x01\",\"doc_type\":\"t\"}}",
		`{"doc":{"x":"\q","doc_type":"t"}}`,
		`{"doc":{"x":01,"doc_type":"t"}}`,
	} {
		t.Run(fmt.Sprint(i), func(t *testing.T) { checkProject(t, []byte(in), false, false) })
	}
}

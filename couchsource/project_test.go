package couchsource

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"
)

var testKeep = map[string]bool{"_id": true, "_rev": true, "_deleted": true, "doc_type": true, "domain": true, "type": true}

func project(t *testing.T, in io.Reader, docMode bool) (string, error) {
	t.Helper()
	out := projectStream(io.NopCloser(in), testKeep, docMode)
	defer out.Close()
	b, err := io.ReadAll(out)
	return string(b), err
}

func TestCouchProjectContinuousRows(t *testing.T) {
	in := `{"seq":1,"id":"a","changes":[{"rev":"1-x"}],"doc":{"_id":"a","_rev":"1-x","doc_type":"CommCareCase","big":"` +
		strings.Repeat("z", 100) + `","nested":{"doc":{"doc_type":"inner"},"domain":"inner"},"domain":"d1","type":"patient","list":[1,{"a":[true,null]},"]"]}}` + "\n" +
		"\n\n" + // heartbeats
		`{"seq":"2-g1AAAA","id":"b","deleted":true,"changes":[{"rev":"2-y"}],"doc":{"_id":"b","_rev":"2-y","_deleted":true}}` + "\n" +
		`{"last_seq":"2-g1AAAA","pending":0}` + "\n"
	got, err := project(t, strings.NewReader(in), false)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"seq":1,"id":"a","changes":[{"rev":"1-x"}],"doc":{"_id":"a","_rev":"1-x","doc_type":"CommCareCase","domain":"d1","type":"patient"}}` + "\n" +
		"\n\n" +
		`{"seq":"2-g1AAAA","id":"b","deleted":true,"changes":[{"rev":"2-y"}],"doc":{"_id":"b","_rev":"2-y","_deleted":true}}` + "\n" +
		`{"last_seq":"2-g1AAAA","pending":0}` + "\n"
	if got != want {
		t.Fatalf("projection\n got %s\nwant %s", got, want)
	}
}

func TestCouchProjectLongpoll(t *testing.T) {
	in := `{"results":[
		{"id":"a","changes":[{"rev":"1-x"}],"doc":{"doc_type":"Group","name":"g","domain":"d","_id":"a","_rev":"1-x"},"seq":1},
		{"id":"b","changes":[{"rev":"1-y"}],"doc":null,"seq":2}
	],"last_seq":2}`
	got, err := project(t, strings.NewReader(in), false)
	if err != nil {
		t.Fatal(err)
	}
	var v struct {
		Results []struct {
			ID  string
			Doc map[string]any
		}
		LastSeq int `json:"last_seq"`
	}
	if err := json.Unmarshal([]byte(got), &v); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, got)
	}
	if len(v.Results) != 2 || v.LastSeq != 2 {
		t.Fatalf("parsed %+v", v)
	}
	if d := v.Results[0].Doc; d["doc_type"] != "Group" || d["domain"] != "d" || d["name"] != nil {
		t.Fatalf("doc = %v", d)
	}
	if v.Results[1].Doc != nil {
		t.Fatalf("null doc became %v", v.Results[1].Doc)
	}
}

func TestCouchProjectDocMode(t *testing.T) {
	in := `{"_id":"c","_rev":"3-a","doc_type":"CommCareCase","domain":"d","type":"t","junk":{"x":[1,2,3]}}`
	got, err := project(t, strings.NewReader(in), true)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"_id":"c","_rev":"3-a","doc_type":"CommCareCase","domain":"d","type":"t"}`; got != want {
		t.Fatalf("got %s, want %s", got, want)
	}
}

func TestCouchProjectEscapesAndOddKeys(t *testing.T) {
	longKey := strings.Repeat("k", 300)
	in := `{"id":"a\"b","seq":1,"` + longKey + `":"v","doc":{"doc\u005ftype":"Esc","domain":"a\\\"b\\","` + longKey + `":{"doc_type":"no"},"type":"x\\"}}`
	got, err := project(t, iotest.OneByteReader(strings.NewReader(in)), false)
	if err != nil {
		t.Fatal(err)
	}
	var row struct {
		ID  string
		Doc map[string]any
	}
	if err := json.Unmarshal([]byte(got), &row); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, got)
	}
	if row.ID != `a"b` || row.Doc["doc_type"] != "Esc" || row.Doc["domain"] != `a\"b\` || row.Doc["type"] != `x\` {
		t.Fatalf("row = %+v", row)
	}
	if !strings.Contains(got, longKey) {
		t.Fatal("a long key outside the document was not copied")
	}
}

func TestCouchProjectDropsOversizedField(t *testing.T) {
	in := `{"id":"a","doc":{"doc_type":"` + strings.Repeat("x", maxFieldLen+10) + `","domain":"d"}}`
	got, err := project(t, strings.NewReader(in), false)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"id":"a","doc":{"doc_type":null,"domain":"d"}}`; got != want {
		t.Fatalf("got %.200s, want %s", got, want)
	}
}

func TestCouchProjectMalformed(t *testing.T) {
	for name, in := range map[string]string{
		"truncated row":   `{"seq":1,"id":"a","doc":{"doc_type":"X","domain":"d`,
		"truncated value": `{"seq":1,"id":"a","doc":{"doc_type":"X","big":[1,2,`,
		"html page":       "<html><body>502 Bad Gateway</body></html>",
		"missing colon":   `{"seq" 1}`,
		"unbalanced":      `{"id":"a","doc":{"x":]}}`,
		"deep nesting":    strings.Repeat("[", 100),
	} {
		t.Run(name, func(t *testing.T) {
			_, err := project(t, strings.NewReader(in), false)
			if err == nil {
				t.Fatal("no error")
			}
			if !errors.Is(err, errSyntax) {
				t.Fatalf("err = %v, want errSyntax", err)
			}
		})
	}
}

// TestProjectRandomDocs compares the projection of random documents, fed in
// random chunk sizes, with the wanted fields decoded from the full document.
func TestCouchProjectRandomDocs(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 200 {
		doc := map[string]any{}
		for range rng.IntN(12) {
			doc[randString(rng, 8)] = randValue(rng, 3)
		}
		for _, k := range []string{"doc_type", "domain", "type"} {
			if rng.IntN(3) > 0 {
				doc[k] = randString(rng, 40)
			}
		}
		// Long strings cross the reader's buffer, escapes included.
		if rng.IntN(4) == 0 {
			doc["domain"] = strings.Repeat(`\"`, 9000) + randString(rng, 5)
		}
		body, err := json.Marshal(map[string]any{"seq": i, "id": fmt.Sprint("d", i), "doc": doc})
		if err != nil {
			t.Fatal(err)
		}
		in := io.Reader(bytes.NewReader(body))
		if i%2 == 1 {
			in = iotest.HalfReader(in)
		}
		got, err := project(t, in, false)
		if err != nil {
			t.Fatalf("doc %d: %v", i, err)
		}
		var row struct{ Doc map[string]any }
		if err := json.Unmarshal([]byte(got), &row); err != nil {
			t.Fatalf("doc %d: output is not JSON: %v", i, err)
		}
		for k := range testKeep {
			want, ok := doc[k]
			if got, gotOK := row.Doc[k]; ok != gotOK || fmt.Sprint(got) != fmt.Sprint(want) && ok {
				t.Fatalf("doc %d field %s = %.80v (%v), want %.80v (%v)", i, k, got, gotOK, want, ok)
			}
		}
		for k := range row.Doc {
			if !testKeep[k] {
				t.Fatalf("doc %d: unwanted field %q kept", i, k)
			}
		}
	}
}

func randString(rng *rand.Rand, n int) string {
	const chars = "abcdefghij_\"\\/é\u2028\n\t"
	r := []rune(chars)
	var b strings.Builder
	for range rng.IntN(n) + 1 {
		b.WriteRune(r[rng.IntN(len(r))])
	}
	return b.String()
}

func randValue(rng *rand.Rand, depth int) any {
	switch k := rng.IntN(7); {
	case k == 0 && depth > 0:
		m := map[string]any{}
		for range rng.IntN(4) {
			m[randString(rng, 5)] = randValue(rng, depth-1)
		}
		return m
	case k == 1 && depth > 0:
		var a []any
		for range rng.IntN(4) {
			a = append(a, randValue(rng, depth-1))
		}
		return a
	case k == 2:
		return rng.Float64() * 1e6
	case k == 3:
		return rng.IntN(2) == 0
	case k == 4:
		return nil
	default:
		return randString(rng, 20)
	}
}

// hugeDoc streams one change row whose document holds n bytes of noise,
// without ever holding the document itself.
func hugeDoc(n int) io.Reader {
	head := `{"seq":1,"id":"big","doc":{"_id":"big","doc_type":"XFormInstance","blob":"`
	// 4999 levels of two containers, in a row and a document: the 10000
	// levels encoding/json accepts.
	tail := `","deep":` + strings.Repeat(`[{"a":`, 4999) + `1` + strings.Repeat(`}]`, 4999) + `,"domain":"d"}}` + "\n"
	return io.MultiReader(strings.NewReader(head), io.LimitReader(repeatReader('x'), int64(n)), strings.NewReader(tail))
}

type repeatReader byte

func (r repeatReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(r)
	}
	return len(p), nil
}

// TestProjectMemoryIndependentOfDocSize streams a 64 MiB document and a
// deeply nested value through the projection and checks that it allocated a
// small fraction of that.
func TestCouchProjectMemoryIndependentOfDocSize(t *testing.T) {
	const size = 64 << 20
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	got, err := project(t, hugeDoc(size), false)
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"seq":1,"id":"big","doc":{"_id":"big","doc_type":"XFormInstance","domain":"d"}}` + "\n"; got != want {
		t.Fatalf("got %s", got)
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 4<<20 {
		t.Fatalf("projecting a %d MiB document allocated %d KiB", size>>20, alloc>>10)
	}
}

func BenchmarkCouchProject(b *testing.B) {
	var buf bytes.Buffer
	for i := range 1000 {
		fmt.Fprintf(&buf, `{"seq":%d,"id":"doc%d","changes":[{"rev":"1-abc"}],"doc":{"_id":"doc%d","_rev":"1-abc","doc_type":"CommCareCase","domain":"demo","type":"patient","name":"Someone","properties":{"a":"%s","b":[1,2,3]}}}`+"\n",
			i, i, i, strings.Repeat("v", 600))
	}
	body := buf.Bytes()
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for range b.N {
		out := projectStream(io.NopCloser(bytes.NewReader(body)), testKeep, false)
		if _, err := io.Copy(io.Discard, out); err != nil {
			b.Fatal(err)
		}
	}
}

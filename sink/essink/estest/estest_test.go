package estest

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/elastic/go-elasticsearch/v8"
	"github.com/elastic/go-elasticsearch/v8/typedapi/types"
	"github.com/elastic/go-elasticsearch/v8/typedapi/types/enums/operationtype"
	"github.com/elastic/go-elasticsearch/v8/typedapi/types/enums/versiontype"
)

// do sends a raw request and returns the status and body.
func do(t *testing.T, s *Server, method, path, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, s.URL()+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	if res.Header.Get("X-Elastic-Product") != "Elasticsearch" {
		t.Fatalf("%s %s: no X-Elastic-Product header", method, path)
	}
	return res.StatusCode, string(b)
}

// TestVersioning walks Elasticsearch's versioning rules one request at a
// time: each step's status and, where it matters, the version or error type.
func TestVersioning(t *testing.T) {
	s := NewServer(t)
	steps := []struct {
		method, path, body string
		status             int
		contains           string
	}{
		{"PUT", "/ix", `{"mappings":{"properties":{"n":{"type":"long"}}}}`, 200, `"acknowledged":true`},
		{"PUT", "/ix", `{}`, 400, `resource_already_exists_exception`},
		{"PUT", "/Upper", `{}`, 400, `invalid_index_name_exception`},
		{"HEAD", "/ix", ``, 200, ``},
		{"HEAD", "/nope", ``, 404, ``},
		// external: strictly greater
		{"PUT", "/ix/_doc/a?version=5&version_type=external", `{"n":1}`, 201, `"_version":5`},
		{"PUT", "/ix/_doc/a?version=5&version_type=external", `{"n":2}`, 409, `current version [5] is higher or equal to the one provided [5]`},
		{"PUT", "/ix/_doc/a?version=4&version_type=external", `{"n":2}`, 409, `version_conflict_engine_exception`},
		{"PUT", "/ix/_doc/a?version=5&version_type=external_gte", `{"n":3}`, 200, `"result":"updated"`},
		{"GET", "/ix/_doc/a", ``, 200, `"_source":{"n":3}`},
		// delete keeps the version: a late older write is refused
		{"DELETE", "/ix/_doc/a?version=9&version_type=external", ``, 200, `"result":"deleted"`},
		{"GET", "/ix/_doc/a", ``, 404, `"found":false`},
		{"PUT", "/ix/_doc/a?version=7&version_type=external", `{"n":4}`, 409, `current version [9]`},
		{"PUT", "/ix/_doc/a?version=10&version_type=external", `{"n":5}`, 201, `"result":"created"`},
		// delete of a missing document with an external version: a tombstone
		{"DELETE", "/ix/_doc/b?version=3&version_type=external", ``, 404, `"result":"not_found"`},
		{"PUT", "/ix/_doc/b?version=2&version_type=external", `{"n":1}`, 409, `current version [3]`},
		// compare-and-set on seq_no; a create conflicts with a live doc
		{"PUT", "/ix/_doc/c?op_type=create", `{"n":1}`, 201, `"_seq_no":5`},
		{"PUT", "/ix/_create/c", `{"n":1}`, 409, `document already exists (current version [1])`},
		{"PUT", "/ix/_doc/c?if_seq_no=4&if_primary_term=1", `{"n":2}`, 409, `required seqNo [4], primary term [1]. current document has seqNo [5]`},
		{"PUT", "/ix/_doc/c?if_seq_no=5&if_primary_term=1", `{"n":2}`, 200, `"_version":2`},
		{"DELETE", "/ix/_doc/c", ``, 200, `"_version":3`},
		{"PUT", "/ix/_doc/c?if_seq_no=7&if_primary_term=1", `{"n":3}`, 409, `but no document was found`},
		{"PUT", "/ix/_doc/c", `{"n":3}`, 201, `"_version":4`},
		// validation
		{"PUT", "/ix/_doc/d?version=2", `{"n":1}`, 400, `internal versioning can not be used for optimistic concurrency control`},
		{"PUT", "/ix/_doc/d?version_type=external", `{"n":1}`, 400, `requires a version`},
		{"PUT", "/ix/_doc/d?version=2&version_type=external&if_seq_no=1&if_primary_term=1", `{}`, 400, `compare and write operations can not be used`},
		// mapping checks
		{"PUT", "/ix/_doc/d", `{"n":"abc"}`, 400, `failed to parse field [n] of type [long] in document with id 'd'`},
		{"PUT", "/ix/_doc/d", `{"_id":"x"}`, 400, `Field [_id] is a metadata field`},
		{"PUT", "/ix/_doc/d", `{"n":"12"}`, 201, ``},
		{"PUT", "/bad", `{"mappings":{"properties":{"n":{"type":"lng"}}}}`, 400, `No handler for type [lng] declared on field [n]`},
		// unsupported endpoints say so
		{"POST", "/ix/_update/a", `{}`, 405, `estest serves a subset`},
	}
	for i, st := range steps {
		status, body := do(t, s, st.method, st.path, st.body)
		if status != st.status || !strings.Contains(body, st.contains) {
			t.Fatalf("step %d: %s %s %s = %d %s\nwant %d containing %q", i, st.method, st.path, st.body, status, body, st.status, st.contains)
		}
	}
}

func TestBulk(t *testing.T) {
	s := NewServer(t)
	body := strings.Join([]string{
		`{"index":{"_index":"bx","_id":"1","version":3,"version_type":"external"}}`, `{"title":"one"}`,
		`{"index":{"_index":"bx","_id":"1","version":2,"version_type":"external"}}`, `{"title":"old"}`,
		`{"create":{"_index":"bx","_id":"2"}}`, `{"title":"two"}`,
		`{"delete":{"_index":"bx","_id":"3","version":7,"version_type":"external"}}`,
		`{"update":{"_index":"bx","_id":"2"}}`, `{"doc":{"title":"x"}}`,
		`{"delete":{"_index":"bx","_id":"2"}}`,
	}, "\n") + "\n"
	status, out := do(t, s, "POST", "/_bulk", body)
	if status != 200 {
		t.Fatalf("bulk = %d %s", status, out)
	}
	var res struct {
		Errors bool                        `json:"errors"`
		Items  []map[string]map[string]any `json:"items"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatal(err)
	}
	want := []struct {
		op     string
		status float64
	}{{"index", 201}, {"index", 409}, {"create", 201}, {"delete", 404}, {"update", 400}, {"delete", 200}}
	if !res.Errors || len(res.Items) != len(want) {
		t.Fatalf("bulk response %s", out)
	}
	for i, w := range want {
		it, ok := res.Items[i][w.op]
		if !ok || it["status"] != w.status {
			t.Fatalf("item %d = %v, want %s status %v", i, res.Items[i], w.op, w.status)
		}
	}
	if e := res.Items[1]["index"]["error"].(map[string]any); e["type"] != "version_conflict_engine_exception" {
		t.Fatalf("item 1 error = %v", e)
	}
}

// TestOfficialClient checks the response shapes by decoding them with the
// official typed client, whose types are generated from Elasticsearch's API
// specification.
func TestOfficialClient(t *testing.T) {
	s := NewServer(t)
	ctx := t.Context()
	es, err := elasticsearch.NewTypedClient(elasticsearch.Config{Addresses: []string{s.URL()}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := es.Indices.Create("cases").Mappings(&types.TypeMapping{Properties: map[string]types.Property{
		"owner": types.NewKeywordProperty(), "n": types.NewLongNumberProperty(),
	}}).Do(ctx); err != nil {
		t.Fatal(err)
	}
	ok, err := es.Indices.Exists("cases").IsSuccess(ctx)
	if err != nil || !ok {
		t.Fatalf("exists = %v, %v", ok, err)
	}
	res, err := es.Index("cases").Id("c1").Document(map[string]any{"owner": "ann", "n": 1}).
		Version("10").VersionType(versiontype.External).Do(ctx)
	if err != nil || res.Version_ != 10 || res.Result.Name != "created" {
		t.Fatalf("index = %+v, %v", res, err)
	}
	_, err = es.Index("cases").Id("c1").Document(map[string]any{"owner": "bob"}).
		Version("9").VersionType(versiontype.External).Do(ctx)
	var esErr *types.ElasticsearchError
	if !errors.As(err, &esErr) || esErr.Status != 409 || esErr.ErrorCause.Type != "version_conflict_engine_exception" {
		t.Fatalf("stale index = %v, want a 409 ElasticsearchError", err)
	}

	bulk := es.Bulk().Index("cases")
	id2, id1 := "c2", "c1"
	v := int64(11)
	vt := versiontype.External
	if err := bulk.IndexOp(types.IndexOperation{Id_: &id2}, map[string]any{"owner": "ann", "n": 2}); err != nil {
		t.Fatal(err)
	}
	if err := bulk.IndexOp(types.IndexOperation{Id_: &id1, Version: &v, VersionType: &vt}, map[string]any{"owner": "cy", "n": 3}); err != nil {
		t.Fatal(err)
	}
	br, err := bulk.Do(ctx)
	if err != nil || br.Errors || len(br.Items) != 2 || br.Items[1][operationtype.Index].Status != 200 {
		t.Fatalf("bulk = %+v, %v", br, err)
	}

	got, err := es.Get("cases", "c1").Do(ctx)
	if err != nil || !got.Found || *got.Version_ != 11 || *got.SeqNo_ != 2 || !strings.Contains(string(got.Source_), `"cy"`) {
		t.Fatalf("get = %+v, %v", got, err)
	}

	sr, err := es.Search().Index("cases").Query(&types.Query{Term: map[string]types.TermQuery{"owner": {Value: "ann"}}}).Do(ctx)
	if err != nil || sr.Hits.Total.Value != 1 || len(sr.Hits.Hits) != 1 || *sr.Hits.Hits[0].Id_ != "c2" {
		t.Fatalf("search = %+v, %v", sr, err)
	}
	cr, err := es.Count().Index("cases").Do(ctx)
	if err != nil || cr.Count != 2 {
		t.Fatalf("count = %+v, %v", cr, err)
	}
	if _, err := es.Indices.Refresh().Index("cases").Do(ctx); err != nil {
		t.Fatal(err)
	}
	dr, err := es.Delete("cases", "c2").Do(ctx)
	if err != nil || dr.Result.Name != "deleted" {
		t.Fatalf("delete = %+v, %v", dr, err)
	}
	if _, err := es.Get("cases", "nope").Do(ctx); err != nil {
		// A missing document is a 404 with found=false, not an error shape.
		t.Fatalf("get missing = %v", err)
	}
}

func TestQueries(t *testing.T) {
	s := NewServer(t)
	for _, d := range []struct{ id, src string }{
		{"1", `{"owner":"ann","n":1,"tags":["x","y"],"form":{"meta":{"user":"u1"}}}`},
		{"2", `{"owner":"bob","n":2,"tags":["y"],"deleted":true}`},
		{"3", `{"owner":"ann","n":3}`},
	} {
		if st, b := do(t, s, "PUT", "/q/_doc/"+d.id, d.src); st != 201 {
			t.Fatalf("index %s = %d %s", d.id, st, b)
		}
	}
	tests := []struct {
		query string
		count string
	}{
		{``, `"count":3`},
		{`{"query":{"match_all":{}}}`, `"count":3`},
		{`{"query":{"term":{"owner":"ann"}}}`, `"count":2`},
		{`{"query":{"term":{"owner":{"value":"bob"}}}}`, `"count":1`},
		{`{"query":{"term":{"n":"2"}}}`, `"count":1`},
		{`{"query":{"term":{"tags":"y"}}}`, `"count":2`},
		{`{"query":{"term":{"form.meta.user":"u1"}}}`, `"count":1`},
		{`{"query":{"terms":{"n":[1,3]}}}`, `"count":2`},
		{`{"query":{"exists":{"field":"deleted"}}}`, `"count":1`},
		{`{"query":{"ids":{"values":["1","3","9"]}}}`, `"count":2`},
		{`{"query":{"bool":{"must":{"term":{"owner":"ann"}},"must_not":[{"term":{"n":3}}]}}}`, `"count":1`},
		{`{"query":{"bool":{"should":[{"term":{"n":1}},{"term":{"n":2}}]}}}`, `"count":2`},
		{`{"query":{"bool":{"filter":[{"term":{"owner":"ann"}}],"should":[{"term":{"n":9}}]}}}`, `"count":2`},
	}
	for _, tt := range tests {
		if st, b := do(t, s, "POST", "/q/_count", tt.query); st != 200 || !strings.Contains(b, tt.count) {
			t.Errorf("count %s = %d %s, want %s", tt.query, st, b, tt.count)
		}
	}
	st, b := do(t, s, "POST", "/q/_search", `{"query":{"term":{"owner":"ann"}},"size":1,"from":1}`)
	if st != 200 || !strings.Contains(b, `"total":{"relation":"eq","value":2}`) || !strings.Contains(b, `"_id":"3"`) || strings.Contains(b, `"_id":"1"`) {
		t.Fatalf("paged search = %d %s", st, b)
	}
	if st, b := do(t, s, "POST", "/q/_search", `{"query":{"match":{"owner":"ann"}}}`); st != 400 || !strings.Contains(b, "unsupported query [match]") {
		t.Fatalf("unsupported query = %d %s", st, b)
	}
}

func TestUnavailable(t *testing.T) {
	s := NewServer(t)
	s.SetUnavailable(true)
	if st, b := do(t, s, "GET", "/", ""); st != 503 || !strings.Contains(b, "master_not_discovered_exception") {
		t.Fatalf("GET / = %d %s", st, b)
	}
	s.SetUnavailable(false)
	if st, _ := do(t, s, "GET", "/", ""); st != 200 {
		t.Fatalf("GET / = %d", st)
	}
}

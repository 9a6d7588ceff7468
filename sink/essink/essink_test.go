package essink

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/elastic/go-elasticsearch/v8"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/sink/essink/estest"
	"github.com/changefeed/changefeed/sink/sinktest"
)

// esURLEnv names a real cluster to run the conformance suite against
// instead of the test double.
const esURLEnv = "CHANGEFEED_TEST_ES_URL"

var conformanceMapping = json.RawMessage(`{"properties": {"title": {"type": "keyword"}, "n": {"type": "long"}}}`)

var indexSeq atomic.Int64

// cluster returns the URL of the cluster the conformance suite runs on.
func cluster(t *testing.T) string {
	if u := os.Getenv(esURLEnv); u != "" {
		t.Logf("running against the cluster at %s (%s)", redact(u), esURLEnv)
		return u
	}
	return estest.NewServer(t).URL()
}

func redact(u string) string {
	if i := strings.Index(u, "@"); i >= 0 {
		if j := strings.Index(u, "://"); j >= 0 && j < i {
			return u[:j+3] + "…" + u[i:]
		}
	}
	return u
}

// freshIndex names an index no other test uses and deletes it at the end.
func freshIndex(t *testing.T, client *elasticsearch.Client) string {
	name := fmt.Sprintf("changefeed-sinktest-%d-%d", time.Now().UnixNano(), indexSeq.Add(1))
	t.Cleanup(func() {
		res, err := client.Indices.Delete([]string{name})
		if err == nil {
			drain(res.Body)
		}
	})
	return name
}

func rawClient(t *testing.T, esURL string) *elasticsearch.Client {
	t.Helper()
	s, err := New(Config{URLs: []string{esURL}, Index: "unused"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s.es
}

func TestConformance(t *testing.T) {
	esURL := cluster(t)
	client := rawClient(t, esURL)
	sinktest.Run(t, func(t *testing.T) sinktest.Harness {
		cfg := Config{URLs: []string{esURL}, Index: freshIndex(t, client), Mapping: conformanceMapping}
		s, err := New(cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		return sinktest.Harness{
			Sink: s,
			Reopen: func(t *testing.T) sinktest.Sink {
				s, err := New(cfg, nil)
				if err != nil {
					t.Fatal(err)
				}
				return s
			},
			Read: func(t *testing.T, ids []string) map[string]sinktest.Stored {
				t.Helper()
				return readBack(t, client, cfg.Index, ids)
			},
		}
	})
}

// readBack reads documents with _mget, which is realtime: no refresh needed.
func readBack(t *testing.T, client *elasticsearch.Client, index string, ids []string) map[string]sinktest.Stored {
	t.Helper()
	body, _ := json.Marshal(map[string]any{"ids": ids})
	res, err := client.Mget(bytes.NewReader(body), client.Mget.WithIndex(index))
	if err != nil {
		t.Fatal(err)
	}
	defer drain(res.Body)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("mget: %s", res.String())
	}
	var out struct {
		Docs []struct {
			ID     string `json:"_id"`
			Found  bool   `json:"found"`
			Source struct {
				Title string      `json:"title"`
				N     json.Number `json:"n"`
				Meta  struct {
					Deleted bool `json:"deleted"`
				} `json:"changefeed"`
			} `json:"_source"`
		} `json:"docs"`
	}
	if err := json.NewDecoder(res.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	m := map[string]sinktest.Stored{}
	for _, d := range out.Docs {
		if d.Found {
			m[d.ID] = sinktest.Stored{Deleted: d.Source.Meta.Deleted, Title: d.Source.Title, N: d.Source.N.String()}
		}
	}
	return m
}

func TestNewValidation(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"valid", Config{URLs: []string{"http://es:9200"}, Index: "cases"}, ""},
		{"no urls", Config{Index: "cases"}, "essink: urls: none given"},
		{"bad url", Config{URLs: []string{"http://a", "es:9200"}, Index: "cases"}, "essink: urls[1]:"},
		{"no index", Config{URLs: []string{"http://es:9200"}}, "essink: index: is empty"},
		{"upper index", Config{URLs: []string{"http://es:9200"}, Index: "Cases"}, "must be lowercase"},
		{"underscore index", Config{URLs: []string{"http://es:9200"}, Index: "_cases"}, "must not start with"},
		{"mapping not object", Config{URLs: []string{"http://es:9200"}, Index: "c", Mapping: json.RawMessage(`[1]`)}, "essink: mapping: must be a JSON object"},
		{"properties not object", Config{URLs: []string{"http://es:9200"}, Index: "c", Mapping: json.RawMessage(`{"properties": 3}`)}, `"properties" must be a JSON object`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.cfg, nil)
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("New = %v", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("New = %v, want %q", err, tt.want)
			}
		})
	}
	_, err := New(Config{URLs: []string{"http://user:s3cret@es:9200", "bad:// s3cret"}, Index: "c"}, nil)
	if err == nil || strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("New = %v: want an error that does not repeat the password", err)
	}
}

func TestCreateBody(t *testing.T) {
	tests := []struct{ mapping, want string }{
		{``, `{"mappings":{"properties":{"changefeed":` + metaJSON + `}}}`},
		{`{"properties":{"n":{"type":"long"}}}`, `{"mappings":{"properties":{"changefeed":` + metaJSON + `,"n":{"type":"long"}}}}`},
		{`{"dynamic":"strict"}`, `{"mappings":{"dynamic":"strict","properties":{"changefeed":` + metaJSON + `}}}`},
		{`{"settings":{"index":{"gc_deletes":"1h"}}}`, `{"mappings":{"properties":{"changefeed":` + metaJSON + `}},"settings":{"index":{"gc_deletes":"1h"}}}`},
		{`{"mappings":{"properties":{"changefeed":{"type":"object"}}}}`, `{"mappings":{"properties":{"changefeed":{"type":"object"}}}}`},
	}
	for _, tt := range tests {
		got, err := createBody(json.RawMessage(tt.mapping))
		if err != nil || string(got) != tt.want {
			t.Errorf("createBody(%s) = %s, %v\nwant %s", tt.mapping, got, err, tt.want)
		}
	}
}

const metaJSON = `{"properties":{"deleted":{"type":"boolean"},"rev":{"type":"keyword"},"rev_path":{"index":false,"type":"keyword"}}}`

func TestBootstrap(t *testing.T) {
	srv := estest.NewServer(t)
	ctx := t.Context()
	s, err := New(Config{URLs: []string{srv.URL()}, Index: "cases", Mapping: conformanceMapping}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for range 2 { // creates, then finds it
		if err := s.Bootstrap(ctx); err != nil {
			t.Fatal(err)
		}
	}
	res, err := s.es.Indices.GetMapping(s.es.Indices.GetMapping.WithIndex("cases"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	for _, want := range []string{`"n":{"type":"long"}`, `"changefeed":{"properties":{"deleted":{"type":"boolean"}`} {
		if !bytes.Contains(b, []byte(want)) {
			t.Fatalf("mapping %s lacks %s", b, want)
		}
	}
	// A mapping the cluster rejects is a configuration error, not transient.
	bad, _ := New(Config{URLs: []string{srv.URL()}, Index: "bad", Mapping: json.RawMessage(`{"properties": {"n": {"type": "no_such_type"}}}`)}, nil)
	if err := bad.Bootstrap(ctx); err == nil || errors.Is(err, doc.ErrTransient) {
		t.Fatalf("Bootstrap with an invalid body = %v, want a plain error", err)
	}
}

func TestRequestsPerBatch(t *testing.T) {
	srv := estest.NewServer(t)
	s, err := New(Config{URLs: []string{srv.URL()}, Index: "batch", Mapping: conformanceMapping}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Bootstrap(t.Context()); err != nil {
		t.Fatal(err)
	}
	var docs []*doc.Document
	for i := range 200 {
		docs = append(docs, sinktest.SQL(fmt.Sprintf("s%d", i), 10, 0, i%10 == 0))
		docs = append(docs, sinktest.Couch(fmt.Sprintf("c%d", i), i%10 == 0, "2-b", "1-a"))
	}
	if err := s.Write(t.Context(), docs); err != nil {
		t.Fatal(err)
	}
	if b, m := srv.Calls("_bulk"), srv.Calls("_mget"); b != 1 || m != 1 {
		t.Fatalf("a batch of 400 documents took %d _bulk and %d _mget requests, want 1 and 1", b, m)
	}
}

func TestCouchTombstoneIsHiddenByTheDocumentedFilter(t *testing.T) {
	srv := estest.NewServer(t)
	s, err := New(Config{URLs: []string{srv.URL()}, Index: "tomb", Mapping: conformanceMapping}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Bootstrap(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := s.Write(t.Context(), []*doc.Document{
		sinktest.Couch("gone", true, "3-c", "2-b", "1-a"),
		sinktest.Couch("here", false, "1-a"),
		sinktest.SQL("sqlgone", 5, 0, true),
	}); err != nil {
		t.Fatal(err)
	}
	count := func(query string) int {
		res, err := s.es.Count(s.es.Count.WithIndex("tomb"), s.es.Count.WithBody(strings.NewReader(query)))
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		var out struct {
			Count int `json:"count"`
		}
		if err := json.NewDecoder(res.Body).Decode(&out); err != nil {
			t.Fatal(err)
		}
		return out.Count
	}
	if n := count(`{"query": {"bool": {"must_not": {"term": {"changefeed.deleted": true}}}}}`); n != 1 {
		t.Fatalf("live documents = %d, want 1", n)
	}
	if n := count(`{"query": {"term": {"title": "here@1-a"}}}`); n != 1 {
		t.Fatalf("term query = %d, want 1", n)
	}
}

func TestTransient(t *testing.T) {
	ctx := t.Context()
	batch := []*doc.Document{sinktest.SQL("a", 1, 0, false), sinktest.Couch("c", false, "1-a")}
	isTransient := func(t *testing.T, err error) {
		t.Helper()
		var de doc.Errors
		if !errors.Is(err, doc.ErrTransient) || errors.As(err, &de) {
			t.Fatalf("err = %v, want doc.ErrTransient", err)
		}
		if strings.Contains(err.Error(), "s3cret") {
			t.Fatalf("error leaks the password: %v", err)
		}
	}

	t.Run("Unavailable", func(t *testing.T) {
		srv := estest.NewServer(t)
		s, _ := New(Config{URLs: []string{strings.Replace(srv.URL(), "http://", "http://elastic:s3cret@", 1)}, Index: "down"}, nil)
		srv.SetUnavailable(true)
		isTransient(t, s.Bootstrap(ctx))
		isTransient(t, s.Write(ctx, batch))
		srv.SetUnavailable(false)
		if err := s.Bootstrap(ctx); err != nil {
			t.Fatal(err)
		}
		if err := s.Write(ctx, batch); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("ConnectionRefused", func(t *testing.T) {
		srv := estest.NewServer(t)
		s, _ := New(Config{URLs: []string{strings.Replace(srv.URL(), "http://", "http://elastic:s3cret@", 1)}, Index: "down"}, nil)
		srv.Close()
		isTransient(t, s.Write(ctx, batch))
		isTransient(t, s.Bootstrap(ctx))
	})

	t.Run("IndexMissingWithoutAutoCreate", func(t *testing.T) {
		// The double auto-creates like Elasticsearch's default; a cluster
		// that does not reports index_not_found_exception per item.
		proxy := http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Elastic-Product", "Elasticsearch")
			w.Header().Set("Content-Type", "application/json")
			if strings.HasSuffix(r.URL.Path, "_bulk") {
				io.WriteString(w, `{"took":1,"errors":true,"items":[{"index":{"_index":"x","_id":"a","status":404,"error":{"type":"index_not_found_exception","reason":"no such index [x]"}}}]}`)
				return
			}
			w.WriteHeader(http.StatusNotFound)
		})}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go proxy.Serve(ln)
		t.Cleanup(func() { proxy.Close() })
		s, _ := New(Config{URLs: []string{"http://" + ln.Addr().String()}, Index: "x"}, nil)
		isTransient(t, s.Write(ctx, batch[:1]))
	})
}

func TestPerItemErrors(t *testing.T) {
	srv := estest.NewServer(t)
	s, _ := New(Config{URLs: []string{srv.URL()}, Index: "items", Mapping: conformanceMapping}, nil)
	if err := s.Bootstrap(t.Context()); err != nil {
		t.Fatal(err)
	}
	reserved := sinktest.Couch("reserved", false, "1-a")
	reserved.Body[MetaField] = "mine"
	meta := sinktest.SQL("meta", 3, 0, false)
	meta.Body["_index"] = "other"
	err := s.Write(t.Context(), []*doc.Document{reserved, meta, sinktest.SQL("fine", 3, 0, false)})
	var de doc.Errors
	if !errors.As(err, &de) || len(de) != 2 || de["reserved"] == nil || de["meta"] == nil {
		t.Fatalf("Write = %v, want doc.Errors for reserved and meta", err)
	}
	if !strings.Contains(de["meta"].Error(), "document_parsing_exception") {
		t.Fatalf("meta error = %v", de["meta"])
	}
}

func TestContextDeadline(t *testing.T) {
	// A write that runs out of time is transient.
	srv := estest.NewServer(t)
	s, _ := New(Config{URLs: []string{srv.URL()}, Index: "slow"}, nil)
	ctx, cancel := context.WithDeadline(t.Context(), time.Now().Add(-time.Second))
	defer cancel()
	err := s.Write(ctx, []*doc.Document{sinktest.SQL("a", 1, 0, false)})
	if !errors.Is(err, doc.ErrTransient) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Write = %v, want doc.ErrTransient wrapping context.DeadlineExceeded", err)
	}
}

// TestCouchWriterInterleaved puts another writer's write between this
// sink's read of the stored revision and its bulk write, deterministically:
// the if_seq_no/if_primary_term (or create) condition must turn the stale
// write into a 409, and the re-read must then refuse it.
func TestCouchWriterInterleaved(t *testing.T) {
	ctx := t.Context()
	for _, tc := range []struct {
		name          string
		before        *doc.Document // stored before the race; nil: nothing
		competitor    *doc.Document // written between our read and write
		ours          *doc.Document
		live          bool
		title         string
		minMgetRounds int
	}{
		{"UpdateOverNewer", sinktest.Couch("c", false, "1-a"), sinktest.Couch("c", false, "3-c", "2-b", "1-a"),
			sinktest.Couch("c", false, "2-b", "1-a"), true, "c@3-c", 2},
		{"CreateOverNewer", nil, sinktest.Couch("c", false, "3-c", "2-b", "1-a"),
			sinktest.Couch("c", false, "2-b", "1-a"), true, "c@3-c", 2},
		{"UpdateOverTombstone", sinktest.Couch("c", false, "1-a"), sinktest.Couch("c", true, "3-c", "2-b", "1-a"),
			sinktest.Couch("c", false, "2-b", "1-a"), false, "", 2},
		{"NewerWinsTheRace", sinktest.Couch("c", false, "1-a"), sinktest.Couch("c", false, "2-b", "1-a"),
			sinktest.Couch("c", false, "3-c", "2-b", "1-a"), true, "c@3-c", 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := estest.NewServer(t)
			index := "race"
			competitor, err := New(Config{URLs: []string{srv.URL()}, Index: index, Mapping: conformanceMapping}, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := competitor.Bootstrap(ctx); err != nil {
				t.Fatal(err)
			}
			if tc.before != nil {
				if err := competitor.Write(ctx, []*doc.Document{tc.before}); err != nil {
					t.Fatal(err)
				}
			}
			target, _ := url.Parse(srv.URL())
			proxy := httputil.NewSingleHostReverseProxy(target)
			var once sync.Once
			front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if strings.HasSuffix(r.URL.Path, "/_bulk") {
					once.Do(func() {
						if err := competitor.Write(ctx, []*doc.Document{tc.competitor}); err != nil {
							t.Error(err)
						}
					})
				}
				proxy.ServeHTTP(w, r)
			}))
			t.Cleanup(front.Close)
			s, err := New(Config{URLs: []string{front.URL}, Index: index}, nil)
			if err != nil {
				t.Fatal(err)
			}
			mgets := srv.Calls("_mget")
			if err := s.Write(ctx, []*doc.Document{tc.ours}); err != nil {
				t.Fatal(err)
			}
			if n := srv.Calls("_mget") - mgets - 1; n < tc.minMgetRounds { // minus the competitor's
				t.Fatalf("%d reads of the stored revision, want %d (read, conflict, read again)", n, tc.minMgetRounds)
			}
			got := readBack(t, rawClient(t, srv.URL()), index, []string{"c"})["c"]
			if got.Deleted == tc.live || (tc.live && got.Title != tc.title) {
				t.Fatalf("stored %+v, want live=%v title %q", got, tc.live, tc.title)
			}
		})
	}
}

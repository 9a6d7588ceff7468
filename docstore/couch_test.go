package docstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/stub"
)

func couchStub(db, id string) *stub.Stub {
	return &stub.Stub{DocumentID: id, DataSourceType: stub.SourceCouch, DataSourceName: db,
		DocumentType: "StubType", Domain: "stub-domain", DocumentRev: "1-x"}
}

// couchDo sends a JSON request to the server and decodes the answer.
func couchDo(t *testing.T, base, method, path string, body any, out any) {
	t.Helper()
	var r io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		r = strings.NewReader(string(b))
	}
	req, err := http.NewRequestWithContext(t.Context(), method, base+path, r)
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
	if res.StatusCode/100 != 2 {
		t.Fatalf("%s %s = %d %s", method, path, res.StatusCode, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatal(err)
		}
	}
}

func TestNewCouch(t *testing.T) {
	for _, bad := range []string{"", "localhost:5984", "ftp://x", "http://", "http://u:s3cret@[::1"} {
		_, err := NewCouch(bad, nil)
		if err == nil {
			t.Errorf("NewCouch(%q) succeeded", bad)
		} else if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("NewCouch error repeats the password: %v", err)
		}
	}
	c, err := NewCouch("http://u:p@127.0.0.1:5984/prefix/", nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.base.String() != "http://127.0.0.1:5984/prefix" || c.user.Username() != "u" {
		t.Fatalf("base %s user %v", c.base, c.user)
	}
}

func TestCouchFetch(t *testing.T) {
	srv := testenv.Couch(t)
	base := srv.URL()
	ctx := t.Context()
	const db = "forms/2024" // a slash must be escaped in the path
	dbPath := "/" + url.PathEscape(db)
	couchDo(t, base, "PUT", dbPath, nil, nil)
	couchDo(t, base, "PUT", "/other", nil, nil)

	var res struct {
		Rev string `json:"rev"`
	}
	// live, updated once
	couchDo(t, base, "PUT", dbPath+"/f1", map[string]any{"doc_type": "XFormInstance", "domain": "d1", "n": 9007199254740993}, &res)
	couchDo(t, base, "PUT", dbPath+"/f1?rev="+res.Rev, map[string]any{"doc_type": "XFormInstance", "domain": "d1", "n": 2, "form": map[string]any{"q": "a"}}, &res)
	f1Rev := res.Rev
	// deleted
	couchDo(t, base, "PUT", dbPath+"/f2", map[string]any{"x": 1}, &res)
	couchDo(t, base, "DELETE", dbPath+"/f2?rev="+res.Rev, nil, &res)
	f2Tomb := res.Rev
	// a conflict whose winning branch is then deleted: the new winner,
	// 3-xxx, has a lower generation than the deleted 6-fff.
	couchDo(t, base, "POST", dbPath+"/_bulk_docs", map[string]any{"new_edits": false, "docs": []any{
		map[string]any{"_id": "f3", "_rev": "5-eee", "v": "long", "_revisions": map[string]any{"start": 5, "ids": []string{"eee", "ddd", "ccc", "bbb", "aaa"}}},
		map[string]any{"_id": "f3", "_rev": "3-xxx", "v": "short", "_revisions": map[string]any{"start": 3, "ids": []string{"xxx", "bbb", "aaa"}}},
	}}, nil)
	couchDo(t, base, "POST", dbPath+"/_bulk_docs", map[string]any{"new_edits": false, "docs": []any{
		map[string]any{"_id": "f3", "_rev": "6-fff", "_deleted": true, "_revisions": map[string]any{"start": 6, "ids": []string{"fff", "eee", "ddd", "ccc", "bbb", "aaa"}}},
	}}, nil)
	couchDo(t, base, "PUT", "/other/o1", map[string]any{"doc_type": "CommCareCase"}, &res)
	// soft-deleted the HQ way: the doc_type is renamed
	couchDo(t, base, "PUT", dbPath+"/f4", map[string]any{"doc_type": "XFormInstance-Deleted", "domain": "d1"}, &res)
	f4Rev := res.Rev

	s, err := NewCouch(base, &http.Client{Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	docs, err := s.Fetch(ctx, []*stub.Stub{
		couchStub(db, "f1"), couchStub(db, "f2"), couchStub("other", "o1"), couchStub(db, "f3"),
		couchStub(db, "f1"), couchStub(db, "never"), couchStub("nodb", "z1"),
		sqlStub(db, "s1", 1, 0), couchStub(db, "f4"),
	})
	var de doc.Errors
	if !errors.As(err, &de) || len(de) != 2 || de["z1"] == nil || de["s1"] == nil {
		t.Fatalf("Fetch error = %v, want doc.Errors for z1 (no database) and s1 (not a Couch stub)", err)
	}
	if !strings.Contains(de["z1"].Error(), `database "nodb"`) {
		t.Fatalf("z1 error = %v", de["z1"])
	}
	var got []string
	byID := map[string]*doc.Document{}
	for _, d := range docs {
		got = append(got, fmt.Sprintf("%s/%s deleted=%v rev=%s path=%d:%s type=%s domain=%s",
			d.SourceName, d.ID, d.Deleted, d.Version.Rev, d.Version.Revisions.Start, strings.Join(d.Version.Revisions.IDs, ","), d.Type, d.Domain))
		byID[d.ID] = d
	}
	f1r, _ := stub.ParseRev(f1Rev)
	f2r, _ := stub.ParseRev(f2Tomb)
	want := []string{
		fmt.Sprintf("forms/2024/f1 deleted=false rev=%s path=2:%s,", f1Rev, f1r.Hash),
		fmt.Sprintf("forms/2024/f2 deleted=true rev=%s path=2:%s,", f2Tomb, f2r.Hash),
		"other/o1 deleted=false rev=",
		"forms/2024/f3 deleted=false rev=3-xxx path=3:xxx,bbb,aaa type=StubType domain=stub-domain",
		"forms/2024/never deleted=true rev= path=0: type=StubType domain=stub-domain",
		fmt.Sprintf("forms/2024/f4 deleted=true rev=%s", f4Rev),
	}
	if len(got) != len(want) {
		t.Fatalf("Fetch =\n%s", strings.Join(got, "\n"))
	}
	for i := range want {
		if !strings.HasPrefix(got[i], want[i]) {
			t.Fatalf("document %d = %s\nwant prefix %s", i, got[i], want[i])
		}
	}
	f1 := byID["f1"]
	if f1.Type != "XFormInstance" || f1.Domain != "d1" || f1.Body["n"] != json.Number("2") || f1.Body["_id"] != "f1" {
		t.Fatalf("f1 = %+v", f1)
	}
	if _, ok := f1.Body["_revisions"]; ok {
		t.Fatal("_revisions left in the body")
	}
	if byID["f4"].Body != nil {
		t.Fatalf("soft-deleted f4 kept a body: %v", byID["f4"].Body)
	}
	if byID["f2"].Body != nil || byID["f3"].Body["v"] != "short" {
		t.Fatalf("f2 body %v, f3 body %v", byID["f2"].Body, byID["f3"].Body)
	}
	if byID["f1"].Version.Revisions.Contains(stub.Rev{Gen: 1, Hash: "x"}) || len(byID["f1"].Version.Revisions.IDs) != 2 {
		t.Fatalf("f1 path = %+v", byID["f1"].Version.Revisions)
	}

	t.Run("Unreachable", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		s, err := NewCouch("http://admin:s3cret@"+addr, nil)
		if err != nil {
			t.Fatal(err)
		}
		_, err = s.Fetch(ctx, []*stub.Stub{couchStub(db, "f1")})
		if !errors.Is(err, doc.ErrTransient) || strings.Contains(err.Error(), "s3cret") {
			t.Fatalf("Fetch = %v, want doc.ErrTransient without the password", err)
		}
	})

	t.Run("ServerErrorIsTransient", func(t *testing.T) {
		bad := http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, `{"error":"unavailable","reason":"maintenance"}`)
		})}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go bad.Serve(ln)
		t.Cleanup(func() { bad.Close() })
		s, _ := NewCouch("http://"+ln.Addr().String(), nil)
		_, err = s.Fetch(ctx, []*stub.Stub{couchStub(db, "f1")})
		if !errors.Is(err, doc.ErrTransient) || !strings.Contains(err.Error(), "503") {
			t.Fatalf("Fetch = %v, want doc.ErrTransient naming HTTP 503", err)
		}
	})

	t.Run("ServerDownThenBack", func(t *testing.T) {
		if err := srv.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		fctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := s.Fetch(fctx, []*stub.Stub{couchStub(db, "f1")})
		cancel()
		if !errors.Is(err, doc.ErrTransient) {
			t.Fatalf("Fetch with the server down = %v, want doc.ErrTransient", err)
		}
		if err := srv.Start(ctx); err != nil {
			t.Fatal(err)
		}
		docs, err := s.Fetch(ctx, []*stub.Stub{couchStub(db, "f1")})
		if err != nil || len(docs) != 1 || docs[0].Version.Rev.String() != f1Rev {
			t.Fatalf("Fetch after restart = %v, %v", docs, err)
		}
	})
}

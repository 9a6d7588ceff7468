package docstore

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/stub"
)

// Couch fetches CouchDB documents by database (the stubs' data_source_name)
// over the CouchDB HTTP API, in bulk, with their revision paths.
//
// Per database and batch it sends one POST /{db}/_bulk_get?revs=true for the
// ids, which returns the current winning revision of every live document with
// its _revisions. Only when some ids are not live does it send
// POST /{db}/_all_docs with those keys, to learn each tombstone's revision
// (CouchDB's _bulk_get does not give it for a deleted winner), and a second
// _bulk_get for exactly those revisions, so a tombstone carries its revision
// path too. A document recreated between the two calls is returned as the
// live revision _all_docs reported.
type Couch struct {
	base   *url.URL // without credentials
	user   *url.Userinfo
	client *http.Client
}

// DeletedSuffix marks a soft-deleted Couch document's doc_type.
const DeletedSuffix = "-Deleted"

// NewCouch returns a store for the CouchDB server at baseURL
// ("http://user:pass@host:5984" or with a path prefix). Credentials in the
// URL are sent as HTTP basic authentication and never appear in errors. A
// nil client means http.DefaultClient; give one with a Timeout or bound each
// Fetch with a context deadline.
func NewCouch(baseURL string, client *http.Client) (*Couch, error) {
	u, err := url.Parse(baseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, errors.New("docstore: couch: base URL must be http(s)://host[:port][/prefix]")
	}
	if client == nil {
		client = http.DefaultClient
	}
	c := &Couch{user: u.User, client: client}
	u.User = nil
	u.RawQuery, u.Fragment = "", ""
	u.Path = strings.TrimSuffix(u.Path, "/")
	u.RawPath = strings.TrimSuffix(u.RawPath, "/")
	c.base = u
	return c, nil
}

type couchWant struct {
	id, db string
	stub   *stub.Stub // the last stub seen
}

// Fetch returns one document per distinct (database, document id) among
// stubs, in order of first appearance, at the database's current winning
// revision: Version.Rev and Version.Revisions are the winner's, whatever
// revision the stubs named. A deleted document has Deleted set and, when the
// database still has its tombstone, the tombstone's revision and path; a
// document the database never had (or purged) has Deleted set and no
// revision. Stubs that are not Couch stubs, and documents of a database that
// does not exist, are returned as doc.Errors alongside the other documents.
func (s *Couch) Fetch(ctx context.Context, stubs []*stub.Stub) ([]*doc.Document, error) {
	var order []*couchWant
	byKey := make(map[string]*couchWant, len(stubs))
	for _, st := range stubs {
		key := st.DataSourceName + "\x00" + st.DocumentID
		if w := byKey[key]; w != nil {
			w.stub = st
			continue
		}
		w := &couchWant{id: st.DocumentID, db: st.DataSourceName, stub: st}
		byKey[key] = w
		order = append(order, w)
	}

	errs := doc.Errors{}
	var dbs []string
	groups := map[string][]*couchWant{}
	for _, w := range order {
		switch {
		case w.stub.DataSourceType != stub.SourceCouch:
			errs[w.id] = fmt.Errorf("docstore: couch: stub of data_source_type %q", w.stub.DataSourceType)
			continue
		case w.db == "":
			errs[w.id] = errors.New("docstore: couch: stub without data_source_name")
			continue
		}
		if groups[w.db] == nil {
			dbs = append(dbs, w.db)
		}
		groups[w.db] = append(groups[w.db], w)
	}

	got := make(map[*couchWant]*doc.Document, len(order))
	for _, db := range dbs {
		ws := groups[db]
		docs, err := s.fetchDB(ctx, db, ws)
		var dbErr *couchDBError
		switch {
		case errors.As(err, &dbErr):
			for _, w := range ws {
				errs[w.id] = err
			}
			continue
		case err != nil:
			return nil, err
		}
		for i, d := range docs {
			got[ws[i]] = d
		}
	}

	out := make([]*doc.Document, 0, len(order))
	for _, w := range order {
		if d := got[w]; d != nil {
			out = append(out, d)
		}
	}
	if len(errs) > 0 {
		return out, errs
	}
	return out, nil
}

// couchDBError is a failure of one database's requests that is not the
// server's: the database does not exist, or the server refused the request
// as malformed. The documents of that database are in error; others are not.
type couchDBError struct {
	db     string
	status int
	body   couchErrorBody
}

func (e *couchDBError) Error() string {
	return fmt.Sprintf("docstore: couch: database %q: HTTP %d %s: %s", e.db, e.status, e.body.Error, e.body.Reason)
}

type couchErrorBody struct {
	Error  string `json:"error"`
	Reason string `json:"reason"`
}

// bulkGetResult is one id's entry in a _bulk_get response. CouchDB reports
// a missing or deleted winner as {"error": {...}}; pouchdb-server as {}.
type bulkGetResult struct {
	ID   string `json:"id"`
	Docs []struct {
		OK json.RawMessage `json:"ok"`
	} `json:"docs"`
}

// fetchDB returns the documents of ws, in order, from database db.
func (s *Couch) fetchDB(ctx context.Context, db string, ws []*couchWant) ([]*doc.Document, error) {
	out := make([]*doc.Document, len(ws))
	index := make(map[string]int, len(ws))
	refs := make([]map[string]string, len(ws))
	for i, w := range ws {
		index[w.id] = i
		refs[i] = map[string]string{"id": w.id}
	}
	if err := s.bulkGet(ctx, db, refs, ws, index, out); err != nil {
		return nil, err
	}

	// Not live: ask _all_docs for the winner's revision (a tombstone's, or a
	// new live one if the document came back meanwhile).
	var keys []string
	for i, d := range out {
		if d == nil {
			keys = append(keys, ws[i].id)
		}
	}
	if len(keys) == 0 {
		return out, nil
	}
	var all struct {
		Rows []struct {
			Key   string `json:"key"`
			Error string `json:"error"`
			Value *struct {
				Rev     string `json:"rev"`
				Deleted bool   `json:"deleted"`
			} `json:"value"`
		} `json:"rows"`
	}
	if err := s.post(ctx, db, "_all_docs", map[string]any{"keys": keys}, &all); err != nil {
		return nil, err
	}
	var revRefs []map[string]string
	for _, row := range all.Rows {
		i, ok := index[row.Key]
		if !ok || out[i] != nil {
			continue
		}
		w := ws[i]
		if row.Value == nil || row.Value.Rev == "" {
			out[i] = deletedDoc(w, stub.Rev{})
			continue
		}
		rev, err := stub.ParseRev(row.Value.Rev)
		if err != nil {
			return nil, transient("docstore: couch: database "+db, fmt.Errorf("document %q: %w", w.id, err))
		}
		// Placeholder until the exact revision is read below.
		out[i] = deletedDoc(w, rev)
		if !row.Value.Deleted {
			out[i] = nil
		}
		revRefs = append(revRefs, map[string]string{"id": w.id, "rev": row.Value.Rev})
	}
	if len(revRefs) > 0 {
		if err := s.bulkGet(ctx, db, revRefs, ws, index, out); err != nil {
			return nil, err
		}
	}
	for i, d := range out {
		if d == nil {
			// Live in _all_docs but that revision is gone again (replaced
			// and compacted): the state moved on; fetch again later.
			return nil, transient("docstore: couch: database "+db, fmt.Errorf("document %q changed while fetched", ws[i].id))
		}
	}
	return out, nil
}

// bulkGet reads refs ({"id"} or {"id","rev"}) with their revision paths and
// sets out[index[id]] for every revision returned.
func (s *Couch) bulkGet(ctx context.Context, db string, refs []map[string]string, ws []*couchWant, index map[string]int, out []*doc.Document) error {
	var res struct {
		Results []bulkGetResult `json:"results"`
	}
	if err := s.post(ctx, db, "_bulk_get?revs=true", map[string]any{"docs": refs}, &res); err != nil {
		return err
	}
	for _, r := range res.Results {
		i, ok := index[r.ID]
		if !ok {
			continue
		}
		for _, d := range r.Docs {
			if len(d.OK) == 0 || string(d.OK) == "null" {
				continue
			}
			dd, err := decodeCouchDoc(ws[i], d.OK)
			if err != nil {
				return transient("docstore: couch: database "+db, err)
			}
			out[i] = dd
			break
		}
	}
	return nil
}

func deletedDoc(w *couchWant, rev stub.Rev) *doc.Document {
	d := &doc.Document{
		ID: w.id, Type: w.stub.DocumentType, Domain: w.stub.Domain,
		Source: stub.SourceCouch, SourceName: w.db, Deleted: true,
	}
	if !rev.IsZero() {
		d.Version.Rev = rev
		d.Version.Revisions = stub.Revisions{Start: rev.Gen, IDs: []string{rev.Hash}}
	}
	return d
}

// decodeCouchDoc turns one revision as _bulk_get returns it into a Document.
func decodeCouchDoc(w *couchWant, raw json.RawMessage) (*doc.Document, error) {
	body, err := decodeBody(raw)
	if err != nil {
		return nil, fmt.Errorf("document %q: %w", w.id, err)
	}
	revStr, _ := body["_rev"].(string)
	rev, err := stub.ParseRev(revStr)
	if err != nil {
		return nil, fmt.Errorf("document %q: %w", w.id, err)
	}
	var path stub.Revisions
	if rv, ok := body["_revisions"]; ok {
		b, _ := json.Marshal(rv)
		if err := json.Unmarshal(b, &path); err != nil {
			return nil, fmt.Errorf("document %q: _revisions: %w", w.id, err)
		}
		delete(body, "_revisions")
	}
	if path.Leaf() != rev {
		path = stub.Revisions{Start: rev.Gen, IDs: []string{rev.Hash}}
	}
	d := deletedDoc(w, rev)
	d.Version.Revisions = path
	if deleted, _ := body["_deleted"].(bool); deleted {
		return d, nil
	}
	// HQ soft-deletes by renaming the doc_type ("CommCareCase-Deleted"); the
	// follower publishes such a change as a deletion and the sinks must
	// treat it as one too.
	if t, _ := body["doc_type"].(string); strings.HasSuffix(t, DeletedSuffix) {
		return d, nil
	}
	d.Deleted = false
	d.Body = body
	if t, ok := body["doc_type"].(string); ok && t != "" {
		d.Type = t
	}
	if dm, ok := body["domain"].(string); ok && dm != "" {
		d.Domain = dm
	}
	return d, nil
}

// post sends a JSON request to /{db}/{endpoint} and decodes the response.
func (s *Couch) post(ctx context.Context, db, endpoint string, body any, out any) error {
	what := "docstore: couch: database " + db
	payload, err := json.Marshal(body)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	u := *s.base
	ep, query, _ := strings.Cut(endpoint, "?")
	u.Path = s.base.Path + "/" + db + "/" + ep
	u.RawPath = s.base.EscapedPath() + "/" + url.PathEscape(db) + "/" + ep
	u.RawQuery = query
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), bytes.NewReader(payload))
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	if s.user != nil {
		pw, _ := s.user.Password()
		req.SetBasicAuth(s.user.Username(), pw)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		// The request URL carries no credentials; net/http's errors name
		// only it.
		return transient(what, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		var eb couchErrorBody
		_ = json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&eb)
		dbErr := &couchDBError{db: db, status: resp.StatusCode, body: eb}
		switch {
		case resp.StatusCode == http.StatusNotFound, resp.StatusCode == http.StatusBadRequest:
			return dbErr
		default: // 401, 403, 408, 429, 5xx: the server, not the documents
			return transient(what, errors.New(dbErr.Error()))
		}
	}
	dec := json.NewDecoder(resp.Body)
	dec.UseNumber()
	if err := dec.Decode(out); err != nil {
		return transient(what, fmt.Errorf("decode %s response: %w", ep, err))
	}
	return nil
}

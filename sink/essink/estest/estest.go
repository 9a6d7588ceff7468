// Package estest is a TEST DOUBLE of Elasticsearch: a small in-memory HTTP
// server answering the part of the Elasticsearch 8 REST API that the
// Elasticsearch sink and its tests use, with the request and response shapes
// of Elastic's API documentation. It exists because no Elasticsearch server
// can be installed where the tests run. It is not Elasticsearch; code must
// not depend on anything it does that Elasticsearch does not.
//
// What it serves (every response carries X-Elastic-Product: Elasticsearch,
// which the official Go client requires):
//
//   - GET|HEAD /                              cluster info (version 8.19.7)
//   - HEAD|GET|PUT|DELETE /{index}            exists / get / create (with
//     "mappings" and "settings", 400 resource_already_exists_exception) /
//     delete
//   - GET|PUT|POST /{index}/_mapping          read / add properties
//   - POST|PUT /_bulk, /{index}/_bulk         index, create and delete
//     actions with version + version_type (internal, external,
//     external_gte), if_seq_no + if_primary_term, per-item results and
//     errors (409 version_conflict_engine_exception, 400
//     document_parsing_exception, …); update actions answer a per-item 400
//   - GET|HEAD|PUT|POST|DELETE /{index}/_doc/{id}, PUT|POST
//     /{index}/_create/{id}                   the same rules, one document
//   - GET|POST /_mget, /{index}/_mget          {"ids": …} or {"docs": …}
//   - POST|GET /_refresh, /{index}/_refresh   accepted (a no-op, see below)
//   - GET|POST /{index}/_search, /{index}/_count with match_all, term,
//     terms, exists, ids and bool (must, filter, should, must_not) queries;
//     from and size
//
// Versioning follows Elasticsearch: internal versions count up from 1 per
// document; external versions must be greater than the current one
// (external_gte: greater or equal), also against a deleted document's
// tombstone, and a delete with an external version of a missing document
// records a tombstone and answers 404 "not_found"; if_seq_no/if_primary_term
// must match the live document (a deleted or missing one is a conflict);
// create conflicts with a live document; seq_no counts up per index;
// primary_term is always 1.
//
// Limits — where it is simpler than Elasticsearch:
//   - Everything is realtime: search and count see every write at once, so
//     refresh is a no-op and never needed for correctness here.
//   - Tombstones are never garbage-collected. Elasticsearch forgets a deleted
//     document's version after index.gc_deletes (60 s by default); a test
//     that depends on the difference is wrong.
//   - Mappings are checked only where given explicitly: a value of the wrong
//     kind for a long/integer/short/byte/double/float/boolean/date/keyword/
//     text/object field is a 400 document_parsing_exception, and metadata
//     fields (_id, _index, …) in a source are rejected. There is no dynamic
//     mapping (unmapped fields are stored untyped), no analysis (a term query
//     matches a whole value exactly, or one element of an array), no scoring
//     (hits are sorted by id, _score is 1), no aggregations, no sort, no
//     aliases, no routing, no shards or replicas.
//   - Index names are checked for the main rules only (lowercase, no
//     forbidden characters or leading -_+).
//   - One lock serialises every request.
//
// Fault injection for tests: SetUnavailable makes every request fail with
// 503, as a cluster without a master does; Close stops the listener, as a
// server that is down.
package estest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Server is the test double. Create it with NewServer.
type Server struct {
	srv *httptest.Server

	mu          sync.Mutex
	indices     map[string]*index
	unavailable bool
	calls       map[string]int
}

type index struct {
	name     string
	uuid     string
	mappings map[string]any
	settings map[string]any
	docs     map[string]*entry
	seqNo    int64
}

// entry is a live document or a tombstone.
type entry struct {
	source  json.RawMessage
	version int64
	seqNo   int64
	deleted bool
}

const primaryTerm = 1

// NewServer starts a double on a loopback port and stops it when tb ends.
func NewServer(tb testing.TB) *Server {
	s := &Server{indices: map[string]*index{}, calls: map[string]int{}}
	s.srv = httptest.NewServer(http.HandlerFunc(s.serve))
	tb.Cleanup(s.srv.Close)
	return s
}

// URL is the server's base URL.
func (s *Server) URL() string { return s.srv.URL }

// Close stops the server: later requests fail to connect.
func (s *Server) Close() { s.srv.Close() }

// SetUnavailable makes every request fail with 503 while on.
func (s *Server) SetUnavailable(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.unavailable = on
}

// Calls returns how many requests reached an endpoint, named like "_bulk",
// "_mget", "_search", "_doc", "index" (the /{index} endpoints).
func (s *Server) Calls(endpoint string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls[endpoint]
}

// response is an HTTP status and a JSON body (nil: no body).
type response struct {
	status int
	body   any
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	var res response
	if err != nil {
		res = errorResponse(400, "parse_exception", "estest: read body: "+err.Error(), "")
	} else {
		s.mu.Lock()
		if s.unavailable {
			res = errorResponse(503, "master_not_discovered_exception", "estest: unavailable (SetUnavailable)", "")
		} else {
			res = s.route(r.Method, r.URL, body)
		}
		s.mu.Unlock()
	}
	w.Header().Set("X-Elastic-Product", "Elasticsearch")
	if res.body == nil {
		w.WriteHeader(res.status)
		return
	}
	b, _ := json.Marshal(res.body)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(res.status)
	if r.Method != http.MethodHead {
		_, _ = w.Write(b)
	}
}

func (s *Server) route(method string, u *url.URL, body []byte) response {
	parts := strings.Split(strings.Trim(u.EscapedPath(), "/"), "/")
	for i, p := range parts {
		if v, err := url.PathUnescape(p); err == nil {
			parts[i] = v
		}
	}
	if len(parts) == 1 && parts[0] == "" {
		parts = nil
	}
	q := u.Query()
	noHandler := func() response {
		return response{405, map[string]any{"error": fmt.Sprintf("Incorrect HTTP method for uri [%s] and method [%s] (estest serves a subset of the API)", u.Path, method), "status": 405}}
	}
	is := func(methods ...string) bool { return slices.Contains(methods, method) }
	switch {
	case len(parts) == 0:
		if !is("GET", "HEAD") {
			return noHandler()
		}
		return response{200, map[string]any{
			"name": "estest", "cluster_name": "estest", "cluster_uuid": "estest-cluster",
			"version": map[string]any{
				"number": "8.19.7", "build_flavor": "default", "build_type": "docker",
				"lucene_version": "9.12.2", "minimum_wire_compatibility_version": "7.17.0",
				"minimum_index_compatibility_version": "7.0.0",
			},
			"tagline": "You Know, for Search",
		}}
	case parts[0] == "_bulk" && len(parts) == 1:
		s.calls["_bulk"]++
		if !is("POST", "PUT") {
			return noHandler()
		}
		return s.bulk("", q, body)
	case parts[0] == "_mget" && len(parts) == 1:
		s.calls["_mget"]++
		return s.mget("", q, body)
	case parts[0] == "_refresh" && len(parts) == 1:
		s.calls["_refresh"]++
		return response{200, map[string]any{"_shards": shards()}}
	case strings.HasPrefix(parts[0], "_"):
		return noHandler()
	}

	name := parts[0]
	switch {
	case len(parts) == 1:
		s.calls["index"]++
		switch method {
		case "HEAD":
			if s.indices[name] == nil {
				return response{404, nil}
			}
			return response{200, nil}
		case "GET":
			ix := s.indices[name]
			if ix == nil {
				return indexNotFound(name)
			}
			return response{200, map[string]any{name: map[string]any{"aliases": map[string]any{}, "mappings": ix.mappings, "settings": map[string]any{"index": ix.settings}}}}
		case "PUT":
			return s.createIndex(name, body)
		case "DELETE":
			if s.indices[name] == nil {
				return indexNotFound(name)
			}
			delete(s.indices, name)
			return response{200, map[string]any{"acknowledged": true}}
		}
		return noHandler()
	case len(parts) == 2 && parts[1] == "_mapping":
		s.calls["_mapping"]++
		ix := s.indices[name]
		if ix == nil {
			return indexNotFound(name)
		}
		switch method {
		case "GET":
			return response{200, map[string]any{name: map[string]any{"mappings": ix.mappings}}}
		case "PUT", "POST":
			var m map[string]any
			if err := json.Unmarshal(body, &m); err != nil {
				return errorResponse(400, "parse_exception", "request body is required to be a JSON object: "+err.Error(), "")
			}
			props, _ := ix.mappings["properties"].(map[string]any)
			if props == nil {
				props = map[string]any{}
			}
			if reason := checkMapping(m); reason != "" {
				return errorResponse(400, "mapper_parsing_exception", reason, name)
			}
			add, _ := m["properties"].(map[string]any)
			for k, v := range add {
				props[k] = v
			}
			ix.mappings["properties"] = props
			return response{200, map[string]any{"acknowledged": true}}
		}
		return noHandler()
	case len(parts) == 2 && parts[1] == "_bulk":
		s.calls["_bulk"]++
		if !is("POST", "PUT") {
			return noHandler()
		}
		return s.bulk(name, q, body)
	case len(parts) == 2 && parts[1] == "_mget":
		s.calls["_mget"]++
		return s.mget(name, q, body)
	case len(parts) == 2 && parts[1] == "_refresh":
		s.calls["_refresh"]++
		if s.indices[name] == nil {
			return indexNotFound(name)
		}
		return response{200, map[string]any{"_shards": shards()}}
	case len(parts) == 2 && (parts[1] == "_search" || parts[1] == "_count"):
		s.calls[parts[1]]++
		if !is("GET", "POST") {
			return noHandler()
		}
		return s.search(name, parts[1] == "_count", q, body)
	case len(parts) == 3 && (parts[1] == "_doc" || parts[1] == "_create"):
		s.calls["_doc"]++
		id := parts[2]
		p := params{index: name, id: id, opType: "index"}
		if err := p.fromQuery(q); err != nil {
			return errorResponse(400, "illegal_argument_exception", err.Error(), "")
		}
		if parts[1] == "_create" || q.Get("op_type") == "create" {
			p.opType = "create"
		}
		switch {
		case parts[1] == "_doc" && is("GET", "HEAD"):
			r := s.get(name, id, q)
			if method == "HEAD" {
				r.body = nil
			}
			return r
		case parts[1] == "_doc" && method == "DELETE":
			p.opType = "delete"
			item, status := s.apply(p, nil)
			return response{status, item}
		case is("PUT", "POST"):
			item, status := s.apply(p, body)
			return response{status, item}
		}
		return noHandler()
	}
	return noHandler()
}

func shards() map[string]any { return map[string]any{"total": 2, "successful": 1, "failed": 0} }

func errorCause(typ, reason, index string) map[string]any {
	c := map[string]any{"type": typ, "reason": reason}
	if index != "" {
		c["index"], c["index_uuid"] = index, "_na_"
	}
	return c
}

func errorResponse(status int, typ, reason, index string) response {
	c := errorCause(typ, reason, index)
	e := map[string]any{"root_cause": []any{errorCause(typ, reason, index)}}
	for k, v := range c {
		e[k] = v
	}
	return response{status, map[string]any{"error": e, "status": status}}
}

func indexNotFound(name string) response {
	return errorResponse(404, "index_not_found_exception", "no such index ["+name+"]", name)
}

// validIndexName applies Elasticsearch's main index name rules.
func validIndexName(name string) error {
	switch {
	case name == "" || name == "." || name == "..":
		return fmt.Errorf("Invalid index name [%s], must not be '.' or '..'", name)
	case strings.ToLower(name) != name:
		return fmt.Errorf("Invalid index name [%s], must be lowercase", name)
	case strings.ContainsAny(name, `\/*?"<>| ,#:`):
		return fmt.Errorf("Invalid index name [%s], must not contain the following characters [ , \", *, \\, <, |, ,, >, /, ?, #, :]", name)
	case strings.IndexAny(name[:1], "-_+") == 0:
		return fmt.Errorf("Invalid index name [%s], must not start with '_', '-', or '+'", name)
	case len(name) > 255:
		return fmt.Errorf("Invalid index name [%s], index name is too long", name)
	}
	return nil
}

func (s *Server) createIndex(name string, body []byte) response {
	if err := validIndexName(name); err != nil {
		return errorResponse(400, "invalid_index_name_exception", err.Error(), name)
	}
	if ix := s.indices[name]; ix != nil {
		return errorResponse(400, "resource_already_exists_exception", fmt.Sprintf("index [%s/%s] already exists", name, ix.uuid), name)
	}
	var req struct {
		Mappings map[string]any `json:"mappings"`
		Settings map[string]any `json:"settings"`
		Aliases  map[string]any `json:"aliases"` // accepted, not served
	}
	if len(bytes.TrimSpace(body)) > 0 {
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			return errorResponse(400, "x_content_parse_exception", "estest: create index body: "+err.Error(), name)
		}
	}
	if reason := checkMapping(req.Mappings); reason != "" {
		return errorResponse(400, "mapper_parsing_exception", "Failed to parse mapping: "+reason, name)
	}
	s.newIndex(name, req.Mappings, req.Settings)
	return response{200, map[string]any{"acknowledged": true, "shards_acknowledged": true, "index": name}}
}

func (s *Server) newIndex(name string, mappings, settings map[string]any) *index {
	if mappings == nil {
		mappings = map[string]any{}
	}
	if settings == nil {
		settings = map[string]any{}
	}
	ix := &index{name: name, uuid: fmt.Sprintf("estest-%08x", rand.Uint32()), mappings: mappings, settings: settings, docs: map[string]*entry{}}
	s.indices[name] = ix
	return ix
}

// params are one write's metadata, from a bulk action line or a query.
type params struct {
	opType        string // index, create, delete
	index, id     string
	version       *int64
	versionType   string
	ifSeqNo       *int64
	ifPrimaryTerm *int64
}

func (p *params) fromQuery(q url.Values) error {
	parse := func(k string) (*int64, error) {
		v := q.Get(k)
		if v == "" {
			return nil, nil
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("failed to parse [%s]: %v", k, err)
		}
		return &n, nil
	}
	var err error
	if p.version, err = parse("version"); err != nil {
		return err
	}
	if p.ifSeqNo, err = parse("if_seq_no"); err != nil {
		return err
	}
	if p.ifPrimaryTerm, err = parse("if_primary_term"); err != nil {
		return err
	}
	p.versionType = q.Get("version_type")
	return nil
}

// validate applies the request validation Elasticsearch does before
// touching the document.
func (p *params) validate() string {
	switch p.versionType {
	case "", "internal", "external", "external_gte":
	default:
		return "No version type match [" + p.versionType + "]"
	}
	external := p.versionType == "external" || p.versionType == "external_gte"
	switch {
	case p.id == "" && p.opType == "delete":
		return "id is missing"
	case external && p.version == nil:
		return "version type [" + p.versionType + "] requires a version"
	case external && p.opType == "create":
		return "create operations only support internal versioning. use index instead"
	case external && (p.ifSeqNo != nil || p.ifPrimaryTerm != nil):
		return "compare and write operations can not be used with version type [" + p.versionType + "]"
	case !external && p.version != nil:
		return "internal versioning can not be used for optimistic concurrency control. Please use `if_seq_no` and `if_primary_term` instead"
	case (p.ifSeqNo == nil) != (p.ifPrimaryTerm == nil):
		return "if_seq_no and if_primary_term must be set together"
	case p.version != nil && (*p.version < 0 || *p.version == math.MaxInt64):
		return fmt.Sprintf("illegal version value [%d] for version type [%s]", *p.version, p.versionType)
	case p.ifSeqNo != nil && *p.ifSeqNo < 0:
		return fmt.Sprintf("sequence numbers must be non negative. got [%d]", *p.ifSeqNo)
	}
	return ""
}

// apply performs one index/create/delete and returns the result item (the
// object Elasticsearch puts under the action name in a bulk response) and
// its status.
func (s *Server) apply(p params, source []byte) (map[string]any, int) {
	fail := func(status int, typ, reason string) (map[string]any, int) {
		return map[string]any{"_index": p.index, "_id": p.id, "status": status, "error": errorCause(typ, reason, p.index)}, status
	}
	if msg := p.validate(); msg != "" {
		return fail(400, "action_request_validation_exception", "Validation Failed: 1: "+msg+";")
	}
	if err := validIndexName(p.index); err != nil {
		return fail(400, "invalid_index_name_exception", err.Error())
	}
	var doc map[string]any
	if p.opType != "delete" {
		dec := json.NewDecoder(bytes.NewReader(source))
		dec.UseNumber()
		if err := dec.Decode(&doc); err != nil || doc == nil {
			return fail(400, "document_parsing_exception", "[1:1] failed to parse: the source is not a JSON object")
		}
		if p.id == "" {
			p.id = fmt.Sprintf("estest%016x", rand.Uint64())
		}
	}
	ix := s.indices[p.index]
	if ix == nil {
		ix = s.newIndex(p.index, nil, nil) // action.auto_create_index
	}
	if doc != nil {
		if reason := checkSource(ix.mappings, doc, p.id); reason != "" {
			return fail(400, "document_parsing_exception", reason)
		}
	}

	cur := ix.docs[p.id]
	live := cur != nil && !cur.deleted
	var curVersion int64
	if cur != nil {
		curVersion = cur.version
	}
	conflict := func(reason string) (map[string]any, int) {
		return fail(409, "version_conflict_engine_exception", "["+p.id+"]: version conflict, "+reason)
	}
	next := curVersion + 1
	switch {
	case p.ifSeqNo != nil:
		if !live {
			return conflict(fmt.Sprintf("required seqNo [%d], primary term [%d]. but no document was found", *p.ifSeqNo, *p.ifPrimaryTerm))
		}
		if cur.seqNo != *p.ifSeqNo || *p.ifPrimaryTerm != primaryTerm {
			return conflict(fmt.Sprintf("required seqNo [%d], primary term [%d]. current document has seqNo [%d] and primary term [%d]",
				*p.ifSeqNo, *p.ifPrimaryTerm, cur.seqNo, primaryTerm))
		}
	case p.versionType == "external":
		if cur != nil && curVersion >= *p.version {
			return conflict(fmt.Sprintf("current version [%d] is higher or equal to the one provided [%d]", curVersion, *p.version))
		}
		next = *p.version
	case p.versionType == "external_gte":
		if cur != nil && curVersion > *p.version {
			return conflict(fmt.Sprintf("current version [%d] is higher than the one provided [%d]", curVersion, *p.version))
		}
		next = *p.version
	}
	if p.opType == "create" && live {
		return conflict(fmt.Sprintf("document already exists (current version [%d])", curVersion))
	}

	seq := ix.seqNo
	ix.seqNo++
	item := map[string]any{"_index": p.index, "_id": p.id, "_version": next, "_shards": shards(), "_seq_no": seq, "_primary_term": primaryTerm}
	if p.opType == "delete" {
		ix.docs[p.id] = &entry{version: next, seqNo: seq, deleted: true}
		if !live {
			item["result"], item["status"] = "not_found", 404
			return item, 404
		}
		item["result"], item["status"] = "deleted", 200
		return item, 200
	}
	ix.docs[p.id] = &entry{source: json.RawMessage(slices.Clone(bytes.TrimSpace(source))), version: next, seqNo: seq}
	if live {
		item["result"], item["status"] = "updated", 200
		return item, 200
	}
	item["result"], item["status"] = "created", 201
	return item, 201
}

func (s *Server) bulk(defaultIndex string, q url.Values, body []byte) response {
	start := time.Now()
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 0, 64<<10), 100<<20)
	var lines [][]byte
	for sc.Scan() {
		if l := bytes.TrimSpace(sc.Bytes()); len(l) > 0 {
			lines = append(lines, slices.Clone(l))
		}
	}
	if err := sc.Err(); err != nil {
		return errorResponse(400, "illegal_argument_exception", "estest: bulk body: "+err.Error(), "")
	}
	if len(lines) == 0 {
		return errorResponse(400, "action_request_validation_exception", "Validation Failed: 1: no requests added;", "")
	}
	var items []any
	errorsSeen := false
	for i := 0; i < len(lines); i++ {
		var action map[string]map[string]json.RawMessage
		if err := json.Unmarshal(lines[i], &action); err != nil || len(action) != 1 {
			return errorResponse(400, "illegal_argument_exception", fmt.Sprintf("Malformed action/metadata line [%d], expected a simple value for field [%s] but found [START_OBJECT]", i+1, "action"), "")
		}
		var op string
		var meta map[string]json.RawMessage
		for k, v := range action {
			op, meta = k, v
		}
		p := params{opType: op, index: defaultIndex}
		var err error
		for k, raw := range meta {
			switch k {
			case "_index":
				err = json.Unmarshal(raw, &p.index)
			case "_id":
				err = json.Unmarshal(raw, &p.id)
			case "version":
				p.version = new(int64)
				err = json.Unmarshal(raw, p.version)
			case "version_type":
				err = json.Unmarshal(raw, &p.versionType)
			case "if_seq_no":
				p.ifSeqNo = new(int64)
				err = json.Unmarshal(raw, p.ifSeqNo)
			case "if_primary_term":
				p.ifPrimaryTerm = new(int64)
				err = json.Unmarshal(raw, p.ifPrimaryTerm)
			case "routing", "require_alias", "pipeline", "dynamic_templates", "retry_on_conflict", "_source", "op_type":
			default:
				return errorResponse(400, "illegal_argument_exception", fmt.Sprintf("Action/metadata line [%d] contains an unknown parameter [%s]", i+1, k), "")
			}
			if err != nil {
				return errorResponse(400, "illegal_argument_exception", fmt.Sprintf("Action/metadata line [%d]: field [%s]: %v", i+1, k, err), "")
			}
		}
		var source []byte
		switch op {
		case "index", "create", "update":
			if i+1 >= len(lines) {
				return errorResponse(400, "illegal_argument_exception", "The bulk request must be terminated by a newline [\\n]", "")
			}
			i++
			source = lines[i]
		case "delete":
		default:
			return errorResponse(400, "illegal_argument_exception", fmt.Sprintf("Malformed action/metadata line [%d], expected one of [create, delete, index, update] but found [%s]", i+1, op), "")
		}
		if p.index == "" {
			return errorResponse(400, "action_request_validation_exception", "Validation Failed: 1: index is missing;", "")
		}
		var item map[string]any
		var status int
		if op == "update" {
			item, status = map[string]any{"_index": p.index, "_id": p.id, "status": 400,
				"error": errorCause("illegal_argument_exception", "estest: update actions are not supported by the test double", p.index)}, 400
		} else {
			item, status = s.apply(p, source)
		}
		if status >= 300 && !(op == "delete" && status == 404) {
			errorsSeen = true
		}
		items = append(items, map[string]any{op: item})
	}
	return response{200, map[string]any{"took": time.Since(start).Milliseconds(), "errors": errorsSeen, "items": items}}
}

func (s *Server) get(name, id string, q url.Values) response {
	ix := s.indices[name]
	if ix == nil {
		return indexNotFound(name)
	}
	e := ix.docs[id]
	if e == nil || e.deleted {
		return response{404, map[string]any{"_index": name, "_id": id, "found": false}}
	}
	return response{200, getBody(name, id, e, q)}
}

func getBody(name, id string, e *entry, q url.Values) map[string]any {
	b := map[string]any{"_index": name, "_id": id, "_version": e.version, "_seq_no": e.seqNo,
		"_primary_term": primaryTerm, "found": true}
	if q.Get("_source") == "false" {
		return b
	}
	b["_source"] = filterSource(e.source, q.Get("_source_includes"))
	return b
}

// filterSource keeps the top-level fields named by includes (comma
// separated; "a.b" keeps all of "a"); empty includes keep everything.
func filterSource(src json.RawMessage, includes string) json.RawMessage {
	if includes == "" {
		return src
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(src, &m) != nil {
		return src
	}
	keep := map[string]json.RawMessage{}
	for _, inc := range strings.Split(includes, ",") {
		top, _, _ := strings.Cut(strings.TrimSpace(inc), ".")
		if v, ok := m[top]; ok {
			keep[top] = v
		}
	}
	b, _ := json.Marshal(keep)
	return b
}

func (s *Server) mget(defaultIndex string, q url.Values, body []byte) response {
	var req struct {
		IDs  []string `json:"ids"`
		Docs []struct {
			Index string `json:"_index"`
			ID    string `json:"_id"`
		} `json:"docs"`
	}
	if err := json.Unmarshal(body, &req); err != nil {
		return errorResponse(400, "parse_exception", "estest: mget body: "+err.Error(), "")
	}
	type ref struct{ index, id string }
	var refs []ref
	for _, id := range req.IDs {
		refs = append(refs, ref{defaultIndex, id})
	}
	for _, d := range req.Docs {
		ix := d.Index
		if ix == "" {
			ix = defaultIndex
		}
		refs = append(refs, ref{ix, d.ID})
	}
	if len(refs) == 0 {
		return errorResponse(400, "action_request_validation_exception", "Validation Failed: 1: no documents to get;", "")
	}
	docs := make([]any, 0, len(refs))
	for _, r := range refs {
		if r.index == "" {
			return errorResponse(400, "action_request_validation_exception", "Validation Failed: 1: index is missing for doc 0;", "")
		}
		ix := s.indices[r.index]
		switch {
		case ix == nil:
			docs = append(docs, map[string]any{"_index": r.index, "_id": r.id,
				"error": map[string]any{"root_cause": []any{errorCause("index_not_found_exception", "no such index ["+r.index+"]", r.index)},
					"type": "index_not_found_exception", "reason": "no such index [" + r.index + "]", "index": r.index, "index_uuid": "_na_"}})
		case ix.docs[r.id] == nil || ix.docs[r.id].deleted:
			docs = append(docs, map[string]any{"_index": r.index, "_id": r.id, "found": false})
		default:
			docs = append(docs, getBody(r.index, r.id, ix.docs[r.id], q))
		}
	}
	return response{200, map[string]any{"docs": docs}}
}

func (s *Server) search(name string, count bool, q url.Values, body []byte) response {
	ix := s.indices[name]
	if ix == nil {
		return indexNotFound(name)
	}
	var req struct {
		Query map[string]any `json:"query"`
		From  *int           `json:"from"`
		Size  *int           `json:"size"`
	}
	if len(bytes.TrimSpace(body)) > 0 {
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.UseNumber()
		if err := dec.Decode(&req); err != nil {
			return errorResponse(400, "parsing_exception", "estest: search body: "+err.Error(), name)
		}
	}
	from, size := 0, 10
	if req.From != nil {
		from = *req.From
	}
	if req.Size != nil {
		size = *req.Size
	}
	if v := q.Get("from"); v != "" {
		from, _ = strconv.Atoi(v)
	}
	if v := q.Get("size"); v != "" {
		size, _ = strconv.Atoi(v)
	}
	ids := make([]string, 0, len(ix.docs))
	for id, e := range ix.docs {
		if e.deleted {
			continue
		}
		var src map[string]any
		dec := json.NewDecoder(bytes.NewReader(e.source))
		dec.UseNumber()
		if dec.Decode(&src) != nil {
			continue
		}
		ok, err := matches(req.Query, id, src)
		if err != nil {
			return errorResponse(400, "parsing_exception", err.Error(), name)
		}
		if ok {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	if count {
		return response{200, map[string]any{"count": len(ids), "_shards": map[string]any{"total": 1, "successful": 1, "skipped": 0, "failed": 0}}}
	}
	hits := []any{}
	for i := from; i < len(ids) && i < from+size; i++ {
		e := ix.docs[ids[i]]
		hits = append(hits, map[string]any{"_index": name, "_id": ids[i], "_score": 1.0, "_source": filterSource(e.source, q.Get("_source_includes"))})
	}
	var maxScore any
	if len(hits) > 0 {
		maxScore = 1.0
	}
	return response{200, map[string]any{
		"took": 0, "timed_out": false,
		"_shards": map[string]any{"total": 1, "successful": 1, "skipped": 0, "failed": 0},
		"hits":    map[string]any{"total": map[string]any{"value": len(ids), "relation": "eq"}, "max_score": maxScore, "hits": hits},
	}}
}

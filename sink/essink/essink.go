// Package essink writes documents into an Elasticsearch index with
// github.com/elastic/go-elasticsearch: index and mapping bootstrap, bulk
// writes, and version checks done by Elasticsearch itself, so that
// concurrent writers (two pillow processes during a rebalance) cannot make
// an older state win.
//
// SQL documents — external versioning. Each write carries
// version_type=external with version = the commit LSN. Elasticsearch
// applies the write only if that number is greater than the stored one;
// otherwise it answers 409 version_conflict_engine_exception, which the sink
// counts as a successful no-op. Why the commit LSN alone, without the
// ordinal: a version must be one 64-bit number (at most 2^63-2), and the
// pair (LSN, ordinal) needs 96 bits; a packing that steals low bits from the
// LSN would break once the WAL grows past the remaining range. The ordinal
// adds nothing a sink can use: every change with one commit LSN belongs to
// one transaction, and any state fetched for any of them is the state after
// that commit or a later one — a later commit brings its own stub with a
// greater LSN. Why external and not external_gte: a re-delivered stub with
// the same LSN is then a cheap no-op, as the SQL sink's strict comparison
// makes it. A deletion is a tombstone document, {"changefeed": {"deleted":
// true}}, indexed with the same external version, not a delete:
// Elasticsearch forgets a deleted document's version after
// index.gc_deletes (60 s by default), after which a late older write, or a
// Couch copy of the same id, could recreate the document.
//
// One id from two sources (HQ's Couch→SQL migration keeps ids): the SQL copy
// wins whatever the order (package sink). A SQL write's external version is
// above any internal version a Couch write left; a Couch write is refused
// when the stored document has no "changefeed.rev_path", which every Couch
// write stores and no SQL write does (documents written by earlier versions
// included). An index is the sink's own: a document put there by other
// means counts as SQL-held.
//
// Couch documents — optimistic concurrency on the stored revision path.
// Revisions have no monotonic number (a deleted conflict winner can leave a
// winner of lower generation), so Elasticsearch's versions cannot order
// them. The sink stores the revision and its known path (leaf first) in the
// reserved field "changefeed" of the source, reads the stored documents of
// the batch with one _mget, decides per document as package sink says
// (refuse the stored revision and its ancestors, write anything else), and
// writes with if_seq_no/if_primary_term of what it read (or create when
// nothing was stored). A 409 means another writer changed the document in
// between: the sink reads it again and decides again, up to 8 rounds, after
// which the document is reported in doc.Errors. Because Elasticsearch forgets
// everything about a really deleted document, a Couch deletion is stored as a
// tombstone document whose source holds only
// {"changefeed": {"deleted": true, "rev": …, "rev_path": […]}}, never a
// delete: otherwise a late write of an older revision could bring the
// document back. Queries on any body field never match a tombstone; queries
// that match all documents must exclude them:
//
//	{"bool": {"must_not": {"term": {"changefeed.deleted": true}}}}
//
// Bootstrap maps "changefeed" (deleted: boolean, rev: keyword, rev_path:
// keyword not indexed) next to the configured mapping.
//
// Errors: a failure of the cluster or of the whole request (connection
// refused, timeout, 5xx, 429, authentication, a missing index when
// auto-creation is off) wraps doc.ErrTransient; an item the cluster rejects
// because of the document (a mapping error, 400) is that document's error in
// doc.Errors. Source field "_id" is dropped from bodies (it is the
// document's _id).
package essink

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/url"
	"strings"

	"github.com/elastic/go-elasticsearch/v8"
	"github.com/elastic/go-elasticsearch/v8/esapi"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/sink"
)

// MetaField is the reserved source field that holds a Couch document's
// revision, its path and the tombstone flag.
const MetaField = "changefeed"

// maxRounds bounds the read-decide-write rounds for Couch documents that
// meet concurrent writers.
const maxRounds = 8

// Config says which cluster and index to write.
type Config struct {
	// URLs of the cluster's nodes ("https://es1:9200"). Credentials in a
	// URL are used as Username/Password when those are empty.
	URLs []string
	// Index to write; Bootstrap creates it.
	Index string
	// Mapping is the index's "mappings" object ({"properties": …}), or a
	// whole create-index body ({"settings": …, "mappings": …}) when it has
	// a top-level "settings" or "mappings" key. Optional.
	Mapping json.RawMessage
	// Username and Password for basic authentication, or APIKey (base64,
	// takes precedence).
	Username, Password, APIKey string
	// Refresh makes each bulk request wait until its writes are searchable
	// (refresh=wait_for). Slower; for demos and tests that search.
	Refresh bool
}

// Sink is an Elasticsearch sink. It is safe for concurrent use, and several
// Sinks (processes) may write one index.
type Sink struct {
	cfg        Config
	es         *elasticsearch.Client
	log        *slog.Logger
	createBody []byte
}

// New checks cfg and returns a sink. It does not contact the cluster. Errors
// name the field and never repeat credentials. log may be nil.
func New(cfg Config, log *slog.Logger) (*Sink, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if len(cfg.URLs) == 0 {
		return nil, errors.New("essink: urls: none given")
	}
	addrs := make([]string, len(cfg.URLs))
	for i, raw := range cfg.URLs {
		u, err := url.Parse(raw)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("essink: urls[%d]: must be http(s)://host[:port]", i)
		}
		if u.User != nil {
			if cfg.Username == "" && cfg.Password == "" {
				cfg.Username = u.User.Username()
				cfg.Password, _ = u.User.Password()
			}
			u.User = nil
		}
		addrs[i] = u.String()
	}
	if err := validIndexName(cfg.Index); err != nil {
		return nil, fmt.Errorf("essink: index: %w", err)
	}
	body, err := createBody(cfg.Mapping)
	if err != nil {
		return nil, fmt.Errorf("essink: mapping: %w", err)
	}
	es, err := elasticsearch.NewClient(elasticsearch.Config{
		Addresses: addrs,
		Username:  cfg.Username,
		Password:  cfg.Password,
		APIKey:    cfg.APIKey,
		// The pillow retries a transient failure with backoff; a second
		// layer of immediate retries here would only add load.
		DisableRetry: true,
	})
	if err != nil {
		return nil, fmt.Errorf("essink: client: %w", err)
	}
	return &Sink{cfg: cfg, es: es, log: log, createBody: body}, nil
}

// validIndexName applies Elasticsearch's index name rules.
func validIndexName(name string) error {
	switch {
	case name == "":
		return errors.New("is empty")
	case name == "." || name == "..":
		return fmt.Errorf("%q is not a valid name", name)
	case strings.ToLower(name) != name:
		return fmt.Errorf("%q must be lowercase", name)
	case strings.ContainsAny(name, `\/*?"<>| ,#:`):
		return fmt.Errorf(`%q must not contain \ / * ? " < > | space , # :`, name)
	case strings.IndexAny(name[:1], "-_+") == 0:
		return fmt.Errorf("%q must not start with - _ or +", name)
	case len(name) > 255:
		return fmt.Errorf("%q is longer than 255 bytes", name)
	}
	return nil
}

// metaMapping maps MetaField.
var metaMapping = map[string]any{
	"properties": map[string]any{
		"deleted":  map[string]any{"type": "boolean"},
		"rev":      map[string]any{"type": "keyword"},
		"rev_path": map[string]any{"type": "keyword", "index": false},
	},
}

// createBody builds the create-index request body from Config.Mapping,
// adding the mapping of MetaField.
func createBody(mapping json.RawMessage) ([]byte, error) {
	body := map[string]any{}
	if len(bytes.TrimSpace(mapping)) > 0 {
		var m map[string]any
		if err := json.Unmarshal(mapping, &m); err != nil || m == nil {
			return nil, errors.New("must be a JSON object")
		}
		_, hasMappings := m["mappings"]
		_, hasSettings := m["settings"]
		if hasMappings || hasSettings {
			body = m
		} else {
			body["mappings"] = m
		}
	}
	mappings, ok := body["mappings"].(map[string]any)
	if !ok {
		if body["mappings"] != nil {
			return nil, errors.New(`"mappings" must be a JSON object`)
		}
		mappings = map[string]any{}
		body["mappings"] = mappings
	}
	props, ok := mappings["properties"].(map[string]any)
	if !ok {
		if mappings["properties"] != nil {
			return nil, errors.New(`"properties" must be a JSON object`)
		}
		props = map[string]any{}
		mappings["properties"] = props
	}
	if _, taken := props[MetaField]; !taken {
		props[MetaField] = metaMapping
	}
	return json.Marshal(body)
}

// Name is "essink:<index>".
func (s *Sink) Name() string { return "essink:" + s.cfg.Index }

// Bootstrap creates the index with its mapping if it does not exist. An
// existing index is left as it is. Concurrent Bootstraps are fine.
func (s *Sink) Bootstrap(ctx context.Context) error {
	res, err := s.es.Indices.Exists([]string{s.cfg.Index}, s.es.Indices.Exists.WithContext(ctx))
	if err != nil {
		return s.transient("bootstrap: index exists", err)
	}
	drain(res.Body)
	switch {
	case res.StatusCode == http.StatusOK:
		return nil
	case res.StatusCode != http.StatusNotFound:
		return s.transient("bootstrap: index exists", fmt.Errorf("HTTP %d", res.StatusCode))
	}
	res, err = s.es.Indices.Create(s.cfg.Index,
		s.es.Indices.Create.WithBody(bytes.NewReader(s.createBody)),
		s.es.Indices.Create.WithContext(ctx))
	if err != nil {
		return s.transient("bootstrap: create index", err)
	}
	defer drain(res.Body)
	if res.StatusCode == http.StatusOK {
		s.log.Info("essink: index created", "index", s.cfg.Index)
		return nil
	}
	e := readError(res)
	switch {
	case e.Type == "resource_already_exists_exception":
		return nil // another process won the race
	case res.StatusCode == http.StatusBadRequest:
		return fmt.Errorf("essink: %s: bootstrap: create index: %w", s.cfg.Index, e)
	default:
		return s.transient("bootstrap: create index", e)
	}
}

// esError is an error object of an Elasticsearch response.
type esError struct {
	Status int    `json:"-"`
	Type   string `json:"type"`
	Reason string `json:"reason"`
}

func (e *esError) Error() string {
	if e.Type == "" {
		return fmt.Sprintf("HTTP %d", e.Status)
	}
	return fmt.Sprintf("HTTP %d %s: %s", e.Status, e.Type, e.Reason)
}

// readError reads the error of a failed response. Elasticsearch sends
// {"error": {"type", "reason", …}, "status"}, or {"error": "text"} for
// requests it cannot route; a proxy may send anything.
func readError(res *esapi.Response) *esError {
	e := &esError{Status: res.StatusCode}
	var body struct {
		Error json.RawMessage `json:"error"`
	}
	if json.NewDecoder(io.LimitReader(res.Body, 64<<10)).Decode(&body) != nil || len(body.Error) == 0 {
		return e
	}
	if json.Unmarshal(body.Error, e) != nil {
		_ = json.Unmarshal(body.Error, &e.Reason)
	}
	return e
}

// op is one bulk action.
type op struct {
	d      *doc.Document
	action string // index, create, delete
	meta   map[string]any
	source []byte // nil for delete
}

// Write writes docs in bulk. It returns nil (every document written or
// refused as not newer), an error wrapping doc.ErrTransient (retry the
// batch; what was written stays, and rewriting it is a no-op), or doc.Errors
// (the listed documents were rejected; all others were written or refused).
func (s *Sink) Write(ctx context.Context, docs []*doc.Document) error {
	if len(docs) == 0 {
		return nil
	}
	docs = sink.Newest(docs)
	errs := doc.Errors{}
	var ops []op
	var pending []*doc.Document // Couch documents still to decide
	for _, d := range docs {
		if sink.IsCouch(d) {
			pending = append(pending, d)
			continue
		}
		o, err := s.sqlOp(d)
		if err != nil {
			errs[d.ID] = err
			continue
		}
		ops = append(ops, o)
	}
	var written, refused int
	for round := 1; ; round++ {
		if len(pending) > 0 {
			stored, err := s.mget(ctx, pending)
			if err != nil {
				return err
			}
			for _, d := range pending {
				o, skip, err := s.couchOp(d, stored[d.ID])
				switch {
				case err != nil:
					errs[d.ID] = err
				case skip:
					refused++
				default:
					ops = append(ops, o)
				}
			}
			pending = nil
		}
		if len(ops) == 0 {
			break
		}
		items, err := s.bulk(ctx, ops)
		if err != nil {
			return err
		}
		for i, it := range items {
			o := ops[i]
			switch {
			case it.Status/100 == 2 || (o.action == "delete" && it.Status == http.StatusNotFound):
				written++
			case it.Status == http.StatusConflict && sink.IsCouch(o.d):
				pending = append(pending, o.d) // changed meanwhile: decide again
			case it.Status == http.StatusConflict:
				refused++ // not newer than the stored external version
			case it.Status == http.StatusTooManyRequests || it.Status >= 500 || transientTypes[it.Error.Type]:
				return s.transient("bulk", &esError{Status: it.Status, Type: it.Error.Type, Reason: it.Error.Reason})
			default:
				errs[o.d.ID] = fmt.Errorf("essink: %s: %w", s.cfg.Index, &esError{Status: it.Status, Type: it.Error.Type, Reason: it.Error.Reason})
			}
		}
		ops = nil
		if len(pending) == 0 {
			break
		}
		if round == maxRounds {
			for _, d := range pending {
				errs[d.ID] = fmt.Errorf("essink: %s: document changed by other writers during %d attempts", s.cfg.Index, maxRounds)
			}
			break
		}
	}
	s.log.Debug("essink: batch written", "index", s.cfg.Index, "documents", len(docs),
		"written", written, "refused_not_newer", refused, "errors", len(errs))
	if len(errs) > 0 {
		return errs
	}
	return nil
}

// transientTypes are item errors that are the cluster's state, not the
// document's.
var transientTypes = map[string]bool{
	"index_not_found_exception":           true, // auto-creation off and no Bootstrap
	"cluster_block_exception":             true, // read-only index (disk watermark)
	"es_rejected_execution_exception":     true,
	"unavailable_shards_exception":        true,
	"circuit_breaking_exception":          true,
	"node_not_connected_exception":        true,
	"no_shard_available_action_exception": true,
}

// source is the body as indexed: "_id" is dropped, being the _id itself.
func source(d *doc.Document, meta map[string]any) ([]byte, error) {
	body := make(map[string]any, len(d.Body)+1)
	for k, v := range d.Body {
		if k != "_id" {
			body[k] = v
		}
	}
	if meta != nil {
		if _, taken := d.Body[MetaField]; taken {
			return nil, fmt.Errorf("essink: body field %q is reserved by the sink", MetaField)
		}
		body[MetaField] = meta
	}
	b, err := json.Marshal(body)
	if err != nil {
		return nil, fmt.Errorf("essink: encode body: %w", err)
	}
	return b, nil
}

func (s *Sink) sqlOp(d *doc.Document) (op, error) {
	v := uint64(d.Version.SQL.CommitLSN)
	if v > math.MaxInt64-1 {
		return op{}, fmt.Errorf("essink: LSN %s is beyond Elasticsearch's version range", d.Version.SQL.CommitLSN)
	}
	o := op{d: d, action: "index", meta: map[string]any{"_index": s.cfg.Index, "_id": d.ID, "version": v, "version_type": "external"}}
	var err error
	if d.Deleted {
		o.source, err = json.Marshal(map[string]any{MetaField: map[string]any{"deleted": true}})
		return o, err
	}
	o.source, err = source(d, nil)
	return o, err
}

// stored is what the index holds for a Couch document.
type stored struct {
	found       bool
	seqNo       int64
	primaryTerm int64
	revPath     []string
	// sql: written from SQL (no rev_path, which every Couch write stores).
	sql bool
}

// couchOp decides a Couch document against what is stored: skip (refused,
// a no-op) or an op conditioned on the stored state.
func (s *Sink) couchOp(d *doc.Document, st stored) (op, bool, error) {
	if st.found && (st.sql || sink.Refuses(st.revPath, d.Version.Rev)) {
		return op{}, true, nil
	}
	path := sink.RevPath(d.Version)
	if path == nil {
		path = []string{}
	}
	meta := map[string]any{"rev": d.Version.Rev.String(), "rev_path": path}
	o := op{d: d, action: "create", meta: map[string]any{"_index": s.cfg.Index, "_id": d.ID}}
	if st.found {
		o.action = "index"
		o.meta["if_seq_no"], o.meta["if_primary_term"] = st.seqNo, st.primaryTerm
	}
	if d.Deleted {
		meta["deleted"] = true
		b, err := json.Marshal(map[string]any{MetaField: meta})
		o.source = b
		return o, false, err
	}
	var err error
	o.source, err = source(d, meta)
	return o, false, err
}

// mget reads the stored state of docs.
func (s *Sink) mget(ctx context.Context, docs []*doc.Document) (map[string]stored, error) {
	ids := make([]string, len(docs))
	for i, d := range docs {
		ids[i] = d.ID
	}
	body, _ := json.Marshal(map[string]any{"ids": ids})
	res, err := s.es.Mget(bytes.NewReader(body),
		s.es.Mget.WithIndex(s.cfg.Index),
		s.es.Mget.WithSourceIncludes(MetaField),
		s.es.Mget.WithContext(ctx))
	if err != nil {
		return nil, s.transient("mget", err)
	}
	defer drain(res.Body)
	if res.StatusCode != http.StatusOK {
		return nil, s.transient("mget", readError(res))
	}
	var out struct {
		Docs []struct {
			ID          string   `json:"_id"`
			Found       bool     `json:"found"`
			SeqNo       int64    `json:"_seq_no"`
			PrimaryTerm int64    `json:"_primary_term"`
			Error       *esError `json:"error"`
			Source      struct {
				Meta struct {
					RevPath *[]string `json:"rev_path"`
				} `json:"changefeed"`
			} `json:"_source"`
		} `json:"docs"`
	}
	if err := json.NewDecoder(res.Body).Decode(&out); err != nil {
		return nil, s.transient("mget", fmt.Errorf("decode response: %w", err))
	}
	m := make(map[string]stored, len(out.Docs))
	for _, d := range out.Docs {
		switch {
		case d.Error != nil && d.Error.Type == "index_not_found_exception":
			// Nothing stored yet; the write creates the index (or fails
			// transiently if auto-creation is off).
		case d.Error != nil:
			return nil, s.transient("mget", d.Error)
		case d.Found:
			st := stored{found: true, seqNo: d.SeqNo, primaryTerm: d.PrimaryTerm, sql: d.Source.Meta.RevPath == nil}
			if p := d.Source.Meta.RevPath; p != nil {
				st.revPath = *p
			}
			m[d.ID] = st
		}
	}
	return m, nil
}

type bulkItem struct {
	Status int     `json:"status"`
	Error  esError `json:"error"`
}

// bulk sends ops as one _bulk request and returns the items in order.
func (s *Sink) bulk(ctx context.Context, ops []op) ([]bulkItem, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	for _, o := range ops {
		if err := enc.Encode(map[string]any{o.action: o.meta}); err != nil {
			return nil, fmt.Errorf("essink: encode action: %w", err)
		}
		if o.source != nil {
			buf.Write(o.source)
			buf.WriteByte('\n')
		}
	}
	opts := []func(*esapi.BulkRequest){s.es.Bulk.WithContext(ctx)}
	if s.cfg.Refresh {
		opts = append(opts, s.es.Bulk.WithRefresh("wait_for"))
	}
	res, err := s.es.Bulk(&buf, opts...)
	if err != nil {
		return nil, s.transient("bulk", err)
	}
	defer drain(res.Body)
	if res.StatusCode != http.StatusOK {
		return nil, s.transient("bulk", readError(res))
	}
	var out struct {
		Items []map[string]bulkItem `json:"items"`
	}
	if err := json.NewDecoder(res.Body).Decode(&out); err != nil {
		return nil, s.transient("bulk", fmt.Errorf("decode response: %w", err))
	}
	if len(out.Items) != len(ops) {
		return nil, s.transient("bulk", fmt.Errorf("%d items in the response to %d actions", len(out.Items), len(ops)))
	}
	items := make([]bulkItem, len(ops))
	for i, m := range out.Items {
		it, ok := m[ops[i].action]
		if !ok {
			return nil, s.transient("bulk", fmt.Errorf("item %d does not answer action %q", i, ops[i].action))
		}
		items[i] = it
	}
	return items, nil
}

func (s *Sink) transient(op string, err error) error {
	return fmt.Errorf("%w: essink: %s: %s: %w", doc.ErrTransient, s.cfg.Index, op, err)
}

func drain(r io.ReadCloser) {
	_, _ = io.Copy(io.Discard, io.LimitReader(r, 1<<20))
	r.Close()
}

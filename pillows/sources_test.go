package pillows_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/pillows"
	"github.com/changefeed/changefeed/stub"
)

// couchMem is a Couch store in memory serving every database (registered
// with StoreKey.Name ""), like one CouchDB server. Like the real stores it
// answers by id, so it reports a call that asks for one id twice.
type couchMem struct {
	t *testing.T
}

func (c *couchMem) Fetch(_ context.Context, stubs []*stub.Stub) ([]*doc.Document, error) {
	seen := map[string]bool{}
	out := make([]*doc.Document, 0, len(stubs))
	for _, s := range stubs {
		if seen[s.DocumentID] {
			c.t.Errorf("one Fetch call asked for %s twice: the answer by id cannot tell the copies apart", s.DocumentID)
		}
		seen[s.DocumentID] = true
		rev, err := stub.ParseRev(s.DocumentRev)
		if err != nil {
			return nil, err
		}
		out = append(out, &doc.Document{
			ID: s.DocumentID, Type: s.DocumentType, Domain: s.Domain,
			Source: stub.SourceCouch, SourceName: s.DataSourceName,
			Body:    map[string]any{"db": s.DataSourceName},
			Version: doc.Version{Rev: rev},
		})
	}
	return out, nil
}

// keyProc is a processor whose failures are chosen per document key
// (source/name/id). Like every processor it reports them as doc.Errors,
// which name documents by id only.
type keyProc struct {
	mu     sync.Mutex
	poison map[string]bool
	done   map[string][]string // key → versions processed successfully
}

func (p *keyProc) Name() string { return "proc" }

func (p *keyProc) Process(_ context.Context, docs []*doc.Document) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	errs := doc.Errors{}
	for _, d := range docs {
		if p.poison[d.Key()] {
			errs[d.ID] = errors.New("poison document " + d.Key())
			continue
		}
		p.done[d.Key()] = append(p.done[d.Key()], d.Version.String())
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

func (p *keyProc) setPoison(key string, on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.poison[key] = on
}

// processed reports whether key was processed successfully at version.
func (p *keyProc) processed(key, version string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, v := range p.done[key] {
		if v == version {
			return true
		}
	}
	return false
}

func (e *env) produceStubs(ss ...*stub.Stub) {
	e.t.Helper()
	recs := make([]*kgo.Record, len(ss))
	for i, s := range ss {
		b, err := json.Marshal(s)
		if err != nil {
			e.t.Fatal(err)
		}
		recs[i] = &kgo.Record{Key: s.Key(), Value: b}
	}
	if err := e.prod.ProduceSync(e.ctx, recs...).FirstErr(); err != nil {
		e.t.Fatal(err)
	}
}

func describeRows(rows []pillows.ErrorRow) string {
	var out []string
	for _, r := range rows {
		out = append(out, fmt.Sprintf("%s/%s/%s proc=%q attempts=%d dead=%v", r.DataSourceType, r.DataSourceName, r.DocumentID, r.Processor, r.Attempts, r.Dead))
	}
	sort.Strings(out)
	return "[" + strings.Join(out, "; ") + "]"
}

// One pillow reads the same document id from three sources (HQ's Couch→SQL
// migration keeps ids: couch/hq, couch/hq2 through one store, and sql/src).
// The couch/hq copy fails in the processor; the others succeed. The failure
// is charged to couch/hq only, its row survives the other copies'
// successes (now and later) and is retried, and a retry after the fault is
// gone processes the couch/hq copy and clears the row.
func TestSameIDFromSeveralSources(t *testing.T) {
	e := newEnv(t)
	const id = "shared-1"
	e.exec(`INSERT INTO src (id, doc_type, domain, name, n) VALUES ($1, 'case', 'demo', 'sql copy', 1)`, id)

	proc := &keyProc{poison: map[string]bool{}, done: map[string][]string{}}
	const (
		bad   = "couch/hq/" + id
		other = "couch/hq2/" + id
		sqlK  = "sql/src/" + id
	)
	proc.setPoison(bad, true)

	p := e.pillow("sources", proc)
	p.Stores[pillows.StoreKey{Type: stub.SourceCouch}] = &couchMem{t: t}
	p.Retry = pillows.Retry{MaxAttempts: 1000, BackoffUnit: 100 * time.Millisecond, Interval: 50 * time.Millisecond}

	couchStub := func(db, rev string) *stub.Stub {
		return &stub.Stub{DocumentID: id, DocumentRev: rev, DataSourceType: stub.SourceCouch, DataSourceName: db,
			DocumentType: "CommCareCase", Domain: "demo", PublishTimestamp: time.Now()}
	}
	sqlStub := func(lsn uint64) *stub.Stub {
		return mkStub(change{id: id, lsn: lsn})
	}
	// Failing copy first: keyed by id alone, the failure would be charged
	// to a later copy and the failing copy's success would clear it.
	e.produceStubs(couchStub("hq", "1-a"), couchStub("hq2", "1-b"), sqlStub(101))

	e.start(e.runner(), p)

	sqlV1 := sqlStub(101).SQLVersion().String()
	testenv.Eventually(t, 30*time.Second, func() string {
		switch {
		case !proc.processed(sqlK, sqlV1):
			return "sql copy not processed"
		case !proc.processed(other, "1-b"):
			return "couch/hq2 copy not processed"
		}
		rows := e.errorRows("sources")
		if len(rows) != 1 {
			return "want exactly the couch/hq row, have " + describeRows(rows)
		}
		r := rows[0]
		if r.DataSourceType != stub.SourceCouch || r.DataSourceName != "hq" || r.DocumentID != id || r.Processor != "proc" {
			return "wrong row: " + describeRows(rows)
		}
		if r.Stub.DataSourceType != stub.SourceCouch || r.Stub.DataSourceName != "hq" || r.Version != "1-a" {
			return fmt.Sprintf("row holds the stub of another copy: %+v", r.Stub)
		}
		// Retried: each retry refetches the couch/hq copy and fails again.
		if r.Attempts < 3 {
			return fmt.Sprintf("attempts = %d, want >= 3", r.Attempts)
		}
		return ""
	})
	if proc.processed(bad, "1-a") {
		t.Fatal("the poisoned copy was processed")
	}

	// Later successes of the other copies leave the row alone.
	e.exec(`UPDATE src SET name = 'sql copy 2', n = 2 WHERE id = $1`, id)
	e.produceStubs(sqlStub(202), couchStub("hq2", "2-c"))
	sqlV2 := sqlStub(202).SQLVersion().String()
	testenv.Eventually(t, 30*time.Second, func() string {
		if !proc.processed(sqlK, sqlV2) || !proc.processed(other, "2-c") {
			return "new versions of the other copies not processed"
		}
		return ""
	})
	rows := e.errorRows("sources")
	if len(rows) != 1 || rows[0].DataSourceName != "hq" || rows[0].Dead {
		t.Fatalf("after the other copies succeeded again: rows %s, want the live couch/hq row", describeRows(rows))
	}
	before := rows[0].Attempts
	testenv.Eventually(t, 30*time.Second, func() string {
		rows := e.errorRows("sources")
		if len(rows) != 1 || rows[0].Attempts <= before {
			return "couch/hq row not retried further: " + describeRows(rows)
		}
		return ""
	})

	// The fault is gone: the retry processes the couch/hq copy itself and
	// resolves its row.
	proc.setPoison(bad, false)
	testenv.Eventually(t, 30*time.Second, func() string {
		if !proc.processed(bad, "1-a") {
			return "couch/hq copy not processed on retry"
		}
		if rows := e.errorRows("sources"); len(rows) != 0 {
			return "rows left: " + describeRows(rows)
		}
		return ""
	})
}

package pillows

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/stub"
)

func sqlStub(id string, lsn uint64, ord uint32) *stub.Stub {
	return &stub.Stub{DocumentID: id, DataSourceType: stub.SourceSQL, DataSourceName: "s", DocumentType: "t", LSN: stub.LSN(lsn), TxOrdinal: ord}
}

func couchStub(id, rev string) *stub.Stub {
	return &stub.Stub{DocumentID: id, DataSourceType: stub.SourceCouch, DataSourceName: "db", DocumentType: "t", DocumentRev: rev}
}

func TestDedupSQL(t *testing.T) {
	d := newDedup(10)
	d.record(sqlStub("a", 100, 2))
	tests := []struct {
		s    *stub.Stub
		done bool
	}{
		{sqlStub("a", 100, 2), true},  // same version
		{sqlStub("a", 100, 1), true},  // older ordinal
		{sqlStub("a", 99, 9), true},   // older commit
		{sqlStub("a", 100, 3), false}, // newer
		{sqlStub("a", 101, 0), false},
		{sqlStub("b", 1, 0), false}, // unknown document
	}
	for _, tt := range tests {
		if got := d.done(tt.s); got != tt.done {
			t.Errorf("done(%s %s) = %v, want %v", tt.s.DocumentID, tt.s.SQLVersion(), got, tt.done)
		}
	}
	// Recording an older version never lowers the memory.
	d.record(sqlStub("a", 50, 0))
	if !d.done(sqlStub("a", 100, 2)) {
		t.Fatal("older record lowered the remembered version")
	}
}

// Couch: only the exact (id, rev) is skipped; a lower generation (a new
// winner after a deleted conflict branch) is never skipped.
func TestDedupCouchExactRevOnly(t *testing.T) {
	d := newDedup(10)
	d.record(couchStub("x", "3-ccc"))
	if !d.done(couchStub("x", "3-ccc")) {
		t.Fatal("same rev not skipped")
	}
	for _, rev := range []string{"2-bbb", "3-aaa", "4-ddd", ""} {
		if d.done(couchStub("x", rev)) {
			t.Fatalf("rev %q skipped", rev)
		}
	}
}

func TestDedupBounded(t *testing.T) {
	d := newDedup(3)
	for i := range 5 {
		d.record(sqlStub(fmt.Sprint(i), 10, 0))
	}
	if len(d.items) != 3 || d.ll.Len() != 3 {
		t.Fatalf("size %d/%d, want 3", len(d.items), d.ll.Len())
	}
	if d.done(sqlStub("0", 10, 0)) || !d.done(sqlStub("4", 10, 0)) {
		t.Fatal("least recently used not evicted first")
	}
}

func TestCollapseNewer(t *testing.T) {
	if !newer(sqlStub("a", 5, 0), sqlStub("a", 4, 9)) || newer(sqlStub("a", 4, 0), sqlStub("a", 5, 0)) {
		t.Fatal("SQL collapse must keep the highest version")
	}
	if !newer(couchStub("a", "1-a"), couchStub("a", "2-b")) {
		t.Fatal("Couch collapse keeps the later stub in partition order")
	}
}

func TestFilter(t *testing.T) {
	s := sqlStub("a", 1, 0)
	s.Domain = "demo"
	for _, tt := range []struct {
		f    Filter
		want bool
	}{
		{Filter{}, true},
		{Filter{DocumentTypes: []string{"t"}}, true},
		{Filter{DocumentTypes: []string{"u"}}, false},
		{Filter{Domains: []string{"demo", "x"}}, true},
		{Filter{DocumentTypes: []string{"t"}, Domains: []string{"x"}}, false},
	} {
		if got := tt.f.Match(s); got != tt.want {
			t.Errorf("%+v.Match = %v", tt.f, got)
		}
	}
	// A deletion whose domain the DELETE did not carry must still reach
	// the pillow; one with another domain must not.
	del := sqlStub("a", 2, 0)
	del.IsDeletion = true
	if !(Filter{Domains: []string{"demo"}}).Match(del) {
		t.Error("deletion stub without a domain was filtered out")
	}
	del.Domain = "other"
	if (Filter{Domains: []string{"demo"}}).Match(del) {
		t.Error("deletion stub of another domain passed the filter")
	}
}

// A type filter passes the deletions of its types: a soft delete by its
// base type, and a deletion of unknown type whatever the filter.
func TestFilterDeletions(t *testing.T) {
	f := Filter{DocumentTypes: []string{"CommCareCase"}}
	for _, tt := range []struct {
		typ      string
		deletion bool
		want     bool
	}{
		{"CommCareCase", false, true},
		{"CommCareCase-Deleted", true, true},
		{"CommCareCase-Deleted", false, true}, // a soft delete published without is_deletion
		{"Unknown", true, true},
		{"Unknown", false, false},
		{"XFormInstance-Deleted", true, false},
		{"CommCareCase-Deleted-Deleted", true, false},
	} {
		s := couchStub("a", "2-x")
		s.DocumentType, s.IsDeletion = tt.typ, tt.deletion
		if got := f.Match(s); got != tt.want {
			t.Errorf("%s (deletion %v): Match = %v, want %v", tt.typ, tt.deletion, got, tt.want)
		}
	}
}

// Two pillows in one consumer group would split its partitions: Run
// refuses them before connecting anywhere.
func TestRunRefusesSharedGroup(t *testing.T) {
	r, err := NewRunner(Options{Errors: NewErrorLog(nil)})
	if err != nil {
		t.Fatal(err)
	}
	mk := func(name, group string) *Pillow {
		return &Pillow{Name: name, Group: group, Topics: []string{"t"}, Processors: []Processor{proc{"a"}},
			Stores: map[StoreKey]Store{{Type: stub.SourceSQL}: storeFunc(nil)}}
	}
	err = r.Run(t.Context(), mk("cases", ""), mk("cases-2", "cases"))
	if !errors.Is(err, ErrDefinition) || !strings.Contains(err.Error(), `pillow cases-2: group: consumer group "cases" is already pillow cases's`) {
		t.Fatalf("err = %v", err)
	}
}

type proc struct{ n string }

func (p proc) Name() string                                   { return p.n }
func (p proc) Process(context.Context, []*doc.Document) error { return nil }

func TestValidate(t *testing.T) {
	st := map[StoreKey]Store{{Type: stub.SourceSQL, Name: "s"}: nil}
	good := func() *Pillow {
		return &Pillow{Name: "p", Topics: []string{"t"}, Processors: []Processor{proc{"a"}},
			Stores: map[StoreKey]Store{{Type: stub.SourceSQL}: storeFunc(nil)}}
	}
	p := good()
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}
	if p.Group != "p" || p.Batch.MaxStubs != 500 || p.Retry.BackoffUnit != 5*time.Minute || p.Retry.DeadLetterTopic != "p-dead-letter" || p.Retry.MaxAttempts != 5 {
		t.Fatalf("defaults = %+v", p)
	}
	if got := p.Retry.Backoff(3); got != 45*time.Minute {
		t.Fatalf("backoff(3) = %s, want 5·3² = 45m", got)
	}
	bad := []struct {
		mut  func(*Pillow)
		want string
	}{
		{func(p *Pillow) { p.Name = "a b" }, "pillow a b: name"},
		{func(p *Pillow) { p.Topics = nil }, "pillow p: topics"},
		{func(p *Pillow) { p.Processors = append(p.Processors, proc{"a"}) }, "pillow p: processors[1].name: duplicate"},
		{func(p *Pillow) { p.Stores = nil }, "pillow p: stores"},
		{func(p *Pillow) { p.Stores = st }, "is nil"},
		{func(p *Pillow) { p.Batch.MaxStubs = -1 }, "pillow p: batch.max_stubs"},
	}
	for _, tt := range bad {
		p := good()
		tt.mut(p)
		if err := p.Validate(); err == nil || !errors.Is(err, ErrDefinition) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("err = %v, want %q", err, tt.want)
		}
	}
}

type storeFunc func(context.Context, []*stub.Stub) ([]*doc.Document, error)

func (f storeFunc) Fetch(ctx context.Context, s []*stub.Stub) ([]*doc.Document, error) {
	return f(ctx, s)
}

func TestIsTransient(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want bool
	}{
		{fmt.Errorf("x: %w", doc.ErrTransient), true},
		{errors.New("bad value"), false},
		{doc.Errors{"a": errors.New("x")}, false},
		{&PanicError{Value: "boom"}, false},
		{context.DeadlineExceeded, true},
	} {
		if got := IsTransient(tt.err); got != tt.want {
			t.Errorf("IsTransient(%v) = %v", tt.err, got)
		}
	}
	if errorType(&PanicError{Value: 1}) != "panic" || errorType(fmt.Errorf("w: %w", errors.New("x"))) != "*errors.errorString" {
		t.Fatal("errorType")
	}
}

// A failure recorded while the retry loop found the table empty must keep
// the flag set: the clear is conditional on the generation it started from.
func TestErrorFlagClearIsConditional(t *testing.T) {
	var f errorFlag
	f.set()
	g := f.generation()
	f.set() // a worker records a failure while the table is being read
	f.clearIf(g)
	if !f.get() {
		t.Fatal("flag cleared although a failure was recorded after the snapshot")
	}
	f.clearIf(f.generation())
	if f.get() {
		t.Fatal("flag not cleared with nothing recorded since the snapshot")
	}
}

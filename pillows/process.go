package pillows

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/internal/pgclass"
	"github.com/changefeed/changefeed/stub"
)

// PanicError is a panic recovered from a processor or store, attributed to
// the documents of the call that panicked.
type PanicError struct {
	Value any
	Stack string
}

func (e *PanicError) Error() string { return fmt.Sprintf("panic: %v", e.Value) }

// IsTransient reports whether err means a store, sink or the errors table
// is unreachable rather than a document being at fault: errors wrapping
// doc.ErrTransient, and failures that a store or sink did not classify but
// that are the server's by package pgclass (a SQLSTATE of class 08, 40, 53,
// 55, 57, … or a connection error, timeout or cut response). Any other
// error, a SQLSTATE of class 22, 23, 54 or 42 included, is the fault of the
// documents of the call: they are split to find which.
func IsTransient(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, doc.ErrTransient) {
		return true
	}
	var pe *PanicError
	if errors.As(err, &pe) {
		return false
	}
	var pge *pgconn.PgError
	if errors.As(err, &pge) {
		return pgclass.ServerCode(pge.Code)
	}
	return pgclass.Network(err)
}

// safe calls fn, turning a panic into a *PanicError.
func safe(fn func() error) (err error) {
	defer func() {
		if v := recover(); v != nil {
			err = &PanicError{Value: v, Stack: string(debug.Stack())}
		}
	}()
	return fn()
}

// errorFlag says whether a pillow may have rows in the errors table. Clearing
// it is conditional on no failure having been recorded since the table was
// found empty: otherwise a failure recorded while the retry loop was looking
// would be forgotten, and later successes would not clear its row.
type errorFlag struct {
	mu  sync.Mutex
	on  bool
	gen uint64
}

func (f *errorFlag) set() {
	f.mu.Lock()
	f.on = true
	f.gen++
	f.mu.Unlock()
}

func (f *errorFlag) get() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.on
}

// generation is taken before looking at the table; clearIf clears the flag
// only if nothing was recorded since.
func (f *errorFlag) generation() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.gen
}

func (f *errorFlag) clearIf(gen uint64) {
	f.mu.Lock()
	if f.gen == gen {
		f.on = false
	}
	f.mu.Unlock()
}

// engine fetches and processes collapsed stubs for one pillow. It is shared
// by the partition workers and the retry loop.
type engine struct {
	// mayHaveErrors is false only when the errors table was seen without
	// rows for this pillow since the last failure was recorded; while
	// true, successfully processed documents clear their old rows.
	mayHaveErrors errorFlag
	// successes counts rounds that reached every store and processor
	// (documents may have failed on their own): evidence that a document
	// failing transiently alone is at fault itself.
	successes atomic.Uint64
	// lastOK is when a round last succeeded (Unix nanoseconds).
	lastOK atomic.Int64

	p       *Pillow
	m       *Metrics
	errs    *ErrorLog
	onPanic func(where string, pe *PanicError)
}

// outcome of one round.
type outcome struct {
	// failures are per-document failures (to record).
	failures []Failure
	// failed holds the keys of documents with at least one failure.
	failed map[docKey]bool
	// revs holds the revision of every Couch document fetched: the
	// winner handed to the processors, which need not be the stub's.
	revs map[docKey]string
}

// fetch fetches the stubs' documents in bulk, one call per store (more
// only when the same id comes from several sources of one store). It
// returns the documents by key, the per-document failures, and a transient
// error that stops the round.
func (e *engine) fetch(ctx context.Context, stubs []*stub.Stub) (map[docKey]*doc.Document, []Failure, error) {
	byStore := map[StoreKey][]*fetchGroup{}
	var order []StoreKey
	var fails []Failure
	for _, s := range stubs {
		k, st := e.p.store(s)
		if st == nil {
			fails = append(fails, Failure{Stub: s, Err: fmt.Errorf("no document store for data_source_type %q data_source_name %q", s.DataSourceType, s.DataSourceName)})
			continue
		}
		if _, ok := byStore[k]; !ok {
			order = append(order, k)
		}
		byStore[k] = addUnique(byStore[k], s)
	}
	docs := make(map[docKey]*doc.Document, len(stubs))
	for _, k := range order {
		st := e.p.Stores[k]
		for _, g := range byStore[k] {
			group := g.stubs
			got, fetchFails, err := e.fetchStore(ctx, k, st, group)
			if err != nil {
				return nil, nil, err
			}
			fails = append(fails, fetchFails...)
			// The group's ids are distinct: a store's answer by id
			// (documents, doc.Errors) names one stub.
			byID := make(map[string]*doc.Document, len(got))
			for _, d := range got {
				if d != nil {
					byID[d.ID] = d
				}
			}
			failedIDs := map[string]bool{}
			for _, f := range fetchFails {
				failedIDs[f.Stub.DocumentID] = true
			}
			for _, s := range group {
				if failedIDs[s.DocumentID] {
					continue
				}
				d := byID[s.DocumentID]
				if d == nil {
					fails = append(fails, Failure{Stub: s, Err: fmt.Errorf("store %s returned no document for %s", k, s.DocumentID)})
					continue
				}
				fill(d, s)
				if keyOfDoc(d) != keyOf(s) {
					fails = append(fails, Failure{Stub: s, Err: fmt.Errorf("store %s returned document %s for %s", k, keyOfDoc(d), keyOf(s))})
					continue
				}
				docs[keyOf(s)] = d
			}
		}
	}
	return docs, fails, nil
}

// fetchGroup is the stubs of one Store.Fetch call: their ids are distinct.
type fetchGroup struct {
	stubs []*stub.Stub
	ids   map[string]bool
}

// addUnique adds s to the first group that does not hold its id yet. A
// store serving several sources (StoreKey.Name "") can be asked for the same
// id from two of them; a Store answers by id (documents, doc.Errors), so
// such stubs go to separate calls. Stubs are collapsed per document, so
// usually there is one group.
func addUnique(groups []*fetchGroup, s *stub.Stub) []*fetchGroup {
	for _, g := range groups {
		if !g.ids[s.DocumentID] {
			g.ids[s.DocumentID] = true
			g.stubs = append(g.stubs, s)
			return groups
		}
	}
	return append(groups, &fetchGroup{stubs: []*stub.Stub{s}, ids: map[string]bool{s.DocumentID: true}})
}

// fill completes what a store may leave out from the stub.
func fill(d *doc.Document, s *stub.Stub) {
	if d.Source == "" {
		d.Source = s.DataSourceType
	}
	if d.SourceName == "" {
		d.SourceName = s.DataSourceName
	}
	if d.Type == "" {
		d.Type = s.DocumentType
	}
	if d.Domain == "" {
		d.Domain = s.Domain
	}
	if s.DataSourceType == stub.SourceSQL && d.Version.SQL == (stub.SQLVersion{}) {
		d.Version.SQL = s.SQLVersion()
	}
}

func (e *engine) fetchStore(ctx context.Context, k StoreKey, st Store, group []*stub.Stub) ([]*doc.Document, []Failure, error) {
	t0 := time.Now()
	var got []*doc.Document
	cctx, cancel := context.WithTimeout(ctx, e.p.Timeouts.IO)
	err := safe(func() error {
		var err error
		got, err = st.Fetch(cctx, group)
		return err
	})
	timedOut := cctx.Err() != nil
	cancel()
	e.m.fetchSeconds.WithLabelValues(e.p.Name, k.String()).Observe(time.Since(t0).Seconds())
	if err == nil {
		return got, nil, nil
	}
	if ctx.Err() != nil {
		return nil, nil, ctx.Err()
	}
	if timedOut {
		return nil, nil, fmt.Errorf("%w: fetch from %s: no answer within %s: %w", doc.ErrTransient, k, e.p.Timeouts.IO, err)
	}
	if IsTransient(err) {
		return nil, nil, fmt.Errorf("fetch from %s: %w", k, err)
	}
	var de doc.Errors
	if errors.As(err, &de) {
		var fails []Failure
		for _, s := range group {
			if derr, ok := de[s.DocumentID]; ok {
				fails = append(fails, Failure{Stub: s, Err: derr})
			}
		}
		return got, fails, nil
	}
	e.notePanic("fetch "+k.String(), err)
	if len(group) == 1 {
		return nil, []Failure{{Stub: group[0], Err: err}}, nil
	}
	// Isolate by bisection: k bad documents among n cost about
	// 2·k·log2(n) calls, and every other document is fetched.
	mid := len(group) / 2
	a, fa, err := e.fetchStore(ctx, k, st, group[:mid])
	if err != nil {
		return nil, nil, err
	}
	b, fb, err := e.fetchStore(ctx, k, st, group[mid:])
	if err != nil {
		return nil, nil, err
	}
	return append(a, b...), append(fa, fb...), nil
}

func (e *engine) notePanic(where string, err error) {
	var pe *PanicError
	if e.onPanic != nil && errors.As(err, &pe) {
		e.onPanic(where, pe)
	}
}

// process runs one processor on docs. It returns the documents that failed,
// by key, and a transient error that stops the round.
func (e *engine) process(ctx context.Context, pr Processor, docs []*doc.Document) (map[docKey]error, error) {
	t0 := time.Now()
	cctx, cancel := context.WithTimeout(ctx, e.p.Timeouts.IO)
	err := safe(func() error { return pr.Process(cctx, docs) })
	timedOut := cctx.Err() != nil
	cancel()
	e.m.processSeconds.WithLabelValues(e.p.Name, pr.Name()).Observe(time.Since(t0).Seconds())
	if err == nil {
		return nil, nil
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	if timedOut {
		return nil, fmt.Errorf("%w: processor %s: no answer within %s: %w", doc.ErrTransient, pr.Name(), e.p.Timeouts.IO, err)
	}
	if IsTransient(err) {
		return nil, fmt.Errorf("processor %s: %w", pr.Name(), err)
	}
	var de doc.Errors
	if errors.As(err, &de) {
		perID := make(map[string]int, len(docs))
		for _, d := range docs {
			perID[d.ID]++
		}
		failed := make(map[docKey]error, len(de))
		var unclear []*doc.Document
		for _, d := range docs {
			derr, ok := de[d.ID]
			switch {
			case !ok:
			case perID[d.ID] > 1:
				unclear = append(unclear, d)
			default:
				failed[keyOfDoc(d)] = derr
			}
		}
		// doc.Errors names documents by id. When the batch held that id
		// from several sources, which copy failed is unknown: ask again
		// one document at a time (processors are idempotent).
		for _, d := range unclear {
			f, err := e.process(ctx, pr, []*doc.Document{d})
			if err != nil {
				return nil, err
			}
			maps.Copy(failed, f)
		}
		return failed, nil
	}
	e.notePanic("processor "+pr.Name(), err)
	if len(docs) == 1 {
		return map[docKey]error{keyOfDoc(docs[0]): err}, nil
	}
	// Isolate by bisection (processors are idempotent: documents of the
	// failed call that were written are written again as no-ops).
	mid := len(docs) / 2
	failed, err := e.process(ctx, pr, docs[:mid])
	if err != nil {
		return nil, err
	}
	fb, err := e.process(ctx, pr, docs[mid:])
	if err != nil {
		return nil, err
	}
	if failed == nil {
		return fb, nil
	}
	maps.Copy(failed, fb)
	return failed, nil
}

// round fetches the stubs' documents and runs the processors named in only
// (all when nil). Per-document failures are returned, not recorded; a
// transient failure returns an error and nothing is to be committed.
func (e *engine) round(ctx context.Context, stubs []*stub.Stub, only map[string]bool) (outcome, error) {
	out := outcome{failed: map[docKey]bool{}}
	docs, fails, err := e.fetch(ctx, stubs)
	if err != nil {
		return out, err
	}
	for k, d := range docs {
		if k.typ == stub.SourceCouch {
			if out.revs == nil {
				out.revs = make(map[docKey]string, len(docs))
			}
			out.revs[k] = d.Version.Rev.String()
		}
	}
	out.failures = append(out.failures, fails...)
	for _, f := range fails {
		out.failed[keyOf(f.Stub)] = true
	}
	list := make([]*doc.Document, 0, len(docs))
	stubOf := make(map[docKey]*stub.Stub, len(docs)) // fetch keeps only documents whose key is their stub's
	for _, s := range stubs {
		if d, ok := docs[keyOf(s)]; ok {
			list = append(list, d)
			stubOf[keyOf(s)] = s
		}
	}
	if len(list) == 0 {
		e.succeeded()
		return out, nil
	}
	for _, pr := range e.p.Processors {
		if only != nil && !only[pr.Name()] {
			continue
		}
		failed, err := e.process(ctx, pr, list)
		if err != nil {
			return out, err
		}
		for k, ferr := range failed {
			s := stubOf[k]
			if s == nil {
				continue
			}
			out.failures = append(out.failures, Failure{Processor: pr.Name(), Stub: s, Err: ferr})
			out.failed[k] = true
		}
		e.m.processed.WithLabelValues(e.p.Name, pr.Name()).Add(float64(len(list) - len(failed)))
	}
	e.succeeded()
	return out, nil
}

func (e *engine) succeeded() {
	e.successes.Add(1)
	e.lastOK.Store(time.Now().UnixNano())
}

// lastSuccess is when a round of the pillow last succeeded (zero: never).
func (e *engine) lastSuccess() time.Time {
	if n := e.lastOK.Load(); n != 0 {
		return time.Unix(0, n)
	}
	return time.Time{}
}

// handle runs a round on a batch and records its per-document failures. A
// returned error is transient: the batch must be retried as a whole.
func (e *engine) handle(ctx context.Context, stubs []*stub.Stub) (outcome, error) {
	out, err := e.round(ctx, stubs, nil)
	if err != nil {
		return out, err
	}
	if len(out.failures) > 0 {
		if err := e.record(ctx, out.failures); err != nil {
			return out, err
		}
	}
	if e.mayHaveErrors.get() {
		// A document now processed by every processor no longer needs
		// its older failures retried (a dead one included).
		var ok []docKey
		for _, s := range stubs {
			if k := keyOf(s); !out.failed[k] {
				ok = append(ok, k)
			}
		}
		rctx, cancel := context.WithTimeout(ctx, e.p.Timeouts.IO)
		err := e.errs.resolve(rctx, e.p.Name, ok)
		cancel()
		if err != nil {
			return out, err
		}
	}
	return out, nil
}

// record writes failures to the errors table within Timeouts.IO.
func (e *engine) record(ctx context.Context, fs []Failure) error {
	rctx, cancel := context.WithTimeout(ctx, e.p.Timeouts.IO)
	err := e.errs.record(rctx, e.p.Name, e.p.Retry, fs)
	cancel()
	if err != nil {
		return err
	}
	e.mayHaveErrors.set()
	for _, f := range fs {
		e.m.docErrors.WithLabelValues(e.p.Name, f.Processor).Inc()
	}
	return nil
}

// recordStuck records a document whose rounds keep failing transiently
// while its pillow's other rounds succeed: a failure of the fetch
// (processor ""), so that the retry loop runs every processor again.
func (e *engine) recordStuck(ctx context.Context, s *stub.Stub, err error) error {
	e.m.stuck.WithLabelValues(e.p.Name).Inc()
	return e.record(ctx, []Failure{{Stub: s, Err: fmt.Errorf("keeps failing as if its store or a sink were down while they work for other documents: %w", err)}})
}

package pillows

import (
	"context"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/stub"
)

// worker processes one assigned partition: it batches the partition's
// records, processes them in order and marks the last record of a batch
// only after the whole batch was handled. One worker per partition at a
// time, so one document's stubs (same key, same partition) are processed
// sequentially.
type worker struct {
	pr    *pillowRun
	topic string
	part  int32
	log   *slog.Logger

	ctx    context.Context // canceled: abandon the batch in hand
	cancel context.CancelFunc
	quit   chan struct{} // closed: finish the batch in hand, then exit
	quitMu sync.Once
	done   chan struct{}
	wake   chan struct{}

	mu            sync.Mutex
	queue         []*kgo.Record
	hwm           int64
	backpressured bool
	transient     bool
	paused        bool
	abandoned     bool // the pause state is no longer this worker's

	ownMu sync.Mutex
	owned bool

	dd *dedup
}

func newWorker(pr *pillowRun, topic string, part int32) *worker {
	ctx, cancel := context.WithCancel(pr.abortCtx)
	return &worker{
		pr: pr, topic: topic, part: part,
		log:    pr.log.With("topic", topic, "partition", part),
		ctx:    ctx,
		cancel: cancel,
		quit:   make(chan struct{}),
		done:   make(chan struct{}),
		wake:   make(chan struct{}, 1),
		owned:  true,
		dd:     newDedup(pr.p.DedupSize),
	}
}

// highWater is the queue length at which fetching of the partition pauses
// (it resumes below half): a few batches ahead, bounded memory.
func (w *worker) highWater() int { return max(1000, 8*w.pr.p.Batch.MaxStubs) }

// enqueue is called by the poll loop; it never blocks. When the queue
// grows past its high-water mark the partition's fetching is paused.
func (w *worker) enqueue(recs []*kgo.Record, hwm int64) {
	w.mu.Lock()
	w.queue = append(w.queue, recs...)
	w.hwm = hwm
	if len(w.queue) >= w.highWater() {
		w.backpressured = true
		w.updatePause()
	}
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *worker) take(n int) []*kgo.Record {
	w.mu.Lock()
	defer w.mu.Unlock()
	n = min(n, len(w.queue))
	out := make([]*kgo.Record, n)
	copy(out, w.queue)
	clear(w.queue[:n])
	w.queue = w.queue[n:]
	if w.backpressured && len(w.queue) < w.highWater()/2 {
		w.backpressured = false
		w.updatePause()
	}
	return out
}

func (w *worker) setTransient(on bool) {
	w.mu.Lock()
	w.transient = on
	w.updatePause()
	w.mu.Unlock()
}

// updatePause pauses or resumes fetching of the partition. Called with mu.
func (w *worker) updatePause() {
	if w.abandoned {
		return
	}
	want := w.backpressured || w.transient
	if want == w.paused {
		return
	}
	m := map[string][]int32{w.topic: {w.part}}
	if want {
		w.pr.cl.PauseFetchPartitions(m)
	} else {
		w.pr.cl.ResumeFetchPartitions(m)
	}
	w.paused = want
}

// stop asks the worker to finish the batch in hand and exit.
func (w *worker) stop() { w.quitMu.Do(func() { close(w.quit) }) }

// disown refuses every later mark: the partition may belong to another
// member now.
func (w *worker) disown() {
	w.ownMu.Lock()
	w.owned = false
	w.ownMu.Unlock()
}

// abandon gives up the batch in hand without waiting for it: no mark is
// accepted from now on, its I/O is canceled (a sink that ignores the
// cancellation finishes in the background, and its late write is refused
// by the version check of a sink that has newer), and the partition's
// fetching is resumed now, as the worker may never get to it.
func (w *worker) abandon() {
	w.disown()
	w.cancel()
	w.mu.Lock()
	w.backpressured, w.transient = false, false
	w.updatePause()
	w.abandoned = true
	w.mu.Unlock()
}

func (w *worker) mark(r *kgo.Record) bool {
	w.ownMu.Lock()
	defer w.ownMu.Unlock()
	if !w.owned {
		return false
	}
	w.pr.cl.MarkCommitRecords(r)
	return true
}

func (w *worker) quitting() bool {
	select {
	case <-w.quit:
		return true
	default:
		return false
	}
}

func (w *worker) run() {
	defer close(w.done)
	defer w.cancel()
	defer func() {
		// A paused partition stays paused in the client across
		// assignments: resume it so a later owner session fetches it.
		w.mu.Lock()
		w.backpressured, w.transient = false, false
		w.updatePause()
		w.mu.Unlock()
	}()
	limit := w.pr.p.Batch.MaxStubs
	for {
		recs := w.take(limit)
		if len(recs) == 0 {
			select {
			case <-w.quit:
				return
			case <-w.ctx.Done():
				return
			case <-w.wake:
				continue
			}
		}
		if len(recs) < limit && !w.quitting() {
			timer := time.NewTimer(w.pr.p.Batch.MaxWait)
		collect:
			for len(recs) < limit {
				select {
				case <-w.wake:
					recs = append(recs, w.take(limit-len(recs))...)
				case <-timer.C:
					break collect
				case <-w.quit:
					break collect
				}
			}
			timer.Stop()
		}
		if !w.process(recs) || w.quitting() {
			return
		}
	}
}

// process handles one batch. It returns false when the batch was abandoned
// (the worker must exit without marking).
func (w *worker) process(recs []*kgo.Record) bool {
	pr := w.pr
	p := pr.p
	m := pr.r.o.Metrics
	m.batchSize.WithLabelValues(p.Name).Observe(float64(len(recs)))
	w.log.Debug("batch", "records", len(recs), "first_offset", recs[0].Offset, "last_offset", recs[len(recs)-1].Offset)

	// Decode, filter, collapse to the highest version per document, and
	// skip what this partition already processed.
	stubs := make([]*stub.Stub, 0, len(recs)) // one per document, in order of first appearance
	index := make(map[docKey]int, len(recs))  // where each document is in stubs
	var lastPublished time.Time
	dups := 0
	for _, r := range recs {
		s, err := stub.Unmarshal(r.Value)
		if err != nil {
			m.skipped.WithLabelValues(p.Name, "invalid").Inc()
			w.log.Warn("skipping invalid stub", "offset", r.Offset, "err", err)
			continue
		}
		if s.PublishTimestamp.After(lastPublished) {
			lastPublished = s.PublishTimestamp
		}
		if !p.Filter.Match(s) {
			m.skipped.WithLabelValues(p.Name, "filtered").Inc()
			continue
		}
		if w.dd.done(s) {
			dups++
			continue
		}
		k := keyOf(s)
		if i, ok := index[k]; ok {
			dups++
			if newer(s, stubs[i]) {
				stubs[i] = s
			}
			continue
		}
		index[k] = len(stubs)
		stubs = append(stubs, s)
	}
	if dups > 0 {
		m.skipped.WithLabelValues(p.Name, "duplicate").Add(float64(dups))
	}

	if len(stubs) > 0 {
		h := &handling{backoff: pr.r.o.TransientMin}
		if !w.handle(stubs, h) {
			return false
		}
		w.setTransient(false)
	}

	last := recs[len(recs)-1]
	if !w.mark(last) {
		return false
	}
	w.mu.Lock()
	hwm := w.hwm
	w.mu.Unlock()
	lbl := []string{p.Name, w.topic, strconv.Itoa(int(w.part))}
	m.lagRecords.WithLabelValues(lbl...).Set(float64(max(0, hwm-last.Offset-1)))
	if !lastPublished.IsZero() {
		m.lagSeconds.WithLabelValues(lbl...).Set(time.Since(lastPublished).Seconds())
	}
	return true
}

// splitAfter is how many transient failures in a row make a batch of
// several documents split in halves: a document that makes a store or sink
// fail as a whole (a response too large, a decoder limit, a hang) is then
// isolated in about log2(batch) steps while the others go on.
const splitAfter = 2

// handling is the state of one batch's transient failures, shared by its
// halves.
type handling struct {
	backoff time.Duration
	// first is when the batch first failed, and successes the pillow's
	// count of successful rounds then: a document that keeps failing
	// while others succeed is at fault itself, not the store or sink.
	first     time.Time
	successes uint64
}

// handle processes stubs until each document is handled: written, or its
// failure recorded in the errors table. A transient failure pauses the
// partition and retries with backoff. After splitAfter failures a group of
// several documents is split in halves, each handled on its own; a single
// document that keeps failing is recorded as failed (its error retried by
// the retry loop, dead-lettered in the end) once other rounds of the pillow
// succeeded since the batch first failed, or once it has failed for
// Timeouts.Stall, so that no document holds its partition forever. It
// returns false when the batch must be abandoned.
func (w *worker) handle(stubs []*stub.Stub, h *handling) bool {
	pr := w.pr
	p := pr.p
	m := pr.r.o.Metrics
	for attempt := 1; ; attempt++ {
		out, err := pr.eng.handle(w.ctx, stubs)
		if err == nil {
			h.backoff = pr.r.o.TransientMin
			for _, s := range stubs {
				k := keyOf(s)
				if out.failed[k] {
					continue
				}
				if rev, ok := out.revs[k]; ok && rev != s.DocumentRev {
					// Remember the revision written, the winner fetched,
					// not the stub's: once a conflict branch is deleted,
					// the stub's revision can win again, and its next
					// stub must not be skipped while the sink holds the
					// branch.
					c := *s
					c.DocumentRev = rev
					s = &c
				}
				w.dd.record(s)
			}
			return true
		}
		if w.ctx.Err() != nil {
			return false
		}
		if h.first.IsZero() {
			h.first, h.successes = time.Now(), pr.eng.successes.Load()
		}
		m.transient.WithLabelValues(p.Name).Inc()
		if attempt >= splitAfter {
			if len(stubs) > 1 {
				mid := len(stubs) / 2
				w.log.Warn("batch keeps failing: splitting it to find a document at fault", "documents", len(stubs), "attempts", attempt, "err", err)
				return w.handle(stubs[:mid], h) && w.handle(stubs[mid:], h)
			}
			othersOK := pr.eng.successes.Load() != h.successes
			if othersOK || time.Since(h.first) >= p.Timeouts.Stall {
				s := stubs[0]
				rerr := pr.eng.recordStuck(w.ctx, s, err)
				if rerr == nil {
					w.log.Error("document keeps failing while its store and sinks work for others: recorded as failed, partition goes on",
						"data_source_type", s.DataSourceType, "data_source_name", s.DataSourceName, "document_id", s.DocumentID,
						"attempts", attempt, "others_succeeded", othersOK, "err", err)
					return true
				}
				err = rerr
			}
		}
		w.log.Warn("transient failure: partition paused, batch will be retried", "documents", len(stubs), "attempt", attempt, "backoff", h.backoff, "err", err)
		w.setTransient(true)
		t := time.NewTimer(h.backoff)
		select {
		case <-t.C:
		case <-w.quit:
			t.Stop()
			return false
		case <-w.ctx.Done():
			t.Stop()
			return false
		}
		h.backoff = min(2*h.backoff, pr.r.o.TransientMax)
	}
}

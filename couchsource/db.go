package couchsource

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	kivik "github.com/go-kivik/kivik/v4"
	"github.com/go-kivik/kivik/v4/couchdb/chttp"

	"github.com/changefeed/changefeed/ack"
	"github.com/changefeed/changefeed/stub"
)

// Reasons a feed connection ends, for logs and the reconnect metric.
var (
	errFeedEnded       = errors.New("the server ended the feed")
	errIdentityChanged = errors.New("the database's identity changed: it was deleted and recreated")
)

// session is one incarnation of a database as followed: a reset starts a
// new one, so that acknowledgements of the old incarnation's stubs never
// move the new one's checkpoint.
type session struct {
	tr       *ack.Tracker[stub.Seq]
	identity string
}

// dbFollower follows one database.
type dbFollower struct {
	f    *Follower
	name string
	db   *kivik.DB
	log  *slog.Logger

	sess atomic.Pointer[session]
	// since is where the next feed request starts: the seq of the last
	// change read (reader goroutine only).
	since stub.Seq
	// mode is the feed type in use (reader goroutine only).
	mode FeedMode
	// markerGone records that the identity marker was found missing
	// under a checkpoint that has an identity (reader goroutine only).
	markerGone bool
	// silentStarts counts continuous feeds that stayed silent from their
	// first byte, towards the longpoll fallback.
	silentStarts int

	// acked counts acknowledged changes towards CheckpointEvery.
	acked atomic.Int64
	kick  chan struct{}

	cpMu        sync.Mutex
	stored      Checkpoint // what the store holds (or, after a reset, must hold)
	hasStored   bool
	dirty       bool // stored must be written even if the tracker has nothing new
	lastCurrent time.Time
	cpFailed    atomic.Bool

	state   atomic.Pointer[string] // "" when following, else why not
	streamE atomic.Pointer[error]  // why the monitor ended the feed

	initial *initialLoad
}

type initialLoad struct {
	start    time.Time
	target   int64
	read     int64
	lastLog  time.Time
	lastRead int64
}

func newDBFollower(f *Follower, name string) *dbFollower {
	d := &dbFollower{
		f:    f,
		name: name,
		db:   f.client.DB(name),
		log:  f.log.With("db", name),
		kick: make(chan struct{}, 1),
		mode: f.cfg.Feed,
	}
	if d.mode == FeedAuto {
		d.mode = FeedContinuous
	}
	d.setStatus("starting")
	d.sess.Store(&session{tr: &ack.Tracker[stub.Seq]{}})
	return d
}

func (d *dbFollower) setStatus(s string) {
	d.state.Store(&s)
	v := 0.0
	if s == "" {
		v = 1
	}
	d.f.m.following.WithLabelValues(d.name).Set(v)
}

func (d *dbFollower) status() string {
	s := *d.state.Load()
	if d.cpFailed.Load() {
		if s != "" {
			s += ", "
		}
		s += "checkpoint writes failing"
	}
	return s
}

// run follows the database until ctx ends or a fatal error.
func (d *dbFollower) run(ctx, pubCtx context.Context) error {
	bo := backoff{min: d.f.cfg.BackoffMin, max: d.f.cfg.BackoffMax}
	for {
		cp, ok, err := d.f.store.Load(ctx, d.f.cfg.Source, d.name)
		if err == nil {
			d.cpMu.Lock()
			d.stored, d.hasStored, d.lastCurrent = cp, ok, time.Now()
			d.cpMu.Unlock()
			d.since = "0"
			if ok {
				d.since = cp.Seq
				d.sess.Store(&session{tr: &ack.Tracker[stub.Seq]{}, identity: cp.Identity})
				d.log.Info("resuming from checkpoint", "seq", string(cp.Seq), "identity", cp.Identity, "checkpointed_at", cp.UpdatedAt)
			} else {
				d.log.Info("no checkpoint: reading the feed from the start")
			}
			break
		}
		d.setStatus("checkpoint store unreachable")
		d.log.Error("loading the checkpoint failed; retrying", "err", err)
		if !sleep(ctx, bo.next()) {
			return nil
		}
	}

	// Checkpoints are written until reading stops; a write under way then
	// completes (writeCtx is not cancelled with ctx).
	loopCtx, stopCP := context.WithCancel(ctx)
	cpDone := make(chan struct{})
	go func() {
		defer close(cpDone)
		d.checkpointLoop(loopCtx, context.WithoutCancel(ctx))
	}()
	defer func() { stopCP(); <-cpDone }()

	for ctx.Err() == nil {
		wait, err := d.connectAndStream(ctx, pubCtx, &bo)
		if err != nil {
			d.setStatus("stopped: " + err.Error())
			return err
		}
		if wait > 0 && !sleep(ctx, wait) {
			break
		}
	}
	d.setStatus("stopped")
	return nil
}

// connectAndStream opens one feed connection and reads it until it ends.
// It returns how long to wait before the next attempt, or a fatal error.
func (d *dbFollower) connectAndStream(ctx, pubCtx context.Context, bo *backoff) (time.Duration, error) {
	info, err := d.db.Stats(ctx)
	if err != nil {
		return d.retryable(ctx, "db_info", err, bo)
	}
	// A marker that disappeared under a checkpoint that has one means the
	// database was deleted (and perhaps recreated). Write a new one only
	// when it is still missing at the next attempt: a write racing a
	// deletion that is still under way could otherwise land in (or, on
	// some servers, resurrect) the database being deleted.
	create := d.markerGone || d.sess.Load().identity == ""
	identity, err := d.identity(ctx, create)
	if err != nil {
		return d.retryable(ctx, "identity", err, bo)
	}
	if identity == "" && !create {
		d.markerGone = true
		return d.retryable(ctx, "identity", errIdentityChanged, bo)
	}
	d.markerGone = false
	d.checkReset(ctx, info, identity)
	d.updateLag(info)
	if target := info.DocCount + info.DeletedCount; d.since == "0" && d.initial == nil && target > 0 {
		d.initial = &initialLoad{start: time.Now(), target: target, lastLog: time.Now()}
		d.f.m.initialTarget.WithLabelValues(d.name).Set(float64(d.initial.target))
		d.f.m.initialRead.WithLabelValues(d.name).Set(0)
		d.log.Info("initial load from seq 0", "documents", d.initial.target)
	}

	read, err := d.stream(ctx, pubCtx)
	if ctx.Err() != nil {
		return 0, nil
	}
	if read > 0 {
		bo.reset()
	}
	if err == nil {
		// A longpoll response ended normally: ask again at once.
		return 0, nil
	}
	return d.retryable(ctx, "feed", err, bo)
}

// retryable classifies an error: fatal ones are returned, the others are
// logged and counted and give the delay before the next attempt.
func (d *dbFollower) retryable(ctx context.Context, stage string, err error, bo *backoff) (time.Duration, error) {
	if ctx.Err() != nil {
		return 0, nil
	}
	status := httpStatus(err)
	reason := "error"
	wait := bo.next()
	var httpErr *chttp.HTTPError
	switch {
	case errors.Is(err, ack.ErrFailed):
		return 0, fmt.Errorf("%w: database %s: %w", ErrPublish, d.name, err)
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		return 0, fmt.Errorf("%w: database %s: %s: %w", ErrAuth, d.name, stage, err)
	case errors.Is(err, ErrDatabaseMissing) || status == http.StatusNotFound:
		reason = "db_missing"
		if *d.state.Load() != "database missing (404)" {
			d.log.Error("database does not exist (404); retrying with backoff, not ready meanwhile", "stage", stage)
		}
		d.setStatus("database missing (404)")
		d.f.m.reconnects.WithLabelValues(d.name, reason).Inc()
		return wait, nil
	case errors.Is(err, errIdentityChanged):
		reason = "identity_changed"
		wait = d.f.cfg.BackoffMin
	case status == http.StatusBadRequest:
		if d.since != "0" {
			d.reset(ctx, "seq_rejected", d.sess.Load().identity, fmt.Sprintf("the server rejected the stored seq %q", d.since))
			return 0, nil
		}
		return 0, fmt.Errorf("%w: database %s: %w", ErrBadRequest, d.name, err)
	case status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable:
		reason = "throttled"
		if errors.As(err, &httpErr) {
			if ra, ok := retryAfter(httpErr.Response); ok {
				wait = ra
			}
		}
	case errors.Is(err, ErrFeedSilent):
		reason = "silent"
	case errors.Is(err, errFeedEnded):
		reason = "ended"
	case status >= 500:
		reason = "server_error"
	}
	d.setStatus("reconnecting: " + reason)
	d.f.m.reconnects.WithLabelValues(d.name, reason).Inc()
	d.log.Warn("feed interrupted; reconnecting from the last change read, the checkpoint does not move meanwhile",
		"stage", stage, "reason", reason, "status", status, "err", err, "retry_in", wait, "since", string(d.since))
	return wait, nil
}

// checkReset detects a database that is not the one the checkpoint was
// taken from, and replays it from the start.
func (d *dbFollower) checkReset(ctx context.Context, info *kivik.DBStats, identity string) {
	sess := d.sess.Load()
	switch {
	case identity != "" && sess.identity != "" && identity != sess.identity:
		d.reset(ctx, "identity_changed", identity,
			fmt.Sprintf("the database's identity is %s, the checkpoint's %s: it was deleted and recreated", identity, sess.identity))
		return
	case identity != "" && sess.identity == "":
		// No identity yet (first run, or a marker that could not be
		// written before): adopt it.
		d.sess.Store(&session{tr: sess.tr, identity: identity})
	}
	// Servers with integer seqs: a checkpoint beyond the database's
	// update_seq cannot belong to this database.
	if cur, ok := strconv.ParseInt(string(d.since), 10, 64); ok == nil {
		if upd, err := strconv.ParseInt(info.UpdateSeq, 10, 64); err == nil && cur > upd {
			d.reset(ctx, "seq_ahead", d.sess.Load().identity,
				fmt.Sprintf("the checkpoint's seq %d is beyond the database's update_seq %d", cur, upd))
		}
	}
}

// reset starts a new session from seq 0.
func (d *dbFollower) reset(ctx context.Context, reason, identity, why string) {
	d.log.Warn("database reset detected: replaying its feed from the start; consumers receive duplicates, nothing is lost",
		"reason", reason, "detail", why, "previous_since", string(d.since))
	d.f.m.rewinds.WithLabelValues(d.name, reason).Inc()
	d.sess.Store(&session{tr: &ack.Tracker[stub.Seq]{}, identity: identity})
	d.since = "0"
	d.initial = nil
	d.cpMu.Lock()
	d.stored = Checkpoint{Seq: "0", Identity: identity}
	d.hasStored, d.dirty = true, true
	d.cpMu.Unlock()
	if err := d.checkpoint(ctx); err != nil {
		d.log.Error("writing the reset checkpoint failed; retried with the next checkpoint", "err", err)
	}
}

// stream reads one feed connection. It returns the number of changes read
// and why the connection ended (nil: a longpoll response completed).
func (d *dbFollower) stream(ctx, pubCtx context.Context) (int, error) {
	cfg := d.f.cfg
	feedCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	mode := d.mode
	if mode == FeedLongpoll {
		var c2 context.CancelFunc
		feedCtx, c2 = context.WithTimeout(feedCtx, cfg.LongpollTimeout+cfg.ReadTimeout)
		defer c2()
	}
	d.streamE.Store(nil)
	monDone := make(chan struct{})
	go func() {
		defer close(monDone)
		d.monitor(feedCtx, cancel)
	}()
	defer func() { cancel(); <-monDone }()

	k := &requestKind{project: d.f.keep, readTimeout: cfg.ReadTimeout, selector: d.f.selector}
	params := map[string]any{
		"feed":         string(mode),
		"since":        string(d.since),
		"include_docs": true,
		"heartbeat":    cfg.Heartbeat.Milliseconds(),
	}
	if mode == FeedLongpoll {
		params["timeout"] = cfg.LongpollTimeout.Milliseconds()
	}
	if d.f.selector != nil {
		params["filter"] = "_selector"
	}
	ch := d.db.Changes(withKind(feedCtx, k), kivik.Params(params))
	defer ch.Close()
	if err := ch.Err(); err != nil {
		return 0, d.feedErr(ctx, feedCtx, err, k, 0)
	}
	d.setStatus("")

	read := 0
	var doc map[string]any
	for ch.Next() {
		id := ch.ID()
		if id == "" {
			continue // a continuous feed's closing {"last_seq":…} line
		}
		if d.cpFailed.Load() {
			if !d.waitCheckpoint(feedCtx) {
				break
			}
		}
		seq := stub.Seq(ch.Seq())
		if seq == "" {
			// A row without a seq (CouchDB's seq_interval): its position
			// is no later than the last known one, which is safe to keep.
			seq = d.since
		}
		clear(doc)
		if doc == nil {
			doc = map[string]any{}
		}
		if err := ch.ScanDoc(&doc); err != nil {
			clear(doc)
		}
		d.handle(feedCtx, pubCtx, id, seq, ch.Deleted(), ch.Changes(), doc)
		d.since = seq
		read++
		if err := d.sess.Load().tr.Err(); err != nil {
			return read, err
		}
	}
	err := ch.Err()
	if err == nil && mode == FeedLongpoll && ctx.Err() == nil && d.streamErr() == nil {
		if meta, merr := ch.Metadata(); merr == nil && meta.LastSeq != "" {
			// Changes the server filtered out (a selector) end the
			// response too; their position is safe to checkpoint once
			// everything before is acknowledged.
			d.sess.Load().tr.Begin().End(stub.Seq(meta.LastSeq))
			d.since = stub.Seq(meta.LastSeq)
		}
		return read, nil
	}
	if err == nil {
		err = errFeedEnded
	}
	return read, d.feedErr(ctx, feedCtx, err, k, read)
}

// feedErr picks the error that explains why a feed ended.
func (d *dbFollower) feedErr(ctx, feedCtx context.Context, err error, k *requestKind, read int) error {
	if e := d.streamErr(); e != nil {
		return e
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if errors.Is(err, ErrFeedSilent) || errors.Is(feedCtx.Err(), context.DeadlineExceeded) {
		if d.mode == FeedLongpoll {
			return nil // an idle longpoll: ask again
		}
		if k.bytes.Load() == 0 && read == 0 && d.f.cfg.Feed == FeedAuto {
			d.silentStarts++
			if d.silentStarts >= 2 {
				d.mode = FeedLongpoll
				d.log.Warn("continuous feed delivers nothing (a buffering proxy or server?): falling back to longpoll")
			}
		}
		if !errors.Is(err, ErrFeedSilent) {
			err = fmt.Errorf("%w: %w", ErrFeedSilent, err)
		}
		return err
	}
	d.silentStarts = 0
	return err
}

func (d *dbFollower) streamErr() error {
	if p := d.streamE.Load(); p != nil {
		return *p
	}
	return nil
}

// monitor re-reads the database's info and identity while the feed is
// open: for the lag metric, and because some servers keep a deleted
// database's feed open.
func (d *dbFollower) monitor(ctx context.Context, cancel context.CancelFunc) {
	t := time.NewTicker(d.f.cfg.CheckInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		info, err := d.db.Stats(ctx)
		if ctx.Err() != nil {
			return
		}
		if httpStatus(err) == http.StatusNotFound {
			e := fmt.Errorf("%w (found by the periodic check)", ErrDatabaseMissing)
			d.streamE.Store(&e)
			cancel()
			return
		}
		if err != nil {
			continue // the feed itself will tell
		}
		d.updateLag(info)
		identity, err := d.identity(ctx, false)
		if err != nil || ctx.Err() != nil {
			continue
		}
		if cur := d.sess.Load().identity; cur != "" && identity != cur {
			e := errIdentityChanged
			d.streamE.Store(&e)
			cancel()
			return
		}
	}
}

// waitCheckpoint pauses reading while checkpoint writes fail: a follower
// that cannot record progress must not make more of it.
func (d *dbFollower) waitCheckpoint(ctx context.Context) bool {
	d.log.Warn("reading paused: checkpoint writes are failing")
	for d.cpFailed.Load() {
		select {
		case <-ctx.Done():
			return false
		case d.kick <- struct{}{}:
		default:
		}
		if !sleep(ctx, 200*time.Millisecond) {
			return false
		}
	}
	d.log.Info("reading resumed: checkpoint written")
	return true
}

// handle turns one change into a stub and publishes it.
func (d *dbFollower) handle(ctx, pubCtx context.Context, id string, seq stub.Seq, deleted bool, revs []string, doc map[string]any) {
	m := d.f.m
	m.read.WithLabelValues(d.name).Inc()
	d.progress()
	tr := d.sess.Load().tr
	u := tr.Begin()
	if strings.HasPrefix(id, "_design/") && !d.f.cfg.Routing.IncludeDesignDocs {
		m.skipped.WithLabelValues(d.name, "design_doc").Inc()
		u.End(seq)
		return
	}
	s, topic := d.buildStub(ctx, id, seq, deleted, revs, doc)
	u.Add()
	d.f.pub.Publish(pubCtx, topic, s, func(err error) {
		u.Done(err)
		if err != nil {
			d.log.Error("kafka failed a stub for good; the checkpoint stays before it", "id", id, "topic", topic, "err", err)
			return
		}
		m.published.WithLabelValues(d.name).Inc()
		if d.f.cfg.PrintStubs != nil {
			d.f.printStub(topic, s)
		}
		if d.acked.Add(1)%int64(d.f.cfg.CheckpointEvery) == 0 {
			select {
			case d.kick <- struct{}{}:
			default:
			}
		}
	})
	u.End(seq)
}

func (d *dbFollower) progress() {
	il := d.initial
	if il == nil {
		return
	}
	il.read++
	d.f.m.initialRead.WithLabelValues(d.name).Set(float64(il.read))
	now := time.Now()
	if il.read >= il.target {
		el := now.Sub(il.start)
		d.log.Info("initial load reached the database's document count", "read", il.read, "elapsed", el.Round(time.Millisecond).String(),
			"changes_per_second", int(float64(il.read)/max(el.Seconds(), 1e-3)))
		d.initial = nil
		return
	}
	if now.Sub(il.lastLog) >= d.f.cfg.ProgressInterval {
		rate := float64(il.read-il.lastRead) / now.Sub(il.lastLog).Seconds()
		d.log.Info("initial load progress", "read", il.read, "documents", il.target,
			"percent", fmt.Sprintf("%.1f", 100*float64(il.read)/float64(il.target)),
			"changes_per_second", int(rate), "published", d.acked.Load())
		il.lastLog, il.lastRead = now, il.read
	}
}

// buildStub makes the change's stub and picks its topic.
func (d *dbFollower) buildStub(ctx context.Context, id string, seq stub.Seq, deleted bool, revs []string, doc map[string]any) (*stub.Stub, string) {
	routing := d.f.cfg.Routing
	rev := str(doc["_rev"])
	if rev == "" && len(revs) > 0 {
		rev = revs[0]
	}
	if b, ok := doc["_deleted"].(bool); ok && b {
		deleted = true
	}
	docType := str(doc["doc_type"])
	fields := doc
	if deleted && docType == "" && rev != "" && !strings.HasPrefix(id, "_design/") {
		// A DELETE leaves a tombstone without fields: route by the last
		// revision before it, while compaction has not removed it.
		if prev, err := d.previousRevision(ctx, id, rev); err == nil {
			fields = prev
			docType = str(prev["doc_type"])
		} else {
			d.log.Debug("deletion without doc_type: earlier revision unreadable", "id", id, "rev", rev, "err", err)
		}
		if docType == "" {
			d.f.m.untyped.WithLabelValues(d.name).Inc()
		}
	}
	rule, softDeleted := routing.Route(docType)
	switch {
	case strings.HasPrefix(id, "_design/"):
		docType = DesignDocType
	case docType == "":
		docType = UnknownDocType
	}
	now := time.Now().UTC()
	s := &stub.Stub{
		DocumentID:                  id,
		DocumentRev:                 rev,
		DataSourceType:              stub.SourceCouch,
		DataSourceName:              d.name,
		DocumentType:                docType,
		Domain:                      str(fields[rule.DomainField]),
		IsDeletion:                  deleted || softDeleted,
		PublishTimestamp:            now,
		OriginalPublicationDatetime: now,
		Seq:                         seq,
	}
	if rule.SubtypeField != "" {
		s.DocumentSubtype = str(fields[rule.SubtypeField])
	}
	return s, rule.Topic
}

// previousRevision reads the stub fields of the revision before a deletion.
func (d *dbFollower) previousRevision(ctx context.Context, id, rev string) (map[string]any, error) {
	cfg := d.f.cfg
	keep := map[string]bool{"_id": true, "_rev": true, "_revisions": true}
	k := &requestKind{project: keep, docMode: true, readTimeout: cfg.ReadTimeout}
	var tomb struct {
		Revisions stub.Revisions `json:"_revisions"`
	}
	gctx, cancel := context.WithTimeout(ctx, cfg.ReadTimeout)
	defer cancel()
	if err := d.db.Get(withKind(gctx, k), id, kivik.Rev(rev), kivik.Param("revs", true)).ScanDoc(&tomb); err != nil {
		return nil, err
	}
	if len(tomb.Revisions.IDs) < 2 || tomb.Revisions.Start < 2 {
		return nil, errors.New("no earlier revision")
	}
	parent := fmt.Sprintf("%d-%s", tomb.Revisions.Start-1, tomb.Revisions.IDs[1])
	var prev map[string]any
	k2 := &requestKind{project: d.f.keep, docMode: true, readTimeout: cfg.ReadTimeout}
	if err := d.db.Get(withKind(gctx, k2), id, kivik.Rev(parent)).ScanDoc(&prev); err != nil {
		return nil, err
	}
	return prev, nil
}

func str(v any) string {
	s, _ := v.(string)
	return s
}

// updateLag sets the lag gauge from update_seq and the stored checkpoint.
func (d *dbFollower) updateLag(info *kivik.DBStats) {
	d.cpMu.Lock()
	stored := d.stored.Seq
	d.cpMu.Unlock()
	if stored == "" {
		stored = "0"
	}
	upd, ok1 := numericPrefix(stub.Seq(info.UpdateSeq))
	cp, ok2 := numericPrefix(stored)
	if ok1 && ok2 {
		d.f.m.lag.WithLabelValues(d.name).Set(float64(max(upd-cp, 0)))
	}
}

// numericPrefix returns the number a seq starts with: CouchDB 2/3's
// "12-g1AAAA…" gives 12, an integer seq itself. It is used for the lag
// metric and to keep the stored checkpoint from moving backwards, never to
// order or skip changes.
func numericPrefix(s stub.Seq) (int64, bool) {
	v := string(s)
	if i := strings.IndexByte(v, '-'); i >= 0 {
		v = v[:i]
	}
	n, err := strconv.ParseInt(v, 10, 64)
	return n, err == nil && n >= 0
}

// backoff doubles from min to max, with jitter.
type backoff struct {
	min, max, cur time.Duration
}

func (b *backoff) next() time.Duration {
	if b.cur < b.min {
		b.cur = b.min
	}
	d := b.cur
	b.cur = min(b.cur*2, b.max)
	// Up to 25% less, so that followers of many databases spread out.
	return d - time.Duration(rand.Int64N(int64(d)/4+1))
}

func (b *backoff) reset() { b.cur = 0 }

// sleep waits d or until ctx ends; it reports whether ctx is still live.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// httpStatus returns the HTTP status an error carries, 0 for none (a
// network error, a malformed response, a context error).
func httpStatus(err error) int {
	var sc interface{ HTTPStatus() int }
	if err == nil || !errors.As(err, &sc) {
		return 0
	}
	return sc.HTTPStatus()
}

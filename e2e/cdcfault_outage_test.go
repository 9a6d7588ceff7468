package e2e_test

import (
	"context"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/changefeed/changefeed/e2e/internal/faultenv"
	"github.com/changefeed/changefeed/stub"
)

// faultOutage is how long Kafka stays paused.
const faultOutage = 10 * time.Second

// faultGrace is how long after the pause began an acknowledgement received
// just before it may still be confirmed (the next status tick, plus slack).
const faultGrace = 2*faultStatusInterval + time.Second

// TestCDCFaultKafkaPaused pauses Kafka for 10 s while changes keep being
// committed, more than the publisher may hold unacknowledged. Nothing may be
// lost, every stub must be valid, the publisher stays up (not ready while
// Kafka does not answer, ready again after), and the slot's
// confirmed_flush_lsn does not move during the outage (sampled throughout;
// only acknowledgements received before the pause may be confirmed in its
// first moments) and is never past a change not yet in Kafka.
func TestCDCFaultKafkaPaused(t *testing.T) {
	// A small in-flight bound, so that the outage also exercises the
	// back-pressure path: decoding waits while status ticks go on.
	r := newFaultRig(t, map[string]string{"CHANGEFEED_MAX_IN_FLIGHT": "500"})
	r.start(t)
	stopWorkload, workloadErr := faultBackground(func(ctx context.Context) error {
		// Bounded in count too: a minute's worth at 400 changes/s.
		_, err := r.wl.Run(ctx, 400*60, 400, 10, 20)
		return err
	})
	defer stopWorkload()

	r.sampler.SetLabel("before")
	r.reader.WaitFor(t, time.Minute, "stubs flowing before the outage", func(recs []faultenv.Record) bool { return len(recs) >= 500 })
	before := r.sampler.Sample(t)

	r.sampler.SkipKafka(true)
	r.sampler.SetLabel("paused")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pausedAt := time.Now()
	if err := r.kafka.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	committedAtPause := len(r.wl.Committed())
	// Readiness fails while Kafka does not answer; the process stays up.
	faultenv.Poll(t, faultOutage-time.Second, 100*time.Millisecond, "/readyz failing during the outage", func() bool {
		return r.httpStatus("/readyz") == http.StatusServiceUnavailable
	})
	if code := r.httpStatus("/healthz"); code != http.StatusOK {
		t.Errorf("/healthz during the outage: %d, want 200", code)
	}
	// The rest of the outage: a scenario length, not a wait for a condition.
	time.Sleep(time.Until(pausedAt.Add(faultOutage)))
	if !r.pub.Running() {
		t.Fatalf("publisher exited during the Kafka outage with %d:\n%s", r.pub.ExitCode(), r.pub.Log())
	}
	committedDuringPause := len(r.wl.Committed()) - committedAtPause
	unpausedAt := time.Now()
	if err := r.kafka.Unpause(ctx); err != nil {
		t.Fatal(err)
	}
	r.sampler.SetLabel("after")
	r.sampler.SkipKafka(false)

	// Recovery: the slot moves past where it stood during the outage.
	_, pausedHi, _ := confirmedRange(r.sampler.Samples(), "paused", pausedAt, unpausedAt)
	faultenv.Poll(t, time.Minute, 50*time.Millisecond, "slot confirmed past its outage position", func() bool {
		return r.sampler.Sample(t).Confirmed > pausedHi.Confirmed
	})
	faultenv.Poll(t, time.Minute, 100*time.Millisecond, "/readyz after the outage", func() bool {
		return r.httpStatus("/readyz") == http.StatusOK
	})
	stopWorkload()
	if err := workloadErr(); err != nil {
		t.Fatalf("workload: %v", err)
	}
	r.finish(t, nil)

	if committedDuringPause == 0 {
		t.Fatalf("no change was committed during the outage: the test checked nothing")
	}
	samples := r.sampler.Samples()
	lo, hi, n := confirmedRange(samples, "paused", pausedAt.Add(faultGrace), unpausedAt)
	t.Logf("outage %s: %d changes committed meanwhile; slot confirmed %s before, %d samples from +%s to the end of the outage: %s .. %s",
		unpausedAt.Sub(pausedAt).Round(time.Millisecond), committedDuringPause, before.Confirmed, n, faultGrace, lo.Confirmed, hi.Confirmed)
	if n < int(faultOutage/time.Second) {
		t.Fatalf("only %d samples during the outage", n)
	}
	if lo.Confirmed != hi.Confirmed {
		t.Errorf("confirmed_flush_lsn moved during the Kafka outage: %s at %s, %s at %s",
			lo.Confirmed, lo.At.Format("15:04:05.000"), hi.Confirmed, hi.At.Format("15:04:05.000"))
	}
}

// TestCDCFaultKafkaOutageKeepalivesKill pauses Kafka with stubs in flight,
// then writes only to an unpublished table (and the publisher emits
// heartbeats), so that keepalives with a moving WAL end keep arriving while
// stubs are unacknowledged; then kills the publisher with SIGKILL. The slot
// must never have been confirmed past the lowest unacknowledged commit
// (sampled throughout), and after a restart with Kafka back nothing is lost.
func TestCDCFaultKafkaOutageKeepalivesKill(t *testing.T) {
	r := newFaultRig(t, map[string]string{"CHANGEFEED_HEARTBEAT_INTERVAL": "300ms"})
	r.start(t)
	stopWorkload, workloadErr := faultBackground(func(ctx context.Context) error {
		// Bounded in count too: a minute's worth at 400 changes/s.
		_, err := r.wl.Run(ctx, 400*60, 400, 10, 20)
		return err
	})
	defer stopWorkload()

	r.sampler.SetLabel("before")
	r.reader.WaitFor(t, time.Minute, "stubs flowing before the outage", func(recs []faultenv.Record) bool { return len(recs) >= 300 })

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r.sampler.SkipKafka(true)
	r.sampler.SetLabel("paused, published writes")
	if err := r.kafka.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	// Published changes keep coming for a moment (a scenario length, not a
	// wait for a condition): their stubs are in flight.
	time.Sleep(time.Second)
	stopWorkload()
	if err := workloadErr(); err != nil {
		t.Fatalf("workload: %v", err)
	}

	// Then only WAL the publication filters out: keepalives whose WAL end
	// runs past every stub in flight.
	r.sampler.SetLabel("paused, unpublished writes")
	walBefore := faultWALPosition(t, r)
	stopUnpublished, unpublishedErr := faultBackground(func(ctx context.Context) error {
		_, err := faultenv.Unpublished(ctx, r.wl.Pool(), "fault_unpublished")
		return err
	})
	// Five seconds of keepalives with stubs in flight (scenario length).
	time.Sleep(5 * time.Second)
	if !r.pub.Running() {
		t.Fatalf("publisher exited during the Kafka outage with %d:\n%s", r.pub.ExitCode(), r.pub.Log())
	}
	r.sampler.SetLabel("killed")
	r.pub.Kill(t)
	stopUnpublished()
	if err := unpublishedErr(); err != nil {
		t.Fatalf("unpublished writes: %v", err)
	}
	walAfter := faultWALPosition(t, r)
	killed := r.sampler.SlotReleased(t, 30*time.Second)

	if err := r.kafka.Unpause(ctx); err != nil {
		t.Fatal(err)
	}
	r.sampler.SkipKafka(false)
	r.sampler.SetLabel("restarted")
	kill := faultenv.Kill{
		Confirmed:  killed.Confirmed,
		Checkpoint: killed.Checkpoint,
		End:        faultenv.StableEndOffsets(t, r.adm, 30*time.Second, faultTopic),
	}
	t.Logf("unpublished WAL %s .. %s; at the kill: slot confirmed %s, checkpoint %s; end offsets after the outage %v",
		walBefore, walAfter, kill.Confirmed, kill.Checkpoint, kill.End)
	r.start(t)
	a := r.finish(t, []faultenv.Kill{kill})

	// The scenario must have had stubs in flight: changes that reached
	// Kafka only after the restart. The slot at the kill must be at or
	// below the lowest of their commit LSNs (CheckConfirmation in finish
	// checks every sample; this is the one that matters most).
	inFlight := 0
	var lowest faultenv.Change
	for _, c := range a.Changes {
		if f := c.First(); f.Offset >= kill.End[f.TP] {
			if inFlight == 0 || c.Version.CommitLSN < lowest.Version.CommitLSN {
				lowest = *c
			}
			inFlight++
		}
	}
	// Changes that never reached Kafka were in flight too (and lost: finish
	// reported them, with CheckLost).
	missing := a.Missing(r.wl.Committed())
	if inFlight+len(missing) == 0 {
		t.Fatalf("no stub was in flight at the kill: the test checked nothing")
	}
	if inFlight == 0 {
		t.Fatalf("%d changes in flight at the kill never reached Kafka", len(missing))
	}
	t.Logf("%d changes reached Kafka only after the restart; lowest commit LSN %s (%s)", inFlight, lowest.Version.CommitLSN, lowest.Key)
	if kill.Confirmed > lowest.Version.CommitLSN {
		t.Errorf("slot confirmed %s at the kill, past the unacknowledged commit %s of %s", kill.Confirmed, lowest.Version.CommitLSN, lowest.Key)
	}
	if walAfter <= lowest.Version.CommitLSN {
		t.Errorf("the unpublished writes did not move the WAL past the stubs in flight (%s <= %s)", walAfter, lowest.Version.CommitLSN)
	}
}

// faultBackground runs fn in a goroutine until stop is called; wait returns
// fn's error. stop may be called more than once.
func faultBackground(fn func(context.Context) error) (stop func(), wait func() error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()
	var once sync.Once
	var err error
	wait = func() error {
		once.Do(func() { err = <-done })
		return err
	}
	stop = func() { cancel(); _ = wait() }
	return stop, wait
}

func faultWALPosition(t *testing.T, r *faultRig) stub.LSN {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var s string
	if err := r.wl.Pool().QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&s); err != nil {
		t.Fatal(err)
	}
	lsn, err := stub.ParseLSN(s)
	if err != nil {
		t.Fatal(err)
	}
	return lsn
}

package e2e_test

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/changefeed/changefeed/e2e/internal/faultenv"
)

// TestCDCFaultKillNine kills the publisher with SIGKILL at five random points
// of a 20,000-change workload and restarts it each time. Every committed
// change must reach Kafka at least once, nothing rolled back may, the slot
// must never be confirmed past a change not yet in Kafka, and a change is
// published again after a kill only if its commit LSN is at or above the slot's
// confirmed_flush_lsn at that kill.
func TestCDCFaultKillNine(t *testing.T) {
	const (
		changes = 20000
		rate    = 1000 // changes/s: the workload lasts ~20 s, the kills ~10 s
		kills   = 5
	)
	r := newFaultRig(t, nil)
	rng := rand.New(rand.NewPCG(r.seed, 1))
	r.start(t)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type outcome struct {
		n   int
		err error
	}
	wlDone := make(chan outcome, 1)
	go func() {
		n, err := r.wl.Run(ctx, changes, rate, 20, 25)
		wlDone <- outcome{n, err}
	}()

	var recorded []faultenv.Kill
	workloadOver := false
	for i := range kills {
		// A random point of the run: between two confirmations or right
		// after one, with stubs in flight or not.
		delay := 300*time.Millisecond + time.Duration(rng.Int64N(int64(1700*time.Millisecond)))
		select {
		case o := <-wlDone:
			wlDone <- o
			workloadOver = true
		case <-time.After(delay):
		}
		if !r.pub.Running() {
			t.Fatalf("publisher run %d exited on its own with %d:\n%s", r.pub.Runs()-1, r.pub.ExitCode(), r.pub.Log())
		}
		before := r.reader.Len()
		k := r.kill(t)
		recorded = append(recorded, k)
		t.Logf("kill %d after %s (workload running: %t, %d records read): slot confirmed %s, checkpoint %s, end offsets %v",
			i+1, delay.Round(time.Millisecond), !workloadOver, before, k.Confirmed, k.Checkpoint, k.End)
		r.start(t)
	}

	o := <-wlDone
	if o.err != nil {
		t.Fatalf("workload: %v", o.err)
	}
	if o.n != changes {
		t.Fatalf("workload wrote %d changes, want %d", o.n, changes)
	}
	a := r.finish(t, recorded)

	// Changes in Kafka but not confirmed at a kill are what the next run
	// publishes again: if no kill left any, the duplicate check above
	// checked nothing.
	exposed := 0
	for i, k := range recorded {
		n := 0
		for _, c := range a.Changes {
			// The next run resumes from the later of slot and checkpoint.
			if f := c.First(); f.Offset < k.End[f.TP] && c.Version.CommitLSN >= max(k.Confirmed, k.Checkpoint) {
				n++
			}
		}
		t.Logf("kill %d: %d changes were in Kafka but not confirmed", i+1, n)
		exposed += n
	}
	if exposed == 0 {
		t.Errorf("no kill left a change in Kafka unconfirmed: the kills did not land mid-stream")
	}
	if a.Duplicates() == 0 {
		t.Errorf("no duplicates after %d kills with %d changes unconfirmed: were they republished?", kills, exposed)
	}
	for i := 1; i < len(recorded); i++ {
		if recorded[i].Confirmed < recorded[i-1].Confirmed {
			t.Errorf("slot went backwards between kills %d and %d: %s -> %s", i, i+1, recorded[i-1].Confirmed, recorded[i].Confirmed)
		}
	}
}

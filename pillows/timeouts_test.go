package pillows_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/pillows"
)

// hungSink never answers (it ignores its context too) until released.
type hungSink struct {
	release chan struct{}
	calls   chan struct{}
}

func (h *hungSink) Name() string { return "rep" }
func (h *hungSink) Process(context.Context, []*doc.Document) error {
	select {
	case h.calls <- struct{}{}:
	default:
	}
	<-h.release
	return nil
}

// A sink that hangs cannot stall the group's rebalance: the revoke waits
// for the batch in hand at most Timeouts.Revoke, then abandons it (nothing
// committed for it), and the new member processes the partition from the
// last committed offset.
func TestRevokeBoundedWhenSinkHangs(t *testing.T) {
	e := newEnv(t)
	all, final := history(30, 1, 0)
	e.apply(final)
	e.produce(all...)
	hung := &hungSink{release: make(chan struct{}), calls: make(chan struct{}, 1)}
	reg := prometheus.NewRegistry()
	m, _ := pillows.NewMetrics(reg)
	pA := e.pillow("hung", hung)
	pA.Timeouts = pillows.Timeouts{Revoke: time.Second}
	e.start(e.runner(func(o *pillows.Options) { o.Metrics = m; o.ShutdownTimeout = 2 * time.Second }), pA)
	// Cleanups run last-in first-out: the sink is released before the
	// runner is stopped.
	t.Cleanup(func() { close(hung.release) })
	select {
	case <-hung.calls:
	case <-time.After(30 * time.Second):
		t.Fatal("the hung sink was never called")
	}

	sinkB := e.repSink("rep")
	e.start(e.runner(), e.pillow("hung", sinkB))
	e.waitMembers("hung", 2)
	if n := metricValue(t, reg, "changefeed_pillow_abandoned_batches_total", "pillow", "hung"); n < 1 {
		t.Fatalf("abandoned batches = %v, want at least 1", n)
	}
	// The partitions B took over were not committed past the abandoned
	// batch: B writes their documents.
	testenv.Eventually(t, 30*time.Second, func() string {
		if n := sinkB.writes.Load(); n == 0 {
			return fmt.Sprintf("member B wrote %d documents", n)
		}
		return ""
	})
}

package pillows_test

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/pillows"
)

// A failure recorded by one process of a pillow is cleared by the success
// of another: the partition's next owner. Process A starts with an empty
// errors table; process B joins, and the documents of B's partitions fail
// there and are recorded. B stops, A takes its partitions and processes new
// versions of those documents successfully: their rows go. Before, A's
// "may have errors" flag was its own (off since its start) and the rows
// stayed, to be retried — or, dead, to stay for good — although the
// documents were fine.
func TestFailuresClearedByAnotherProcess(t *testing.T) {
	e := newEnv(t)
	byPart, err := kgo.NewClient(kgo.SeedBrokers(e.brokers...), kgo.DefaultProduceTopic(topic), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(byPart.Close)
	// One document per partition, so that B owns at least one of them.
	produce := func(lsn uint64) {
		t.Helper()
		var cs []change
		final := map[string]change{}
		for p := range int32(partitions) {
			c := change{id: fmt.Sprintf("x%d", p), lsn: lsn + uint64(p), name: fmt.Sprintf("x%d@%d", p, lsn)}
			final[c.id] = c
			cs = append(cs, c)
		}
		e.apply(final) // the source first, then its stubs
		for p, c := range cs {
			b, err := json.Marshal(mkStub(c))
			if err != nil {
				t.Fatal(err)
			}
			if err := byPart.ProduceSync(e.ctx, &kgo.Record{Key: []byte(c.id), Value: b, Partition: int32(p)}).FirstErr(); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Rows are retried only after an hour: whatever clears them in this
	// test is a success of the document, not the retry loop.
	pillow := func(s *repSink) *pillows.Pillow {
		p := e.pillow("shared", s)
		p.Retry = pillows.Retry{MaxAttempts: 3, BackoffUnit: time.Hour, Interval: 100 * time.Millisecond}
		return p
	}
	sessionOpts := func(o *pillows.Options) {
		o.KafkaOpts = append(o.KafkaOpts, kgo.SessionTimeout(6*time.Second), kgo.HeartbeatInterval(200*time.Millisecond))
	}

	a := e.start(e.runner(sessionOpts), pillow(e.repSink("rep")))
	e.waitMembers("shared", 1)
	bSink := e.repSink("rep")
	for p := range partitions {
		bSink.poison.Store(fmt.Sprintf("x%d", p), true)
	}
	b := e.start(e.runner(sessionOpts), pillow(bSink))
	e.waitMembers("shared", 2)

	produce(100)
	testenv.Eventually(t, 30*time.Second, func() string {
		rows := e.errorRows("shared")
		if len(rows) == 0 {
			return "no failure recorded by B yet"
		}
		if got := len(e.sinkState()) + len(rows); got != partitions {
			return fmt.Sprintf("%d documents handled, want %d", got, partitions)
		}
		return ""
	})
	if err := b.stop(); err != nil {
		t.Fatal(err)
	}
	e.waitMembers("shared", 1)

	produce(200)
	testenv.Eventually(t, 30*time.Second, func() string {
		if rows := e.errorRows("shared"); len(rows) != 0 {
			return "rows left after A processed the documents: " + describeRows(rows)
		}
		return testenv.DiffStates(map[string]string{"x0": "x0@200", "x1": "x1@200", "x2": "x2@200"}, e.sinkState())
	})
	if err := a.stop(); err != nil {
		t.Fatal(err)
	}
}

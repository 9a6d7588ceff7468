package faultenv

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/stub"
)

// TP is a topic partition.
type TP struct {
	Topic     string
	Partition int32
}

// Offsets are end offsets (high watermarks) per partition.
type Offsets map[TP]int64

// Record is one stub read back from Kafka.
type Record struct {
	TP
	Offset int64
	Key    string
	Stub   *stub.Stub
}

// Reader consumes topics from their start for the whole test and keeps
// every record.
type Reader struct {
	cl     *kgo.Client
	cancel context.CancelFunc
	done   chan struct{}

	mu   sync.Mutex
	recs []Record
	bad  []error // values that are not valid stubs
}

// NewReader starts consuming topics (which may not exist yet) from offset 0.
func NewReader(t testing.TB, brokers []string, topics ...string) *Reader {
	t.Helper()
	cl, err := kgo.NewClient(
		kgo.SeedBrokers(brokers...),
		kgo.ConsumeTopics(topics...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.MetadataMinAge(100*time.Millisecond),
		kgo.MetadataMaxAge(time.Second),
		kgo.FetchMaxWait(200*time.Millisecond),
	)
	if err != nil {
		t.Fatalf("faultenv: kafka reader: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &Reader{cl: cl, cancel: cancel, done: make(chan struct{})}
	go r.loop(ctx)
	t.Cleanup(r.Close)
	return r
}

func (r *Reader) loop(ctx context.Context) {
	defer close(r.done)
	for ctx.Err() == nil {
		fs := r.cl.PollFetches(ctx)
		var batch []Record
		var bad []error
		fs.EachRecord(func(kr *kgo.Record) {
			s, err := stub.Unmarshal(kr.Value)
			if err != nil {
				v := kr.Value
				if len(v) > 600 {
					v = v[:600]
				}
				bad = append(bad, fmt.Errorf("record %s/%d@%d (key %q) is not a valid stub (a committed change reported missing below may be this one): %w; value %s",
					kr.Topic, kr.Partition, kr.Offset, kr.Key, err, v))
				return
			}
			batch = append(batch, Record{TP: TP{kr.Topic, kr.Partition}, Offset: kr.Offset, Key: string(kr.Key), Stub: s})
		})
		r.mu.Lock()
		r.recs = append(r.recs, batch...)
		r.bad = append(r.bad, bad...)
		r.mu.Unlock()
	}
}

// Close stops consuming.
func (r *Reader) Close() {
	r.cancel()
	<-r.done
	r.cl.Close()
}

// Records returns a copy of everything read so far.
func (r *Reader) Records() []Record {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Record(nil), r.recs...)
}

// Len is the number of records read so far.
func (r *Reader) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.recs)
}

// Invalid returns the records whose value was not a valid stub.
func (r *Reader) Invalid() []error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]error(nil), r.bad...)
}

// WaitFor polls until cond holds on the records read so far.
func (r *Reader) WaitFor(t testing.TB, limit time.Duration, what string, cond func([]Record) bool) {
	t.Helper()
	Poll(t, limit, 100*time.Millisecond, what, func() bool { return cond(r.Records()) })
}

// CaughtUp polls until the reader has read every record below the topics'
// current end offsets.
func (r *Reader) CaughtUp(t testing.TB, adm *kadm.Client, limit time.Duration, topics ...string) {
	t.Helper()
	var end Offsets
	Poll(t, limit, 100*time.Millisecond, "read end offsets", func() bool {
		var err error
		end, err = EndOffsets(context.Background(), adm, time.Second, topics...)
		return err == nil
	})
	Poll(t, limit, 100*time.Millisecond, fmt.Sprintf("reader caught up with %v", end), func() bool {
		next := Offsets{}
		for _, rec := range r.Records() {
			next[rec.TP] = max(next[rec.TP], rec.Offset+1)
		}
		for tp, off := range end {
			if next[tp] < off {
				return false
			}
		}
		return true
	})
}

// Admin returns a kadm client for brokers, closed when the test ends.
func Admin(t testing.TB, brokers []string) *kadm.Client {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.MetadataMinAge(100*time.Millisecond))
	if err != nil {
		t.Fatalf("faultenv: kafka admin: %v", err)
	}
	t.Cleanup(cl.Close)
	return kadm.NewClient(cl)
}

// CreateTopic creates topic with partitions (ahead of the publisher, so that
// end offsets can be read from the first sample on).
func CreateTopic(t testing.TB, adm *kadm.Client, topic string, partitions int32) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := adm.CreateTopic(ctx, partitions, -1, nil, topic)
	if err == nil {
		err = resp.Err
	}
	if err != nil && !errors.Is(err, kerr.TopicAlreadyExists) {
		t.Fatalf("faultenv: create topic %s: %v", topic, err)
	}
}

// EndOffsets reads the topics' end offsets, bounded by limit. Any error, of
// the request or of a partition, fails the whole read: a partial answer
// could be mistaken for an empty partition.
func EndOffsets(ctx context.Context, adm *kadm.Client, limit time.Duration, topics ...string) (Offsets, error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	listed, err := adm.ListEndOffsets(ctx, topics...)
	if err != nil {
		return nil, err
	}
	out := Offsets{}
	var perr error
	listed.Each(func(o kadm.ListedOffset) {
		if o.Err != nil {
			perr = fmt.Errorf("%s/%d: %w", o.Topic, o.Partition, o.Err)
			return
		}
		out[TP{o.Topic, o.Partition}] = o.Offset
	})
	if perr != nil {
		return nil, perr
	}
	for _, topic := range topics {
		found := false
		for tp := range out {
			found = found || tp.Topic == topic
		}
		if !found {
			return nil, fmt.Errorf("topic %s: no partitions listed", topic)
		}
	}
	return out, nil
}

// StableEndOffsets reads end offsets until two reads interval apart agree:
// after a kill, requests the dead process left in the broker's socket
// buffers may still be appended.
func StableEndOffsets(t testing.TB, adm *kadm.Client, limit time.Duration, topics ...string) Offsets {
	t.Helper()
	var prev, cur Offsets
	Poll(t, limit, 200*time.Millisecond, "stable end offsets", func() bool {
		o, err := EndOffsets(context.Background(), adm, time.Second, topics...)
		if err != nil {
			return false
		}
		prev, cur = cur, o
		return prev != nil && equalOffsets(prev, cur)
	})
	return cur
}

func equalOffsets(a, b Offsets) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

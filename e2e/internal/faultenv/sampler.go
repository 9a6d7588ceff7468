package faultenv

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kadm"

	"github.com/changefeed/changefeed/stub"
)

// SlotSample is one reading of the slot, the checkpoint and Kafka, taken in
// that order: the slot first, then the checkpoint (so that checkpoint >= slot
// must hold: the publisher writes the checkpoint before confirming), then
// the end offsets (so that a record at or past them was not in Kafka when
// the slot was read).
type SlotSample struct {
	At            time.Time // when the slot was read
	Exists        bool
	Active        bool
	Confirmed     stub.LSN
	HasCheckpoint bool
	Checkpoint    stub.LSN
	// End are the end offsets read after the slot; nil when Kafka did not
	// answer (paused).
	End Offsets
	// Label is what the test was doing (SetLabel).
	Label string
}

// Sampler samples a slot on an interval for the whole test.
type Sampler struct {
	url    string
	slot   string
	adm    *kadm.Client
	topics []string

	skipKafka atomic.Bool
	label     atomic.Value // string
	stop      chan struct{}
	done      chan struct{}

	mu      sync.Mutex
	samples []SlotSample
	errs    int
}

// StartSampler samples slot every interval until Stop or the end of the test.
func StartSampler(t testing.TB, url, slot string, adm *kadm.Client, topics []string, interval time.Duration) *Sampler {
	t.Helper()
	s := &Sampler{url: url, slot: slot, adm: adm, topics: topics, stop: make(chan struct{}), done: make(chan struct{})}
	s.label.Store("")
	go s.loop(interval)
	t.Cleanup(func() { s.Stop() })
	return s
}

// SkipKafka stops (or resumes) reading end offsets, e.g. while Kafka is
// paused, so that PostgreSQL is sampled at full rate.
func (s *Sampler) SkipKafka(skip bool) { s.skipKafka.Store(skip) }

// SetLabel tags the following samples.
func (s *Sampler) SetLabel(l string) { s.label.Store(l) }

func (s *Sampler) loop(interval time.Duration) {
	defer close(s.done)
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		if conn == nil || conn.IsClosed() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			c, err := pgx.Connect(ctx, s.url)
			cancel()
			if err != nil {
				s.fail()
				continue
			}
			conn = c
		}
		smp, err := s.sample(conn)
		if err != nil {
			s.fail()
			conn.Close(context.Background())
			conn = nil
			continue
		}
		s.mu.Lock()
		s.samples = append(s.samples, smp)
		s.mu.Unlock()
	}
}

func (s *Sampler) fail() {
	s.mu.Lock()
	s.errs++
	s.mu.Unlock()
}

// Sample takes one sample now (outside the loop), with its own connection.
func (s *Sampler) Sample(t testing.TB) SlotSample {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, s.url)
	if err != nil {
		t.Fatalf("faultenv: sample: %v", err)
	}
	defer conn.Close(context.Background())
	smp, err := s.sample(conn)
	if err != nil {
		t.Fatalf("faultenv: sample: %v", err)
	}
	s.mu.Lock()
	s.samples = append(s.samples, smp)
	s.mu.Unlock()
	return smp
}

func (s *Sampler) sample(conn *pgx.Conn) (SlotSample, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	smp := SlotSample{Label: s.label.Load().(string)}
	var confirmed *string
	err := conn.QueryRow(ctx, `SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1`, s.slot).
		Scan(&smp.Active, &confirmed)
	smp.At = time.Now()
	switch {
	case errors.Is(err, pgx.ErrNoRows):
	case err != nil:
		return smp, err
	default:
		smp.Exists = true
		if confirmed != nil {
			if smp.Confirmed, err = stub.ParseLSN(*confirmed); err != nil {
				return smp, err
			}
		}
	}
	// A separate statement, after the slot: its snapshot is newer.
	var ckpt string
	err = conn.QueryRow(ctx, `SELECT confirmed_lsn::text FROM changefeed.cdc_checkpoint WHERE slot_name = $1`, s.slot).Scan(&ckpt)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
	case err != nil:
		return smp, err
	default:
		smp.HasCheckpoint = true
		if smp.Checkpoint, err = stub.ParseLSN(ckpt); err != nil {
			return smp, err
		}
	}
	if !s.skipKafka.Load() && s.adm != nil {
		if end, err := EndOffsets(context.Background(), s.adm, 500*time.Millisecond, s.topics...); err == nil {
			smp.End = end
		}
	}
	return smp, nil
}

// Samples returns the samples so far.
func (s *Sampler) Samples() []SlotSample {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]SlotSample(nil), s.samples...)
}

// Errors is the number of failed samples.
func (s *Sampler) Errors() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.errs
}

// Stop ends sampling and returns every sample.
func (s *Sampler) Stop() []SlotSample {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.done
	return s.Samples()
}

// SlotReleased polls until no process streams the slot (after a kill, the
// walsender notices the closed connection) and returns the slot's final
// state: what a restart resumes from.
func (s *Sampler) SlotReleased(t testing.TB, limit time.Duration) SlotSample {
	t.Helper()
	var last SlotSample
	Poll(t, limit, 50*time.Millisecond, "slot "+s.slot+" released", func() bool {
		last = s.Sample(t)
		return last.Exists && !last.Active
	})
	return last
}

// SlotActive polls until a process streams the slot.
func (s *Sampler) SlotActive(t testing.TB, limit time.Duration) SlotSample {
	t.Helper()
	var last SlotSample
	Poll(t, limit, 25*time.Millisecond, "slot "+s.slot+" active", func() bool {
		last = s.Sample(t)
		return last.Active
	})
	return last
}

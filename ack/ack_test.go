package ack

import (
	"errors"
	"math/rand/v2"
	"testing"
)

func TestConfirmsContiguousPrefixOnly(t *testing.T) {
	var tr Tracker[int]
	u1, u2, u3 := tr.Begin(), tr.Begin(), tr.Begin()
	u1.Add()
	u2.Add()
	u3.Add()
	u1.End(10)
	u2.End(20)
	u3.End(30)
	u3.Done(nil)
	u2.Done(nil)
	if _, ok := tr.Confirmed(); ok {
		t.Fatal("confirmed with unit 1 unacknowledged")
	}
	u1.Done(nil)
	if pos, ok := tr.Confirmed(); !ok || pos != 30 {
		t.Fatalf("confirmed = %d, %v; want 30", pos, ok)
	}
	if !tr.Idle() || tr.InFlight() != 0 {
		t.Fatal("tracker not idle after all acks")
	}
}

func TestOpenUnitBlocksEvenWhenAcked(t *testing.T) {
	var tr Tracker[int]
	u := tr.Begin()
	u.Add()
	u.Done(nil)
	if _, ok := tr.Confirmed(); ok {
		t.Fatal("a unit that has not ended must not be confirmed")
	}
	if tr.Idle() {
		t.Fatal("open unit reported idle")
	}
	u.End(5)
	if pos, _ := tr.Confirmed(); pos != 5 {
		t.Fatalf("confirmed = %d, want 5", pos)
	}
}

func TestEmptyUnitResolvesAtEnd(t *testing.T) {
	var tr Tracker[int]
	tr.Begin().End(7)
	if pos, ok := tr.Confirmed(); !ok || pos != 7 {
		t.Fatalf("confirmed = %d, %v; want 7", pos, ok)
	}
}

func TestFailureFreezesCheckpoint(t *testing.T) {
	var tr Tracker[int]
	u1, u2 := tr.Begin(), tr.Begin()
	u1.Add()
	u2.Add()
	u1.End(1)
	u2.End(2)
	u1.Done(errors.New("boom"))
	u2.Done(nil)
	if _, ok := tr.Confirmed(); ok {
		t.Fatal("confirmed past a failed message")
	}
	if !errors.Is(tr.Err(), ErrFailed) {
		t.Fatalf("Err = %v, want ErrFailed", tr.Err())
	}
}

// TestPropertyNeverPastUnacked acknowledges messages in random orders and
// checks after every ack that the checkpoint never passes a unit with a
// message still in flight, and that it reaches the last unit at the end.
func TestPropertyNeverPastUnacked(t *testing.T) {
	for seed := uint64(0); seed < 300; seed++ {
		rng := rand.New(rand.NewPCG(seed, seed*7+1))
		var tr Tracker[int]
		nUnits := 1 + rng.IntN(40)
		type msg struct{ unit int }
		var msgs []msg
		units := make([]*Unit[int], nUnits)
		pending := make([]int, nUnits)
		for i := range units {
			units[i] = tr.Begin()
			for range rng.IntN(4) {
				units[i].Add()
				pending[i]++
				msgs = append(msgs, msg{i})
			}
			units[i].End(i)
		}
		rng.Shuffle(len(msgs), func(i, j int) { msgs[i], msgs[j] = msgs[j], msgs[i] })
		check := func() {
			pos, ok := tr.Confirmed()
			lowest := -1
			for i, p := range pending {
				if p > 0 {
					lowest = i
					break
				}
			}
			if lowest == -1 {
				if !ok || pos != nUnits-1 {
					t.Fatalf("seed %d: all acked but confirmed = %d, %v", seed, pos, ok)
				}
				return
			}
			if ok && pos >= lowest {
				t.Fatalf("seed %d: confirmed %d while unit %d is unacknowledged", seed, pos, lowest)
			}
			if lowest > 0 && (!ok || pos != lowest-1) {
				t.Fatalf("seed %d: confirmed = %d, %v; want %d (just below lowest unacked)", seed, pos, ok, lowest-1)
			}
		}
		check()
		for _, m := range msgs {
			units[m.unit].Done(nil)
			pending[m.unit]--
			check()
		}
	}
}

func BenchmarkTracker(b *testing.B) {
	var tr Tracker[int]
	b.ReportAllocs()
	for i := range b.N {
		u := tr.Begin()
		u.Add()
		u.End(i)
		u.Done(nil)
	}
}

// While one unit waits for Kafka, a million units without messages behind it
// must not pile up; once it is acknowledged the checkpoint is the last one.
func TestEmptyUnitsCoalesceBehindAStalledOne(t *testing.T) {
	var tr Tracker[int]
	stalled := tr.Begin()
	stalled.Add()
	stalled.End(1)
	for i := 2; i <= 1_000_000; i++ {
		tr.Begin().End(i)
	}
	if n := tr.Units(); n != 1 {
		t.Fatalf("%d units held, want 1", n)
	}
	// A unit with a message is not merged: it has its own acknowledgement.
	busy := tr.Begin()
	busy.Add()
	busy.End(1_000_001)
	tr.Begin().End(1_000_002)
	if n := tr.Units(); n != 2 {
		t.Fatalf("%d units held, want 2", n)
	}
	if _, ok := tr.Confirmed(); ok {
		t.Fatal("confirmed past the stalled unit")
	}
	stalled.Done(nil)
	if pos, _ := tr.Confirmed(); pos != 1_000_000 {
		t.Fatalf("confirmed %d, want 1000000", pos)
	}
	busy.Done(nil)
	if pos, _ := tr.Confirmed(); pos != 1_000_002 || !tr.Idle() {
		t.Fatalf("confirmed %d (idle %v), want 1000002", pos, tr.Idle())
	}
}

// Package ack turns out-of-order acknowledgements into a safe checkpoint.
//
// A source (the WAL, a _changes feed) emits units in order: a transaction or a
// Couch change. Each unit produces zero or more messages that Kafka
// acknowledges in any order, across partitions. The checkpoint a source may
// store is the position of a unit such that it and every unit before it are
// fully acknowledged: the position just below the lowest unacknowledged unit,
// never the highest acknowledged one. Storing more would lose the
// unacknowledged messages on a crash; this package never does.
package ack

import (
	"errors"
	"sync"
)

// ErrFailed is returned by Tracker.Err once any message failed for good.
var ErrFailed = errors.New("ack: a message failed")

// Tracker tracks units in source order. It is safe for concurrent use: acks
// come from the producer's goroutines while the source adds units.
type Tracker[P any] struct {
	mu        sync.Mutex
	units     []*Unit[P] // open or unresolved units, oldest first; a ring would save copies but the queue is short-lived
	head      int
	confirmed P
	has       bool
	inflight  int
	err       error
}

// Unit is one source unit (a transaction, a change). Add one for each message
// it produces, call Done once per message when Kafka acknowledges it, and End
// with its position when the source says the unit is complete.
type Unit[P any] struct {
	t       *Tracker[P]
	pending int
	ended   bool
	pos     P
}

// Begin opens the next unit in source order.
func (t *Tracker[P]) Begin() *Unit[P] {
	u := &Unit[P]{t: t}
	t.mu.Lock()
	t.units = append(t.units, u)
	t.mu.Unlock()
	return u
}

// Add counts one more message of the unit as in flight.
func (u *Unit[P]) Add() {
	u.t.mu.Lock()
	u.pending++
	u.t.inflight++
	u.t.mu.Unlock()
}

// Done acknowledges one message. A non-nil err marks the tracker failed: the
// checkpoint never moves past this unit again.
func (u *Unit[P]) Done(err error) {
	t := u.t
	t.mu.Lock()
	defer t.mu.Unlock()
	u.pending--
	t.inflight--
	if err != nil {
		if t.err == nil {
			t.err = errors.Join(ErrFailed, err)
		}
		return
	}
	t.advance()
}

// End closes the unit at pos, the position to checkpoint once it and all
// earlier units are acknowledged. The unit takes no more messages.
//
// A unit that ends with nothing in flight behind an ended unit that waits
// for acknowledgements is merged into it (its position replaces that
// unit's): confirming through it needs nothing more than confirming that
// unit. So while Kafka stalls, units without messages (transactions that
// publish nothing) do not pile up.
func (u *Unit[P]) End(pos P) {
	t := u.t
	t.mu.Lock()
	defer t.mu.Unlock()
	u.pos = pos
	u.ended = true
	if n := len(t.units); u.pending == 0 && n-1 > t.head && t.units[n-1] == u {
		if prev := t.units[n-2]; prev.ended {
			prev.pos = pos
			t.units[n-1] = nil
			t.units = t.units[:n-1]
			return
		}
	}
	t.advance()
}

// advance pops resolved units from the front. Called with mu held.
func (t *Tracker[P]) advance() {
	if t.err != nil {
		return
	}
	for t.head < len(t.units) {
		u := t.units[t.head]
		if !u.ended || u.pending > 0 {
			break
		}
		t.confirmed, t.has = u.pos, true
		t.units[t.head] = nil
		t.head++
	}
	if t.head == len(t.units) {
		t.units, t.head = t.units[:0], 0
	} else if t.head > 1024 && t.head*2 > len(t.units) {
		n := copy(t.units, t.units[t.head:])
		clear(t.units[n:])
		t.units, t.head = t.units[:n], 0
	}
}

// Confirmed returns the checkpoint: the position of the newest unit that, with
// every unit before it, is fully acknowledged. ok is false until one is.
func (t *Tracker[P]) Confirmed() (pos P, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.confirmed, t.has
}

// Idle reports whether no unit is open or unacknowledged.
func (t *Tracker[P]) Idle() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.head == len(t.units)
}

// Units returns the number of units held: open, or ended and waiting for
// acknowledgements (theirs or an earlier unit's).
func (t *Tracker[P]) Units() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.units) - t.head
}

// InFlight returns the number of messages added but not yet acknowledged.
func (t *Tracker[P]) InFlight() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.inflight
}

// Err returns the first permanent failure, wrapped in ErrFailed.
func (t *Tracker[P]) Err() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.err
}

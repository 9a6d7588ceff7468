package couchsource

import (
	"context"
	"time"

	"github.com/changefeed/changefeed/stub"
)

// checkpointLoop writes the checkpoint every CheckpointInterval, or sooner
// when CheckpointEvery changes were acknowledged, until ctx ends. The final
// checkpoint is written by Follower.Run after the producer's flush.
func (d *dbFollower) checkpointLoop(ctx, writeCtx context.Context) {
	t := time.NewTicker(d.f.cfg.CheckpointInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-d.kick:
		}
		if err := d.checkpoint(writeCtx); err != nil {
			d.log.Error("checkpoint write failed; reading pauses until one succeeds", "err", err)
		}
	}
}

// checkpoint stores the session's confirmed position: the seq of a change
// such that it and every change before it in feed order were acknowledged
// by Kafka (ack.Tracker). It never stores a position the feed reached by
// rewinding behind the stored one.
func (d *dbFollower) checkpoint(ctx context.Context) error {
	d.cpMu.Lock()
	defer d.cpMu.Unlock()
	m := d.f.m
	sess := d.sess.Load()
	d.f.m.inflight.WithLabelValues(d.name).Set(float64(sess.tr.InFlight()))
	seq, ok := sess.tr.Confirmed()
	next := Checkpoint{Seq: seq, Identity: sess.identity}
	if !ok {
		if !d.dirty {
			d.touch(sess)
			return nil
		}
		next = d.stored // a reset's "0" that was not written yet
	}
	if next.Identity == "" {
		// The marker could not be read or written this time: keep the
		// identity the checkpoint had.
		next.Identity = d.stored.Identity
	}
	if !d.dirty && d.hasStored && next.Identity == d.stored.Identity {
		if next.Seq == d.stored.Seq {
			d.touch(sess)
			return nil
		}
		if behind(next.Seq, d.stored.Seq) {
			// The feed replays changes before the stored checkpoint (the
			// server rewound, or reading restarted from an older seq).
			// Everything up to the stored seq was acknowledged before;
			// storing this one would move the checkpoint backwards.
			m.cpHeld.WithLabelValues(d.name).Inc()
			d.touch(sess)
			return nil
		}
	}
	if err := d.f.store.Save(ctx, d.f.cfg.Source, d.name, next); err != nil {
		m.cpErrors.WithLabelValues(d.name).Inc()
		if d.cpFailed.CompareAndSwap(false, true) {
			d.log.Error("checkpoint write failed: not ready, reading pauses until one succeeds", "err", err)
		}
		return err
	}
	if d.cpFailed.CompareAndSwap(true, false) {
		d.log.Info("checkpoint writes succeed again")
	}
	m.cpWrites.WithLabelValues(d.name).Inc()
	d.stored, d.hasStored, d.dirty = next, true, false
	d.stored.UpdatedAt = time.Now()
	d.touch(sess)
	return nil
}

// touch updates the checkpoint age: 0 while the stored checkpoint covers
// everything read and acknowledged (nothing in flight), else the time since
// it last did. Called with cpMu held.
func (d *dbFollower) touch(sess *session) {
	now := time.Now()
	seq, ok := sess.tr.Confirmed()
	if sess.tr.Idle() && (!ok || seq == d.stored.Seq || behind(seq, d.stored.Seq)) {
		d.lastCurrent = now
	}
	d.f.m.cpAge.WithLabelValues(d.name).Set(now.Sub(d.lastCurrent).Seconds())
}

// behind reports whether seq a is before b by their numeric prefixes, when
// both have one. Without them nothing is known, and a is not behind.
func behind(a, b stub.Seq) bool {
	x, ok1 := numericPrefix(a)
	y, ok2 := numericPrefix(b)
	return ok1 && ok2 && x < y
}

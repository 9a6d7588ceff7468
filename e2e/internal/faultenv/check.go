package faultenv

import (
	"cmp"
	"fmt"
	"math"
	"slices"
	"sort"

	"github.com/changefeed/changefeed/stub"
)

// Copy is one record of a change.
type Copy struct {
	TP
	Offset int64
}

// Change is everything Kafka holds about one change.
type Change struct {
	Key     ChangeKey
	Version stub.SQLVersion // commit LSN and ordinal
	Copies  []Copy          // in offset order; all in one partition
}

// First is the change's earliest copy.
func (c *Change) First() Copy { return c.Copies[0] }

// Analysis indexes the records read from Kafka by change.
type Analysis struct {
	Changes map[ChangeKey]*Change
	Records int
}

// Analyze groups records by change and reports records that disagree with
// each other (one change with two versions, or in two partitions).
func Analyze(recs []Record) (*Analysis, []error) {
	a := &Analysis{Changes: map[ChangeKey]*Change{}, Records: len(recs)}
	var errs []error
	for _, r := range recs {
		k := ChangeKey{r.Stub.XID, r.Stub.DocumentID}
		c := a.Changes[k]
		v := r.Stub.SQLVersion()
		if c == nil {
			c = &Change{Key: k, Version: v}
			a.Changes[k] = c
		}
		if c.Version != v {
			errs = append(errs, fmt.Errorf("change %s published with versions %s and %s", k, c.Version, v))
		}
		if r.Key != r.Stub.DocumentID {
			errs = append(errs, fmt.Errorf("record %s/%d@%d: key %q is not the document id %q", r.Topic, r.Partition, r.Offset, r.Key, r.Stub.DocumentID))
		}
		c.Copies = append(c.Copies, Copy{r.TP, r.Offset})
	}
	for _, c := range a.Changes {
		sort.Slice(c.Copies, func(i, j int) bool { return c.Copies[i].Offset < c.Copies[j].Offset })
		for _, cp := range c.Copies[1:] {
			if cp.TP != c.Copies[0].TP {
				errs = append(errs, fmt.Errorf("change %s in two partitions: %v and %v", c.Key, c.Copies[0].TP, cp.TP))
			}
		}
	}
	return a, errs
}

// CheckCoverage checks that every committed change is in Kafka, and that
// nothing else is: no change of a rolled-back transaction, no change the
// workload did not make.
func (a *Analysis) CheckCoverage(committed []ChangeKey, rolledBack func(xid uint32) bool) []error {
	var errs []error
	want := make(map[ChangeKey]bool, len(committed))
	missing := 0
	for _, k := range committed {
		want[k] = true
		if a.Changes[k] == nil {
			missing++
			if missing <= 10 {
				errs = append(errs, fmt.Errorf("committed change %s is not in Kafka", k))
			}
		}
	}
	if missing > 10 {
		errs = append(errs, fmt.Errorf("… %d committed changes missing in all", missing))
	}
	for k, c := range a.Changes {
		switch {
		case rolledBack(k.XID):
			errs = append(errs, fmt.Errorf("change %s of a rolled-back transaction was published (version %s)", k, c.Version))
		case !want[k]:
			errs = append(errs, fmt.Errorf("change %s (version %s) was published but never committed by the workload", k, c.Version))
		}
	}
	return errs
}

// Missing returns the committed changes that are not in Kafka.
func (a *Analysis) Missing(committed []ChangeKey) []ChangeKey {
	var out []ChangeKey
	for _, k := range committed {
		if a.Changes[k] == nil {
			out = append(out, k)
		}
	}
	return out
}

// CheckLost checks the confirmation rule for changes that never reached
// Kafka, whose commit LSN is therefore unknown: after(xid) bounds it from
// above (Workload.After). A sample confirmed at or past that bound had
// confirmed a change Kafka never acknowledged.
func CheckLost(missing []ChangeKey, after func(xid uint32) (stub.LSN, bool), samples []SlotSample) []error {
	var low stub.LSN = math.MaxUint64
	var lowKey ChangeKey
	for _, k := range missing {
		if b, ok := after(k.XID); ok && b < low {
			low, lowKey = b, k
		}
	}
	if len(missing) == 0 || low == math.MaxUint64 {
		return nil
	}
	for _, s := range samples {
		if s.Exists && s.Confirmed >= low {
			return []error{fmt.Errorf("sample at %s (%s): slot confirmed %s, past the commit of change %s (committed below %s), which never reached Kafka: confirmed without an acknowledgement",
				s.At.Format("15:04:05.000"), s.Label, s.Confirmed, lowKey, low)}
		}
	}
	return nil
}

// Duplicates is the number of records beyond the first copy of each change.
func (a *Analysis) Duplicates() int { return a.Records - len(a.Changes) }

// CheckConfirmation checks the confirmation rule against every sample: the
// slot is never confirmed past the commit LSN of a change that was not yet in
// Kafka.
//
// A sample reads the slot, then (maybe) the end offsets. A change whose
// earliest copy sits at or past an end offset read after the slot was not in
// Kafka when the slot was read, so the slot must not have been confirmed past
// its commit LSN (a restart from there would skip it). Samples without end
// offsets (Kafka paused) use the next end offsets read after them, which is
// just as exact: they were also read after the slot.
func (a *Analysis) CheckConfirmation(samples []SlotSample) []error {
	type entry struct {
		off int64
		lsn stub.LSN
		key ChangeKey
	}
	// Per partition: changes by first offset, with the suffix minimum of
	// their commit LSNs.
	byTP := map[TP][]entry{}
	for _, c := range a.Changes {
		f := c.First()
		byTP[f.TP] = append(byTP[f.TP], entry{f.Offset, c.Version.CommitLSN, c.Key})
	}
	suffix := map[TP][]int{} // index of the entry with the minimum LSN from i on
	for tp, es := range byTP {
		slices.SortFunc(es, func(x, y entry) int { return cmp.Compare(x.off, y.off) })
		idx := make([]int, len(es))
		for i := len(es) - 1; i >= 0; i-- {
			idx[i] = i
			if i+1 < len(es) && es[idx[i+1]].lsn < es[i].lsn {
				idx[i] = idx[i+1]
			}
		}
		suffix[tp] = idx
	}
	// lowestAbsent returns the change of lowest commit LSN not yet in
	// Kafka as of end offsets end.
	lowestAbsent := func(end Offsets) (entry, bool) {
		best, found := entry{lsn: math.MaxUint64}, false
		for tp, es := range byTP {
			hwm, ok := end[tp]
			if !ok {
				continue // unknown partition: no claim
			}
			i := sort.Search(len(es), func(i int) bool { return es[i].off >= hwm })
			if i < len(es) {
				if e := es[suffix[tp][i]]; e.lsn < best.lsn {
					best, found = e, true
				}
			}
		}
		return best, found
	}
	var errs []error
	var next Offsets
	for i := len(samples) - 1; i >= 0; i-- {
		s := samples[i]
		if s.End != nil {
			next = s.End
		}
		if !s.Exists || next == nil {
			continue
		}
		if e, ok := lowestAbsent(next); ok && s.Confirmed > e.lsn {
			errs = append(errs, fmt.Errorf("sample at %s (%s): slot confirmed %s, past the commit LSN %s of change %s that was not in Kafka yet",
				s.At.Format("15:04:05.000"), s.Label, s.Confirmed, e.lsn, e.key))
			if len(errs) >= 10 {
				break
			}
		}
	}
	slices.Reverse(errs)
	return errs
}

// CheckCheckpoint checks that the publisher's checkpoint was never behind
// the slot's confirmed_flush_lsn.
func CheckCheckpoint(samples []SlotSample) []error {
	var errs []error
	for _, s := range samples {
		if s.Exists && s.HasCheckpoint && s.Checkpoint < s.Confirmed {
			errs = append(errs, fmt.Errorf("sample at %s (%s): checkpoint %s behind the slot's confirmed_flush_lsn %s",
				s.At.Format("15:04:05.000"), s.Label, s.Checkpoint, s.Confirmed))
			if len(errs) >= 10 {
				break
			}
		}
	}
	return errs
}

// Kill is what a test recorded about one kill -9 of the publisher.
type Kill struct {
	// Confirmed is the slot's confirmed_flush_lsn once the killed process's
	// walsender released it: where the next run resumes.
	Confirmed stub.LSN
	// Checkpoint is the publisher's checkpoint at that moment.
	Checkpoint stub.LSN
	// End are the topics' end offsets once they were stable after the kill:
	// records below them come from runs before the kill, records at or past
	// them from later runs.
	End Offsets
}

// CheckDuplicates attributes every record to the run that produced it (by the
// end offsets recorded at each kill) and checks that a run after a kill
// republished only changes whose commit LSN is above the slot's
// confirmed_flush_lsn at that kill (at or above: a commit record starting
// exactly there is decoded again), and that no run published one change
// twice.
func (a *Analysis) CheckDuplicates(kills []Kill) []error {
	runOf := func(cp Copy) int {
		r := 0
		for i, k := range kills {
			if end, ok := k.End[cp.TP]; ok && cp.Offset >= end {
				r = i + 1
			}
		}
		return r
	}
	var errs []error
	for _, c := range a.Changes {
		seen := map[int]bool{}
		first := -1
		for _, cp := range c.Copies {
			run := runOf(cp)
			if seen[run] {
				errs = append(errs, fmt.Errorf("change %s (version %s) published twice by run %d (offsets %v)", c.Key, c.Version, run, c.Copies))
				continue
			}
			seen[run] = true
			if first < 0 {
				first = run
				continue
			}
			// A copy in run r > first: run r resumed after kill r-1, from
			// the slot's position. A commit record at or after it is
			// decoded again; one before it must not be.
			k := kills[run-1]
			if c.Version.CommitLSN < k.Confirmed {
				errs = append(errs, fmt.Errorf("change %s (commit LSN %s) republished by run %d although the slot was confirmed to %s when run %d was killed",
					c.Key, c.Version.CommitLSN, run, k.Confirmed, run-1))
			}
		}
		if len(errs) >= 10 {
			break
		}
	}
	return errs
}

package faultenv

import (
	"strings"
	"testing"
	"time"

	"github.com/changefeed/changefeed/stub"
)

// rec builds a record of change (xid, doc) committed at lsn, at offset off of
// partition p.
func rec(p int32, off int64, xid uint32, doc string, lsn stub.LSN) Record {
	return Record{
		TP: TP{"t", p}, Offset: off, Key: doc,
		Stub: &stub.Stub{DocumentID: doc, XID: xid, LSN: lsn, TxOrdinal: 1},
	}
}

func ends(p0, p1 int64) Offsets { return Offsets{{"t", 0}: p0, {"t", 1}: p1} }

func sample(confirmed stub.LSN, end Offsets) SlotSample {
	return SlotSample{At: time.Unix(0, 0), Exists: true, Confirmed: confirmed, End: end}
}

func TestCheckConfirmation(t *testing.T) {
	// Partition 0: A (lsn 100) at 0, C (lsn 300) at 1.
	// Partition 1: B (lsn 200) at 0, D (lsn 400) at 1.
	recs := []Record{
		rec(0, 0, 1, "a", 100), rec(0, 1, 3, "c", 300),
		rec(1, 0, 2, "b", 200), rec(1, 1, 4, "d", 400),
	}
	tests := []struct {
		name    string
		samples []SlotSample
		wantErr string
	}{
		{"nothing in kafka, nothing confirmed", []SlotSample{sample(0, ends(0, 0))}, ""},
		{"nothing in kafka, confirmed at the lowest commit", []SlotSample{sample(100, ends(0, 0))}, ""},
		{"nothing in kafka, confirmed past the lowest commit", []SlotSample{sample(101, ends(0, 0))}, "change a@xid1"},
		// C is in Kafka but B is not: acks out of order across partitions.
		// Confirming C's position (the highest acknowledged) would skip B.
		{"highest acked instead of lowest unacked", []SlotSample{sample(301, ends(2, 0))}, "change b@xid2"},
		{"lowest unacked respected", []SlotSample{sample(200, ends(2, 0))}, ""},
		{"everything in kafka", []SlotSample{sample(1000, ends(2, 2))}, ""},
		// A sample without end offsets (Kafka paused) is judged by the next
		// end offsets read after it.
		{"paused sample judged by later offsets", []SlotSample{sample(250, nil), sample(100, ends(2, 0))}, "change b@xid2"},
		{"paused sample, later offsets show it was fine", []SlotSample{sample(250, nil), sample(100, ends(2, 1))}, ""},
		{"no later offsets: no claim", []SlotSample{sample(1000, ends(2, 2)), sample(1000, nil)}, ""},
		{"slot missing: no claim", []SlotSample{{Exists: false, Confirmed: 1000, End: ends(0, 0)}}, ""},
		// A partition the offsets do not list is not assumed empty: B
		// (partition 1, lsn 200) is not reported, C is.
		{"unlisted partition", []SlotSample{sample(301, Offsets{{"t", 0}: 1})}, "change c@xid3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, errs := Analyze(recs)
			if len(errs) > 0 {
				t.Fatal(errs)
			}
			checkErrs(t, a.CheckConfirmation(tt.samples), tt.wantErr)
		})
	}
}

func TestCheckDuplicates(t *testing.T) {
	// Run 0 published A(100) B(200) C(300) on partition 0 (offsets 0-2);
	// kill 1 left the slot at k1 and the end offset at 3.
	base := []Record{rec(0, 0, 1, "a", 100), rec(0, 1, 2, "b", 200), rec(0, 2, 3, "c", 300)}
	kill := func(confirmed stub.LSN) []Kill { return []Kill{{Confirmed: confirmed, End: Offsets{{"t", 0}: 3}}} }
	tests := []struct {
		name    string
		recs    []Record
		kills   []Kill
		wantErr string
	}{
		{"replay after the confirmed position", append(base[:3:3], rec(0, 3, 2, "b", 200), rec(0, 4, 3, "c", 300)), kill(150), ""},
		// A commit record starting exactly at the confirmed position is
		// decoded again by PostgreSQL.
		{"replay at the confirmed position", append(base[:3:3], rec(0, 3, 2, "b", 200)), kill(200), ""},
		{"replay below the confirmed position", append(base[:3:3], rec(0, 3, 1, "a", 100)), kill(150), "a@xid1 (commit LSN 0/64) republished by run 1"},
		{"duplicate within one run", append(base[:3:3], rec(0, 3, 1, "a", 100)), nil, "published twice by run 0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, errs := Analyze(tt.recs)
			if len(errs) > 0 {
				t.Fatal(errs)
			}
			checkErrs(t, a.CheckDuplicates(tt.kills), tt.wantErr)
		})
	}
}

func TestCheckCoverageAndLost(t *testing.T) {
	a, _ := Analyze([]Record{rec(0, 0, 1, "a", 100), rec(0, 1, 9, "x", 900)})
	committed := []ChangeKey{{1, "a"}, {2, "b"}}
	rolledBack := func(xid uint32) bool { return xid == 9 }
	errs := a.CheckCoverage(committed, rolledBack)
	checkErrs(t, errs[:1], "committed change b@xid2 is not in Kafka")
	checkErrs(t, errs[1:], "rolled-back transaction")

	missing := a.Missing(committed)
	if len(missing) != 1 || missing[0] != (ChangeKey{2, "b"}) {
		t.Fatalf("Missing = %v", missing)
	}
	after := func(xid uint32) (stub.LSN, bool) { return 250, xid == 2 }
	checkErrs(t, CheckLost(missing, after, []SlotSample{sample(249, nil)}), "")
	checkErrs(t, CheckLost(missing, after, []SlotSample{sample(249, nil), sample(250, nil)}), "never reached Kafka")
}

func TestAnalyzeInconsistent(t *testing.T) {
	_, errs := Analyze([]Record{rec(0, 0, 1, "a", 100), rec(1, 0, 1, "a", 200)})
	if len(errs) != 2 {
		t.Fatalf("want a version and a partition error, got %v", errs)
	}
}

func TestCheckCheckpoint(t *testing.T) {
	ok := SlotSample{Exists: true, Confirmed: 100, HasCheckpoint: true, Checkpoint: 100}
	behind := SlotSample{Exists: true, Confirmed: 100, HasCheckpoint: true, Checkpoint: 99}
	checkErrs(t, CheckCheckpoint([]SlotSample{ok}), "")
	checkErrs(t, CheckCheckpoint([]SlotSample{ok, behind}), "checkpoint 0/63 behind")
}

// checkErrs wants no error when want is empty, else exactly one containing want.
func checkErrs(t *testing.T, errs []error, want string) {
	t.Helper()
	if want == "" {
		if len(errs) > 0 {
			t.Fatalf("unexpected errors: %v", errs)
		}
		return
	}
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), want) {
		t.Fatalf("want one error containing %q, got %v", want, errs)
	}
}

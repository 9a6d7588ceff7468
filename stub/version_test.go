package stub

import (
	"strings"
	"testing"
)

func TestSQLVersionCompare(t *testing.T) {
	tests := []struct {
		name string
		a, b SQLVersion
		want int
	}{
		{"equal", SQLVersion{100, 1}, SQLVersion{100, 1}, 0},
		{"ordinal breaks ties", SQLVersion{100, 1}, SQLVersion{100, 2}, -1},
		{"commit lsn dominates ordinal", SQLVersion{101, 0}, SQLVersion{100, 99}, 1},
		// T1 writes at 100, commits at 300; T2 writes at 200, commits at 250.
		// Versions carry the commit LSN, so T1 is newer.
		{"interleaved transactions", SQLVersion{300, 0}, SQLVersion{250, 0}, 1},
		{"high bits", SQLVersion{1 << 40, 0}, SQLVersion{1<<40 - 1, 5}, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.a.Compare(tt.b); got != tt.want {
				t.Fatalf("Compare = %d, want %d", got, tt.want)
			}
			if got := tt.b.Compare(tt.a); got != -tt.want {
				t.Fatalf("reverse Compare = %d, want %d", got, -tt.want)
			}
		})
	}
}

func TestLSNText(t *testing.T) {
	tests := []struct {
		in   string
		want LSN
		err  bool
	}{
		{"16/B374D848", 0x16B374D848, false},
		{"0/0", 0, false},
		{"FFFFFFFF/FFFFFFFF", ^LSN(0), false},
		{"16B374D848", 0, true},
		{"x/1", 0, true},
		{"1/100000000", 0, true},
	}
	for _, tt := range tests {
		got, err := ParseLSN(tt.in)
		if (err != nil) != tt.err {
			t.Fatalf("ParseLSN(%q) err = %v, want err %v", tt.in, err, tt.err)
		}
		if err == nil {
			if got != tt.want {
				t.Fatalf("ParseLSN(%q) = %d, want %d", tt.in, got, tt.want)
			}
			if back := got.String(); back != tt.in {
				t.Fatalf("String() = %q, want %q", back, tt.in)
			}
		}
	}
}

func TestParseRev(t *testing.T) {
	tests := []struct {
		in   string
		want Rev
		err  bool
	}{
		{"1-abc", Rev{1, "abc"}, false},
		{"12-917fa2381192822767f010b95b45325b", Rev{12, "917fa2381192822767f010b95b45325b"}, false},
		{"abc", Rev{}, true},
		{"0-abc", Rev{}, true},
		{"-abc", Rev{}, true},
		{"3-", Rev{}, true},
	}
	for _, tt := range tests {
		got, err := ParseRev(tt.in)
		if (err != nil) != tt.err || got != tt.want {
			t.Fatalf("ParseRev(%q) = %v, %v; want %v, err %v", tt.in, got, err, tt.want, tt.err)
		}
	}
}

func TestRelate(t *testing.T) {
	// Path of leaf 3-c: 3-c <- 2-b <- 1-a.
	path := Revisions{Start: 3, IDs: []string{"c", "b", "a"}}
	tests := []struct {
		name string
		rev  Rev
		want Relation
	}{
		{"leaf itself", Rev{3, "c"}, Same},
		{"parent", Rev{2, "b"}, Ancestor},
		{"root", Rev{1, "a"}, Ancestor},
		{"sibling branch same generation", Rev{3, "z"}, Unrelated},
		{"higher generation on another branch", Rev{4, "x"}, Unrelated},
		{"beyond truncated history", Rev{0, "q"}, Unrelated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Relate(tt.rev, path); got != tt.want {
				t.Fatalf("Relate = %v, want %v", got, tt.want)
			}
		})
	}
}

// A deleted conflict winner can leave a lower-generation winner: RankLeaves
// ranks leaves, it does not say which state is current.
func TestRankLeavesIsNotTimeOrder(t *testing.T) {
	deletedWinner := Rev{5, "aaa"}
	newWinner := Rev{3, "fff"}
	if RankLeaves(deletedWinner, newWinner) <= 0 {
		t.Fatal("5-aaa should outrank 3-fff as a leaf")
	}
	// The current winner's path does not contain the deleted branch.
	path := Revisions{Start: 3, IDs: []string{"fff", "b", "a"}}
	if Relate(deletedWinner, path) != Unrelated {
		t.Fatal("a deleted sibling branch must be Unrelated, not an ancestor")
	}
	if RankLeaves(Rev{2, "b"}, Rev{2, "c"}) >= 0 {
		t.Fatal("hash breaks generation ties")
	}
}

func TestStubJSONRoundTrip(t *testing.T) {
	s := &Stub{DocumentID: "c1", DataSourceType: SourceSQL, DataSourceName: "form_processor_commcarecasesql",
		DocumentType: "CommCareCase", Domain: "d", LSN: 0x16B374D848, TxOrdinal: 2, XID: 77}
	b, err := s.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	got, err := Unmarshal(b)
	if err != nil {
		t.Fatal(err)
	}
	if got.LSN != s.LSN || got.TxOrdinal != 2 || got.DocumentID != "c1" {
		t.Fatalf("round trip = %+v", got)
	}
	if want := `"lsn":"16/B374D848"`; !strings.Contains(string(b), want) {
		t.Fatalf("json %s lacks %s", b, want)
	}
	if strings.Contains(string(b), `"seq"`) || strings.Contains(string(b), `"commit_timestamp"`) {
		t.Fatalf("zero fields not omitted: %s", b)
	}
	if _, err := Unmarshal([]byte(`{"document_id":""}`)); err == nil {
		t.Fatal("invalid stub accepted")
	}
}

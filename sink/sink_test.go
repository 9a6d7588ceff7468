package sink

import (
	"fmt"
	"strings"
	"testing"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/stub"
)

func couch(id string, deleted bool, start int, ids ...string) *doc.Document {
	return &doc.Document{ID: id, Source: stub.SourceCouch, Deleted: deleted, Version: doc.Version{
		Rev: stub.Rev{Gen: start, Hash: ids[0]}, Revisions: stub.Revisions{Start: start, IDs: ids}}}
}

func sql(id string, lsn stub.LSN, ord uint32) *doc.Document {
	return &doc.Document{ID: id, Source: stub.SourceSQL, Version: doc.Version{SQL: stub.SQLVersion{CommitLSN: lsn, Ordinal: ord}}}
}

func TestRevPath(t *testing.T) {
	tests := []struct {
		name string
		v    doc.Version
		want string
	}{
		{"full", couch("a", false, 3, "c", "b", "a").Version, "3-c 2-b 1-a"},
		{"truncated history", couch("a", false, 9, "i", "h").Version, "9-i 8-h"},
		{"unknown revision", doc.Version{}, ""},
		{"path of another leaf", doc.Version{Rev: stub.Rev{Gen: 2, Hash: "x"}, Revisions: stub.Revisions{Start: 2, IDs: []string{"y", "a"}}}, "2-x"},
		{"no path", doc.Version{Rev: stub.Rev{Gen: 4, Hash: "d"}}, "4-d"},
		{"path longer than the generation", couch("a", false, 2, "b", "a", "z").Version, "2-b 1-a"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := strings.Join(RevPath(tt.v), " "); got != tt.want {
				t.Fatalf("RevPath = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestRefuses(t *testing.T) {
	stored := RevPath(couch("a", false, 3, "c", "b", "a").Version)
	tests := []struct {
		rev  stub.Rev
		want bool
	}{
		{stub.Rev{Gen: 3, Hash: "c"}, true},  // the same revision
		{stub.Rev{Gen: 1, Hash: "a"}, true},  // an ancestor
		{stub.Rev{Gen: 4, Hash: "d"}, false}, // a descendant
		{stub.Rev{Gen: 2, Hash: "x"}, false}, // another branch, lower generation: the current winner
		{stub.Rev{}, false},                  // unknown: never refused
	}
	for _, tt := range tests {
		if got := Refuses(stored, tt.rev); got != tt.want {
			t.Errorf("Refuses(%v, %s) = %v, want %v", stored, tt.rev, got, tt.want)
		}
	}
	if Refuses(nil, stub.Rev{Gen: 1, Hash: "a"}) {
		t.Error("an empty stored path refuses")
	}
}

func TestNewest(t *testing.T) {
	show := func(docs []*doc.Document) string {
		var p []string
		for _, d := range docs {
			p = append(p, d.ID+"@"+d.Version.String())
		}
		return strings.Join(p, " ")
	}
	tests := []struct {
		name string
		in   []*doc.Document
		want string
	}{
		{"no duplicates", []*doc.Document{sql("a", 1, 0), sql("b", 2, 0)}, "a@0/1#0 b@0/2#0"},
		{"sql newest wins, first position kept",
			[]*doc.Document{sql("a", 5, 0), sql("b", 1, 0), sql("a", 7, 0), sql("a", 6, 9), sql("c", 1, 0)},
			"a@0/7#0 b@0/1#0 c@0/1#0"},
		{"ordinal", []*doc.Document{sql("a", 5, 2), sql("a", 5, 1)}, "a@0/5#2"},
		{"couch descendant wins either way",
			[]*doc.Document{couch("a", false, 3, "c", "b", "a"), couch("a", false, 2, "b", "a"), couch("b", false, 1, "a"), couch("b", false, 2, "b", "a")},
			"a@3-c b@2-b"},
		{"couch unrelated: later wins",
			[]*doc.Document{couch("a", false, 5, "e", "d"), couch("a", false, 3, "x", "b")}, "a@3-x"},
		// The Couch→SQL migration rule: SQL wins whatever the order.
		{"mixed kinds: SQL wins after", []*doc.Document{couch("a", false, 1, "a"), sql("a", 9, 0)}, "a@0/9#0"},
		{"mixed kinds: SQL wins before", []*doc.Document{sql("a", 9, 0), couch("a", false, 1, "a")}, "a@0/9#0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := fmt.Sprint(tt.in)
			if got := show(Newest(tt.in)); got != tt.want {
				t.Fatalf("Newest = %s, want %s", got, tt.want)
			}
			if fmt.Sprint(tt.in) != in {
				t.Fatal("Newest modified its input")
			}
		})
	}
}

package pgident

import (
	"slices"
	"testing"
)

func TestParseTable(t *testing.T) {
	tests := []struct {
		in   string
		want []string
		err  bool
	}{
		{"cases", []string{"cases"}, false},
		{"reporting.cases", []string{"reporting", "cases"}, false},
		{`odd"name`, []string{`odd"name`}, false},
		{"", nil, true},
		{"a.b.c", nil, true},
		{".cases", nil, true},
		{"cases.", nil, true},
		{"ca\x00ses", nil, true},
	}
	for _, tt := range tests {
		got, err := ParseTable(tt.in)
		if (err != nil) != tt.err || !slices.Equal([]string(got), tt.want) {
			t.Errorf("ParseTable(%q) = %v, %v; want %v, err %v", tt.in, got, err, tt.want, tt.err)
		}
	}
	// Quoting makes a hostile name a plain identifier.
	id, _ := ParseTable(`x"; DROP TABLE y; --`)
	if got := id.Sanitize(); got != `"x""; DROP TABLE y; --"` {
		t.Errorf("Sanitize = %s", got)
	}
}

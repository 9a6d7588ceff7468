package testenv

import (
	"strings"
	"testing"
)

func TestDiffStates(t *testing.T) {
	if d := DiffStates(map[string]string{"a": "1"}, map[string]string{"a": "1"}); d != "" {
		t.Fatalf("equal states differ: %s", d)
	}
	d := DiffStates(map[string]string{"a": "1", "b": "2"}, map[string]string{"a": "9", "c": "3"})
	for _, want := range []string{`a: got "9" want "1"`, `missing b="2"`, `extra c="3"`} {
		if !strings.Contains(d, want) {
			t.Fatalf("diff %q lacks %q", d, want)
		}
	}
}

func TestEventuallyReturnsOnceTrue(t *testing.T) {
	n := 0
	Eventually(t, 5e9, func() string {
		if n++; n < 3 {
			return "not yet"
		}
		return ""
	})
	if n != 3 {
		t.Fatalf("cond called %d times, want 3", n)
	}
}

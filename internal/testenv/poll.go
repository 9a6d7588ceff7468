package testenv

import (
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"
)

// Eventually polls cond every 50ms until it returns "" (the condition holds)
// or timeout passes; then it fails the test with cond's last explanation.
// Tests wait for conditions with it, never with a bare sleep.
func Eventually(t testing.TB, timeout time.Duration, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for time.Now().Before(deadline) {
		if last = cond(); last == "" {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("condition not met within %s: %s", timeout, last)
}

// DiffStates describes how two id → state maps differ ("" when equal),
// listing at most five differences, for comparing a sink with its source.
func DiffStates(want, got map[string]string) string {
	var out []string
	for k, v := range want {
		if g, ok := got[k]; !ok {
			out = append(out, fmt.Sprintf("missing %s=%q", k, v))
		} else if g != v {
			out = append(out, fmt.Sprintf("%s: got %q want %q", k, g, v))
		}
	}
	for k, v := range got {
		if _, ok := want[k]; !ok {
			out = append(out, fmt.Sprintf("extra %s=%q", k, v))
		}
	}
	sort.Strings(out)
	if len(out) > 5 {
		out = append(out[:5], fmt.Sprintf("… %d differences", len(out)))
	}
	return strings.Join(out, "; ")
}

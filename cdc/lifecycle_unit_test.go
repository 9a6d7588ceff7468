package cdc

import (
	"strings"
	"testing"
	"time"
)

// PostgreSQL 14 and older are refused with a message that says so (the
// test servers are 15: the refusal itself is checked here).
func TestServerVersion(t *testing.T) {
	for _, tt := range []struct {
		num  int
		ok   bool
		name string
	}{{140011, false, "14.11"}, {100023, false, "10.23"}, {150006, true, "15.6"}, {170000, true, "17.0"}} {
		err := checkServerVersion(tt.num, tt.name)
		if (err == nil) != tt.ok {
			t.Errorf("%s: err = %v", tt.name, err)
		}
		if err != nil && (!errorsIs(err, ErrPrecondition) || !strings.Contains(err.Error(), "PostgreSQL "+tt.name+" is too old") || !strings.Contains(err.Error(), "15 or later")) {
			t.Errorf("%s: message %q", tt.name, err)
		}
	}
}

func TestGapAcceptance(t *testing.T) {
	g, err := ParseGapAcceptance("changefeed@0/1a2b3c")
	if err != nil || g.Slot != "changefeed" || g.String() != "changefeed@0/1A2B3C" {
		t.Fatalf("%+v, %v", g, err)
	}
	for _, bad := range []string{"true", "1", "changefeed", "Bad-Slot@0/1", "changefeed@x"} {
		if _, err := ParseGapAcceptance(bad); !errorsIs(err, ErrConfig) {
			t.Errorf("%q: err = %v, want ErrConfig", bad, err)
		}
	}
	if _, err := New(Config{PostgresURL: "postgres://u@h/db", Slot: "a", AllowNewSlot: GapAcceptance{Slot: "b", Checkpoint: 1}}, Deps{Producer: nopProducer{}}); !errorsIs(err, ErrConfig) {
		t.Errorf("acceptance of another slot: %v", err)
	}
}

func TestLogLimiter(t *testing.T) {
	l := logLimiter{every: 10 * time.Second}
	t0 := time.Unix(1000, 0)
	logged := 0
	for i := range 10_000 {
		if ok, _ := l.allow(t0.Add(time.Duration(i) * time.Millisecond)); ok {
			logged++
		}
	}
	if logged != 1 {
		t.Fatalf("%d lines logged in 10s, want 1", logged)
	}
	if ok, n := l.allow(t0.Add(11 * time.Second)); !ok || n != 9_999 {
		t.Fatalf("after the interval: %v, %d suppressed", ok, n)
	}
}

// Package fuzzcheck holds what every fuzz target checks besides its own
// comparison with a library: that the code under test allocates within a
// bound however hostile the input. (A panic fails a fuzz target by itself.)
//
// The fuzz targets (go test -fuzz, files *_fuzz_test.go) are:
//
//   - cdc: FuzzPgoutput (the pgoutput decoder against pglogrepl),
//     FuzzAppendStub (the hand-written stub encoder against encoding/json),
//     FuzzParseRouting (the routing loader);
//   - stub: FuzzUnmarshal (the fast stub decoder against encoding/json);
//   - couchsource: FuzzProject (the _changes stream filter against a full
//     encoding/json decode), FuzzLoadRouting;
//   - pillows/pillowconf: FuzzParse (the pillows file loader).
//
// Their seed corpora (testdata/fuzz/<Target>/) run with every go test;
// scripts/test.sh fuzzes each for a short while, scripts/fuzz.sh longer.
package fuzzcheck

import (
	"runtime/metrics"
	"testing"
)

const heapAllocs = "/gc/heap/allocs:bytes"

// Allocated returns the bytes allocated on the heap while fn ran. The count
// is process-wide (goroutines fn starts are included) and counts in units
// of the allocator's spans, so it is meant for bounds of kilobytes and up.
func Allocated(fn func()) uint64 {
	s := []metrics.Sample{{Name: heapAllocs}}
	metrics.Read(s)
	before := s[0].Value.Uint64()
	fn()
	metrics.Read(s)
	return s[0].Value.Uint64() - before
}

// Bounded runs fn and fails t if it allocated more than limit bytes.
func Bounded(t testing.TB, limit uint64, what string, fn func()) {
	t.Helper()
	if n := Allocated(fn); n > limit {
		t.Fatalf("%s allocated %d bytes, bound %d", what, n, limit)
	}
}

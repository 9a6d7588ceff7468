package e2e_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"

	"github.com/changefeed/changefeed/internal/testenv"
)

// kill -9 the pillow binary repeatedly while it works through duplicated,
// reversed stubs; after a restart the sink equals the source (every
// document's latest state, deleted ones absent). SIGTERM then finishes the
// batch, commits and exits 0; a restart after it has nothing to redo.
func TestPillowKillNineAndSIGTERM(t *testing.T) {
	r := newPillowRig(t, pillowRigOpts{})
	// Small batches: the work takes long enough to be interrupted.
	file := r.writeFileBatch(5, "cases")
	all, final := pillowHistory("case", 1000, 4, 6, 1000)
	r.apply(final)
	rev := slices.Clone(all)
	slices.Reverse(rev)
	r.produce(append(rev, all...)...) // reversed, then again in order

	// Kill at varying points after the group is joined; at least one kill
	// must leave work undone for the restart to prove anything.
	midStream := 0
	for i, delay := range []time.Duration{100 * time.Millisecond, 300 * time.Millisecond, 0} {
		p := r.startPillow(file, "--pillow", "cases")
		p.waitLog(t, "partitions assigned")
		time.Sleep(delay) // the kill's timing, not a condition
		p.signal(t, syscall.SIGKILL)
		p.wait(t, 10*time.Second)
		if r.lag("cases") != "" {
			midStream++
		}
		t.Logf("kill %d after %s: %d of %d rows, %s", i+1, delay, len(r.sink("cases")), len(r.source()), r.lag("cases"))
	}
	if midStream == 0 {
		t.Fatal("no kill landed before the work was done")
	}
	p := r.startPillow(file, "--pillow", "cases")
	p.waitLog(t, "partitions assigned")
	testenv.Eventually(t, 60*time.Second, func() string { return testenv.DiffStates(r.source(), r.sink("cases")) })
	testenv.Eventually(t, 60*time.Second, func() string { return r.lag("cases") })
	if n := r.errorRows("cases"); n != 0 {
		t.Fatalf("%d error rows", n)
	}
	p.signal(t, syscall.SIGTERM)
	if code := p.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("exit code after SIGTERM = %d, want 0", code)
	}

	// SIGTERM commits: with periodic commits off, only the shutdown
	// commit can bring the lag of new changes to zero.
	p = r.startPillow(file, "--pillow", "cases", "--commit-interval", "1h")
	p.waitLog(t, "partitions assigned")
	more, final2 := pillowHistory("late", 30, 1, 0, 100000)
	r.apply(final2)
	r.produce(more...)
	testenv.Eventually(t, 60*time.Second, func() string { return testenv.DiffStates(r.source(), r.sink("cases")) })
	if r.lag("cases") == "" {
		t.Fatal("offsets committed before shutdown although --commit-interval is 1h")
	}
	p.signal(t, syscall.SIGTERM)
	if code := p.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("exit code after SIGTERM = %d, want 0", code)
	}
	if d := r.lag("cases"); d != "" {
		t.Fatalf("after SIGTERM: %s (offsets not committed at shutdown)", d)
	}
}

// The reporting database is down for 10 s while changes flow: no error
// rows, nothing lost, processing resumes.
func TestPillowSinkDownTenSeconds(t *testing.T) {
	r := newPillowRig(t, pillowRigOpts{separateSink: true})
	file := r.writeFile("cases")
	first, final1 := pillowHistory("a", 100, 2, 5, 1000)
	r.apply(final1)
	r.produce(first...)
	p := r.startPillow(file, "--pillow", "cases")
	testenv.Eventually(t, 60*time.Second, func() string { return testenv.DiffStates(r.source(), r.sink("cases")) })

	if err := r.rep.Stop(r.ctx); err != nil {
		t.Fatal(err)
	}
	down := time.Now()
	second, final2 := pillowHistory("b", 100, 2, 5, 5000)
	r.apply(final2)
	r.produce(second...)
	// Changes to documents already in the sink, too.
	r.exec(r.srcPool, `UPDATE cases SET name = name || '-later' WHERE id LIKE 'a-%'`)
	var later []pillowChange
	for i, c := range first {
		if !final1[c.id].deleted && c.lsn == final1[c.id].lsn {
			later = append(later, pillowChange{id: c.id, lsn: 9000 + uint64(i), name: c.name + "-later"})
		}
	}
	r.produce(later...)
	time.Sleep(time.Until(down.Add(10 * time.Second))) // the outage itself, not a condition
	if n := r.errorRows("cases"); n != 0 {
		t.Fatalf("%d error rows during the outage", n)
	}
	if err := r.rep.Start(r.ctx); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 60*time.Second, func() string { return testenv.DiffStates(r.source(), r.sink("cases")) })
	if n := r.errorRows("cases"); n != 0 {
		t.Fatalf("%d error rows after the outage", n)
	}
	p.signal(t, syscall.SIGTERM)
	if code := p.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("exit code = %d", code)
	}
	if !strings.Contains(p.output(), "transient failure") {
		t.Fatal("the outage was not seen as transient")
	}
}

// A committed offset that retention deleted: the binary exits non-zero,
// naming the pillow and partition and saying a reindex is needed.
func TestPillowOffsetOutOfRangeExits(t *testing.T) {
	r := newPillowRig(t, pillowRigOpts{})
	file := r.writeFile("cases")
	first, final := pillowHistory("a", 30, 1, 0, 1000)
	r.apply(final)
	r.produce(first...)
	p := r.startPillow(file, "--pillow", "cases")
	testenv.Eventually(t, 60*time.Second, func() string { return testenv.DiffStates(r.source(), r.sink("cases")) })
	p.signal(t, syscall.SIGTERM)
	if code := p.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("exit code = %d", code)
	}
	more, _ := pillowHistory("b", 30, 1, 0, 2000)
	r.produce(more...)
	ends, err := r.adm.ListEndOffsets(r.ctx, pillowTopic)
	if err != nil {
		t.Fatal(err)
	}
	del := kadm.Offsets{}
	ends.Each(func(o kadm.ListedOffset) { del.Add(kadm.Offset{Topic: o.Topic, Partition: o.Partition, At: o.Offset}) })
	if resp, err := r.adm.DeleteRecords(r.ctx, del); err != nil || resp.Error() != nil {
		t.Fatalf("delete records: %v %v", err, resp.Error())
	}
	p = r.startPillow(file, "--pillow", "cases")
	code := p.wait(t, 60*time.Second)
	if code != 3 {
		t.Fatalf("exit code = %d, want 3 (reindex needed)", code)
	}
	out := p.output()
	for _, want := range []string{"pillow cases", "topic " + pillowTopic + " partition ", "reindex"} {
		if !strings.Contains(out, want) {
			t.Fatalf("stderr does not say %q:\n%s", want, tail(out, 2000))
		}
	}
}

// checkpoints copy: a pillow split off an old one starts exactly where the
// old one stopped; merge takes the minimum; tools refuse live groups.
func TestPillowCheckpointCopyAndMerge(t *testing.T) {
	r := newPillowRig(t, pillowRigOpts{})
	file := r.writeFile("old", "new", "merged")
	first, final1 := pillowHistory("a", 60, 1, 0, 1000)
	r.apply(final1)
	r.produce(first...)
	if code, out := r.runCLI(file, "list"); code != 0 || !strings.Contains(out, "old") || !strings.Contains(out, "postgres:rep_merged") {
		t.Fatalf("list: code %d\n%s", code, out)
	}
	p := r.startPillow(file, "--pillow", "old")
	testenv.Eventually(t, 60*time.Second, func() string { return testenv.DiffStates(r.source(), r.sink("old")) })
	// Operations endpoints.
	base := "http://" + p.httpAddr(t)
	testenv.Eventually(t, 20*time.Second, func() string { return httpCheck(base+"/readyz", "ready") })
	if msg := httpCheck(base+"/healthz", "ok"); msg != "" {
		t.Fatal(msg)
	}
	for _, want := range []string{
		`changefeed_pillow_processed_total{pillow="old",processor="pgsink:rep_old"} 60`,
		`changefeed_pillow_lag_records{partition="0",pillow="old",topic="pillow-cases"} 0`,
		"changefeed_pillow_lag_seconds", "changefeed_pillow_batch_size_bucket", "changefeed_pillow_fetch_seconds_bucket",
		"changefeed_pillow_stubs_skipped_total", "process_resident_memory_bytes",
	} {
		if msg := httpCheck(base+"/metrics", want); msg != "" {
			t.Fatal(msg)
		}
	}

	// Refused while old runs.
	if code, out := r.runCLI(file, "checkpoints", "copy", "old", "new"); code == 0 || !strings.Contains(out, "live members") {
		t.Fatalf("copy from a live group: code %d\n%s", code, out)
	}
	p.signal(t, syscall.SIGTERM)
	if code := p.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("exit code = %d", code)
	}
	if code, out := r.runCLI(file, "checkpoints", "copy", "old", "new"); code != 0 {
		t.Fatalf("copy: code %d\n%s", code, out)
	}

	second, final2 := pillowHistory("b", 60, 1, 0, 5000)
	r.apply(final2)
	r.produce(second...)
	p = r.startPillow(file, "--pillow", "new")
	p.waitLog(t, "partitions assigned")
	want := map[string]string{}
	for id, c := range final2 {
		want[id] = c.name
	}
	// Exactly the changes after the copy point: none of the first batch.
	testenv.Eventually(t, 60*time.Second, func() string { return testenv.DiffStates(want, r.sink("new")) })
	p.signal(t, syscall.SIGTERM)
	if code := p.wait(t, 30*time.Second); code != 0 {
		t.Fatalf("exit code = %d", code)
	}
	if d := testenv.DiffStates(want, r.sink("new")); d != "" {
		t.Fatalf("new pillow: %s", d)
	}

	// merge old (behind) and new (at the end) into merged: the minimum,
	// i.e. old's offsets.
	if code, out := r.runCLI(file, "checkpoints", "merge", "old", "new", "--into", "merged"); code != 0 {
		t.Fatalf("merge: code %d\n%s", code, out)
	}
	code, out := r.runCLI(file, "checkpoints", "show", "old", "merged")
	if code != 0 {
		t.Fatalf("show: code %d\n%s", code, out)
	}
	committed := map[string]map[string]string{} // group → partition → committed
	for _, line := range strings.Split(out, "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		if committed[f[0]] == nil {
			committed[f[0]] = map[string]string{}
		}
		committed[f[0]][f[2]] = f[3]
	}
	if len(committed["old"]) != pillowPartitions || !mapsEqual(committed["old"], committed["merged"]) {
		t.Fatalf("merged offsets are not the minimum (old's):\n%s", out)
	}
	ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
	defer cancel()
	_ = ctx
}

// httpCheck returns "" when url answers 200 with a body containing want.
func httpCheck(url, want string) string {
	resp, err := http.Get(url) //nolint:gosec,noctx // loopback test server
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), want) {
		return fmt.Sprintf("GET %s: %d, body lacks %q:\n%s", url, resp.StatusCode, want, tail(string(b), 1500))
	}
	return ""
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

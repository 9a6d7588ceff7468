package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/changefeed/changefeed/bench/cdcbench/walbench"
)

// floorChildCmd is the hidden command a floor run executes in a child
// process, so that its RSS and CPU time are measured alone.
const floorChildCmd = "floor-child"

func floorChild(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet(floorChildCmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	slot := fs.String("slot", "", "")
	pub := fs.String("publication", "", "")
	end := fs.String("end-lsn", "", "")
	proto := fs.Int("proto", 1, "")
	values := fs.Bool("values", false, "")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	endLSN, err := pglogrepl.ParseLSN(*end)
	if err != nil {
		fmt.Fprintln(stderr, "floor-child:", err)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	r, err := walbench.Floor(ctx, os.Getenv(urlEnv), walbench.FloorOptions{
		Slot: *slot, Publication: *pub, EndLSN: endLSN, ProtoVersion: *proto, Values: *values,
	})
	if err != nil {
		fmt.Fprintln(stderr, "floor-child:", err)
		return 1
	}
	peak, err := readStatus("/proc/self/status", "VmHWM:")
	if err != nil {
		fmt.Fprintln(stderr, "floor-child:", err)
		return 1
	}
	if err := json.NewEncoder(stdout).Encode(floorChildResult{FloorResult: r, PeakRSS: peak}); err != nil {
		fmt.Fprintln(stderr, "floor-child:", err)
		return 1
	}
	return 0
}

// floorChildResult is what the floor child prints.
type floorChildResult struct {
	walbench.FloorResult
	PeakRSS int64 // VmHWM at the end, bytes
}

// result is one measured run.
type result struct {
	what    string
	run     int
	changes int64
	elapsed time.Duration // decode start to the last change (floor) or last stub in Kafka (publisher)
	confirm time.Duration // publisher: to confirmed_flush_lsn >= the dataset's end
	startup time.Duration // publisher: process start to slot active
	usage   usage
	note    string
}

func (r result) rate() float64 { return float64(r.changes) / r.elapsed.Seconds() }

// usage is what a child process cost.
type usage struct {
	maxRSS   int64 // bytes: VmHWM, the peak RSS
	p50RSS   int64 // bytes, median of samples taken while measuring
	p95RSS   int64
	cpu      time.Duration // user + system
	walCPU   time.Duration // the walsender's, when PostgreSQL is local (0: unknown)
	nSamples int
}

// rssSampler reads a process's VmRSS from /proc on an interval.
type rssSampler struct {
	mu      sync.Mutex
	samples []int64
	on      bool
	stop    chan struct{}
	done    chan struct{}
}

func sampleRSS(pid int, every time.Duration) *rssSampler {
	s := &rssSampler{stop: make(chan struct{}), done: make(chan struct{})}
	path := "/proc/" + strconv.Itoa(pid) + "/status"
	go func() {
		defer close(s.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-t.C:
			}
			rss, err := readVmRSS(path)
			if err != nil {
				continue
			}
			s.mu.Lock()
			if s.on {
				s.samples = append(s.samples, rss)
			}
			s.mu.Unlock()
		}
	}()
	return s
}

// record turns recording on or off (only the measured window counts).
func (s *rssSampler) record(on bool) {
	s.mu.Lock()
	s.on = on
	s.mu.Unlock()
}

func (s *rssSampler) finish() (p50, p95 int64, n int) {
	close(s.stop)
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.samples) == 0 {
		return 0, 0, 0
	}
	v := slices.Clone(s.samples)
	slices.Sort(v)
	return v[len(v)/2], v[len(v)*95/100], len(v)
}

func readVmRSS(path string) (int64, error) { return readStatus(path, "VmRSS:") }

// readStatus reads a size field of /proc/<pid>/status in bytes. VmHWM is
// the peak RSS of the process's current image. (rusage's ru_maxrss is not
// used: Linux folds the RSS of the address space a child had before exec —
// with Go's vfork-style exec, the parent's — into it.)
func readStatus(path, field string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Text()
		if v, ok := strings.CutPrefix(line, field); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				return 0, err
			}
			return kb * 1024, nil
		}
	}
	return 0, errors.New("no " + field + " in " + path)
}

// childUsage reads a finished child's CPU time.
func childUsage(ps *os.ProcessState) usage {
	return usage{cpu: ps.UserTime() + ps.SystemTime()}
}

// runFloor measures the floor once, on a fresh copy of the dataset's slot.
func runFloor(ctx context.Context, c config, conn *pgx.Conn, d walbench.Dataset, run int) (result, walbench.FloorResult, error) {
	res := result{what: "floor", run: run}
	slot, err := walbench.CopySlot(ctx, conn, d, fmt.Sprintf("floor%d", run))
	if err != nil {
		return res, walbench.FloorResult{}, err
	}
	defer func() {
		if err := walbench.DropSlot(context.Background(), conn, slot); err != nil {
			fmt.Fprintf(os.Stderr, "cdcbench: drop slot %s: %v\n", slot, err)
		}
	}()
	self, err := os.Executable()
	if err != nil {
		return res, walbench.FloorResult{}, err
	}
	args := []string{floorChildCmd, "-slot", slot, "-publication", d.Publication,
		"-end-lsn", d.EndLSN.String(), "-proto", strconv.Itoa(c.proto)}
	if c.values {
		args = append(args, "-values")
	}
	cmd := exec.CommandContext(ctx, self, args...)
	cmd.Env = append(os.Environ(), urlEnv+"="+c.url)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		return res, walbench.FloorResult{}, err
	}
	s := sampleRSS(cmd.Process.Pid, 50*time.Millisecond)
	s.record(true)
	werr := cmd.Wait()
	res.usage = childUsage(cmd.ProcessState)
	res.usage.p50RSS, res.usage.p95RSS, res.usage.nSamples = s.finish()
	if werr != nil {
		return res, walbench.FloorResult{}, fmt.Errorf("floor run %d: %w: %s", run, werr, strings.TrimSpace(errb.String()))
	}
	var cr floorChildResult
	if err := json.Unmarshal(out.Bytes(), &cr); err != nil {
		return res, cr.FloorResult, fmt.Errorf("floor run %d: read result: %w", run, err)
	}
	fr := cr.FloorResult
	res.usage.maxRSS = cr.PeakRSS
	res.usage.walCPU = cr.WalsenderCPU
	res.changes, res.elapsed = fr.Changes, fr.Elapsed
	if fr.Changes != d.Changes {
		return res, fr, fmt.Errorf("floor run %d decoded %d changes, the dataset has %d", run, fr.Changes, d.Changes)
	}
	return res, fr, nil
}

// measure runs the floor and the publisher c.runs times each, alternating,
// and prints every run and the medians.
func measure(ctx context.Context, c config, conn *pgx.Conn, d walbench.Dataset, stdout, stderr io.Writer) error {
	var pub *publisherRunner
	if !c.skipPublisher {
		var err error
		if pub, err = newPublisherRunner(ctx, c, conn, d, stderr); err != nil {
			return err
		}
		defer pub.close()
	}
	printDataset(stdout, d)
	fmt.Fprintf(stdout, "floor: pgoutput proto_version %d, values %t; host: %d CPUs\n", c.proto, c.values, numCPU())
	fmt.Fprintf(stdout, "%-4s %-9s %10s %10s %9s %9s %9s %9s %9s %11s %11s  %s\n",
		"run", "side", "changes/s", "WAL MiB/s", "elapsed", "maxRSS", "RSS p50", "RSS p95", "CPU", "CPU µs/chg", "wsnd µs/chg", "note")
	var floors, pubs []result
	for run := 1; run <= c.runs; run++ {
		if !c.skipFloor {
			r, fr, err := runFloor(ctx, c, conn, d, run)
			if err != nil {
				return err
			}
			if d.LastCommitEnd == 0 && fr.LastCommitEnd != 0 {
				d.LastCommitEnd = fr.LastCommitEnd
				if err := walbench.RecordLastCommitEnd(ctx, conn, d.Name, d.LastCommitEnd); err != nil {
					return err
				}
			}
			printResult(stdout, d, r)
			floors = append(floors, r)
		}
		if pub != nil {
			r, err := pub.run(ctx, run)
			if err != nil {
				return err
			}
			printResult(stdout, d, r)
			pubs = append(pubs, r)
		}
	}
	fmt.Fprintln(stdout)
	var a, b float64
	if len(floors) > 0 {
		a = median(floors, result.rate)
		fmt.Fprintf(stdout, "(a) floor      median %8.0f changes/s  %6.1f WAL MiB/s  max RSS %s\n",
			a, a*walPerChange(d), mib(maxOf(floors, func(r result) int64 { return r.usage.maxRSS })))
	}
	if len(pubs) > 0 {
		b = median(pubs, result.rate)
		fmt.Fprintf(stdout, "(b) publisher  median %8.0f changes/s  %6.1f WAL MiB/s  max RSS %s  RSS p50 %s\n",
			b, b*walPerChange(d), mib(maxOf(pubs, func(r result) int64 { return r.usage.maxRSS })),
			mib(int64(median(pubs, func(r result) float64 { return float64(r.usage.p50RSS) }))))
	}
	if a > 0 && b > 0 {
		fmt.Fprintf(stdout, "ratio b/a = %.2f (target >= 0.80)\n", b/a)
	}
	return nil
}

func walPerChange(d walbench.Dataset) float64 {
	return float64(d.WALBytes()) / float64(d.Changes) / (1 << 20)
}

func printResult(w io.Writer, d walbench.Dataset, r result) {
	note := r.note
	if r.what == "publisher" {
		note = fmt.Sprintf("confirmed after %s, start-up %s %s", r.confirm.Round(time.Millisecond), r.startup.Round(time.Millisecond), note)
	}
	wsnd := "-"
	if r.usage.walCPU > 0 {
		wsnd = fmt.Sprintf("%.2f", float64(r.usage.walCPU.Microseconds())/float64(max(r.changes, 1)))
	}
	fmt.Fprintf(w, "%-4d %-9s %10.0f %10.1f %9s %9s %9s %9s %9s %11.2f %11s  %s\n",
		r.run, r.what, r.rate(), r.rate()*walPerChange(d), r.elapsed.Round(time.Millisecond),
		mib(r.usage.maxRSS), mib(r.usage.p50RSS), mib(r.usage.p95RSS), r.usage.cpu.Round(10*time.Millisecond),
		float64(r.usage.cpu.Microseconds())/float64(max(r.changes, 1)), wsnd, note)
}

func mib(b int64) string { return fmt.Sprintf("%.1fMiB", float64(b)/(1<<20)) }

func median(rs []result, f func(result) float64) float64 {
	v := make([]float64, len(rs))
	for i, r := range rs {
		v[i] = f(r)
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

func maxOf(rs []result, f func(result) int64) int64 {
	var m int64
	for _, r := range rs {
		m = max(m, f(r))
	}
	return m
}

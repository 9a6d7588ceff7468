package e2e_test

// Crash and outage tests of the cdc-publisher: a real PostgreSQL and a kfake
// container (internal/testenv), the built cmd/cdc-publisher as a child
// process, and the checks of e2e/internal/faultenv.

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"

	"github.com/changefeed/changefeed/e2e/internal/faultenv"
	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/migrations"
)

// faultSeedEnv replays a run: its seed is logged by every fault test.
const faultSeedEnv = "CHANGEFEED_FAULT_SEED"

// faultStatusInterval is the publisher's confirmation interval in these
// tests: short, so that many confirmations happen between kills.
const faultStatusInterval = 200 * time.Millisecond

const (
	faultTable       = "fault_cases"
	faultTopic       = "fault-cases"
	faultSlot        = "fault_slot"
	faultPublication = "fault_pub"
)

// faultRig is one fault test's world.
type faultRig struct {
	pg      *testenv.PG
	kafka   *testenv.KafkaServer
	adm     *kadm.Client
	wl      *faultenv.Workload
	pub     *faultenv.Publisher
	reader  *faultenv.Reader
	sampler *faultenv.Sampler
	seed    uint64
	// http is the publisher's /metrics, /healthz, /readyz address (the
	// same for every run).
	http string
}

func faultSeed(t *testing.T) uint64 {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv(faultSeedEnv); v != "" {
		s, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("$%s: %v", faultSeedEnv, err)
		}
		seed = s
	}
	t.Logf("seed %d (replay with %s=%d)", seed, faultSeedEnv, seed)
	return seed
}

// newFaultRig starts PostgreSQL and Kafka, creates the workload table and
// the topic (3 partitions, so acknowledgements arrive out of order), and
// prepares, without starting, the publisher, a reader of the topic and a
// sampler of the slot.
func newFaultRig(t *testing.T, env map[string]string) *faultRig {
	t.Helper()
	r := &faultRig{seed: faultSeed(t)}
	r.pg = testenv.Postgres(t)
	r.kafka = testenv.Kafka(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Applied here too (the publisher applies them at start) so that the
	// sampler can read the checkpoint table from the first sample.
	if err := migrations.Up(ctx, r.pg.URL(), slog.New(slog.NewTextHandler(io.Discard, nil))); err != nil {
		t.Fatalf("migrations: %v", err)
	}
	r.adm = faultenv.Admin(t, r.kafka.Brokers())
	faultenv.CreateTopic(t, r.adm, faultTopic, 3)
	r.wl = faultenv.NewWorkload(t, r.pg.URL(), faultTable, r.seed)

	r.http = net.JoinHostPort("127.0.0.1", strconv.Itoa(testenv.FreePort(t)))
	settings := map[string]string{
		"CHANGEFEED_STATUS_INTERVAL": faultStatusInterval.String(),
		"CHANGEFEED_HTTP_ADDR":       r.http,
	}
	for k, v := range env {
		settings[k] = v
	}
	r.pub = faultenv.NewPublisher(t, faultenv.PublisherConfig{
		PostgresURL: r.pg.URL(),
		Brokers:     r.kafka.Brokers(),
		Slot:        faultSlot,
		Publication: faultPublication,
		Routing:     "tables:\n" + faultenv.RoutingFor(faultTable, faultTopic),
		Env:         settings,
	})
	r.reader = faultenv.NewReader(t, r.kafka.Brokers(), faultTopic)
	r.sampler = faultenv.StartSampler(t, r.pg.URL(), faultSlot, r.adm, []string{faultTopic}, 50*time.Millisecond)
	return r
}

// start starts a publisher run and waits until it streams the slot.
func (r *faultRig) start(t *testing.T) faultenv.SlotSample {
	t.Helper()
	// The HTTP port was free when picked, but between a kill and the
	// restart another process (a container's port mapping, a parallel
	// test) can take it: a run that cannot listen is restarted on a new
	// port, a bounded number of times. Any other early exit fails the test.
	for attempt := 1; ; attempt++ {
		r.pub.Start(t)
		var s faultenv.SlotSample
		portTaken := false
		faultenv.Poll(t, time.Minute, 25*time.Millisecond, "publisher streaming", func() bool {
			if !r.pub.Running() {
				if log := r.pub.Log(); attempt < 3 && strings.Contains(log, "address already in use") {
					portTaken = true
					return true
				}
				t.Fatalf("publisher run %d exited with %d before streaming:\n%s", r.pub.Runs()-1, r.pub.ExitCode(), r.pub.Log())
			}
			s = r.sampler.Sample(t)
			return s.Active
		})
		if !portTaken {
			return s
		}
		r.http = net.JoinHostPort("127.0.0.1", strconv.Itoa(testenv.FreePort(t)))
		r.pub.SetEnv("CHANGEFEED_HTTP_ADDR", r.http)
	}
}

// kill kills the publisher with SIGKILL and records where the next run
// resumes: the slot once released, and the topic's end offsets once stable
// (Kafka must be up).
func (r *faultRig) kill(t *testing.T) faultenv.Kill {
	t.Helper()
	r.pub.Kill(t)
	s := r.sampler.SlotReleased(t, 30*time.Second)
	return faultenv.Kill{
		Confirmed:  s.Confirmed,
		Checkpoint: s.Checkpoint,
		End:        faultenv.StableEndOffsets(t, r.adm, 30*time.Second, faultTopic),
	}
}

// finish waits until every committed change is in Kafka, stops the publisher
// (expecting exit 0), and runs every check.
func (r *faultRig) finish(t *testing.T, kills []faultenv.Kill) *faultenv.Analysis {
	t.Helper()
	committed := r.wl.Committed()
	want := make(map[faultenv.ChangeKey]bool, len(committed))
	for _, k := range committed {
		want[k] = true
	}
	// Wait until every committed change is in Kafka, or until the slot is
	// confirmed past the end of the workload: then nothing more will come,
	// and a change still missing is lost (the checks below say which).
	walEnd := faultWALPosition(t, r)
	start := time.Now()
	present := func() int {
		got := make(map[faultenv.ChangeKey]bool, len(want))
		for _, rec := range r.reader.Records() {
			if k := (faultenv.ChangeKey{XID: rec.Stub.XID, DocID: rec.Stub.DocumentID}); want[k] {
				got[k] = true
			}
		}
		return len(got)
	}
	settled := false
	err := faultenv.PollErr(3*time.Minute, 100*time.Millisecond, func() bool {
		if present() == len(want) {
			return true
		}
		if !r.pub.Running() {
			t.Errorf("publisher run %d exited with %d:\n%s", r.pub.Runs()-1, r.pub.ExitCode(), r.pub.Log())
			return true
		}
		settled = r.sampler.Sample(t).Confirmed >= walEnd
		return settled
	})
	switch {
	case err != nil:
		t.Errorf("%d of %d committed changes in Kafka after 3m", present(), len(want))
	case settled:
		t.Logf("slot confirmed past the workload's end %s: reading Kafka to its end before checking", walEnd)
	default:
		t.Logf("all %d committed changes in Kafka %s after the workload ended", len(committed), time.Since(start).Round(time.Millisecond))
	}
	if r.pub.Running() {
		if code := r.pub.Stop(t, time.Minute); code != 0 {
			t.Errorf("publisher exited with %d after SIGTERM, want 0:\n%s", code, r.pub.Log())
		}
	}
	r.reader.CaughtUp(t, r.adm, time.Minute, faultTopic)
	final := r.sampler.Sample(t)
	samples := r.sampler.Stop()

	a, errs := faultenv.Analyze(r.reader.Records())
	errs = append(errs, r.reader.Invalid()...)
	errs = append(errs, a.CheckCoverage(committed, r.wl.RolledBack)...)
	errs = append(errs, a.CheckConfirmation(samples)...)
	errs = append(errs, faultenv.CheckLost(a.Missing(committed), r.wl.After, samples)...)
	errs = append(errs, faultenv.CheckCheckpoint(samples)...)
	errs = append(errs, a.CheckDuplicates(kills)...)
	for _, err := range errs {
		t.Error(err)
	}
	withEnd := 0
	for _, s := range samples {
		if s.End != nil {
			withEnd++
		}
	}
	t.Logf("%d committed changes (%d rolled-back transactions), %d records, %d duplicates; %d slot samples (%d with end offsets, %d failed); final confirmed %s, checkpoint %s",
		len(committed), r.wl.RolledBackCount(), a.Records, a.Duplicates(), len(samples), withEnd, r.sampler.Errors(), final.Confirmed, final.Checkpoint)
	if withEnd < 10 {
		t.Errorf("only %d samples read Kafka's end offsets: the confirmation check had too little to work with", withEnd)
	}
	return a
}

// httpStatus is the status code of GET path on the publisher's HTTP
// address, 0 when it does not answer.
func (r *faultRig) httpStatus(path string) int {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + r.http + path)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// confirmedRange returns the lowest and highest confirmed LSN among samples
// with label taken at or after from.
func confirmedRange(samples []faultenv.SlotSample, label string, from, to time.Time) (lo, hi faultenv.SlotSample, n int) {
	for _, s := range samples {
		if s.Label != label || s.At.Before(from) || s.At.After(to) || !s.Exists {
			continue
		}
		if n == 0 || s.Confirmed < lo.Confirmed {
			lo = s
		}
		if n == 0 || s.Confirmed > hi.Confirmed {
			hi = s
		}
		n++
	}
	return lo, hi, n
}

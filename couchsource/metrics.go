package couchsource

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	read          *prometheus.CounterVec
	published     *prometheus.CounterVec
	skipped       *prometheus.CounterVec
	untyped       *prometheus.CounterVec
	reconnects    *prometheus.CounterVec
	rewinds       *prometheus.CounterVec
	cpWrites      *prometheus.CounterVec
	cpErrors      *prometheus.CounterVec
	cpHeld        *prometheus.CounterVec
	cpAge         *prometheus.GaugeVec
	lag           *prometheus.GaugeVec
	following     *prometheus.GaugeVec
	inflight      *prometheus.GaugeVec
	initialRead   *prometheus.GaugeVec
	initialTarget *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	cv := func(name, help string, labels ...string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: "changefeed_couch_" + name, Help: help}, append([]string{"db"}, labels...))
	}
	gv := func(name, help string) *prometheus.GaugeVec {
		return prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "changefeed_couch_" + name, Help: help}, []string{"db"})
	}
	m := &metrics{
		read:          cv("changes_read_total", "Changes read from the database's _changes feed (replays included)."),
		published:     cv("changes_published_total", "Changes whose stub Kafka acknowledged."),
		skipped:       cv("changes_skipped_total", "Changes read and not published (design documents).", "reason"),
		untyped:       cv("deletions_untyped_total", "Deletions published without a doc_type: no earlier revision was readable, so they went to the default topic."),
		reconnects:    cv("feed_reconnects_total", "Feed connections that ended and were reopened, by reason.", "reason"),
		rewinds:       cv("rewinds_total", "Resets detected (database recreated, stored seq rejected or ahead of the database): the feed is replayed from the start.", "reason"),
		cpWrites:      cv("checkpoint_writes_total", "Checkpoints written to PostgreSQL."),
		cpErrors:      cv("checkpoint_errors_total", "Checkpoint writes that failed; reading pauses until one succeeds."),
		cpHeld:        cv("checkpoint_held_total", "Checkpoint writes withheld because the feed replays changes before the stored checkpoint (a rewind): the stored checkpoint never moves backwards."),
		cpAge:         gv("checkpoint_age_seconds", "Seconds since the stored checkpoint last covered everything read; 0 while it does."),
		lag:           gv("lag", "The database's update_seq minus the stored checkpoint's seq, by their numeric prefixes, where the server's seqs have one."),
		following:     gv("following", "1 while the database's feed is connected, 0 otherwise."),
		inflight:      gv("stubs_in_flight", "Stubs produced and not yet acknowledged by Kafka."),
		initialRead:   gv("initial_load_read", "Changes read so far by an initial run from seq 0."),
		initialTarget: gv("initial_load_target", "Documents (live and deleted) in the database when the initial run from seq 0 started."),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.read, m.published, m.skipped, m.untyped, m.reconnects, m.rewinds,
		m.cpWrites, m.cpErrors, m.cpHeld, m.cpAge, m.lag, m.following, m.inflight, m.initialRead, m.initialTarget} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register couch metrics: %w", err)
		}
	}
	return m, nil
}

package pillows_test

import (
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/pillows"
	"github.com/changefeed/changefeed/sink/pgsink"
)

// A sink's server down at start-up is waited for, like an outage during a
// batch: Run keeps retrying the bootstrap (counted as transient failures)
// and starts consuming once the server is back. Before, Run returned the
// bootstrap error and the process exited.
func TestStartupWaitsForSink(t *testing.T) {
	e := newEnv(t)
	repPG := testenv.Postgres(t)
	if err := repPG.Stop(e.ctx); err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.New(e.ctx, repPG.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	s, err := pgsink.New(pool, pgsink.Config{Table: "rep", Columns: []pgsink.Column{{Name: "name", Type: "text"}}}, e.log)
	if err != nil {
		t.Fatal(err)
	}
	e.apply(map[string]change{"doc-1": {id: "doc-1", lsn: 5, name: "one"}})
	e.produce(change{id: "doc-1", lsn: 5})

	reg := prometheus.NewRegistry()
	m, err := pillows.NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	run := e.start(e.runner(func(o *pillows.Options) { o.Metrics = m }), e.pillow("startup", pillows.SinkProcessor(s)))
	testenv.Eventually(t, 30*time.Second, func() string {
		select {
		case <-run.finished:
			t.Fatalf("Run returned while the sink was down: %v", run.err)
		default:
		}
		if n := metricValue(t, reg, "changefeed_pillow_transient_errors_total", "pillow", "startup"); n < 3 {
			return "bootstrap not retried yet"
		}
		return ""
	})

	if err := repPG.Start(e.ctx); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 60*time.Second, func() string {
		var name string
		if err := pool.QueryRow(e.ctx, `SELECT name FROM rep_live WHERE doc_id = 'doc-1'`).Scan(&name); err != nil {
			return err.Error()
		}
		if name != "one" {
			return "doc-1 = " + name
		}
		return ""
	})
}

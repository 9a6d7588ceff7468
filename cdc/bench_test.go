package cdc_test

// Go benchmarks of the publisher against the floor of logical decoding, on
// the same pre-generated WAL (see bench/cdcbench for the command that also
// measures RSS and runs the built binary):
//
//	go test ./cdc -run '^$' -bench BenchmarkWAL -benchtime 3x
//
// PostgreSQL comes from $CHANGEFEED_BENCH_POSTGRES_URL (the dataset is kept
// there and reused) or from a container (internal/testenv). Kafka is kfake in
// this process, for both the publisher and nothing else. The dataset has
// $CHANGEFEED_BENCH_CHANGES changes (default 50,000) in transactions of 100.
// Each op replays the whole dataset from a fresh copy of its base slot;
// changes/s and ns/change are reported per op.

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/bench/cdcbench/walbench"
	"github.com/changefeed/changefeed/cdc"
	"github.com/changefeed/changefeed/internal/testenv"
	"github.com/changefeed/changefeed/kafkaconn"
	"github.com/changefeed/changefeed/migrations"
	"github.com/changefeed/changefeed/publish"
)

// walBenchDataset returns a PostgreSQL URL and a prepared dataset.
func walBenchDataset(b *testing.B) (string, *pgx.Conn, walbench.Dataset) {
	b.Helper()
	url := os.Getenv("CHANGEFEED_BENCH_POSTGRES_URL")
	if url == "" {
		url = testenv.Postgres(b).URL()
	}
	changes := 50000
	if v := os.Getenv("CHANGEFEED_BENCH_CHANGES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			b.Fatalf("$CHANGEFEED_BENCH_CHANGES: %q is not a positive integer", v)
		}
		changes = n
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		b.Fatalf("connect: %v", err)
	}
	b.Cleanup(func() { conn.Close(context.Background()) })
	name := fmt.Sprintf("gobench%d", changes)
	d, err := walbench.Load(ctx, conn, name)
	if err != nil {
		if err := walbench.Drop(ctx, conn, name); err != nil {
			b.Fatal(err)
		}
		d, err = walbench.Prepare(ctx, conn, walbench.GenOptions{
			Name: name, Changes: changes, TxRows: 100, UpdatePct: 35, DeletePct: 5, PayloadBytes: 200,
		})
		if err != nil {
			b.Fatalf("prepare dataset: %v", err)
		}
	}
	if err := migrations.Up(ctx, url, slog.New(slog.NewTextHandler(io.Discard, nil))); err != nil {
		b.Fatal(err)
	}
	return url, conn, d
}

func walBenchReport(b *testing.B, d walbench.Dataset, total time.Duration) {
	per := total / time.Duration(b.N)
	// The measured window, not the set-up around it.
	b.ReportMetric(float64(per.Nanoseconds()), "ns/op")
	b.ReportMetric(float64(d.Changes)/per.Seconds(), "changes/s")
	b.ReportMetric(float64(per.Nanoseconds())/float64(d.Changes), "ns/change")
	b.ReportMetric(float64(d.WALBytes())/(1<<20)/per.Seconds(), "WAL-MiB/s")
}

// BenchmarkWALFloor is the floor: a bare pglogrepl loop decoding every
// pgoutput message and tuple of the dataset.
func BenchmarkWALFloor(b *testing.B) {
	url, conn, d := walBenchDataset(b)
	ctx := context.Background()
	var total time.Duration
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		slot, err := walbench.CopySlot(ctx, conn, d, fmt.Sprintf("gbf%d", i))
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		r, err := walbench.Floor(ctx, url, walbench.FloorOptions{Slot: slot, Publication: d.Publication, EndLSN: d.EndLSN})
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		if r.Changes != d.Changes {
			b.Fatalf("floor decoded %d changes, want %d", r.Changes, d.Changes)
		}
		total += r.Elapsed
		if err := walbench.DropSlot(ctx, conn, slot); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.StopTimer()
	walBenchReport(b, d, total)
}

// BenchmarkWALPublisher runs the publisher (package cdc with the publish
// producer) over the dataset into kfake, from the moment its slot is active
// until Kafka holds every stub.
func BenchmarkWALPublisher(b *testing.B) {
	url, conn, d := walBenchDataset(b)
	var total time.Duration
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		total += walBenchPublisherRun(b, url, conn, d, fmt.Sprintf("gbp%d", i))
		b.StartTimer()
	}
	b.StopTimer()
	walBenchReport(b, d, total)
}

func walBenchPublisherRun(b *testing.B, url string, conn *pgx.Conn, d walbench.Dataset, suffix string) time.Duration {
	b.Helper()
	ctx := context.Background()
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1))
	if err != nil {
		b.Fatal(err)
	}
	defer cluster.Close()
	slot, err := walbench.CopySlot(ctx, conn, d, suffix)
	if err != nil {
		b.Fatal(err)
	}
	defer func() {
		if err := walbench.DropSlot(context.Background(), conn, slot); err != nil {
			b.Error(err)
		}
		_, _ = conn.Exec(context.Background(), `DELETE FROM changefeed.cdc_checkpoint WHERE slot_name = $1`, slot)
	}()
	const topic = "walbench"
	routing, err := cdc.ParseRouting("walbench.yaml", fmt.Appendf(nil, `tables:
  - table: public.%s
    topic: %s
    document_type: CommCareCase
    id_column: id
    domain_column: domain
    subtype_column: type
    deletion:
      column: deleted
`, d.Table, topic))
	if err != nil {
		b.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	kcfg := kafkaconn.Config{Brokers: cluster.ListenAddrs()}
	prod, err := publish.New(kcfg, publish.Options{Partitions: 3, ReplicationFactor: 1, MinInsyncReplicas: 1, MaxBufferedRecords: 2*10000 + 100, Component: "cdc"}, log, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer prod.Close()
	p, err := cdc.New(cdc.Config{
		PostgresURL: url, Slot: slot, Publication: d.Publication, Routing: routing, Migrate: true,
	}, cdc.Deps{Producer: prod, Logger: log})
	if err != nil {
		b.Fatal(err)
	}
	admCl, err := kgo.NewClient(kgo.SeedBrokers(cluster.ListenAddrs()...))
	if err != nil {
		b.Fatal(err)
	}
	defer admCl.Close()
	adm := kadm.NewClient(admCl)

	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	runErr := make(chan error, 1)
	go func() { runErr <- p.Run(runCtx) }()

	var t0 time.Time
	walBenchPoll(b, runErr, time.Minute, 5*time.Millisecond, "slot active", func() bool {
		var active bool
		_ = conn.QueryRow(ctx, `SELECT active FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&active)
		if active {
			t0 = time.Now()
		}
		return active
	})
	var elapsed time.Duration
	walBenchPoll(b, runErr, 10*time.Minute, 10*time.Millisecond, "every stub in Kafka", func() bool {
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		offs, err := adm.ListEndOffsets(lctx, topic)
		if err != nil {
			return false
		}
		var n int64
		offs.Each(func(o kadm.ListedOffset) { n += o.Offset })
		if n >= d.Changes {
			elapsed = time.Since(t0)
		}
		return n >= d.Changes
	})
	stop()
	if err := <-runErr; err != nil {
		b.Fatalf("publisher: %v", err)
	}
	return elapsed
}

// walBenchPoll polls cond until it holds, the publisher returns, or limit.
func walBenchPoll(b *testing.B, runErr chan error, limit, every time.Duration, what string, cond func() bool) {
	b.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		select {
		case err := <-runErr:
			b.Fatalf("%s: publisher returned early: %v", what, err)
		default:
		}
		if time.Now().After(deadline) {
			b.Fatalf("%s: not done after %s", what, limit)
		}
		time.Sleep(every)
	}
}

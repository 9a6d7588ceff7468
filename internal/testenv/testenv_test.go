package testenv

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
	"github.com/twmb/franz-go/pkg/sasl/scram"
)

func TestPostgres(t *testing.T) {
	t.Parallel()
	pg := Postgres(t)
	ctx := testContext(t)

	conn, err := pgx.Connect(ctx, pg.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var walLevel, slots, senders string
	if err := conn.QueryRow(ctx, `SELECT current_setting('wal_level'),
		current_setting('max_replication_slots'), current_setting('max_wal_senders')`).
		Scan(&walLevel, &slots, &senders); err != nil {
		t.Fatal(err)
	}
	if walLevel != "logical" || slots != "20" || senders != "20" {
		t.Fatalf("wal_level=%s max_replication_slots=%s max_wal_senders=%s, want logical 20 20", walLevel, slots, senders)
	}

	// The replication URL opens a logical replication connection.
	repl, err := pgx.Connect(ctx, pg.ReplicationURL())
	if err != nil {
		t.Fatalf("replication connection: %v", err)
	}
	defer repl.Close(ctx)
	if _, err := repl.Exec(ctx, "IDENTIFY_SYSTEM"); err != nil {
		t.Fatalf("IDENTIFY_SYSTEM: %v", err)
	}
}

func TestPostgresOptions(t *testing.T) {
	t.Parallel()
	pg := Postgres(t, WithPGArgs("-c", "wal_level=replica"), WithPassword("p@ss word/?"))
	ctx := testContext(t)

	conn, err := pgx.Connect(ctx, pg.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var walLevel string
	if err := conn.QueryRow(ctx, "SELECT current_setting('wal_level')").Scan(&walLevel); err != nil {
		t.Fatal(err)
	}
	if walLevel != "replica" {
		t.Fatalf("wal_level = %s, want replica", walLevel)
	}

	// Password authentication is really enforced over TCP.
	bad := strings.Replace(pg.URL(), "p%40ss", "wrong", 1)
	if bad == pg.URL() {
		t.Fatalf("cannot derive a wrong-password URL from %s", pg.URL())
	}
	if c, err := pgx.Connect(ctx, bad); err == nil {
		c.Close(ctx)
		t.Fatal("connecting with a wrong password succeeded")
	}
}

func TestPostgresStopStart(t *testing.T) {
	t.Parallel()
	pg := Postgres(t)
	ctx := testContext(t)
	url, port := pg.URL(), pg.Port()
	pg.Exec(t, "CREATE TABLE kept (v text)")
	pg.Exec(t, "INSERT INTO kept VALUES ($1)", "survives")

	if err := pg.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if c, err := pgx.Connect(ctx, url); err == nil {
		c.Close(ctx)
		t.Fatal("connected to a stopped server")
	}
	if err := pg.Start(ctx); err != nil {
		t.Fatal(err)
	}

	if pg.Port() != port || pg.URL() != url {
		t.Fatalf("address changed across restart: %s -> %s", url, pg.URL())
	}
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var v string
	if err := conn.QueryRow(ctx, "SELECT v FROM kept").Scan(&v); err != nil {
		t.Fatal(err)
	}
	if v != "survives" {
		t.Fatalf("got %q after restart, want %q", v, "survives")
	}
}

func TestKafka(t *testing.T) {
	t.Parallel()
	k := Kafka(t, WithPartitions(3))
	ctx := testContext(t)

	cl := newKafkaClient(t, k, "testenv")
	if err := cl.ProduceSync(ctx, kgo.StringRecord("hello")).FirstErr(); err != nil {
		t.Fatalf("produce: %v", err)
	}
	rec := consumeOne(ctx, t, cl)
	if string(rec.Value) != "hello" {
		t.Fatalf("consumed %q, want hello", rec.Value)
	}
	parts, err := topicPartitions(ctx, cl, "testenv")
	if err != nil {
		t.Fatal(err)
	}
	if parts != 3 {
		t.Fatalf("auto-created topic has %d partitions, want 3", parts)
	}

	// While paused the broker answers nothing; afterwards the same client goes on.
	if err := k.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	pausedCtx, cancel := context.WithTimeout(ctx, time.Second)
	err = cl.Ping(pausedCtx)
	cancel()
	if err == nil {
		t.Fatal("a paused broker answered")
	}
	if err := k.Unpause(ctx); err != nil {
		t.Fatal(err)
	}
	if err := cl.ProduceSync(ctx, kgo.StringRecord("after outage")).FirstErr(); err != nil {
		t.Fatalf("produce after unpause: %v", err)
	}
}

func TestKafkaSASL(t *testing.T) {
	t.Parallel()
	const user, password = "changefeed", "s3cret"
	k := Kafka(t, WithSASL("SCRAM-SHA-256", user, password))
	ctx := testContext(t)

	good := newKafkaClient(t, k, "sasl", kgo.SASL(scram.Auth{User: user, Pass: password}.AsSha256Mechanism()))
	if err := good.ProduceSync(ctx, kgo.StringRecord("authenticated")).FirstErr(); err != nil {
		t.Fatalf("produce with the right password: %v", err)
	}
	if rec := consumeOne(ctx, t, good); string(rec.Value) != "authenticated" {
		t.Fatalf("consumed %q", rec.Value)
	}

	bad := newKafkaClient(t, k, "sasl", kgo.SASL(scram.Auth{User: user, Pass: "wrong"}.AsSha256Mechanism()))
	badCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := bad.Ping(badCtx); err == nil {
		t.Fatal("a client with the wrong password got in")
	} else {
		t.Logf("wrong password rejected: %v", err)
	}

	// kfake drops unauthenticated connections, so the client retries until
	// the deadline: keep it short.
	anon := newKafkaClient(t, k, "sasl")
	anonCtx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if err := anon.ProduceSync(anonCtx, kgo.StringRecord("anonymous")).FirstErr(); err == nil {
		t.Fatal("a client without SASL could produce")
	}
}

func TestCouch(t *testing.T) {
	t.Parallel()
	s := Couch(t)
	ctx := testContext(t)

	couchDo(ctx, t, http.MethodPut, s.URL()+"/testenv", "", http.StatusCreated)
	couchDo(ctx, t, http.MethodPut, s.URL()+"/testenv/doc1", `{"hello":"world"}`, http.StatusCreated)

	var changes struct {
		Results []struct {
			ID  string          `json:"id"`
			Seq json.RawMessage `json:"seq"` // an integer on pouchdb-server, a string on CouchDB
		} `json:"results"`
	}
	decode(t, couchDo(ctx, t, http.MethodGet, s.URL()+"/testenv/_changes", "", http.StatusOK), &changes)
	if len(changes.Results) != 1 || changes.Results[0].ID != "doc1" {
		t.Fatalf("_changes = %+v, want doc1 only", changes.Results)
	}
}

func TestCouchStopStart(t *testing.T) {
	t.Parallel()
	s := Couch(t)
	ctx := testContext(t)
	url, port := s.URL(), s.Port()
	couchDo(ctx, t, http.MethodPut, url+"/kept", "", http.StatusCreated)
	couchDo(ctx, t, http.MethodPut, url+"/kept/doc", `{"v":"survives"}`, http.StatusCreated)

	if err := s.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}

	if s.Port() != port || s.URL() != url {
		t.Fatalf("address changed across restart: %s -> %s", url, s.URL())
	}
	var doc struct{ V string }
	decode(t, couchDo(ctx, t, http.MethodGet, url+"/kept/doc", "", http.StatusOK), &doc)
	if doc.V != "survives" {
		t.Fatalf("doc after restart = %+v", doc)
	}
}

func TestFreePort(t *testing.T) {
	if p := FreePort(t); p <= 0 || p > 65535 {
		t.Fatalf("FreePort() = %d", p)
	}
}

// testContext bounds a test's own operations.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func newKafkaClient(t *testing.T, k *KafkaServer, topic string, opts ...kgo.Opt) *kgo.Client {
	t.Helper()
	cl, err := kgo.NewClient(append([]kgo.Opt{
		kgo.SeedBrokers(k.Brokers()...),
		kgo.DefaultProduceTopic(topic),
		kgo.ConsumeTopics(topic),
		kgo.AllowAutoTopicCreation(),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		// Fail fast on errors the tests provoke instead of retrying for long.
		kgo.RecordDeliveryTimeout(20 * time.Second),
	}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl
}

func consumeOne(ctx context.Context, t *testing.T, cl *kgo.Client) *kgo.Record {
	t.Helper()
	for {
		fetches := cl.PollRecords(ctx, 1)
		if err := fetches.Err0(); err != nil {
			t.Fatalf("poll: %v", err)
		}
		if recs := fetches.Records(); len(recs) > 0 {
			return recs[0]
		}
	}
}

// topicPartitions asks the broker how many partitions topic has.
func topicPartitions(ctx context.Context, cl *kgo.Client, topic string) (int, error) {
	req := kmsg.NewPtrMetadataRequest()
	rt := kmsg.NewMetadataRequestTopic()
	rt.Topic = kmsg.StringPtr(topic)
	req.Topics = append(req.Topics, rt)
	resp, err := req.RequestWith(ctx, cl)
	if err != nil {
		return 0, fmt.Errorf("metadata: %w", err)
	}
	for _, tp := range resp.Topics {
		if tp.Topic != nil && *tp.Topic == topic {
			if err := kerr.ErrorForCode(tp.ErrorCode); err != nil {
				return 0, fmt.Errorf("metadata of %s: %w", topic, err)
			}
			return len(tp.Partitions), nil
		}
	}
	return 0, fmt.Errorf("topic %s not in metadata", topic)
}

func couchDo(ctx context.Context, t *testing.T, method, url, body string, want int) []byte {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, url, err)
	}
	if resp.StatusCode != want {
		t.Fatalf("%s %s: status %d, want %d: %s", method, url, resp.StatusCode, want, b)
	}
	return b
}

func decode(t *testing.T, b []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
}

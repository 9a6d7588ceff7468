package e2e_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/changefeed/changefeed/internal/testenv"
)

var (
	pillowPubOnce sync.Once
	pillowPubBin  string
	pillowPubErr  error
)

func pillowPublisherBinary(t *testing.T) string {
	t.Helper()
	pillowPubOnce.Do(func() {
		dir, err := os.MkdirTemp("", "pillow-e2e-pub-")
		if err != nil {
			pillowPubErr = err
			return
		}
		pillowPubBin = filepath.Join(dir, "cdc-publisher")
		out, err := exec.Command("go", "build", "-o", pillowPubBin, "github.com/changefeed/changefeed/cmd/cdc-publisher").CombinedOutput()
		if err != nil {
			pillowPubErr = fmt.Errorf("go build cdc-publisher: %v\n%s", err, out)
		}
	})
	if pillowPubErr != nil {
		t.Fatal(pillowPubErr)
	}
	return pillowPubBin
}

// Publisher → Kafka → pillow → SQL sink: rows inserted, updated and deleted
// in PostgreSQL appear as they are in the reporting table.
func TestPillowPublisherToReportingTable(t *testing.T) {
	r := newPillowRig(t, pillowRigOpts{})
	routing := filepath.Join(r.dir, "routing.yaml")
	if err := os.WriteFile(routing, []byte(`tables:
  - table: cases
    topic: `+pillowTopic+`
    data_source_name: cases
    document_type_column: doc_type
    id_column: id
    domain_column: domain
`), 0o600); err != nil {
		t.Fatal(err)
	}
	pub := exec.Command(pillowPublisherBinary(t))
	pub.Env = append(os.Environ(),
		"CHANGEFEED_POSTGRES_URL="+r.src.URL(),
		"CHANGEFEED_KAFKA_BROKERS="+strings.Join(r.kafka.Brokers(), ","),
		"CHANGEFEED_ROUTING_FILE="+routing,
		"CHANGEFEED_HTTP_ADDR=127.0.0.1:0",
		"CHANGEFEED_SLOT=pillow_e2e",
		"CHANGEFEED_PUBLICATION=pillow_e2e",
		"CHANGEFEED_KAFKA_REPLICATION_FACTOR=1", // kfake has one broker
		"CHANGEFEED_KAFKA_MIN_INSYNC_REPLICAS=1",
	)
	pubOut := &lockedWriter{w: new(strings.Builder)}
	pub.Stdout, pub.Stderr = pubOut, pubOut
	if err := pub.Start(); err != nil {
		t.Fatal(err)
	}
	pubDone := make(chan struct{})
	go func() { _ = pub.Wait(); close(pubDone) }()
	t.Cleanup(func() {
		_ = pub.Process.Signal(syscall.SIGTERM)
		select {
		case <-pubDone:
		case <-time.After(20 * time.Second):
			_ = pub.Process.Kill()
			<-pubDone
		}
		if t.Failed() {
			t.Logf("cdc-publisher output (tail):\n%s", tail(pubOut.String(), 3000))
		}
	})

	p := r.startPillow(r.writeFile("cases"), "--pillow", "cases")
	p.waitLog(t, "partitions assigned")
	// Writes made while the publisher is starting are not lost either.
	for i := range 50 {
		r.exec(r.srcPool, `INSERT INTO cases (id, doc_type, domain, name, n) VALUES ($1, 'case', 'demo', $2, $3)`,
			fmt.Sprintf("c-%02d", i), fmt.Sprintf("first %d", i), i)
	}
	testenv.Eventually(t, 60*time.Second, func() string { return testenv.DiffStates(r.source(), r.sink("cases")) })

	r.exec(r.srcPool, `UPDATE cases SET name = 'updated ' || id WHERE n % 3 = 0`)
	r.exec(r.srcPool, `DELETE FROM cases WHERE n % 7 = 1`)
	r.exec(r.srcPool, `BEGIN; UPDATE cases SET name = 'tx-a' WHERE id = 'c-02'; UPDATE cases SET name = 'tx-b' WHERE id = 'c-02'; COMMIT`)
	testenv.Eventually(t, 60*time.Second, func() string {
		src := r.source()
		if src["c-03"] != "updated c-03" || src["c-02"] != "tx-b" {
			return "source not as expected"
		}
		return testenv.DiffStates(src, r.sink("cases"))
	})
}

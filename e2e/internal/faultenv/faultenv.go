// Package faultenv is the harness of the publisher's crash and outage tests
// (e2e/cdcfault_*_test.go): it runs the built cdc-publisher as a child process
// that can be killed with SIGKILL and restarted, writes a workload to a real
// PostgreSQL, reads every stub back from Kafka, samples the slot's
// confirmed_flush_lsn and the topics' end offsets, and checks the results
// against the publisher's guarantees:
//
//   - every committed change is in Kafka at least once, and nothing from a
//     rolled-back transaction is;
//   - the slot is never confirmed past the lowest change not yet in Kafka
//     (CheckConfirmation: exact, from end offsets read after each sample);
//   - after a kill, a change already published is published again only if
//     its commit LSN is at or above the slot's confirmed_flush_lsn at the kill
//     (CheckDuplicates);
//   - the publisher's own checkpoint is never behind the slot.
//
// Servers come from internal/testenv. Nothing here sleeps for a condition:
// waits poll with a deadline.
package faultenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// BinEnv names a prebuilt cdc-publisher binary to use instead of building one.
const BinEnv = "CHANGEFEED_E2E_PUBLISHER_BIN"

var build struct {
	once sync.Once
	path string
	err  error
}

// PublisherBinary builds ./cmd/cdc-publisher once per test process and
// returns its path ($CHANGEFEED_E2E_PUBLISHER_BIN if set).
func PublisherBinary(t testing.TB) string {
	t.Helper()
	if p := os.Getenv(BinEnv); p != "" {
		return p
	}
	build.once.Do(func() { build.path, build.err = buildPublisher() })
	if build.err != nil {
		t.Fatalf("faultenv: %v", build.err)
	}
	return build.path
}

// binDirPrefix names the temporary directories holding built binaries.
// Without a TestMain there is no hook at the end of the process, so each
// build removes the directories of builds older than a day instead.
const binDirPrefix = "changefeed-e2e-bin-"

func buildPublisher() (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	gomod := strings.TrimSpace(string(out))
	if err != nil || gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("find the module root (go env GOMOD): %v", err)
	}
	sweepOldBinDirs()
	dir, err := os.MkdirTemp("", binDirPrefix)
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "cdc-publisher")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/cdc-publisher")
	cmd.Dir = filepath.Dir(gomod)
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/cdc-publisher: %v\n%s", err, b)
	}
	return bin, nil
}

func sweepOldBinDirs() {
	entries, err := os.ReadDir(os.TempDir())
	if err != nil {
		return
	}
	for _, e := range entries {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), binDirPrefix) {
			continue
		}
		if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > 24*time.Hour {
			_ = os.RemoveAll(filepath.Join(os.TempDir(), e.Name()))
		}
	}
}

// Poll calls cond every interval until it returns true, failing the test
// with what after limit. Every wait of the suite goes through it.
func Poll(t testing.TB, limit, interval time.Duration, what string, cond func() bool) {
	t.Helper()
	if err := PollErr(limit, interval, cond); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// PollErr is Poll returning an error instead of failing.
func PollErr(limit, interval time.Duration, cond func() bool) error {
	deadline := time.Now().Add(limit)
	for {
		if cond() {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not true after %s", limit)
		}
		time.Sleep(interval)
	}
}

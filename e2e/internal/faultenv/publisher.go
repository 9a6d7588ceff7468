package faultenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// PublisherConfig is how a test runs cmd/cdc-publisher. Settings travel in
// the environment, as in production (the URL carries a password).
type PublisherConfig struct {
	PostgresURL string
	Brokers     []string
	Slot        string
	Publication string
	// Routing is the routing file's YAML.
	Routing string
	// Env adds or overrides CHANGEFEED_* settings (e.g.
	// CHANGEFEED_STATUS_INTERVAL).
	Env map[string]string
}

// Publisher is the cdc-publisher as a child process that a test starts,
// kills and restarts. Each start is a run, with its own log file.
type Publisher struct {
	t   testing.TB
	bin string
	env []string
	dir string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when the current run's process has exited
	err  error         // the current run's Wait error
	runs int
	logs []string
}

// NewPublisher prepares a publisher; Start runs it. The process is killed when
// the test ends, and its logs are printed if the test failed.
func NewPublisher(t testing.TB, cfg PublisherConfig) *Publisher {
	t.Helper()
	dir := t.TempDir()
	routing := filepath.Join(dir, "routing.yaml")
	if err := os.WriteFile(routing, []byte(cfg.Routing), 0o600); err != nil {
		t.Fatalf("faultenv: write routing: %v", err)
	}
	settings := map[string]string{
		"CHANGEFEED_POSTGRES_URL":     cfg.PostgresURL,
		"CHANGEFEED_KAFKA_BROKERS":    strings.Join(cfg.Brokers, ","),
		"CHANGEFEED_SLOT":             cfg.Slot,
		"CHANGEFEED_PUBLICATION":      cfg.Publication,
		"CHANGEFEED_ROUTING_FILE":     routing,
		"CHANGEFEED_HTTP_ADDR":        "127.0.0.1:0",
		"CHANGEFEED_KAFKA_PARTITIONS": "3",
		// kfake has one broker.
		"CHANGEFEED_KAFKA_REPLICATION_FACTOR":  "1",
		"CHANGEFEED_KAFKA_MIN_INSYNC_REPLICAS": "1",
		"CHANGEFEED_LOG_LEVEL":                 "info",
	}
	for k, v := range cfg.Env {
		settings[k] = v
	}
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CHANGEFEED_") {
			env = append(env, kv)
		}
	}
	keys := make([]string, 0, len(settings))
	for k := range settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		env = append(env, k+"="+settings[k])
	}
	p := &Publisher{t: t, bin: PublisherBinary(t), env: env, dir: dir}
	t.Cleanup(func() {
		p.mu.Lock()
		running := p.cmd != nil && !p.exited()
		p.mu.Unlock()
		if running {
			_ = p.signal(syscall.SIGKILL)
			p.wait(10 * time.Second)
		}
		if t.Failed() {
			for i, path := range p.logs {
				t.Logf("cdc-publisher run %d log (last 40 lines of %s):\n%s", i, path, tailFile(path, 40))
			}
		}
	})
	return p
}

// Start begins a new run. The previous run must have exited.
// SetEnv changes one setting for the runs started after it.
func (p *Publisher) SetEnv(key, value string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	prefix := key + "="
	for i, kv := range p.env {
		if strings.HasPrefix(kv, prefix) {
			p.env[i] = prefix + value
			return
		}
	}
	p.env = append(p.env, prefix+value)
}

func (p *Publisher) Start(t testing.TB) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil && !p.exited() {
		t.Fatalf("faultenv: publisher run %d is still running", p.runs-1)
	}
	logPath := filepath.Join(p.dir, fmt.Sprintf("run-%d.log", p.runs))
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatalf("faultenv: %v", err)
	}
	cmd := exec.Command(p.bin)
	cmd.Env = p.env
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("faultenv: start cdc-publisher: %v", err)
	}
	done := make(chan struct{})
	p.cmd, p.done, p.err = cmd, done, nil
	p.logs = append(p.logs, logPath)
	p.runs++
	go func() {
		err := cmd.Wait()
		f.Close()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(done)
	}()
}

// Runs is the number of starts so far.
func (p *Publisher) Runs() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.runs
}

// Done is closed when the current run's process exits.
func (p *Publisher) Done() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.done
}

// Running reports whether the current run's process is alive.
func (p *Publisher) Running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd != nil && !p.exited()
}

func (p *Publisher) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Kill sends SIGKILL and waits until the process is gone.
func (p *Publisher) Kill(t testing.TB) {
	t.Helper()
	if err := p.signal(syscall.SIGKILL); err != nil {
		t.Fatalf("faultenv: kill publisher: %v", err)
	}
	if !p.wait(10 * time.Second) {
		t.Fatalf("faultenv: publisher still alive 10s after SIGKILL")
	}
}

// Stop sends SIGTERM and returns the exit code, failing the test if the
// process does not exit within limit.
func (p *Publisher) Stop(t testing.TB, limit time.Duration) int {
	t.Helper()
	if err := p.signal(syscall.SIGTERM); err != nil {
		t.Fatalf("faultenv: stop publisher: %v", err)
	}
	if !p.wait(limit) {
		t.Fatalf("faultenv: publisher did not exit within %s of SIGTERM", limit)
	}
	return p.ExitCode()
}

// ExitCode is the exited run's status (-1 for a signal).
func (p *Publisher) ExitCode() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.cmd.ProcessState == nil {
		return -1
	}
	return p.cmd.ProcessState.ExitCode()
}

// Log is the current run's output so far.
func (p *Publisher) Log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.logs) == 0 {
		return ""
	}
	b, _ := os.ReadFile(p.logs[len(p.logs)-1])
	return string(b)
}

func (p *Publisher) signal(sig os.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return errors.New("not started")
	}
	if p.exited() {
		return fmt.Errorf("run %d already exited: %v", p.runs-1, p.err)
	}
	return p.cmd.Process.Signal(sig)
}

func (p *Publisher) wait(limit time.Duration) bool {
	select {
	case <-p.Done():
		return true
	case <-time.After(limit):
		return false
	}
}

func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

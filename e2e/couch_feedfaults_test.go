package e2e_test

import (
	"bufio"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

// couchFault is what the fault proxy does to one _changes request.
type couchFault int

const (
	couchPass       couchFault = iota // forward
	couchTruncate                     // forward, then cut the connection inside a row
	couchHTML                         // 502 with an HTML page, as a proxy sends
	couchThrottle                     // 429 with Retry-After
	couchSilent                       // 200, then nothing at all: no rows, no heartbeats
	couchGarbage200                   // 200 with an HTML page
)

func (f couchFault) String() string {
	return [...]string{"pass", "truncate", "html", "throttle", "silent", "garbage200"}[f]
}

// couchFaultProxy forwards to CouchDB and applies a scripted fault to each
// successive _changes request.
type couchFaultProxy struct {
	srv    *httptest.Server
	mu     sync.Mutex
	script []couchFault
	seen   []couchSeen
}

type couchSeen struct {
	at    time.Time
	fault couchFault
	query url.Values
}

func newCouchFaultProxy(t *testing.T, target string, script ...couchFault) *couchFaultProxy {
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	p := &couchFaultProxy{script: script}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.FlushInterval = -1
	rp.Transport = &http.Transport{DisableCompression: true}
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasSuffix(r.URL.Path, "/_changes") {
			rp.ServeHTTP(w, r)
			return
		}
		p.mu.Lock()
		fault := couchPass
		if len(p.script) > 0 {
			fault, p.script = p.script[0], p.script[1:]
		}
		p.seen = append(p.seen, couchSeen{at: time.Now(), fault: fault, query: r.URL.Query()})
		p.mu.Unlock()
		switch fault {
		case couchPass:
			rp.ServeHTTP(w, r)
		case couchTruncate:
			p.truncate(t, u, w, r)
		case couchHTML:
			w.Header().Set("Content-Type", "text/html")
			w.WriteHeader(http.StatusBadGateway)
			_, _ = io.WriteString(w, "<html><body><h1>502 Bad Gateway</h1></body></html>")
		case couchThrottle:
			w.Header().Set("Retry-After", "2")
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusTooManyRequests)
			_, _ = io.WriteString(w, `{"error":"too_many_requests","reason":"slow down"}`)
		case couchSilent:
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		case couchGarbage200:
			w.Header().Set("Content-Type", "text/html")
			_, _ = io.WriteString(w, "<html><body>Service Unavailable</body></html>\n")
		}
	}))
	t.Cleanup(p.srv.Close)
	return p
}

// truncate forwards the request and copies the response until the middle
// of its second row, then drops the connection.
func (p *couchFaultProxy) truncate(t *testing.T, target *url.URL, w http.ResponseWriter, r *http.Request) {
	req, err := http.NewRequestWithContext(r.Context(), r.Method, target.String()+r.URL.RequestURI(), r.Body)
	if err != nil {
		t.Error(err)
		return
	}
	req.Header = r.Header.Clone()
	if u := target.User; u != nil {
		pw, _ := u.Password()
		req.SetBasicAuth(u.Username(), pw)
	}
	resp, err := (&http.Client{Transport: &http.Transport{DisableCompression: true}}).Do(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	w.WriteHeader(resp.StatusCode)
	br := bufio.NewReader(resp.Body)
	line, _ := br.ReadString('}') // into the first row
	_, _ = io.WriteString(w, line)
	w.(http.Flusher).Flush()
	// Drop the connection without ending the chunked body properly.
	panic(http.ErrAbortHandler)
}

func (p *couchFaultProxy) requests() []couchSeen {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]couchSeen(nil), p.seen...)
}

// TestCouchFeedFaults puts a fault-injecting proxy between the follower and
// CouchDB: a row cut mid-way, an HTML error page (502 and 200), a 429 with
// Retry-After, and two feeds that stay silent from their first byte. The
// follower must retry each without losing a change, wait as Retry-After
// asks, detect the silent feeds by its read deadline and fall back to
// longpoll. A second follower with wrong credentials must stop with a clear
// error, a non-zero exit and no password in its output.
func TestCouchFeedFaults(t *testing.T) {
	const db = "faults"
	e := couchSetup(t)
	ctx := couchCtx(t, 2*time.Minute)
	e.createDB(ctx, db)
	want := e.bulk(ctx, db, couchDocs("f", 0, 300, map[string]any{"doc_type": "Domain", "name": "dom"}))

	proxy := newCouchFaultProxy(t, e.couch.URL(),
		couchTruncate, couchHTML, couchGarbage200, couchThrottle, couchSilent, couchSilent)
	base := proxy.srv.URL
	if u, _ := url.Parse(e.couch.URL()); u.User != nil {
		base = strings.Replace(base, "://", "://"+u.User.String()+"@", 1)
	}
	f := e.startFollower(e.followerEnv(base, db))
	kc := e.consume(db, "domain")
	kc.waitRevs(t, 60*time.Second, want)
	more := e.bulk(ctx, db, couchDocs("g", 0, 50, map[string]any{"doc_type": "Domain", "name": "dom"}))
	kc.waitRevs(t, 30*time.Second, more)

	seen := proxy.requests()
	var faults []string
	for _, s := range seen {
		faults = append(faults, s.fault.String()+"/"+s.query.Get("feed"))
	}
	t.Logf("feed requests: %v", faults)
	if len(seen) < 7 {
		t.Fatalf("%d feed requests, want the six faults and a working feed", len(seen))
	}
	for i, s := range seen[:6] {
		if s.query.Get("feed") != "continuous" {
			t.Errorf("request %d (%s) used feed=%s, want continuous", i, s.fault, s.query.Get("feed"))
		}
	}
	if wait := seen[4].at.Sub(seen[3].at); wait < 2*time.Second {
		t.Errorf("the request after a 429 with Retry-After: 2 came %s later", wait)
	}
	// Two feeds silent from their first byte: the follower assumes a
	// buffering proxy and falls back to longpoll.
	if wait := seen[6].at.Sub(seen[5].at); wait < 2*time.Second {
		t.Errorf("a silent feed was abandoned after %s, before its read timeout", wait)
	}
	if got := seen[6].query.Get("feed"); got != "longpoll" {
		t.Errorf("after two silent feeds the follower asked for feed=%s, want longpoll", got)
	}
	if len(f.stderr.grep("falling back to longpoll")) == 0 {
		t.Error("no log line for the longpoll fallback")
	}
	for reason, min := range map[string]float64{"server_error": 2, "throttled": 1, "silent": 2} {
		if n := f.metric("changefeed_couch_feed_reconnects_total", `db="faults"`, `reason="`+reason+`"`); n < min {
			t.Errorf("reconnects{reason=%s} = %v, want ≥ %v", reason, n, min)
		}
	}
	if code, _ := f.get("/healthz"); code != http.StatusOK {
		t.Errorf("healthz = %d after retried faults", code)
	}
	f.stop()

	// Wrong credentials: a clear error and a non-zero exit, no password.
	bad, _ := url.Parse(e.couch.URL())
	bad.User = url.UserPassword("nobody", "hunter22-wrong")
	cmd := exec.CommandContext(ctx, e.bin)
	cmd.Env = append(cmd.Environ(), e.followerEnv(bad.String(), db)...)
	out, err := cmd.CombinedOutput()
	exit, ok := err.(*exec.ExitError)
	if !ok || exit.ExitCode() != 1 {
		t.Fatalf("wrong credentials: exit %v, want status 1\n%s", err, out)
	}
	if !strings.Contains(string(out), "refused the credentials") {
		t.Errorf("wrong credentials: no clear error in\n%s", out)
	}
	if strings.Contains(string(out), "hunter22") {
		t.Errorf("the password appears in the output:\n%s", out)
	}
}

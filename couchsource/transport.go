package couchsource

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// ErrFeedSilent is the error of a feed read that received nothing, not even
// a heartbeat newline, for the read timeout: the connection is up but dead
// (a stuck proxy, a half-open TCP connection). The feed is reconnected.
var ErrFeedSilent = errors.New("feed silent: no data and no heartbeat within the read timeout")

// requestKind tells the transport what a request is for. kivik builds the
// requests; the transport adds what kivik cannot express (a read deadline
// that heartbeats reset, the field projection, the _selector body).
type requestKind struct {
	// project is the set of document fields to keep; nil: no projection.
	project map[string]bool
	// docMode projects a document response instead of a feed.
	docMode bool
	// readTimeout bounds every read of the response body.
	readTimeout time.Duration
	// selector is the JSON body of a _changes?filter=_selector request.
	selector []byte
	// bytes counts bytes received from the server (heartbeats included).
	bytes atomic.Int64
}

type kindKey struct{}

func withKind(ctx context.Context, k *requestKind) context.Context {
	return context.WithValue(ctx, kindKey{}, k)
}

// transport wraps the HTTP transport kivik uses.
type transport struct {
	base http.RoundTripper
}

// newHTTPTransport returns the base transport. Compression is disabled:
// servers that gzip a live feed (pouchdb-server) buffer it until the
// response ends, and a feed never ends.
func newHTTPTransport(headerTimeout time.Duration) *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.DisableCompression = true
	t.ResponseHeaderTimeout = headerTimeout
	t.MaxIdleConnsPerHost = 16
	return t
}

func (t *transport) RoundTrip(req *http.Request) (*http.Response, error) {
	k, _ := req.Context().Value(kindKey{}).(*requestKind)
	if k == nil {
		return t.base.RoundTrip(req)
	}
	if k.selector != nil {
		r := req.Clone(req.Context())
		r.Body = io.NopCloser(bytes.NewReader(k.selector))
		r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(k.selector)), nil }
		r.ContentLength = int64(len(k.selector))
		r.Header.Set("Content-Type", "application/json")
		r.Header.Del("Content-Encoding")
		req = r
	}
	resp, err := t.base.RoundTrip(req)
	if err != nil || resp.StatusCode >= 300 {
		return resp, err
	}
	var body io.ReadCloser = resp.Body
	if k.readTimeout > 0 {
		body = newDeadlineBody(body, k.readTimeout, &k.bytes)
	}
	if k.project != nil {
		body = projectStream(body, k.project, k.docMode)
		resp.ContentLength = -1
		resp.Header.Del("Content-Length")
	}
	resp.Body = body
	return resp, nil
}

// deadlineBody fails a Read that waits longer than timeout for data. The
// deadline applies only while a Read waits: a consumer that is slow to read
// (Kafka applying back-pressure) does not trip it.
type deadlineBody struct {
	rc      io.ReadCloser
	timeout time.Duration
	count   *atomic.Int64

	mu     sync.Mutex
	timer  *time.Timer
	silent bool
}

func newDeadlineBody(rc io.ReadCloser, timeout time.Duration, count *atomic.Int64) *deadlineBody {
	b := &deadlineBody{rc: rc, timeout: timeout, count: count}
	b.timer = time.AfterFunc(time.Hour, b.expire)
	b.timer.Stop()
	return b
}

func (b *deadlineBody) expire() {
	b.mu.Lock()
	b.silent = true
	b.mu.Unlock()
	b.rc.Close() // unblocks the pending Read
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	b.timer.Reset(b.timeout)
	n, err := b.rc.Read(p)
	b.timer.Stop()
	b.count.Add(int64(n))
	b.mu.Lock()
	silent := b.silent
	b.mu.Unlock()
	if silent {
		return n, fmt.Errorf("%w (%s)", ErrFeedSilent, b.timeout)
	}
	return n, err
}

func (b *deadlineBody) Close() error {
	b.timer.Stop()
	return b.rc.Close()
}

// retryAfter returns the delay a 429 or 503 response asks for, if any.
func retryAfter(resp *http.Response) (time.Duration, bool) {
	if resp == nil {
		return 0, false
	}
	v := strings.TrimSpace(resp.Header.Get("Retry-After"))
	if v == "" {
		return 0, false
	}
	if secs, err := strconv.Atoi(v); err == nil && secs >= 0 {
		return time.Duration(secs) * time.Second, true
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(time.Until(t), 0), true
	}
	return 0, false
}

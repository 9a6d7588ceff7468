package kafkaconn

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/plugin/kslog"
)

// LogRepeatWindow is how long franz-go's log lines with the same message are
// held back after the first: the client retries a broker every few hundred
// milliseconds, and an outage must not flood the log.
const LogRepeatWindow = time.Minute

// Logger routes franz-go's own log lines (broker connection failures, SASL
// errors, data-loss notices) through log at WARN and above, with the
// attribute "component=franz-go". A message repeated within LogRepeatWindow
// is logged once; the next line after the window says how many were held
// back ("repeated").
func Logger(log *slog.Logger) kgo.Opt {
	h := &quietHandler{inner: log.Handler(), state: &quietState{last: map[string]*repeat{}}}
	return kgo.WithLogger(kslog.New(slog.New(h).With("component", "franz-go")))
}

type repeat struct {
	at   time.Time
	held int
}

type quietState struct {
	mu   sync.Mutex
	last map[string]*repeat
}

// quietHandler drops records below WARN and repeats of one message within
// LogRepeatWindow.
type quietHandler struct {
	inner slog.Handler
	state *quietState
}

func (h *quietHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelWarn && h.inner.Enabled(ctx, l)
}

func (h *quietHandler) Handle(ctx context.Context, r slog.Record) error {
	h.state.mu.Lock()
	rep := h.state.last[r.Message]
	if rep != nil && r.Time.Sub(rep.at) < LogRepeatWindow {
		rep.held++
		h.state.mu.Unlock()
		return nil
	}
	held := 0
	if rep == nil {
		if len(h.state.last) > 1000 {
			// Messages are a fixed set of strings; this only bounds
			// memory against a surprise.
			clear(h.state.last)
		}
		rep = &repeat{}
		h.state.last[r.Message] = rep
	}
	held, rep.held, rep.at = rep.held, 0, r.Time
	h.state.mu.Unlock()
	if held > 0 {
		r = r.Clone()
		r.AddAttrs(slog.Int("repeated", held))
	}
	return h.inner.Handle(ctx, r)
}

func (h *quietHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &quietHandler{inner: h.inner.WithAttrs(as), state: h.state}
}

func (h *quietHandler) WithGroup(name string) slog.Handler {
	return &quietHandler{inner: h.inner.WithGroup(name), state: h.state}
}

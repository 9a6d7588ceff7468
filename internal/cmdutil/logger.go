package cmdutil

import (
	"io"
	"log/slog"
)

// ParseLevel parses a log level: debug, info, warn or error (any case,
// optionally with an offset such as "info+2"). On error it returns
// slog.LevelInfo with the error.
func ParseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return slog.LevelInfo, err
	}
	return l, nil
}

// NewLogger returns a logger writing JSON lines to w from level up; a level
// ParseLevel refuses means info. A non-empty component is added to every
// record as "component". wrap, when not nil, wraps the JSON handler (for
// example to mask secrets).
func NewLogger(w io.Writer, level, component string, wrap func(slog.Handler) slog.Handler) *slog.Logger {
	l, _ := ParseLevel(level)
	var h slog.Handler = slog.NewJSONHandler(w, &slog.HandlerOptions{Level: l})
	if wrap != nil {
		h = wrap(h)
	}
	log := slog.New(h)
	if component != "" {
		log = log.With("component", component)
	}
	return log
}

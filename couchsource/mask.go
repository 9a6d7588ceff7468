package couchsource

import (
	"context"
	"log/slog"
	"net/url"
	"slices"
	"strings"
)

// Masked replaces a secret in logs and errors.
const Masked = "xxxxx"

// Masker removes secrets (passwords, and the user:password part of URLs)
// from text. The zero value masks URL credentials only.
type Masker struct {
	secrets []string
}

// NewMasker masks the given secrets wherever they appear, in plain and in
// URL-escaped form. Empty strings are ignored.
func NewMasker(secrets ...string) *Masker {
	m := &Masker{}
	for _, s := range secrets {
		m.Add(s)
	}
	return m
}

// Add adds a secret. Secrets shorter than 3 bytes are masked only inside
// URLs: replacing every "a" of a log line would make it unreadable.
func (m *Masker) Add(secret string) {
	if len(secret) < 3 {
		return
	}
	for _, s := range []string{secret, url.QueryEscape(secret), url.PathEscape(secret), url.UserPassword("u", secret).String()[2:]} {
		if s != "" && !slices.Contains(m.secrets, s) {
			m.secrets = append(m.secrets, s)
		}
	}
}

// String masks the secrets and any URL credentials in s.
func (m *Masker) String(s string) string {
	if m != nil {
		for _, secret := range m.secrets {
			s = strings.ReplaceAll(s, secret, Masked)
		}
	}
	return maskURLUserinfo(s)
}

// Error returns err with its message masked; errors.Is and errors.As still
// see the original chain.
func (m *Masker) Error(err error) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	if masked := m.String(msg); masked != msg {
		return &maskedError{msg: masked, err: err}
	}
	return err
}

type maskedError struct {
	msg string
	err error
}

func (e *maskedError) Error() string { return e.msg }
func (e *maskedError) Unwrap() error { return e.err }

// maskURLUserinfo replaces the password of every scheme://user:password@
// in s, even in text that is not a valid URL (a parse error echoing it).
func maskURLUserinfo(s string) string {
	var b strings.Builder
	for {
		i := strings.Index(s, "://")
		if i < 0 {
			b.WriteString(s)
			return b.String()
		}
		b.WriteString(s[:i+3])
		s = s[i+3:]
		// The authority ends at the first '/', '?', '#', whitespace or quote;
		// its userinfo ends at the last '@' before that.
		end := strings.IndexAny(s, "/?# \t\n\"'`")
		if end < 0 {
			end = len(s)
		}
		at := strings.LastIndexByte(s[:end], '@')
		if at < 0 {
			continue
		}
		user := s[:at]
		if c := strings.IndexByte(user, ':'); c >= 0 {
			user = user[:c] + ":" + Masked
		}
		b.WriteString(user)
		b.WriteByte('@')
		s = s[at+1:]
	}
}

// RedactURL returns the URL with its password masked, for logs.
func RedactURL(raw string) string { return maskURLUserinfo(raw) }

// MaskingHandler is a slog.Handler that masks every message and string
// attribute (including errors) before passing the record on, so that no
// log line carries a secret, whichever package wrote it.
type MaskingHandler struct {
	next slog.Handler
	m    *Masker
}

// NewMaskingHandler wraps next.
func NewMaskingHandler(next slog.Handler, m *Masker) *MaskingHandler {
	return &MaskingHandler{next: next, m: m}
}

func (h *MaskingHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.next.Enabled(ctx, l)
}

func (h *MaskingHandler) Handle(ctx context.Context, r slog.Record) error {
	out := slog.NewRecord(r.Time, r.Level, h.m.String(r.Message), r.PC)
	r.Attrs(func(a slog.Attr) bool {
		out.AddAttrs(h.attr(a))
		return true
	})
	return h.next.Handle(ctx, out)
}

func (h *MaskingHandler) attr(a slog.Attr) slog.Attr {
	v := a.Value.Resolve()
	switch v.Kind() {
	case slog.KindString:
		return slog.String(a.Key, h.m.String(v.String()))
	case slog.KindGroup:
		attrs := v.Group()
		out := make([]any, len(attrs))
		for i, g := range attrs {
			out[i] = h.attr(g)
		}
		return slog.Group(a.Key, out...)
	case slog.KindAny:
		if err, ok := v.Any().(error); ok {
			return slog.String(a.Key, h.m.String(err.Error()))
		}
		if s, ok := v.Any().(interface{ String() string }); ok {
			return slog.String(a.Key, h.m.String(s.String()))
		}
		return a
	default:
		return a
	}
}

func (h *MaskingHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	masked := make([]slog.Attr, len(attrs))
	for i, a := range attrs {
		masked[i] = h.attr(a)
	}
	return &MaskingHandler{next: h.next.WithAttrs(masked), m: h.m}
}

func (h *MaskingHandler) WithGroup(name string) slog.Handler {
	return &MaskingHandler{next: h.next.WithGroup(name), m: h.m}
}

package couchsource

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

func TestCouchMaskerString(t *testing.T) {
	m := NewMasker("s3cr/et@x", "", "pw", "pa ss")
	tests := []struct{ in, want string }{
		{"http://admin:s3cr%2Fet%40x@couch:5984/db", "http://admin:xxxxx@couch:5984/db"},
		{`Get "https://u:whatever@host/x": dial tcp`, `Get "https://u:xxxxx@host/x": dial tcp`},
		// A URL that does not parse, echoed by a parser: known secrets
		// are masked wherever they are.
		{"parse \"http://u:pa ss@h\": invalid character", "parse \"http://u:xxxxx@h\": invalid character"},
		{"password s3cr/et@x in a message", "password xxxxx in a message"},
		{"escaped s3cr%2Fet%40x too", "escaped xxxxx too"},
		{"http://user@host/ has no password", "http://user@host/ has no password"},
		{"postgres://cf:pw@db:5432/x?sslmode=disable", "postgres://cf:xxxxx@db:5432/x?sslmode=disable"},
		{"a short pw is only masked in URLs", "a short pw is only masked in URLs"},
		{"two http://a:b@h1 and http://c:d@h2", "two http://a:xxxxx@h1 and http://c:xxxxx@h2"},
	}
	for _, tt := range tests {
		if got := m.String(tt.in); got != tt.want {
			t.Errorf("String(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

var errTest = errors.New("sentinel")

func TestCouchMaskerError(t *testing.T) {
	m := NewMasker("hunter22")
	err := m.Error(fmt.Errorf("connect http://a:hunter22@h: %w", errTest))
	if strings.Contains(err.Error(), "hunter22") {
		t.Fatalf("not masked: %v", err)
	}
	if !errors.Is(err, errTest) {
		t.Fatal("masking lost the error chain")
	}
	if m.Error(nil) != nil {
		t.Fatal("nil error became non-nil")
	}
}

type stringer struct{ s string }

func (s stringer) String() string { return s.s }

func TestCouchMaskingHandler(t *testing.T) {
	var buf bytes.Buffer
	m := NewMasker("hunter22")
	log := slog.New(NewMaskingHandler(slog.NewJSONHandler(&buf, nil), m))
	log = log.With("url", "http://u:hunter22@host:5984")
	log.WithGroup("g").Info("failed with hunter22",
		"err", errors.New("Post \"http://admin:hunter22@h/db/_changes\": EOF"),
		"s", stringer{"dsn postgres://x:hunter22@pg/db"},
		"n", 42,
		slog.Group("inner", "pw", "hunter22"))
	out := buf.String()
	if strings.Contains(out, "hunter22") {
		t.Fatalf("secret in log line: %s", out)
	}
	for _, want := range []string{`"n":42`, "xxxxx", `"inner"`} {
		if !strings.Contains(out, want) {
			t.Errorf("log line lacks %s: %s", want, out)
		}
	}
}

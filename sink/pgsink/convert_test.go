package pgsink

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestConvert(t *testing.T) {
	tests := []struct {
		typ  string
		in   any
		want string // "" with err set
		err  string
	}{
		{"text", "a", "a", ""},
		{"text", json.Number("1.50"), "1.50", ""},
		{"text", 2.5, "2.5", ""},
		{"text", true, "true", ""},
		{"text", map[string]any{"k": "v"}, `{"k":"v"}`, ""},
		{"text", "a\x00", "", "NUL"},
		{"text", "\xff", "", "UTF-8"},
		{"integer", json.Number("2147483647"), "2147483647", ""},
		{"integer", json.Number("2147483648"), "", "out of range"},
		{"integer", json.Number("1e3"), "1000", ""},
		{"integer", 3.0, "3", ""},
		{"integer", 3.5, "", "not an integer"},
		{"integer", " 12 ", "12", ""},
		{"integer", "0x10", "", "not an integer"},
		{"integer", true, "", "not an integer"},
		{"integer", "+5", "5", ""},
		{"integer", "007", "7", ""},
		{"integer", json.Number("-0"), "0", ""},
		{"integer", " -2147483648", "-2147483648", ""},
		{"integer", "-2147483649", "", "out of range for a 32-bit integer"},
		{"integer", "1_000", "", "not an integer"},
		{"bigint", "9223372036854775807", "9223372036854775807", ""},
		{"bigint", json.Number("99999999999999999999"), "", "out of range for a 64-bit integer"},
		{"bigint", json.Number("12.0"), "12", ""},
		{"bigint", json.Number("-9223372036854775808"), "-9223372036854775808", ""},
		{"bigint", json.Number("9223372036854775808"), "", "out of range"},
		{"numeric", json.Number("12345678901234567890.000000001"), "12345678901234567890.000000001", ""},
		{"numeric", "1/3", "", "not a number"},
		{"numeric", 0.1, "0.1", ""},
		{"boolean", "true", "true", ""},
		{"boolean", "F", "false", ""},
		{"boolean", 1, "", "not a boolean"},
		{"timestamptz", "2024-02-29T13:14:15Z", "2024-02-29T13:14:15Z", ""},
		{"timestamptz", "2024-02-29T13:14:15.5+02:00", "2024-02-29T13:14:15.5+02:00", ""},
		{"timestamptz", "2024-02-29T13:14:15.123456", "2024-02-29T13:14:15.123456Z", ""},
		{"timestamptz", "2024-02-29", "2024-02-29T00:00:00Z", ""},
		{"timestamptz", time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC), "2024-01-02T03:04:05Z", ""},
		{"timestamptz", json.Number("1700000000"), "", "not a timestamp"},
		{"jsonb", map[string]any{"a": []any{json.Number("1.0"), nil}}, `{"a":[1.0,null]}`, ""},
		{"jsonb", "x\x00", "", `\u0000`},
		{"jsonb", `back\slash u0000`, `"back\\slash u0000"`, ""},
		{"jsonb", `\u0000 literally`, `"\\u0000 literally"`, ""},
	}
	for _, tt := range tests {
		got, err := columnTypes[tt.typ](tt.in)
		switch {
		case tt.err == "" && (err != nil || got != tt.want):
			t.Errorf("%s(%#v) = %q, %v; want %q", tt.typ, tt.in, got, err, tt.want)
		case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)):
			t.Errorf("%s(%#v) = %q, %v; want error containing %q", tt.typ, tt.in, got, err, tt.err)
		}
	}
}

func TestLookup(t *testing.T) {
	body := map[string]any{"form": map[string]any{"meta": map[string]any{"user": "u"}, "items": []any{"a", map[string]any{"b": 2}}}}
	tests := []struct {
		path string
		want any
		ok   bool
	}{
		{"form.meta.user", "u", true},
		{"form.items.0", "a", true},
		{"form.items.1.b", 2, true},
		{"form.items.2", nil, false},
		{"form.meta.user.x", nil, false},
		{"nope", nil, false},
	}
	for _, tt := range tests {
		got, ok := lookup(body, strings.Split(tt.path, "."))
		if ok != tt.ok || got != tt.want {
			t.Errorf("lookup(%s) = %v, %v; want %v, %v", tt.path, got, ok, tt.want, tt.ok)
		}
	}
}

func TestArrayLiteral(t *testing.T) {
	if got := arrayLiteral([]string{"3-c", `we"ird\`}); got != `{"3-c","we\"ird\\"}` {
		t.Fatalf("arrayLiteral = %s", got)
	}
	if got := arrayLiteral(nil); got != "{}" {
		t.Fatalf("arrayLiteral(nil) = %s", got)
	}
}

package cdc

import (
	"errors"
	"testing"
)

func TestAppendKeyIDIsInjective(t *testing.T) {
	parts := func(ss ...string) []colVal {
		var out []colVal
		for _, s := range ss {
			out = append(out, colVal{kind: 't', data: []byte(s)})
		}
		return out
	}
	seen := map[string][]string{}
	for _, key := range [][]string{
		{"a/b", "c"}, {"a", "b/c"}, {"a%2Fb", "c"}, {"a", "b%2Fc"}, {"a%", "2Fb"}, {"", "a/b"}, {"a/b", ""}, {"%", "/"}, {"%2", "5"},
	} {
		id, err := appendKeyID(nil, parts(key...))
		if err != nil {
			t.Fatal(err)
		}
		if other, dup := seen[string(id)]; dup {
			t.Fatalf("%q and %q both encode as %q", other, key, id)
		}
		seen[string(id)] = key
	}
	if id, _ := appendKeyID(nil, parts("a/b", "c%")); string(id) != "a%2Fb/c%25" {
		t.Fatalf("id = %q", id)
	}
	if _, err := appendKeyID(nil, []colVal{{kind: 't', data: []byte("a")}, {kind: 'n'}}); !errors.Is(err, errBadID) {
		t.Fatalf("null key part: %v", err)
	}
}

func TestCheckIDRefusesInvalidUTF8(t *testing.T) {
	if err := checkID([]byte("x\xff")); !errors.Is(err, errBadID) {
		t.Fatalf("checkID = %v", err)
	}
	if err := checkID([]byte("é/\u2028")); err != nil {
		t.Fatalf("checkID = %v", err)
	}
}

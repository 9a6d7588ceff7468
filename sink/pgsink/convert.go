package pgsink

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/big"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// Column types a Column may have, with the function that turns a body value
// into the text PostgreSQL parses for that type. Values are converted in Go
// so that a value the column cannot hold is that document's error, found
// before the batch is sent, rather than a failure of the whole statement.
var columnTypes = map[string]func(any) (string, error){
	"text":        toText,
	"integer":     func(v any) (string, error) { return toInteger(v, 32) },
	"bigint":      func(v any) (string, error) { return toInteger(v, 64) },
	"numeric":     toNumeric,
	"boolean":     toBoolean,
	"timestamptz": toTimestamptz,
	"jsonb":       toJSONB,
}

// pgTypeName is how format_type names each column type, for Bootstrap's
// check of an existing table.
var pgTypeName = map[string]string{
	"text":        "text",
	"integer":     "integer",
	"bigint":      "bigint",
	"numeric":     "numeric",
	"boolean":     "boolean",
	"timestamptz": "timestamp with time zone",
	"jsonb":       "jsonb",
}

// lookup returns the value at a dotted path ("form.meta.userID"); a segment
// that is a number indexes an array. Missing is reported by ok == false.
func lookup(body map[string]any, path []string) (v any, ok bool) {
	v = body
	for _, seg := range path {
		switch c := v.(type) {
		case map[string]any:
			if v, ok = c[seg]; !ok {
				return nil, false
			}
		case []any:
			i, err := strconv.Atoi(seg)
			if err != nil || i < 0 || i >= len(c) {
				return nil, false
			}
			v = c[i]
		default:
			return nil, false
		}
	}
	return v, true
}

func checkText(s string) (string, error) {
	switch {
	case !utf8.ValidString(s):
		return "", errors.New("not valid UTF-8")
	case strings.IndexByte(s, 0) >= 0:
		return "", errors.New("contains a NUL character, which PostgreSQL text cannot hold")
	}
	return s, nil
}

func toText(v any) (string, error) {
	switch x := v.(type) {
	case string:
		return checkText(x)
	case json.Number:
		return x.String(), nil
	case bool:
		return strconv.FormatBool(x), nil
	case float64:
		return strconv.FormatFloat(x, 'f', -1, 64), nil
	case float32:
		return strconv.FormatFloat(float64(x), 'f', -1, 32), nil
	case int, int8, int16, int32, int64, uint, uint8, uint16, uint32, uint64:
		return fmt.Sprint(x), nil
	case time.Time:
		return x.Format(time.RFC3339Nano), nil
	default:
		b, err := json.Marshal(x)
		if err != nil {
			return "", err
		}
		return checkText(string(b))
	}
}

func toInteger(v any, bits int) (string, error) {
	var r *big.Rat
	switch x := v.(type) {
	case int:
		r = new(big.Rat).SetInt64(int64(x))
	case int8, int16, int32, int64:
		r, _ = new(big.Rat).SetString(fmt.Sprint(x))
	case uint, uint8, uint16, uint32, uint64:
		r, _ = new(big.Rat).SetString(fmt.Sprint(x))
	case float64:
		if math.IsNaN(x) || math.IsInf(x, 0) {
			return "", fmt.Errorf("%v is not an integer", x)
		}
		r = new(big.Rat)
		r.SetFloat64(x)
	case float32:
		return toInteger(float64(x), bits)
	case json.Number:
		if s, ok := plainInteger(string(x), bits); ok {
			return s, nil
		}
		r = parseDecimal(string(x))
	case string:
		t := strings.TrimSpace(x)
		if s, ok := plainInteger(t, bits); ok {
			return s, nil
		}
		r = parseDecimal(t)
	default:
		return "", fmt.Errorf("%T is not an integer", v)
	}
	if r == nil || !r.IsInt() {
		return "", fmt.Errorf("%v is not an integer", v)
	}
	n := r.Num()
	if !n.IsInt64() {
		return "", fmt.Errorf("%v is out of range for a %d-bit integer", v, bits)
	}
	i := n.Int64()
	if bits == 32 && (i < math.MinInt32 || i > math.MaxInt32) {
		return "", fmt.Errorf("%v is out of range for a %d-bit integer", v, bits)
	}
	return strconv.FormatInt(i, 10), nil
}

// plainInteger is toInteger's fast path for s made of an optional sign and
// decimal digits that fit in 64 bits: the same result as through big.Rat,
// without it. ok is false for anything else (fractions, exponents, spaces,
// overflow, out of range), which takes the general path and its errors.
func plainInteger(s string, bits int) (string, bool) {
	i, err := strconv.ParseInt(s, 10, 64)
	if err != nil || (bits == 32 && (i < math.MinInt32 || i > math.MaxInt32)) {
		return "", false
	}
	return strconv.FormatInt(i, 10), true
}

// parseDecimal parses a decimal number ("12", "-1.50", "1e3"), nil if s is
// not one. big.Rat also accepts "1/3" and hex; those are not decimals.
func parseDecimal(s string) *big.Rat {
	if s == "" || strings.ContainsAny(s, "/xXpP_") {
		return nil
	}
	r, ok := new(big.Rat).SetString(s)
	if !ok {
		return nil
	}
	return r
}

func toNumeric(v any) (string, error) {
	switch x := v.(type) {
	case json.Number:
		if parseDecimal(string(x)) == nil {
			return "", fmt.Errorf("%q is not a number", string(x))
		}
		return string(x), nil
	case string:
		s := strings.TrimSpace(x)
		if parseDecimal(s) == nil {
			return "", fmt.Errorf("%q is not a number", x)
		}
		return s, nil
	case float64:
		if math.IsNaN(x) || math.IsInf(x, 0) {
			return "", fmt.Errorf("%v is not a finite number", x)
		}
		return strconv.FormatFloat(x, 'g', -1, 64), nil
	case float32:
		return toNumeric(float64(x))
	case int, int8, int16, int32, int64, uint, uint8, uint16, uint32, uint64:
		return fmt.Sprint(x), nil
	default:
		return "", fmt.Errorf("%T is not a number", v)
	}
}

func toBoolean(v any) (string, error) {
	switch x := v.(type) {
	case bool:
		return strconv.FormatBool(x), nil
	case string:
		b, err := strconv.ParseBool(strings.TrimSpace(x))
		if err != nil {
			return "", fmt.Errorf("%q is not a boolean", x)
		}
		return strconv.FormatBool(b), nil
	default:
		return "", fmt.Errorf("%T is not a boolean", v)
	}
}

// Timestamp layouts accepted from strings: RFC 3339 with or without a zone
// (no zone means UTC, as CommCare stores its datetimes) and a bare date.
var timeLayouts = []string{
	time.RFC3339Nano,
	"2006-01-02T15:04:05.999999999",
	"2006-01-02 15:04:05.999999999Z07:00",
	"2006-01-02 15:04:05.999999999",
	"2006-01-02",
}

func toTimestamptz(v any) (string, error) {
	switch x := v.(type) {
	case time.Time:
		return x.Format(time.RFC3339Nano), nil
	case string:
		s := strings.TrimSpace(x)
		for _, l := range timeLayouts {
			if t, err := time.Parse(l, s); err == nil {
				return t.Format(time.RFC3339Nano), nil
			}
		}
		return "", fmt.Errorf("%q is not an RFC 3339 timestamp", x)
	default:
		return "", fmt.Errorf("%T is not a timestamp", v)
	}
}

func toJSONB(v any) (string, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return "", err
	}
	if hasNULEscape(b) {
		return "", errors.New(`contains \u0000, which PostgreSQL jsonb cannot hold`)
	}
	return string(b), nil
}

// hasNULEscape reports whether JSON text b contains the escape \u0000 (and
// not an escaped backslash followed by "u0000").
func hasNULEscape(b []byte) bool {
	for i := 0; i < len(b); i++ {
		if b[i] != '\\' {
			continue
		}
		if i+6 <= len(b) && string(b[i+1:i+6]) == "u0000" {
			return true
		}
		i++ // skip the escaped character
	}
	return false
}

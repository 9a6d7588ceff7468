package stub

import (
	"strconv"
	"unicode/utf8"
)

// decodeFast decodes b into s, which must be the zero Stub, when b lies in
// the subset of JSON that the publisher and the follower write: one object
// whose keys are the stub's own JSON field names spelled exactly, holding
// strings without escapes, booleans and integers, with nothing after it.
// For such input the result is exactly what encoding/json produces (the
// same field setters are used for timestamps and LSNs; see the fuzz test).
// Anything else — an unknown or differently cased key, an escape, a null, a
// number with a fraction or exponent, a value out of range, invalid UTF-8,
// a syntax error — returns false, leaving s in an unspecified state, and the
// caller decodes with encoding/json, which then produces its own result or
// error.
func decodeFast(b []byte, s *Stub) bool {
	d := fastDecoder{b: b}
	d.ws()
	if !d.consume('{') {
		return false
	}
	d.ws()
	if d.consume('}') {
		return d.end()
	}
	for {
		key, ok := d.str()
		if !ok {
			return false
		}
		d.ws()
		if !d.consume(':') {
			return false
		}
		d.ws()
		switch string(key) {
		case "document_id":
			ok = d.strField(&s.DocumentID)
		case "document_rev":
			ok = d.strField(&s.DocumentRev)
		case "data_source_type":
			var v []byte
			if v, ok = d.str(); ok {
				switch string(v) {
				case string(SourceSQL):
					s.DataSourceType = SourceSQL
				case string(SourceCouch):
					s.DataSourceType = SourceCouch
				default:
					s.DataSourceType = Source(v)
				}
			}
		case "data_source_name":
			ok = d.strField(&s.DataSourceName)
		case "document_type":
			ok = d.strField(&s.DocumentType)
		case "document_subtype":
			ok = d.strField(&s.DocumentSubtype)
		case "domain":
			ok = d.strField(&s.Domain)
		case "is_deletion":
			s.IsDeletion, ok = d.bool()
		case "associated_document_id":
			ok = d.strField(&s.AssociatedDocumentID)
		case "publish_timestamp":
			ok = d.timeField(s.PublishTimestamp.UnmarshalJSON)
		case "original_publication_datetime":
			ok = d.timeField(s.OriginalPublicationDatetime.UnmarshalJSON)
		case "attempts":
			var n int64
			if n, ok = d.int(strconv.IntSize); ok {
				s.Attempts = int(n)
			}
		case "lsn":
			var v []byte
			if v, ok = d.str(); ok {
				ok = s.LSN.UnmarshalText(v) == nil
			}
		case "tx_ordinal":
			var n uint64
			if n, ok = d.uint(32); ok {
				s.TxOrdinal = uint32(n)
			}
		case "xid":
			var n uint64
			if n, ok = d.uint(32); ok {
				s.XID = uint32(n)
			}
		case "commit_timestamp":
			ok = d.timeField(s.CommitTimestamp.UnmarshalJSON)
		case "seq":
			var v []byte
			if v, ok = d.str(); ok {
				s.Seq = Seq(v)
			}
		default:
			return false
		}
		if !ok {
			return false
		}
		d.ws()
		if d.consume('}') {
			return d.end()
		}
		if !d.consume(',') {
			return false
		}
		d.ws()
	}
}

type fastDecoder struct {
	b []byte
	i int
}

func (d *fastDecoder) ws() {
	for d.i < len(d.b) {
		switch d.b[d.i] {
		case ' ', '\t', '\n', '\r':
			d.i++
		default:
			return
		}
	}
}

func (d *fastDecoder) consume(c byte) bool {
	if d.i < len(d.b) && d.b[d.i] == c {
		d.i++
		return true
	}
	return false
}

// end reports whether only whitespace follows.
func (d *fastDecoder) end() bool {
	d.ws()
	return d.i == len(d.b)
}

// str reads a string without escapes and returns its contents (aliasing b).
func (d *fastDecoder) str() ([]byte, bool) {
	if !d.consume('"') {
		return nil, false
	}
	start, ascii := d.i, true
	for ; d.i < len(d.b); d.i++ {
		switch c := d.b[d.i]; {
		case c == '"':
			v := d.b[start:d.i]
			d.i++
			if !ascii && !utf8.Valid(v) {
				return nil, false // encoding/json would replace the bad bytes
			}
			return v, true
		case c == '\\' || c < 0x20:
			return nil, false
		case c >= utf8.RuneSelf:
			ascii = false
		}
	}
	return nil, false
}

func (d *fastDecoder) strField(dst *string) bool {
	v, ok := d.str()
	if ok {
		*dst = string(v)
	}
	return ok
}

// timeField hands the quoted literal to time.Time's UnmarshalJSON, as
// encoding/json does.
func (d *fastDecoder) timeField(unmarshal func([]byte) error) bool {
	start := d.i
	if _, ok := d.str(); !ok {
		return false
	}
	return unmarshal(d.b[start:d.i]) == nil
}

func (d *fastDecoder) bool() (v, ok bool) {
	rest := d.b[d.i:]
	switch {
	case len(rest) >= 4 && string(rest[:4]) == "true":
		d.i += 4
		return true, true
	case len(rest) >= 5 && string(rest[:5]) == "false":
		d.i += 5
		return false, true
	}
	return false, false
}

// digits reads a JSON integer literal (no fraction, no exponent) and
// returns it as text.
func (d *fastDecoder) digits(signed bool) ([]byte, bool) {
	start := d.i
	if signed && d.i < len(d.b) && d.b[d.i] == '-' {
		d.i++
	}
	first := d.i
	for d.i < len(d.b) && d.b[d.i] >= '0' && d.b[d.i] <= '9' {
		d.i++
	}
	switch n := d.i - first; {
	case n == 0:
		return nil, false
	case n > 1 && d.b[first] == '0':
		return nil, false // a leading zero is invalid JSON
	}
	return d.b[start:d.i], true
}

func (d *fastDecoder) int(bits int) (int64, bool) {
	t, ok := d.digits(true)
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(string(t), 10, bits)
	return n, err == nil
}

func (d *fastDecoder) uint(bits int) (uint64, bool) {
	t, ok := d.digits(false)
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(string(t), 10, bits)
	return n, err == nil
}

package cdc

import (
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/changefeed/changefeed/stub"
)

// stubFields is a stub whose strings are byte slices, so that a stub built
// from a decoded row (slices into the receive buffer) is encoded without
// converting anything to strings. appendStub writes exactly what
// json.Marshal(stub.Stub) writes (tested), without reflection.
type stubFields struct {
	ID, Rev, SourceName, DocType, Subtype, Domain, Associated []byte
	Source                                                    stub.Source
	Deletion                                                  bool
	Published, Original                                       time.Time
	Attempts                                                  int
	LSN                                                       stub.LSN
	Ordinal, XID                                              uint32
	Commit                                                    time.Time
	Seq                                                       stub.Seq
	// PublishedText and CommitText, when set, are Published and Commit
	// already encoded by appendTime (a transaction's stubs share them).
	PublishedText, CommitText []byte
}

func fieldsOf(s *stub.Stub) stubFields {
	return stubFields{
		ID: []byte(s.DocumentID), Rev: []byte(s.DocumentRev), SourceName: []byte(s.DataSourceName),
		DocType: []byte(s.DocumentType), Subtype: []byte(s.DocumentSubtype), Domain: []byte(s.Domain),
		Associated: []byte(s.AssociatedDocumentID), Source: s.DataSourceType, Deletion: s.IsDeletion,
		Published: s.PublishTimestamp, Original: s.OriginalPublicationDatetime, Attempts: s.Attempts,
		LSN: s.LSN, Ordinal: s.TxOrdinal, XID: s.XID, Commit: s.CommitTimestamp, Seq: s.Seq,
	}
}

func appendStub(b []byte, s *stubFields) []byte {
	b = append(b, `{"document_id":`...)
	b = appendJSONString(b, s.ID)
	if len(s.Rev) > 0 {
		b = append(b, `,"document_rev":`...)
		b = appendJSONString(b, s.Rev)
	}
	b = append(b, `,"data_source_type":`...)
	b = appendJSONString(b, s.Source)
	b = append(b, `,"data_source_name":`...)
	b = appendJSONString(b, s.SourceName)
	b = append(b, `,"document_type":`...)
	b = appendJSONString(b, s.DocType)
	if len(s.Subtype) > 0 {
		b = append(b, `,"document_subtype":`...)
		b = appendJSONString(b, s.Subtype)
	}
	if len(s.Domain) > 0 {
		b = append(b, `,"domain":`...)
		b = appendJSONString(b, s.Domain)
	}
	b = append(b, `,"is_deletion":`...)
	b = strconv.AppendBool(b, s.Deletion)
	if len(s.Associated) > 0 {
		b = append(b, `,"associated_document_id":`...)
		b = appendJSONString(b, s.Associated)
	}
	b = append(b, `,"publish_timestamp":`...)
	if s.PublishedText != nil {
		b = append(b, s.PublishedText...)
	} else {
		b = appendTime(b, s.Published)
	}
	b = append(b, `,"original_publication_datetime":`...)
	if s.PublishedText != nil && s.Original.Equal(s.Published) {
		b = append(b, s.PublishedText...)
	} else {
		b = appendTime(b, s.Original)
	}
	b = append(b, `,"attempts":`...)
	b = strconv.AppendInt(b, int64(s.Attempts), 10)
	if s.LSN != 0 {
		b = append(b, `,"lsn":"`...)
		b = appendLSN(b, s.LSN)
		b = append(b, '"')
	}
	if s.Ordinal != 0 {
		b = append(b, `,"tx_ordinal":`...)
		b = strconv.AppendUint(b, uint64(s.Ordinal), 10)
	}
	if s.XID != 0 {
		b = append(b, `,"xid":`...)
		b = strconv.AppendUint(b, uint64(s.XID), 10)
	}
	if !s.Commit.IsZero() {
		b = append(b, `,"commit_timestamp":`...)
		if s.CommitText != nil {
			b = append(b, s.CommitText...)
		} else {
			b = appendTime(b, s.Commit)
		}
	}
	if s.Seq != "" {
		b = append(b, `,"seq":`...)
		b = appendJSONString(b, s.Seq)
	}
	return append(b, '}')
}

func appendTime(b []byte, t time.Time) []byte {
	b = append(b, '"')
	b = t.AppendFormat(b, time.RFC3339Nano)
	return append(b, '"')
}

// appendLSN writes PostgreSQL's text form, as stub.LSN.String.
func appendLSN(b []byte, l stub.LSN) []byte {
	b = appendHexUpper(b, uint32(l>>32))
	b = append(b, '/')
	return appendHexUpper(b, uint32(l))
}

func appendHexUpper(b []byte, v uint32) []byte {
	const digits = "0123456789ABCDEF"
	var tmp [8]byte
	i := len(tmp)
	for {
		i--
		tmp[i] = digits[v&0xF]
		v >>= 4
		if v == 0 {
			break
		}
	}
	return append(b, tmp[i:]...)
}

const hexLower = "0123456789abcdef"

// jsonSafe[c] is true for the ASCII bytes encoding/json writes unescaped.
var jsonSafe = func() (t [utf8.RuneSelf]bool) {
	for c := 0x20; c < utf8.RuneSelf; c++ {
		t[c] = c != '"' && c != '\\' && c != '<' && c != '>' && c != '&'
	}
	return t
}()

// appendJSONString is encoding/json's string encoder (HTML-safe, invalid
// UTF-8 replaced by U+FFFD, U+2028/U+2029 escaped).
func appendJSONString[T ~string | ~[]byte](b []byte, s T) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		if c := s[i]; c < utf8.RuneSelf {
			if jsonSafe[c] {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '\\', '"':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexLower[c>>4], hexLower[c&0xF])
			}
			i++
			start = i
			continue
		}
		var buf [utf8.UTFMax]byte
		n := copy(buf[:], s[i:])
		r, size := utf8.DecodeRune(buf[:n])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexLower[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

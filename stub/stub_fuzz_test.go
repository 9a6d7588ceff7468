package stub

import (
	"strings"
	"testing"

	"github.com/changefeed/changefeed/internal/fuzzcheck"
)

// FuzzUnmarshal checks the promise of Unmarshal: whatever the bytes, it
// returns what encoding/json returns (the same stub, or an error with the
// same text), whether or not the fast path took the input; where the fast
// path accepts, it equals encoding/json before validation too. Decoding
// allocates in proportion to the input.
func FuzzUnmarshal(f *testing.F) {
	for _, tt := range unmarshalCases {
		f.Add([]byte(tt.in))
	}
	for _, s := range fullStubs() {
		b, err := s.Marshal()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	const valid = `"data_source_type":"sql","data_source_name":"s","document_type":"t"`
	for _, in := range []string{
		`{"document_id":"a","Document_Id":"b",` + valid + `}`,                // case-folded duplicate
		`{"document_id":"a","DOCUMENT_ID":null,` + valid + `}`,               // null after a value
		`{"document_\u0069d":"a",` + valid + `}`,                             // escaped key
		`{"documentſid":"a",` + valid + `}`,                                  // ſ folds to s in encoding/json
		`{"document_id":"\ud800\udc00\ud800",` + valid + `}`,                 // surrogates
		`{"document_id":"a","attempts":9223372036854775808,` + valid + `}`,   // int overflow
		`{"document_id":"a","attempts":-9223372036854775808,` + valid + `}`,  // int minimum
		`{"document_id":"a","xid":4294967295,"tx_ordinal":00,` + valid + `}`, // leading zero
		`{"document_id":"a","attempts":1e400,` + valid + `}`,                 // huge float
		`{"document_id":"a","x":` + strings.Repeat(`[`, 10001) + `,` + valid, // deep nesting
		`{"document_id":"a","seq":{"a":[1,{"b":null}]},` + valid + `}`,       // seq not a string
		`{"document_id":"a","lsn":"FFFFFFFF/FFFFFFFF",` + valid + `}`,
		`{"document_id":"a","lsn":"+1/-1",` + valid + `}`,
		`{"document_id":"a","publish_timestamp":"2024-01-02T03:04:05.123456789123Z",` + valid + `}`,
		`{"document_id":"a","publish_timestamp":"2024-01-02T03:04:05+24:00",` + valid + `}`,
		"{\"document_id\":\"a\x00\",\"data_source_type\":\"sql\"}",
		"\ufeff{\"document_id\":\"a\"," + valid + "}",
	} {
		f.Add([]byte(in))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		fuzzcheck.Bounded(t, 64<<10+32*uint64(len(b)), "Unmarshal", func() { _, _ = Unmarshal(b) })
		checkSameAsReference(t, b)
	})
}

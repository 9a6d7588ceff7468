package stub

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"
)

// unmarshalReference is Unmarshal as it was before the fast path: the
// definition Unmarshal must keep.
func unmarshalReference(b []byte) (*Stub, error) {
	var s Stub
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if err := s.Validate(); err != nil {
		return nil, err
	}
	return &s, nil
}

// checkSameAsReference fails unless Unmarshal(b) and the reference agree:
// the same stub, or errors with the same text, both ErrInvalid.
func checkSameAsReference(t *testing.T, b []byte) {
	t.Helper()
	got, gotErr := Unmarshal(b)
	want, wantErr := unmarshalReference(b)
	switch {
	case (gotErr == nil) != (wantErr == nil):
		t.Fatalf("Unmarshal(%q) error = %v, reference %v", b, gotErr, wantErr)
	case gotErr != nil:
		if gotErr.Error() != wantErr.Error() || !errors.Is(gotErr, ErrInvalid) {
			t.Fatalf("Unmarshal(%q) error = %q, reference %q", b, gotErr, wantErr)
		}
	case !reflect.DeepEqual(got, want):
		t.Fatalf("Unmarshal(%q) =\n%#v\nreference\n%#v", b, got, want)
	}
	// Where the fast path accepts, it must equal encoding/json before
	// validation too.
	var fast Stub
	if decodeFast(b, &fast) {
		var ref Stub
		if err := json.Unmarshal(b, &ref); err != nil {
			t.Fatalf("decodeFast accepted %q, which encoding/json rejects: %v", b, err)
		}
		if !reflect.DeepEqual(fast, ref) {
			t.Fatalf("decodeFast(%q) =\n%#v\nencoding/json\n%#v", b, fast, ref)
		}
	}
}

func fullStubs() []*Stub {
	ts := time.Date(2024, 5, 6, 7, 8, 9, 123456789, time.UTC)
	return []*Stub{
		{DocumentID: "c1", DataSourceType: SourceSQL, DataSourceName: "form_processor_commcarecasesql",
			DocumentType: "CommCareCase", Domain: "demo", PublishTimestamp: ts, OriginalPublicationDatetime: ts.Add(-time.Second),
			Attempts: 2, LSN: 0x16_B374D848, TxOrdinal: 3, XID: 812, CommitTimestamp: ts.Add(-time.Minute)},
		{DocumentID: "k1", DocumentRev: "3-917fa23", DataSourceType: SourceCouch, DataSourceName: "commcarehq",
			DocumentType: "XFormInstance", DocumentSubtype: "sub", Domain: "d", IsDeletion: true,
			AssociatedDocumentID: "a1", PublishTimestamp: ts.In(time.FixedZone("x", 3600)), Seq: "12-g1AAAA"},
		{DocumentID: "é ü 日本", DataSourceType: SourceSQL, DataSourceName: "n", DocumentType: "t"},
	}
}

func TestUnmarshalRoundTrip(t *testing.T) {
	for _, s := range fullStubs() {
		b, err := s.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		var fast Stub
		if !decodeFast(b, &fast) {
			t.Fatalf("stub as published takes the slow path: %s", b)
		}
		got, err := Unmarshal(b)
		if err != nil {
			t.Fatal(err)
		}
		if !got.PublishTimestamp.Equal(s.PublishTimestamp) || got.DocumentID != s.DocumentID || got.SQLVersion() != s.SQLVersion() ||
			got.DocumentRev != s.DocumentRev || got.Seq != s.Seq || got.IsDeletion != s.IsDeletion {
			t.Fatalf("round trip of %s = %#v", b, got)
		}
		checkSameAsReference(t, b)
	}
}

// unmarshalCases are inputs for the table test and seeds for the fuzz test.
var unmarshalCases = []struct {
	name, in string
	err      string // substring of the error; empty: valid
}{
	{"minimal", `{"document_id":"a","data_source_type":"sql","data_source_name":"s","document_type":"t"}`, ""},
	{"whitespace", " \n{ \"document_id\" : \"a\" ,\t\"data_source_type\":\"sql\",\r\n\"data_source_name\":\"s\",\"document_type\":\"t\" } \n", ""},
	{"all fields", `{"document_id":"c1","document_rev":"","data_source_type":"sql","data_source_name":"n","document_type":"T","document_subtype":"S","domain":"d","is_deletion":false,"associated_document_id":"x","publish_timestamp":"2024-01-02T03:04:05.5Z","original_publication_datetime":"2024-01-02T03:04:05+02:00","attempts":-3,"lsn":"16/B374D848","tx_ordinal":4294967295,"xid":0,"commit_timestamp":"2024-01-02T03:04:05.999999999-07:30","seq":"7-x"}`, ""},
	{"couch", `{"document_id":"k","document_rev":"2-ab","data_source_type":"couch","data_source_name":"db","document_type":"T","is_deletion":true,"seq":"12-g1AAAA"}`, ""},
	{"escapes", `{"document_id":"a\"b\\c\u00e9\u003c","data_source_type":"sql","data_source_name":"s","document_type":"t"}`, ""},
	{"unknown key", `{"document_id":"a","data_source_type":"sql","data_source_name":"s","document_type":"t","extra":{"x":[1,2,null]}}`, ""},
	{"other case", `{"Document_ID":"a","DATA_SOURCE_TYPE":"sql","data_source_name":"s","document_type":"t"}`, ""},
	{"duplicate key: last wins", `{"document_id":"a","document_id":"b","data_source_type":"sql","data_source_name":"s","document_type":"t"}`, ""},
	{"null leaves zero", `{"document_id":"a","domain":null,"lsn":null,"publish_timestamp":null,"attempts":null,"data_source_type":"sql","data_source_name":"s","document_type":"t"}`, ""},
	{"null after value keeps it", `{"document_id":"a","domain":"d","domain":null,"data_source_type":"sql","data_source_name":"s","document_type":"t"}`, ""},
	{"invalid utf-8 replaced", "{\"document_id\":\"a\xff\xfeb\",\"data_source_type\":\"sql\",\"data_source_name\":\"s\",\"document_type\":\"t\"}", ""},
	{"zero ints", `{"document_id":"a","attempts":-0,"tx_ordinal":0,"data_source_type":"sql","data_source_name":"s","document_type":"t"}`, ""},
	{"empty object", `{}`, "document_id is empty"},
	{"bad source type", `{"document_id":"a","data_source_type":"mongo","data_source_name":"s","document_type":"t"}`, "data_source_type"},
	{"no name", `{"document_id":"a","data_source_type":"sql","document_type":"t"}`, "data_source_name is empty"},
	{"no type", `{"document_id":"a","data_source_type":"sql","data_source_name":"s"}`, "document_type is empty"},
	{"bad couch rev", `{"document_id":"a","document_rev":"x","data_source_type":"couch","data_source_name":"s","document_type":"t"}`, "parse rev"},
	{"fraction in an integer", `{"document_id":"a","attempts":1.0,"data_source_type":"sql","data_source_name":"s","document_type":"t"}`, "cannot unmarshal"},
	{"exponent", `{"document_id":"a","xid":1e3,"data_source_type":"sql","data_source_name":"s","document_type":"t"}`, "cannot unmarshal"},
	{"uint32 overflow", `{"document_id":"a","tx_ordinal":4294967296,"data_source_type":"sql","data_source_name":"s","document_type":"t"}`, "cannot unmarshal"},
	{"negative uint", `{"document_id":"a","xid":-1,"data_source_type":"sql","data_source_name":"s","document_type":"t"}`, "cannot unmarshal"},
	{"leading zero", `{"document_id":"a","attempts":01,"data_source_type":"sql","data_source_name":"s","document_type":"t"}`, "invalid character"},
	{"string for int", `{"document_id":"a","attempts":"1","data_source_type":"sql","data_source_name":"s","document_type":"t"}`, "cannot unmarshal"},
	{"bad lsn", `{"document_id":"a","lsn":"16-0","data_source_type":"sql","data_source_name":"s","document_type":"t"}`, "parse lsn"},
	{"lsn not a string", `{"document_id":"a","lsn":5,"data_source_type":"sql","data_source_name":"s","document_type":"t"}`, "cannot unmarshal"},
	{"bad time", `{"document_id":"a","publish_timestamp":"yesterday","data_source_type":"sql","data_source_name":"s","document_type":"t"}`, "parsing time"},
	{"time not a string", `{"document_id":"a","commit_timestamp":0,"data_source_type":"sql","data_source_name":"s","document_type":"t"}`, "Time.UnmarshalJSON"},
	{"bool as string", `{"document_id":"a","is_deletion":"true","data_source_type":"sql","data_source_name":"s","document_type":"t"}`, "cannot unmarshal"},
	{"truncated", `{"document_id":"a","data_source_type":"sql"`, "unexpected end"},
	{"trailing data", `{"document_id":"a","data_source_type":"sql","data_source_name":"s","document_type":"t"}x`, "invalid character"},
	{"two objects", `{"document_id":"a","data_source_type":"sql","data_source_name":"s","document_type":"t"} {}`, "invalid character"},
	{"trailing comma", `{"document_id":"a","data_source_type":"sql","data_source_name":"s","document_type":"t",}`, "invalid character"},
	{"control character", "{\"document_id\":\"a\tb\",\"data_source_type\":\"sql\",\"data_source_name\":\"s\",\"document_type\":\"t\"}", "invalid character"},
	{"not an object", `["document_id"]`, "cannot unmarshal"},
	{"empty", ``, "unexpected end"},
	{"bare true", `{"document_id":"a","is_deletion":tru,"data_source_type":"sql","data_source_name":"s","document_type":"t"}`, "invalid character"},
}

func TestUnmarshalMatchesEncodingJSON(t *testing.T) {
	for _, tt := range unmarshalCases {
		t.Run(tt.name, func(t *testing.T) {
			b := []byte(tt.in)
			checkSameAsReference(t, b)
			s, err := Unmarshal(b)
			switch {
			case tt.err == "" && err != nil:
				t.Fatalf("Unmarshal = %v", err)
			case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err) || !errors.Is(err, ErrInvalid)):
				t.Fatalf("Unmarshal = %v, %v; want ErrInvalid containing %q", s, err, tt.err)
			}
		})
	}
}

func BenchmarkUnmarshal(b *testing.B) {
	v, err := fullStubs()[0].Marshal()
	if err != nil {
		b.Fatal(err)
	}
	b.Run("fast", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := Unmarshal(v); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("encoding-json", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := unmarshalReference(v); err != nil {
				b.Fatal(err)
			}
		}
	})
}

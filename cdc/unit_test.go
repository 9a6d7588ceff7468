package cdc

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/stub"
)

func TestValidateName(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"changefeed", true},
		{"cf_slot_2", true},
		{strings.Repeat("a", 63), true},
		{strings.Repeat("a", 64), false},
		{"", false},
		{"Changefeed", false},
		{"cf-slot", false},
		{"cf slot", false},
		{`x"; DROP TABLE t; --`, false},
	}
	for _, tt := range tests {
		err := ValidateName("slot", tt.name)
		if (err == nil) != tt.ok {
			t.Errorf("ValidateName(%q) = %v, want ok %v", tt.name, err, tt.ok)
		}
		if err != nil && (!errors.Is(err, ErrConfig) || !strings.HasPrefix(strings.TrimPrefix(err.Error(), ErrConfig.Error()+": "), "slot ")) {
			t.Errorf("error %q does not name the field", err)
		}
	}
}

func TestMaskURL(t *testing.T) {
	tests := []struct {
		in, want string
	}{
		{"postgres://u:s3cret@h:5432/db?sslmode=disable", "postgres://u:xxxxx@h:5432/db?sslmode=disable"},
		{"postgresql://u@h/db", "postgresql://u@h/db"},
		{"postgres://u@h/db?password=s3cret", "postgres://u@h/db?password=xxxxx"},
		{"host=h user=u password=s3cret dbname=db", "host=h user=u password=xxxxx dbname=db"},
		{"host=h password = 's3 cret' dbname=db", "host=h password = xxxxx dbname=db"},
		{"postgres://u:s3cret@h:bad port/db", "(malformed PostgreSQL URL, not shown)"},
		{"postgres://u:s3%zzcret@h/db", "(malformed PostgreSQL URL, not shown)"},
	}
	for _, tt := range tests {
		got := MaskURL(tt.in)
		if got != tt.want {
			t.Errorf("MaskURL(%q) = %q, want %q", tt.in, got, tt.want)
		}
		if strings.Contains(got, "s3") {
			t.Errorf("MaskURL(%q) leaks the password: %q", tt.in, got)
		}
	}
}

func TestURLHasPassword(t *testing.T) {
	for in, want := range map[string]bool{
		"postgres://u:p@h/db":          true,
		"postgres://u@h/db?password=p": true,
		"postgres://u@h/db":            false,
		"host=h password=p":            true,
		"host=h user=u":                false,
		"postgres://u:p@h:bad/db":      true,
	} {
		if got := URLHasPassword(in); got != want {
			t.Errorf("URLHasPassword(%q) = %v", in, got)
		}
	}
}

// The New error for a malformed URL must not echo it (pgx's can).
func TestNewMalformedURLHidesPassword(t *testing.T) {
	for _, u := range []string{
		"postgres://user:hunter2@host:notaport/db",
		"postgres://user:hunter2@host/db?sslmode=bogus",
		"host=h password=hunter2 sslmode=bogus",
	} {
		_, err := New(Config{PostgresURL: u}, Deps{Producer: nopProducer{}})
		if err == nil {
			t.Fatalf("New(%q) accepted", u)
		}
		if !errors.Is(err, ErrConfig) || strings.Contains(err.Error(), "hunter2") {
			t.Errorf("New(%q) = %v", u, err)
		}
	}
	if _, err := New(Config{PostgresURL: "postgres://u@h/db", Slot: "Bad-Slot"}, Deps{Producer: nopProducer{}}); err == nil || !strings.Contains(err.Error(), "slot") {
		t.Errorf("bad slot name: %v", err)
	}
	if _, err := New(Config{PostgresURL: "postgres://u@h/db", Publication: "a;b"}, Deps{Producer: nopProducer{}}); err == nil || !strings.Contains(err.Error(), "publication") {
		t.Errorf("bad publication name: %v", err)
	}
}

// appendStub must write exactly what encoding/json writes for stub.Stub.
func TestAppendStubMatchesEncodingJSON(t *testing.T) {
	ts := time.Date(2026, 1, 2, 3, 4, 5, 600, time.UTC)
	stubs := []stub.Stub{
		{DocumentID: "c1", DataSourceType: stub.SourceSQL, DataSourceName: "case-sql", DocumentType: "CommCareCase"},
		{
			DocumentID: `we<ird>&"id"\` + "\n\t\x01\u2028\u2029é€😀\xff", DocumentRev: "1-abc", DataSourceType: stub.SourceCouch,
			DataSourceName: "n", DocumentType: "T", DocumentSubtype: "s", Domain: "d", IsDeletion: true,
			AssociatedDocumentID: "a", PublishTimestamp: ts, OriginalPublicationDatetime: ts.Add(time.Hour),
			Attempts: 3, LSN: 0x16B374D848, TxOrdinal: 7, XID: 1 << 31, CommitTimestamp: ts, Seq: "12-g1AAA",
		},
		{DocumentID: "x", DataSourceType: stub.SourceSQL, DataSourceName: "n", DocumentType: "T", LSN: 1,
			PublishTimestamp: time.Date(2026, 1, 2, 3, 4, 5, 0, time.FixedZone("x", 3600))},
	}
	for i := range stubs {
		want, err := json.Marshal(&stubs[i])
		if err != nil {
			t.Fatal(err)
		}
		f := fieldsOf(&stubs[i])
		got := appendStub(nil, &f)
		if !bytes.Equal(got, want) {
			t.Errorf("stub %d:\n got %s\nwant %s", i, got, want)
		}
	}
}

func TestAppendLSN(t *testing.T) {
	for _, l := range []stub.LSN{0, 1, 0x16B374D848, ^stub.LSN(0), 0xF00000000} {
		if got := string(appendLSN(nil, l)); got != l.String() {
			t.Errorf("appendLSN(%d) = %s, want %s", l, got, l)
		}
	}
}

// tuple builds a pgoutput TupleData.
func tuple(cols ...any) []byte {
	b := binary.BigEndian.AppendUint16(nil, uint16(len(cols)))
	for _, c := range cols {
		switch v := c.(type) {
		case nil:
			b = append(b, 'n')
		case byte:
			b = append(b, v) // 'u'
		case string:
			b = append(b, 't')
			b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
			b = append(b, v...)
		}
	}
	return b
}

func TestScanTupleKeepsOnlyNeededColumns(t *testing.T) {
	routing, err := ParseRouting("r.yaml", []byte(`
tables:
  - table: cases
    document_type: CommCareCase
    id_column: case_id
    domain_column: domain
    deletion: {column: deleted}
`))
	if err != nil {
		t.Fatal(err)
	}
	rel, err := newRelation(context.Background(), &pglogrepl.RelationMessage{
		RelationID: 7, Namespace: "public", RelationName: "cases",
		Columns: []*pglogrepl.RelationMessageColumn{{Name: "name"}, {Name: "case_id", Flags: 1}, {Name: "deleted"}, {Name: "domain"}},
	}, routing, nil)
	if err != nil {
		t.Fatal(err)
	}
	var row rowVals
	rest, err := scanTuple(append(tuple("big name", "c1", "t", byte('u')), 'X'), rel, &row)
	if err != nil {
		t.Fatal(err)
	}
	if string(rest) != "X" {
		t.Fatalf("rest = %q", rest)
	}
	if string(row.v[slotID].data) != "c1" || string(row.v[slotDeleted].data) != "t" || row.v[slotDomain].kind != 'u' {
		t.Fatalf("row = %+v", row.v)
	}
	if _, err := scanTuple(tuple("a", "b"), rel, &row); err == nil {
		t.Fatal("column count mismatch accepted")
	}
	if _, err := scanTuple(tuple("a", "b", "c", "d")[:12], rel, &row); err == nil {
		t.Fatal("truncated tuple accepted")
	}

	_, err = newRelation(context.Background(), &pglogrepl.RelationMessage{
		RelationID: 8, Namespace: "public", RelationName: "cases",
		Columns: []*pglogrepl.RelationMessageColumn{{Name: "case_id"}, {Name: "deleted"}},
	}, routing, nil)
	if !errors.Is(err, ErrSchema) || !strings.Contains(err.Error(), "domain_column") {
		t.Fatalf("missing column: %v", err)
	}
}

func TestPGTime(t *testing.T) {
	if got := pgTime(0); !got.Equal(time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)) {
		t.Fatalf("pgTime(0) = %v", got)
	}
	if got := pgTime(1_500_000); !got.Equal(time.Date(2000, 1, 1, 0, 0, 1, 500_000_000, time.UTC)) {
		t.Fatalf("pgTime(1.5s) = %v", got)
	}
}

type nopProducer struct{}

func (nopProducer) EnsureTopics(context.Context, ...string) error { return nil }
func (nopProducer) PublishRecord(_ context.Context, _ *kgo.Record, done func(error)) {
	done(nil)
}
func (nopProducer) Flush(context.Context) error { return nil }
func (nopProducer) Ping(context.Context) error  { return nil }

// A stub being built while emit waits holds the publish time text; a tick
// meanwhile (setNow) must not rewrite it in place.
func TestSetNowKeepsEarlierText(t *testing.T) {
	s := &stream{}
	s.setNow(time.Date(2026, 1, 2, 3, 4, 5, 123456789, time.UTC))
	held := s.nowText
	want := string(held)
	s.setNow(time.Date(2026, 1, 2, 3, 4, 6, 100000000, time.UTC)) // shorter text
	if string(held) != want {
		t.Fatalf("held publish time changed: %q -> %q", want, held)
	}
	if string(s.nowText) != `"2026-01-02T03:04:06.1Z"` {
		t.Fatalf("nowText = %s", s.nowText)
	}
}

package cdc

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/changefeed/changefeed/internal/fuzzcheck"
	"github.com/changefeed/changefeed/stub"
)

// fuzzTime builds a time from fuzz input: seconds and nanoseconds from
// 1970, and a zone offset in minutes (0: UTC, as the publisher writes).
func fuzzTime(sec int64, nsec uint32, offMin int16) time.Time {
	t := time.Unix(sec, int64(nsec%1_000_000_000))
	if offMin == 0 {
		return t.UTC()
	}
	return t.In(time.FixedZone("", int(offMin)*60))
}

// FuzzAppendStub checks the hand-written stub encoder (appendStub, also
// with the publish and commit times pre-encoded as a transaction shares
// them) against json.Marshal of stub.Stub, byte for byte, and that what
// it writes decodes back to the stub.
func FuzzAppendStub(f *testing.F) {
	f.Add("c1", "", "sql", "case-sql", "CommCareCase", "", "demo", false, "",
		int64(1767322800), uint32(5), int16(0), int64(1767322800), uint32(5), int16(0),
		int64(0), uint64(0x16B374D848), uint32(1), uint32(812), int64(1767322700), uint32(0), "")
	f.Add("we<ird>&\"id\"\\\n\t\x01\u2028\u2029é€😀\xff", "1-abc", "couch", "n", "T", "s", "d", true, "a",
		int64(-62135596800), uint32(999999999), int16(-720), int64(253402300799), uint32(1), int16(840),
		int64(-3), uint64(0), uint32(0), uint32(0), int64(0), uint32(0), "12-g1AAA\x00")
	f.Add("x", "", "", "", "", "", "", false, "",
		int64(1e12), uint32(0), int16(1440), int64(1), uint32(1), int16(1),
		int64(1<<62), uint64(1<<63), uint32(1<<31), uint32(1<<31), int64(-1e12), uint32(7), "\xed\xa0\x80")
	f.Fuzz(func(t *testing.T, id, rev, source, name, docType, subtype, domain string, deletion bool, assoc string,
		pubSec int64, pubNsec uint32, pubOff int16, origSec int64, origNsec uint32, origOff int16,
		attempts int64, lsn uint64, ordinal, xid uint32, commitSec int64, commitNsec uint32, seq string) {
		s := stub.Stub{
			DocumentID: id, DocumentRev: rev, DataSourceType: stub.Source(source), DataSourceName: name,
			DocumentType: docType, DocumentSubtype: subtype, Domain: domain, IsDeletion: deletion,
			AssociatedDocumentID: assoc, PublishTimestamp: fuzzTime(pubSec, pubNsec, pubOff),
			OriginalPublicationDatetime: fuzzTime(origSec, origNsec, origOff), Attempts: int(attempts),
			LSN: stub.LSN(lsn), TxOrdinal: ordinal, XID: xid, Seq: stub.Seq(seq),
		}
		if commitSec != 0 || commitNsec != 0 {
			s.CommitTimestamp = fuzzTime(commitSec, commitNsec, 0)
		}
		if origSec == pubSec && origNsec == pubNsec {
			// The same instant, as the publisher writes it for a row.
			s.OriginalPublicationDatetime = s.PublishTimestamp.In(s.OriginalPublicationDatetime.Location())
		}
		want, err := json.Marshal(&s)
		var got, shared []byte
		fuzzcheck.Bounded(t, 64<<10+16*uint64(len(want)), "appendStub", func() {
			fields := fieldsOf(&s)
			got = appendStub(nil, &fields)
			fields.PublishedText = appendTime(nil, s.PublishTimestamp)
			if !s.CommitTimestamp.IsZero() {
				fields.CommitText = appendTime(nil, s.CommitTimestamp)
			}
			shared = appendStub(nil, &fields)
		})
		if err != nil {
			// A time encoding/json refuses (a year past 9999, an offset of
			// a day or more) cannot come from PostgreSQL or from a stub
			// that was decoded; the encoder still writes JSON.
			if !json.Valid(got) || !json.Valid(shared) {
				t.Fatalf("appendStub wrote invalid JSON %q", got)
			}
			return
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("appendStub\n got %s\nwant %s", got, want)
		}
		if !bytes.Equal(shared, want) {
			t.Fatalf("appendStub with shared time texts\n got %s\nwant %s", shared, want)
		}
		var back stub.Stub
		if err := json.Unmarshal(got, &back); err != nil {
			t.Fatalf("appendStub wrote %s, which does not decode: %v", got, err)
		}
		if valid := utf8.ValidString(id + rev + source + name + docType + subtype + domain + assoc + seq); !valid {
			return // invalid UTF-8 is written as U+FFFD, as encoding/json does
		}
		if !back.PublishTimestamp.Equal(s.PublishTimestamp) || !back.OriginalPublicationDatetime.Equal(s.OriginalPublicationDatetime) ||
			!back.CommitTimestamp.Equal(s.CommitTimestamp) {
			t.Fatalf("times do not round-trip: %s", got)
		}
		back.PublishTimestamp, back.OriginalPublicationDatetime, back.CommitTimestamp =
			s.PublishTimestamp, s.OriginalPublicationDatetime, s.CommitTimestamp
		if back != s {
			t.Fatalf("round trip of %s:\n got %#v\nwant %#v", got, back, s)
		}
	})
}

package cdc

import (
	"context"
	"encoding/binary"
	"testing"

	"github.com/jackc/pglogrepl"
	"github.com/twmb/franz-go/pkg/kgo"
)

// relationMsg encodes a pgoutput Relation message.
func relationMsg(id uint32, ns, name string, cols ...string) []byte {
	b := []byte{'R'}
	b = binary.BigEndian.AppendUint32(b, id)
	b = append(append(b, ns...), 0)
	b = append(append(b, name...), 0)
	b = append(b, 'd')
	b = binary.BigEndian.AppendUint16(b, uint16(len(cols)))
	for i, c := range cols {
		flag := byte(0)
		if i == 0 {
			flag = 1
		}
		b = append(b, flag)
		b = append(append(b, c...), 0)
		b = binary.BigEndian.AppendUint32(b, 25) // text
		b = binary.BigEndian.AppendUint32(b, 0xFFFFFFFF)
	}
	return b
}

func beginMsg(final uint64, xid uint32) []byte {
	b := []byte{'B'}
	b = binary.BigEndian.AppendUint64(b, final)
	b = binary.BigEndian.AppendUint64(b, 1_000_000)
	return binary.BigEndian.AppendUint32(b, xid)
}

func commitMsg(lsn, end uint64) []byte {
	b := []byte{'C', 0}
	b = binary.BigEndian.AppendUint64(b, lsn)
	b = binary.BigEndian.AppendUint64(b, end)
	return binary.BigEndian.AppendUint64(b, 1_000_000)
}

func insertMsg(rel uint32, cols ...any) []byte {
	b := []byte{'I'}
	b = binary.BigEndian.AppendUint32(b, rel)
	b = append(b, 'N')
	return append(b, tuple(cols...)...)
}

// countingProducer acknowledges every record at once.
type countingProducer struct {
	nopProducer
	n     int
	bytes int
}

func (c *countingProducer) PublishRecord(_ context.Context, r *kgo.Record, done func(error)) {
	c.n++
	c.bytes += len(r.Value)
	done(nil)
}

func benchStream(b *testing.B, prod Producer) *stream {
	b.Helper()
	routing, err := ParseRouting("bench.yaml", []byte(`
tables:
  - table: cases
    topic: case-sql
    document_type: CommCareCase
    id_column: case_id
    domain_column: domain
    subtype_column: type
    deletion: {column: deleted}
`))
	if err != nil {
		b.Fatal(err)
	}
	p, err := New(Config{PostgresURL: "postgres://u@h/db", Routing: routing}, Deps{Producer: prod})
	if err != nil {
		b.Fatal(err)
	}
	s := newStream(p, nil, nil, 0)
	s.ctx = context.Background()
	if err := s.walMessage(relationMsg(1, "public", "cases", "case_id", "domain", "type", "deleted", "name", "opened_on", "modified_on", "owner_id", "case_json")); err != nil {
		b.Fatal(err)
	}
	return s
}

// BenchmarkDecodeInsert measures the publisher's CPU per change without the
// network: decode a pgoutput INSERT of a 9-column row (5 needed), build the
// stub, encode it and hand it to a producer that acknowledges at once. 100
// changes per transaction.
func BenchmarkDecodeInsert(b *testing.B) {
	prod := &countingProducer{}
	s := benchStream(b, prod)
	ins := insertMsg(1, "3f2a7c1e-6d4b-4a8e-9c1f-0b2d3e4f5a6b", "demo-domain", "household", "f", "A name of some length",
		"2024-01-02T03:04:05.678Z", "2024-01-02T03:04:05.678Z", "8e1b7c2d-5a4f-4b3e-8d2c-1a0b9c8d7e6f", `{"a":"`+string(make([]byte, 200))+`"}`)
	const perTx = 100
	b.ReportAllocs()
	b.SetBytes(int64(len(ins)))
	b.ResetTimer()
	lsn := uint64(1 << 32)
	for i := 0; i < b.N; i++ {
		if i%perTx == 0 {
			if i > 0 {
				if err := s.walMessage(commitMsg(lsn, lsn+100)); err != nil {
					b.Fatal(err)
				}
			}
			lsn += 1000
			if err := s.walMessage(beginMsg(lsn, uint32(i))); err != nil {
				b.Fatal(err)
			}
		}
		if err := s.walMessage(ins); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if prod.n != b.N {
		b.Fatalf("%d records for %d changes", prod.n, b.N)
	}
	_ = pglogrepl.XLogDataByteID
}

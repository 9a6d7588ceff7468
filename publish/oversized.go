package publish

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/stub"
)

// recordOverhead is a generous bound on what a record batch adds around one
// record (batch header 61 bytes, record header and varints).
const recordOverhead = 128

// prefixBytes bounds each string copied from an oversized stub.
const prefixBytes = 256

// Oversized is the record written to Options.OversizedTopic for a stub too
// large for its topic. It is keyed by DocumentIDSHA256.
type Oversized struct {
	Topic string `json:"topic"`
	// RecordBytes is the size of the refused record (key and value);
	// LimitBytes the topic's max.message.bytes as the producer knew it.
	RecordBytes int `json:"record_bytes"`
	LimitBytes  int `json:"limit_bytes"`
	// DocumentIDSHA256 and DocumentIDBytes identify the document whose
	// id is truncated in Stub.
	DocumentIDSHA256 string `json:"document_id_sha256"`
	DocumentIDBytes  int    `json:"document_id_bytes"`
	// Stub is the refused stub with every string cut to 256 bytes: its
	// version (LSN and ordinal, or rev and seq), type and source are whole.
	// Nil if the record was not a stub.
	Stub     *stub.Stub `json:"stub,omitempty"`
	Error    string     `json:"error"`
	Recorded time.Time  `json:"recorded"`
}

// oversized reports whether r failed because it alone is larger than its
// topic accepts. A batch of small records refused by the broker (its
// max.message.bytes lowered at run time) is not: those records fail.
func (p *Producer) oversized(r *kgo.Record, err error) bool {
	if p.opts.OversizedTopic == "" || r.Topic == p.opts.OversizedTopic || !errors.Is(err, kerr.MessageTooLarge) {
		return false
	}
	return recordBytes(r)+recordOverhead > int(p.batchMaxBytes(r.Topic))
}

func recordBytes(r *kgo.Record) int {
	n := len(r.Key) + len(r.Value)
	for _, h := range r.Headers {
		n += len(h.Key) + len(h.Value)
	}
	return n
}

// divert records the oversized r to OversizedTopic and then calls done with
// nil: the stub counts as delivered only once its record is acknowledged,
// so a failure to record it fails the stub like any other (nothing is
// skipped silently).
func (p *Producer) divert(ctx context.Context, r *kgo.Record, cause error, done func(error)) {
	o := Oversized{
		Topic:            r.Topic,
		RecordBytes:      recordBytes(r),
		LimitBytes:       int(p.batchMaxBytes(r.Topic)),
		DocumentIDBytes:  len(r.Key),
		DocumentIDSHA256: sha256Hex(r.Key),
		Error:            cause.Error(),
		Recorded:         time.Now().UTC(),
	}
	if s, err := stub.Unmarshal(r.Value); err == nil {
		for _, f := range []*string{&s.DocumentID, &s.DataSourceName, &s.DocumentType, &s.DocumentSubtype,
			&s.Domain, &s.AssociatedDocumentID, &s.DocumentRev} {
			*f = truncate(*f)
		}
		s.Seq = stub.Seq(truncate(string(s.Seq)))
		o.Stub = s
	}
	value, err := json.Marshal(o)
	if err != nil {
		p.metrics.errors.WithLabelValues(r.Topic).Inc()
		done(fmt.Errorf("oversized stub on %s: encode its record: %w", r.Topic, err))
		p.diverting.done()
		return
	}
	topic := r.Topic
	key := []byte(o.DocumentIDSHA256)
	dl := &kgo.Record{Topic: p.opts.OversizedTopic, Key: key, Value: value}
	// r is the caller's until done: nothing below reads it.
	p.cl.Produce(ctx, dl, func(_ *kgo.Record, err error) {
		defer p.diverting.done() // after done: Flush returns once the source knows
		if err != nil {
			p.metrics.errors.WithLabelValues(topic).Inc()
			done(fmt.Errorf("oversized stub on %s (%d bytes): recording it to %s failed: %w", topic, o.RecordBytes, p.opts.OversizedTopic, err))
			return
		}
		p.metrics.oversized.WithLabelValues(topic).Inc()
		attrs := []any{"topic", topic, "record_bytes", o.RecordBytes, "limit_bytes", o.LimitBytes,
			"document_id_sha256", o.DocumentIDSHA256, "document_id_bytes", o.DocumentIDBytes, "recorded_to", p.opts.OversizedTopic}
		if o.Stub != nil {
			attrs = append(attrs, "document_id_prefix", o.Stub.DocumentID, "lsn", o.Stub.LSN, "tx_ordinal", o.Stub.TxOrdinal,
				"document_rev", o.Stub.DocumentRev, "seq", o.Stub.Seq)
		}
		p.log.Error("stub larger than its topic's max.message.bytes: recorded and skipped; the document's consumers miss this change until it is resynced", attrs...)
		done(nil)
	})
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// truncate cuts s to at most prefixBytes without splitting a UTF-8 sequence.
func truncate(s string) string {
	if len(s) <= prefixBytes {
		return s
	}
	cut := prefixBytes
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut]
}

package pillows

import (
	"context"
	"strconv"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/stub"
)

// decodeStub is the one place that decides whether a record is a stub this
// pillow can process: it decodes and validates it (stub.Unmarshal) and
// requires a version the sinks can order by (stub.ValidateVersion: a SQL
// stub without a commit LSN would be written once and never updated). A
// record that fails goes to the dead-letter topic (sendInvalid).
func decodeStub(b []byte) (*stub.Stub, error) {
	s, err := stub.Unmarshal(b)
	if err != nil {
		return nil, err
	}
	if err := s.ValidateVersion(); err != nil {
		return nil, err
	}
	return s, nil
}

// invalidRecord is a record decodeStub refused.
type invalidRecord struct {
	rec *kgo.Record
	err error
}

// sendInvalid publishes the batch's invalid records to the dead-letter
// topic, as they were read, before the batch's offset is marked: once the
// offset is committed the dead letter is their only trace. A failure to
// publish is retried with the transient backoff, the partition paused. It
// returns false when the worker must stop without marking.
func (w *worker) sendInvalid(bad []invalidRecord) bool {
	p := w.pr.p
	dl := w.pr.r.o.DeadLetters
	for _, b := range bad {
		w.log.Warn("invalid stub: sent to the dead-letter topic, not processed", "offset", b.rec.Offset, "dead_letter_topic", p.Retry.DeadLetterTopic, "err", b.err)
	}
	if dl == nil {
		return true
	}
	backoff := w.pr.r.o.TransientMin
	for i := 0; i < len(bad); {
		b := bad[i]
		rec := &kgo.Record{
			Key:   b.rec.Key,
			Value: b.rec.Value,
			Headers: append(b.rec.Headers[:len(b.rec.Headers):len(b.rec.Headers)],
				kgo.RecordHeader{Key: "pillow", Value: []byte(p.Name)},
				kgo.RecordHeader{Key: "error_type", Value: []byte("invalid_stub")},
				kgo.RecordHeader{Key: "error_message", Value: []byte(truncate(b.err.Error(), 4000))},
				kgo.RecordHeader{Key: "source_topic", Value: []byte(b.rec.Topic)},
				kgo.RecordHeader{Key: "source_partition", Value: []byte(strconv.Itoa(int(b.rec.Partition)))},
				kgo.RecordHeader{Key: "source_offset", Value: []byte(strconv.FormatInt(b.rec.Offset, 10))},
			),
		}
		ctx, cancel := context.WithTimeout(w.ctx, p.Timeouts.IO)
		err := dl.DeadLetter(ctx, p.Retry.DeadLetterTopic, rec)
		cancel()
		if err == nil {
			i++
			continue
		}
		if w.ctx.Err() != nil {
			return false
		}
		w.pr.r.o.Metrics.transient.WithLabelValues(p.Name).Inc()
		w.log.Warn("dead letter of an invalid stub failed: partition paused, will retry", "offset", b.rec.Offset, "backoff", backoff, "err", err)
		w.setTransient(true)
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-w.quit:
			t.Stop()
			return false
		case <-w.ctx.Done():
			t.Stop()
			return false
		}
		backoff = min(2*backoff, w.pr.r.o.TransientMax)
	}
	w.setTransient(false)
	return true
}

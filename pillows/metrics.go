package pillows

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the pillow runtime's Prometheus metrics.
type Metrics struct {
	processed      *prometheus.CounterVec
	docErrors      *prometheus.CounterVec
	transient      *prometheus.CounterVec
	stuck          *prometheus.CounterVec
	abandoned      *prometheus.CounterVec
	skipped        *prometheus.CounterVec
	lagRecords     *prometheus.GaugeVec
	lagSeconds     *prometheus.GaugeVec
	batchSize      *prometheus.HistogramVec
	fetchSeconds   *prometheus.HistogramVec
	processSeconds *prometheus.HistogramVec
	commitErrors   *prometheus.CounterVec
	retries        *prometheus.CounterVec
	fatal          *prometheus.CounterVec
}

// NewMetrics registers the metrics on reg (nil: not registered).
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		processed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_pillow_processed_total", Help: "Documents processed successfully, per pillow and processor.",
		}, []string{"pillow", "processor"}),
		docErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_pillow_document_errors_total", Help: "Per-document failures recorded in the errors table, per pillow and processor (\"\" = fetch).",
		}, []string{"pillow", "processor"}),
		transient: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_pillow_transient_errors_total", Help: "Batches paused and retried because a store, sink or the errors table was unreachable.",
		}, []string{"pillow"}),
		stuck: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_pillow_stuck_documents_total", Help: "Documents recorded as failed because they kept failing transiently on their own (others succeeded, or Timeouts.Stall passed).",
		}, []string{"pillow"}),
		abandoned: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_pillow_abandoned_batches_total", Help: "Batches in hand abandoned (not committed) because a revoke or shutdown could not wait for them (Timeouts.Revoke, ShutdownTimeout).",
		}, []string{"pillow"}),
		skipped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_pillow_stubs_skipped_total", Help: "Stubs not fetched: reason=duplicate (already processed or collapsed in a batch), filtered, invalid.",
		}, []string{"pillow", "reason"}),
		lagRecords: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "changefeed_pillow_lag_records", Help: "Records between the last processed offset and the partition's high watermark.",
		}, []string{"pillow", "topic", "partition"}),
		lagSeconds: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "changefeed_pillow_lag_seconds", Help: "Seconds between the publish_timestamp of the last processed stub and its processing.",
		}, []string{"pillow", "topic", "partition"}),
		batchSize: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "changefeed_pillow_batch_size", Help: "Stubs per batch, before deduplication.",
			Buckets: prometheus.ExponentialBuckets(1, 4, 8),
		}, []string{"pillow"}),
		fetchSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "changefeed_pillow_fetch_seconds", Help: "Latency of one bulk fetch from a document store.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
		}, []string{"pillow", "store"}),
		processSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "changefeed_pillow_process_seconds", Help: "Latency of one processor call on a batch.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
		}, []string{"pillow", "processor"}),
		commitErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_pillow_commit_errors_total", Help: "Failed offset commits; progress is not checkpointed until one succeeds.",
		}, []string{"pillow"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_pillow_error_retries_total", Help: "Retries of recorded errors: outcome=resolved, failed, dead.",
		}, []string{"pillow", "outcome"}),
		fatal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_pillow_fatal_errors_total", Help: "Conditions that stop a pillow (committed offset gone: reindex needed).",
		}, []string{"pillow"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.processed, m.docErrors, m.transient, m.stuck, m.abandoned, m.skipped, m.lagRecords, m.lagSeconds,
			m.batchSize, m.fetchSeconds, m.processSeconds, m.commitErrors, m.retries, m.fatal} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("register pillow metrics: %w", err)
			}
		}
	}
	return m, nil
}

// init creates the series of p at zero, so that dashboards and alerts see
// them before the first event.
func (m *Metrics) init(p *Pillow) {
	for _, r := range []string{"duplicate", "filtered", "invalid"} {
		m.skipped.WithLabelValues(p.Name, r)
	}
	for _, o := range []string{"resolved", "failed", "dead"} {
		m.retries.WithLabelValues(p.Name, o)
	}
	m.transient.WithLabelValues(p.Name)
	m.stuck.WithLabelValues(p.Name)
	m.abandoned.WithLabelValues(p.Name)
	m.commitErrors.WithLabelValues(p.Name)
	m.fatal.WithLabelValues(p.Name)
	m.docErrors.WithLabelValues(p.Name, "")
	for _, pr := range p.Processors {
		m.processed.WithLabelValues(p.Name, pr.Name())
		m.docErrors.WithLabelValues(p.Name, pr.Name())
	}
}

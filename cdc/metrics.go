package cdc

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	confirmedLSN     prometheus.Gauge
	lagBytes         prometheus.Gauge
	lagSeconds       prometheus.Gauge
	invalid          prometheus.Counter
	truncates        *prometheus.CounterVec
	refused          *prometheus.CounterVec
	partitionChanges *prometheus.CounterVec
	checkpointErrors prometheus.Counter
	reconnects       prometheus.Counter
	transactions     prometheus.Counter
	changes          prometheus.Counter
	streaming        prometheus.Gauge
	pendingTx        prometheus.Gauge
	slotWALStatus    *prometheus.GaugeVec
	slotSafeWALSize  prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer, inFlight func() float64) (*metrics, error) {
	m := &metrics{
		confirmedLSN: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "changefeed_cdc_confirmed_lsn",
			Help: "The LSN last confirmed to the slot (checkpointed first), as a number.",
		}),
		lagBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "changefeed_cdc_lag_bytes",
			Help: "pg_current_wal_lsn() minus the confirmed LSN, sampled.",
		}),
		lagSeconds: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "changefeed_cdc_lag_seconds",
			Help: "While stubs are unacknowledged: seconds since the commit of the last fully acknowledged transaction; 0 when nothing is pending.",
		}),
		invalid: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "changefeed_cdc_invalid_messages_total",
			Help: "Published-from-anywhere messages and rows that could not become a stub, skipped.",
		}),
		truncates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_cdc_truncates_total",
			Help: "TRUNCATEs of published tables (published as events on the control topic).",
		}, []string{"table"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_cdc_refused_rows_total",
			Help: "Rows not published because their document id cannot be published unchanged (reason utf8: not valid UTF-8; key: a key part is null).",
		}, []string{"table", "reason"}),
		partitionChanges: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "changefeed_cdc_partition_changes_total",
			Help: "Partitions of routed tables seen detached or dropped, or truncated (or rewritten) without a decoded TRUNCATE, while streaming: consumers must resync the table.",
		}, []string{"table", "change"}),
		checkpointErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "changefeed_cdc_checkpoint_errors_total",
			Help: "Failed writes of changefeed.cdc_checkpoint; nothing is confirmed while they fail.",
		}),
		reconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "changefeed_cdc_reconnects_total",
			Help: "Replication sessions restarted after a PostgreSQL error.",
		}),
		transactions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "changefeed_cdc_transactions_total",
			Help: "Transactions decoded.",
		}),
		changes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "changefeed_cdc_changes_total",
			Help: "Row changes and messages decoded.",
		}),
		streaming: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "changefeed_cdc_streaming",
			Help: "1 while the replication stream is running.",
		}),
		pendingTx: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "changefeed_cdc_pending_transactions",
			Help: "Transactions held until Kafka acknowledges them or an earlier one (transactions without stubs are merged into the one before).",
		}),
		slotWALStatus: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "changefeed_cdc_slot_wal_status",
			Help: "1 for the slot's current pg_replication_slots.wal_status (reserved, extended, unreserved, lost), sampled every lag interval.",
		}, []string{"status"}),
		slotSafeWALSize: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "changefeed_cdc_slot_safe_wal_size_bytes",
			Help: "pg_replication_slots.safe_wal_size: WAL that can still be written before the slot loses WAL it needs; -1 when unlimited (no max_slot_wal_keep_size) or lost.",
		}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{
		m.confirmedLSN, m.lagBytes, m.lagSeconds, m.invalid, m.truncates, m.refused, m.partitionChanges, m.checkpointErrors,
		m.reconnects, m.transactions, m.changes, m.streaming, m.pendingTx, m.slotWALStatus, m.slotSafeWALSize,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "changefeed_cdc_stubs_in_flight",
			Help: "Stubs produced and not yet acknowledged by Kafka.",
		}, inFlight),
	} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register metrics: %w", err)
		}
	}
	return m, nil
}

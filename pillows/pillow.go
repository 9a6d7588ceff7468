package pillows

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"time"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/stub"
)

// Store fetches the current state of the documents named by stubs, in bulk.
// It returns one document per distinct id; a document the store no longer
// has comes back Deleted. It returns an error wrapping doc.ErrTransient when
// the store itself is unreachable, and doc.Errors when only some documents
// failed.
type Store interface {
	Fetch(ctx context.Context, stubs []*stub.Stub) ([]*doc.Document, error)
}

// Processor does a pillow's work on a batch of fetched documents: it writes
// them to a sink, or performs any other transformation or side effect.
//
// Process returns nil when every document was handled; doc.Errors naming the
// documents that failed (the others succeeded); or an error wrapping
// doc.ErrTransient when the destination is unreachable, in which case the
// whole batch is retried later. Any other error fails the batch, and the
// pillow then processes its documents one at a time to find which ones fail.
// A panic is recovered and treated like an error of the same kind.
//
// Processors see a document again after a redelivery (at-least-once): they
// must make their writes idempotent, e.g. by refusing versions that are not
// newer than what they hold. Effects that must happen once per version use
// Once.
type Processor interface {
	Name() string
	Process(ctx context.Context, docs []*doc.Document) error
}

// Bootstrapper is implemented by processors that prepare their destination
// (create a table, an index) before the first batch.
type Bootstrapper interface {
	Bootstrap(ctx context.Context) error
}

// Sink is the contract of the sink packages (sink/pgsink, sink/essink).
type Sink interface {
	Name() string
	Bootstrap(ctx context.Context) error
	Write(ctx context.Context, docs []*doc.Document) error
}

// SinkProcessor adapts a Sink to a Processor.
func SinkProcessor(s Sink) Processor { return sinkProcessor{s} }

type sinkProcessor struct{ s Sink }

func (p sinkProcessor) Name() string                        { return p.s.Name() }
func (p sinkProcessor) Bootstrap(ctx context.Context) error { return p.s.Bootstrap(ctx) }
func (p sinkProcessor) Process(ctx context.Context, docs []*doc.Document) error {
	return p.s.Write(ctx, docs)
}

// StoreKey selects the store for a stub: its data_source_type and
// data_source_name. An empty Name matches every name of that type that has
// no store of its own (e.g. one CouchDB server for all its databases).
type StoreKey struct {
	Type stub.Source
	Name string
}

func (k StoreKey) String() string { return string(k.Type) + "/" + k.Name }

// Filter selects the stubs a pillow processes. Empty lists match everything.
// Stubs that do not match are skipped and their offsets committed.
type Filter struct {
	DocumentTypes []string
	Domains       []string
}

// Match reports whether s passes the filter.
//
// A deletion stub whose domain is empty passes a domain filter: a DELETE
// carries only the table's replica identity, so the publisher cannot always
// name the domain of a deleted row. Dropping it would leave the deleted
// document in the sinks forever; passing it costs one fetch that finds the
// document gone.
func (f Filter) Match(s *stub.Stub) bool {
	if len(f.DocumentTypes) > 0 && !slices.Contains(f.DocumentTypes, s.DocumentType) {
		return false
	}
	if len(f.Domains) > 0 && !slices.Contains(f.Domains, s.Domain) && !(s.IsDeletion && s.Domain == "") {
		return false
	}
	return true
}

// Batching bounds a batch (HQ's BulkPillowProcessor chunk).
type Batching struct {
	// MaxStubs is the most stubs handed to one fetch-and-process round.
	// Larger batches mean fewer round trips to stores and sinks but more
	// work redone after a crash. Default 500.
	MaxStubs int
	// MaxWait is how long a partition waits for MaxStubs stubs once it has
	// at least one. Default 100ms.
	MaxWait time.Duration
}

// Retry configures HQ's PillowError handling of per-document failures.
type Retry struct {
	// MaxAttempts is the number of attempts (the first included) after
	// which a failing document is marked dead and sent to the dead-letter
	// topic. Default 5.
	MaxAttempts int
	// BackoffUnit scales the delay before attempt n+1: BackoffUnit·n².
	// Default 5 minutes (HQ's 5·n² minutes).
	BackoffUnit time.Duration
	// Interval is how often the retry loop looks for due errors.
	// Default 30s, capped at BackoffUnit.
	Interval time.Duration
	// DeadLetterTopic receives the stubs of dead documents. Default
	// "<pillow>-dead-letter".
	DeadLetterTopic string
}

// Backoff returns the delay after n failed attempts.
func (r Retry) Backoff(n int) time.Duration {
	if n < 1 {
		n = 1
	}
	return r.BackoffUnit * time.Duration(n*n)
}

// Pillow is one pillow: what it consumes, how it selects, where it fetches
// documents, and what it does with them. Build it in Go for custom
// processors, or from YAML with package pillows/pillowconf.
type Pillow struct {
	Name   string
	Topics []string
	// Group is the Kafka consumer group; default Name. Pillows sharing
	// a group share its committed offsets (see pillows/checkpoints to
	// split or merge them).
	Group      string
	Filter     Filter
	Processors []Processor
	Stores     map[StoreKey]Store
	Batch      Batching
	Retry      Retry
	// DedupSize bounds the per-partition memory of the highest version
	// processed per document. Default 100000 documents.
	DedupSize int
	Timeouts  Timeouts
}

// Timeouts bound the pillow's I/O, so that a store, sink or database that
// stops answering cannot stall a partition, a rebalance or a shutdown.
type Timeouts struct {
	// IO bounds each call to a document store, a processor, the errors
	// table and the dead-letter topic. A call that runs past it fails as
	// transient (the batch is retried; see Stall). Processors receive it
	// as their context's deadline. Default 30s.
	IO time.Duration
	// Revoke bounds finishing the batches in hand of partitions revoked
	// in a rebalance. Past it they are abandoned: their contexts are
	// canceled, nothing is committed for them (the next owner processes
	// them again) and the rebalance goes on. Keep it below the consumer
	// group's rebalance timeout (franz-go's default is 60s). Default 20s.
	Revoke time.Duration
	// Stall is how long one document may keep failing transiently on its
	// own (after its batch was split down to it) while nothing else of
	// the pillow succeeds, before it is recorded as failed and its
	// partition goes on. With other documents succeeding, it is recorded
	// at once. Default 10m.
	Stall time.Duration
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

// ErrDefinition marks an invalid pillow definition.
var ErrDefinition = errors.New("invalid pillow definition")

func defErr(pillow, field, format string, args ...any) error {
	if pillow == "" {
		pillow = "(unnamed)"
	}
	return fmt.Errorf("%w: pillow %s: %s: %s", ErrDefinition, pillow, field, fmt.Sprintf(format, args...))
}

// Validate checks p and fills in defaults. Errors name the pillow and field.
func (p *Pillow) Validate() error {
	if p.Name == "" || !nameRE.MatchString(p.Name) {
		return defErr(p.Name, "name", "must match %s", nameRE)
	}
	if len(p.Topics) == 0 {
		return defErr(p.Name, "topics", "at least one topic is required")
	}
	for i, t := range p.Topics {
		if t == "" || !nameRE.MatchString(t) {
			return defErr(p.Name, fmt.Sprintf("topics[%d]", i), "invalid topic name %q", t)
		}
	}
	if p.Group == "" {
		p.Group = p.Name
	}
	if len(p.Processors) == 0 {
		return defErr(p.Name, "processors", "at least one processor is required")
	}
	seen := map[string]bool{}
	for i, pr := range p.Processors {
		if pr == nil {
			return defErr(p.Name, fmt.Sprintf("processors[%d]", i), "nil processor")
		}
		n := pr.Name()
		if n == "" {
			return defErr(p.Name, fmt.Sprintf("processors[%d].name", i), "empty name")
		}
		if seen[n] {
			return defErr(p.Name, fmt.Sprintf("processors[%d].name", i), "duplicate processor name %q", n)
		}
		seen[n] = true
	}
	if len(p.Stores) == 0 {
		return defErr(p.Name, "stores", "no document store configured")
	}
	for k, s := range p.Stores {
		if k.Type != stub.SourceSQL && k.Type != stub.SourceCouch {
			return defErr(p.Name, "stores", "store %s: data_source_type must be %q or %q", k, stub.SourceSQL, stub.SourceCouch)
		}
		if s == nil {
			return defErr(p.Name, "stores", "store %s is nil", k)
		}
	}
	if p.Batch.MaxStubs < 0 {
		return defErr(p.Name, "batch.max_stubs", "must be positive")
	}
	if p.Batch.MaxStubs == 0 {
		p.Batch.MaxStubs = 500
	}
	if p.Batch.MaxWait < 0 {
		return defErr(p.Name, "batch.max_wait", "must be positive")
	}
	if p.Batch.MaxWait == 0 {
		p.Batch.MaxWait = 100 * time.Millisecond
	}
	if p.Retry.MaxAttempts < 0 {
		return defErr(p.Name, "retry.max_attempts", "must be positive")
	}
	if p.Retry.MaxAttempts == 0 {
		p.Retry.MaxAttempts = 5
	}
	if p.Retry.BackoffUnit < 0 {
		return defErr(p.Name, "retry.backoff", "must be positive")
	}
	if p.Retry.BackoffUnit == 0 {
		p.Retry.BackoffUnit = 5 * time.Minute
	}
	if p.Retry.Interval <= 0 {
		p.Retry.Interval = 30 * time.Second
	}
	p.Retry.Interval = min(p.Retry.Interval, p.Retry.BackoffUnit)
	if p.Retry.DeadLetterTopic == "" {
		p.Retry.DeadLetterTopic = p.Name + "-dead-letter"
	}
	if p.DedupSize < 0 {
		return defErr(p.Name, "dedup_size", "must be positive")
	}
	if p.DedupSize == 0 {
		p.DedupSize = 100000
	}
	for _, t := range []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{{"timeouts.io", &p.Timeouts.IO, 30 * time.Second}, {"timeouts.revoke", &p.Timeouts.Revoke, 20 * time.Second}, {"timeouts.stall", &p.Timeouts.Stall, 10 * time.Minute}} {
		if *t.v < 0 {
			return defErr(p.Name, t.name, "must be positive")
		}
		if *t.v == 0 {
			*t.v = t.def
		}
	}
	return nil
}

// store returns the store for a stub, or nil.
func (p *Pillow) store(s *stub.Stub) (StoreKey, Store) {
	k := StoreKey{Type: s.DataSourceType, Name: s.DataSourceName}
	if st, ok := p.Stores[k]; ok {
		return k, st
	}
	k.Name = ""
	if st, ok := p.Stores[k]; ok {
		return k, st
	}
	return k, nil
}

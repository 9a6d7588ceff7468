package pillows

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/doc"
	"github.com/changefeed/changefeed/publish"
	"github.com/changefeed/changefeed/stub"
)

// ErrorLog is HQ's PillowError table, changefeed.pillow_errors (created by
// package migrations): one row per (pillow, processor, document) that failed,
// the document named by its source and id (data_source_type,
// data_source_name, document_id): one pillow can read the same id from two
// sources, and each copy has its own row. Processor "" means the document
// could not be fetched, so every processor runs again on retry.
type ErrorLog struct {
	pool *pgxpool.Pool
}

// NewErrorLog uses the errors table in pool's database.
func NewErrorLog(pool *pgxpool.Pool) *ErrorLog { return &ErrorLog{pool: pool} }

// Ping checks that the errors table's database answers.
func (l *ErrorLog) Ping(ctx context.Context) error { return l.pool.Ping(ctx) }

// Failure is one document's failure in one processor ("" for the fetch).
type Failure struct {
	Processor string
	Stub      *stub.Stub
	Err       error
}

func versionOf(s *stub.Stub) string {
	if s.DataSourceType == stub.SourceCouch {
		return s.DocumentRev
	}
	return s.SQLVersion().String()
}

// errorType names the error's most specific type, as HQ's error_type does.
func errorType(err error) string {
	var pe *PanicError
	if errors.As(err, &pe) {
		return "panic"
	}
	for {
		next := errors.Unwrap(err)
		if next == nil {
			break
		}
		err = next
	}
	t := reflect.TypeOf(err)
	if t == nil {
		return "unknown"
	}
	return t.String()
}

// record upserts failures. A newer failure of a document already in the
// table replaces its version and message; it keeps the attempt count and
// schedule, and revives a dead row only for a new version. An error reaching
// the table is returned wrapped in doc.ErrTransient: the caller must not move
// its offset past documents whose failure is not recorded.
func (l *ErrorLog) record(ctx context.Context, pillow string, r Retry, fs []Failure) error {
	type key struct {
		p   string
		doc docKey
	}
	seen := map[key]bool{}
	var procs, types, names, ids, versions, stubs, etypes, msgs []string
	for _, f := range fs {
		k := key{f.Processor, keyOf(f.Stub)}
		if seen[k] {
			continue
		}
		seen[k] = true
		b, err := json.Marshal(f.Stub)
		if err != nil {
			return fmt.Errorf("encode stub %s: %w", k.doc, err)
		}
		// jsonb refuses \u0000 (SQLSTATE 22P05).
		b = bytes.ReplaceAll(b, []byte(`\u0000`), []byte(`\ufffd`))
		procs = append(procs, f.Processor)
		types = append(types, string(f.Stub.DataSourceType))
		names = append(names, f.Stub.DataSourceName)
		ids = append(ids, rowDocID(f.Stub.DocumentID))
		versions = append(versions, versionOf(f.Stub))
		stubs = append(stubs, string(b))
		etypes = append(etypes, errorType(f.Err))
		msgs = append(msgs, truncate(f.Err.Error(), 4000))
	}
	_, err := l.pool.Exec(ctx, `
INSERT INTO changefeed.pillow_errors AS e
    (pillow, processor, data_source_type, data_source_name, document_id, version, stub, error_type, error_message, attempts, next_attempt)
SELECT $1, u.p, u.st, u.sn, u.d, u.v, u.s::jsonb, u.t, u.m, 1, now() + $2::interval
FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[]) AS u(p, st, sn, d, v, s, t, m)
ON CONFLICT (pillow, processor, data_source_type, data_source_name, document_id) DO UPDATE SET
    version = excluded.version,
    stub = excluded.stub,
    error_type = excluded.error_type,
    error_message = excluded.error_message,
    next_attempt = CASE WHEN e.dead AND e.version <> excluded.version THEN excluded.next_attempt ELSE e.next_attempt END,
    dead = e.dead AND e.version = excluded.version,
    updated_at = now()`,
		pillow, r.Backoff(1), procs, types, names, ids, versions, stubs, etypes, msgs)
	if err != nil {
		return fmt.Errorf("%w: record pillow errors: %w", doc.ErrTransient, err)
	}
	return nil
}

// resolve deletes the rows of documents processed successfully since. Only
// the rows of these documents' own sources go: the same id read from
// another source keeps its rows.
func (l *ErrorLog) resolve(ctx context.Context, pillow string, keys []docKey) error {
	if len(keys) == 0 {
		return nil
	}
	types := make([]string, len(keys))
	names := make([]string, len(keys))
	ids := make([]string, len(keys))
	for i, k := range keys {
		types[i], names[i], ids[i] = string(k.typ), k.name, rowDocID(k.id)
	}
	if _, err := l.pool.Exec(ctx, `
DELETE FROM changefeed.pillow_errors e
USING unnest($2::text[], $3::text[], $4::text[]) AS u(st, sn, d)
WHERE e.pillow = $1 AND e.data_source_type = u.st AND e.data_source_name = u.sn AND e.document_id = u.d`,
		pillow, types, names, ids); err != nil {
		return fmt.Errorf("%w: clear pillow errors: %w", doc.ErrTransient, err)
	}
	return nil
}

// any reports whether pillow has rows.
func (l *ErrorLog) any(ctx context.Context, pillow string) (bool, error) {
	var ok bool
	err := l.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM changefeed.pillow_errors WHERE pillow = $1)`, pillow).Scan(&ok)
	return ok, err
}

// maxRowDocID is the longest document id the errors table stores as it is.
// Its unique key is a btree, whose entries PostgreSQL caps at 2,704 bytes
// (SQLSTATE 54000 beyond): a longer id — the kind of poison document the
// table exists for — is stored as rowDocID's digest, and the stub column
// keeps the whole id (ErrorRow.DocumentID is read back from it).
const maxRowDocID = 1024

// rowDocID is the document_id column's value for id.
// PostgreSQL text cannot hold NUL or invalid UTF-8 either: such an id is
// stored as its digest too.
func rowDocID(id string) string {
	if len(id) <= maxRowDocID && utf8.ValidString(id) && !strings.ContainsRune(id, 0) {
		return id
	}
	sum := sha256.Sum256([]byte(id))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// truncate cuts s to about n bytes on a rune boundary, as text PostgreSQL
// accepts (valid UTF-8, no NUL): an error message must never be what stops
// its failure from being recorded.
func truncate(s string, n int) string {
	s = strings.ReplaceAll(strings.ToValidUTF8(s, "\uFFFD"), "\x00", "\uFFFD")
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

// ErrorRow is one row of the errors table.
type ErrorRow struct {
	ID             int64
	Pillow         string
	Processor      string
	DataSourceType stub.Source
	DataSourceName string
	DocumentID     string
	Version        string
	Stub           *stub.Stub
	ErrorType      string
	ErrorMessage   string
	Attempts       int
	NextAttempt    time.Time
	Dead           bool
	// UpdatedAt changes whenever a failure is recorded for the row: the
	// retry loop writes its outcome only if it is still the value it
	// claimed.
	UpdatedAt time.Time
}

// errorColumns are the columns scanErrorRow reads, in order.
const errorColumns = `id, pillow, processor, data_source_type, data_source_name, document_id, version, stub, error_type, error_message, attempts, next_attempt, dead, updated_at`

// Rows returns the errors recorded for pillow, oldest first.
func (l *ErrorLog) Rows(ctx context.Context, pillow string) ([]ErrorRow, error) {
	rows, err := l.pool.Query(ctx, `SELECT `+errorColumns+`
FROM changefeed.pillow_errors WHERE pillow = $1 ORDER BY id`, pillow)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, scanErrorRow)
}

func scanErrorRow(row pgx.CollectableRow) (ErrorRow, error) {
	var r ErrorRow
	var raw []byte
	var typ string
	if err := row.Scan(&r.ID, &r.Pillow, &r.Processor, &typ, &r.DataSourceName, &r.DocumentID, &r.Version, &raw, &r.ErrorType, &r.ErrorMessage, &r.Attempts, &r.NextAttempt, &r.Dead, &r.UpdatedAt); err != nil {
		return r, err
	}
	r.DataSourceType = stub.Source(typ)
	r.Stub = new(stub.Stub)
	if err := json.Unmarshal(raw, r.Stub); err != nil {
		return r, fmt.Errorf("pillow error %d: decode stub: %w", r.ID, err)
	}
	if rowDocID(r.Stub.DocumentID) == r.DocumentID {
		r.DocumentID = r.Stub.DocumentID // the whole id of a long one
	}
	return r, nil
}

// DeadLetters receives the stubs of documents that failed for good.
type DeadLetters interface {
	DeadLetter(ctx context.Context, topic string, rec *kgo.Record) error
}

// ProducerDeadLetters publishes dead letters with a publish.Producer,
// creating each dead-letter topic on first use.
func ProducerDeadLetters(p *publish.Producer) DeadLetters {
	return &producerDL{p: p}
}

type producerDL struct {
	p       *publish.Producer
	mu      sync.Mutex
	created map[string]bool
}

func (d *producerDL) DeadLetter(ctx context.Context, topic string, rec *kgo.Record) error {
	d.mu.Lock()
	if !d.created[topic] {
		if err := d.p.EnsureTopics(ctx, topic); err != nil {
			d.mu.Unlock()
			return err
		}
		if d.created == nil {
			d.created = map[string]bool{}
		}
		d.created[topic] = true
	}
	d.mu.Unlock()
	rec.Topic = topic
	done := make(chan error, 1)
	d.p.PublishRecord(ctx, rec, func(err error) { done <- err })
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

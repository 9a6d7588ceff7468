package pillowconf

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"gopkg.in/yaml.v3"

	"github.com/changefeed/changefeed/docstore"
	"github.com/changefeed/changefeed/pillows"
	"github.com/changefeed/changefeed/sink/essink"
	"github.com/changefeed/changefeed/sink/pgsink"
	"github.com/changefeed/changefeed/stub"
)

// Factory builds a custom processor from its options.
type Factory func(ctx context.Context, env Env) (pillows.Processor, error)

// Registry maps the names used by `custom:` to factories. It is a value
// handed to Build (no package-level registration).
type Registry map[string]Factory

// Env is what a Factory gets.
type Env struct {
	Pillow string
	// Name is the processor's name (the `name:` key, default the custom
	// name).
	Name string
	// Options is the `options:` node; decode it with Options.Decode.
	Options *yaml.Node
	// Pool returns a shared pool for url ("" = the default database).
	Pool func(ctx context.Context, url string) (*pgxpool.Pool, error)
	Log  *slog.Logger
}

// Deps are what Build needs from the caller.
type Deps struct {
	// DefaultPostgresURL is the database of postgres sinks without url
	// (and of the errors table).
	DefaultPostgresURL string
	Registry           Registry
	Log                *slog.Logger
	// HTTPClient talks to CouchDB; default: no compression (some CouchDB
	// API servers buffer gzipped responses), 30s timeout.
	HTTPClient *http.Client
}

// Built holds built pillows and the connections they share.
type Built struct {
	Pillows []*pillows.Pillow
	pools   map[string]*pgxpool.Pool
}

// Close closes the shared pools.
func (b *Built) Close() {
	for _, p := range b.pools {
		p.Close()
	}
}

// Build constructs the named pillows (all when names is empty).
func Build(ctx context.Context, f *File, names []string, d Deps) (*Built, error) {
	if d.Log == nil {
		d.Log = slog.New(slog.DiscardHandler)
	}
	if d.HTTPClient == nil {
		d.HTTPClient = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableCompression: true}}
	}
	for _, n := range names {
		if _, ok := f.Find(n); !ok {
			return nil, fmt.Errorf("%w: no pillow named %q (defined: %v)", ErrConfig, n, f.Names())
		}
	}
	b := &Built{pools: map[string]*pgxpool.Pool{}}
	pool := func(ctx context.Context, url string) (*pgxpool.Pool, error) {
		if url == "" {
			url = d.DefaultPostgresURL
		}
		if url == "" {
			return nil, errors.New("no PostgreSQL URL (set url or CHANGEFEED_POSTGRES_URL)")
		}
		if p, ok := b.pools[url]; ok {
			return p, nil
		}
		p, err := pgxpool.New(ctx, url)
		if err != nil {
			// pgx's parse errors can echo the URL, password included.
			return nil, errors.New("invalid PostgreSQL URL")
		}
		b.pools[url] = p
		return p, nil
	}
	fail := func(err error) (*Built, error) {
		b.Close()
		return nil, err
	}

	stores := map[pillows.StoreKey]pillows.Store{}
	for i, s := range f.Stores.Postgres {
		p, err := pool(ctx, s.URL)
		if err != nil {
			return fail(fmt.Errorf("%w: stores.postgres[%d].url: %w", ErrConfig, i, err))
		}
		tables := make([]docstore.PostgresTable, len(s.Tables))
		for j, t := range s.Tables {
			tables[j] = docstore.PostgresTable{Source: t.Source, Table: t.Table, IDColumn: t.IDColumn,
				TypeColumn: t.TypeColumn, DomainColumn: t.DomainColumn, DeletedColumn: t.DeletedColumn}
		}
		st, err := docstore.NewPostgres(p, tables)
		if err != nil {
			return fail(fmt.Errorf("%w: stores.postgres[%d]: %w", ErrConfig, i, err))
		}
		for _, t := range s.Tables {
			stores[pillows.StoreKey{Type: stub.SourceSQL, Name: t.Source}] = st
		}
	}
	for i, s := range f.Stores.Couch {
		st, err := docstore.NewCouch(s.URL, d.HTTPClient)
		if err != nil {
			return fail(fmt.Errorf("%w: stores.couch[%d]: %w", ErrConfig, i, err))
		}
		dbs := s.Databases
		if len(dbs) == 0 {
			dbs = []string{""}
		}
		for _, db := range dbs {
			stores[pillows.StoreKey{Type: stub.SourceCouch, Name: db}] = st
		}
	}

	for _, def := range f.Pillows {
		if len(names) > 0 && !slices.Contains(names, def.Name) {
			continue
		}
		p := &pillows.Pillow{
			Name:   def.Name,
			Topics: def.Topics,
			Group:  def.Group,
			Filter: pillows.Filter{DocumentTypes: def.Filter.DocumentTypes, Domains: def.Filter.Domains},
			Stores: stores,
			Batch:  pillows.Batching{MaxStubs: def.Batch.MaxStubs, MaxWait: time.Duration(def.Batch.MaxWait)},
			Retry: pillows.Retry{MaxAttempts: def.Retry.MaxAttempts, BackoffUnit: time.Duration(def.Retry.Backoff),
				Interval: time.Duration(def.Retry.Interval), DeadLetterTopic: def.Retry.DeadLetterTopic},
			DedupSize: def.DedupSize,
		}
		log := d.Log.With("pillow", def.Name)
		for j, pc := range def.Processors {
			at := fmt.Sprintf("processors[%d]", j)
			var pr pillows.Processor
			switch {
			case pc.Postgres != nil:
				pp, err := pool(ctx, pc.Postgres.URL)
				if err != nil {
					return fail(perr(def.Name, at+".postgres.url", "%v", err))
				}
				cols := make([]pgsink.Column, len(pc.Postgres.Columns))
				for k, c := range pc.Postgres.Columns {
					cols[k] = pgsink.Column{Name: c.Name, Field: c.Field, Type: c.Type}
				}
				s, err := pgsink.New(pp, pgsink.Config{Table: pc.Postgres.Table, Columns: cols}, log)
				if err != nil {
					return fail(perr(def.Name, at+".postgres", "%v", err))
				}
				pr = pillows.SinkProcessor(s)
			case pc.Elasticsearch != nil:
				e := pc.Elasticsearch
				mapping, err := jsonOf(&e.Mapping)
				if err != nil {
					return fail(perr(def.Name, at+".elasticsearch.mapping", "%v", err))
				}
				s, err := essink.New(essink.Config{URLs: e.URLs, Index: e.Index, Mapping: mapping,
					Username: e.Username, Password: e.Password, APIKey: e.APIKey, Refresh: e.Refresh}, log)
				if err != nil {
					return fail(perr(def.Name, at+".elasticsearch", "%v", err))
				}
				pr = pillows.SinkProcessor(s)
			default:
				fac, ok := d.Registry[pc.Custom]
				if !ok {
					known := make([]string, 0, len(d.Registry))
					for k := range d.Registry {
						known = append(known, k)
					}
					slices.Sort(known)
					return fail(perr(def.Name, at+".custom", "no processor registered as %q (registered: %v)", pc.Custom, known))
				}
				name := pc.Name
				if name == "" {
					name = pc.Custom
				}
				opts := pc.Options
				var err error
				pr, err = fac(ctx, Env{Pillow: def.Name, Name: name, Options: &opts, Pool: pool, Log: log})
				if err != nil {
					return fail(perr(def.Name, at+".custom", "%v", err))
				}
			}
			if pc.Name != "" && pr.Name() != pc.Name {
				pr = renamed{pr, pc.Name}
			}
			p.Processors = append(p.Processors, pr)
		}
		if err := p.Validate(); err != nil {
			return fail(err)
		}
		b.Pillows = append(b.Pillows, p)
	}
	return b, nil
}

// jsonOf turns a YAML node into JSON; a string node is taken as JSON.
func jsonOf(n *yaml.Node) (json.RawMessage, error) {
	if n.Kind == 0 {
		return nil, nil
	}
	if n.Kind == yaml.ScalarNode && n.Tag == "!!str" {
		if !json.Valid([]byte(n.Value)) {
			return nil, errors.New("not valid JSON")
		}
		return json.RawMessage(n.Value), nil
	}
	var v any
	if err := n.Decode(&v); err != nil {
		return nil, err
	}
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("not representable as JSON: %w", err)
	}
	return b, nil
}

// renamed gives a processor the name from the file.
type renamed struct {
	pillows.Processor
	name string
}

func (r renamed) Name() string { return r.name }

func (r renamed) Bootstrap(ctx context.Context) error {
	if b, ok := r.Processor.(pillows.Bootstrapper); ok {
		return b.Bootstrap(ctx)
	}
	return nil
}

// Package pillowconf reads pillow definitions from YAML and builds them:
// it is the composition root that constructs document stores and sinks
// (packages docstore, sink/pgsink, sink/essink) and custom processors from a
// Registry, and hands pillows.Pillow values to the runtime.
//
// A file looks like:
//
//	stores:
//	  postgres:
//	    - url: ${CHANGEFEED_SOURCE_URL}
//	      tables:
//	        - {source: cases, table: app.cases, id_column: id, type_column: doc_type,
//	           domain_column: domain, deleted_column: deleted}
//	  couch:
//	    - url: ${CHANGEFEED_COUCH_URL}
//	      databases: [commcarehq]      # empty: every database on that server
//	pillows:
//	  - name: case-report
//	    topics: [changes-sql]
//	    group: case-report             # default: name
//	    filter: {document_types: [case], domains: [demo]}
//	    batch: {max_stubs: 500, max_wait: 100ms}
//	    retry: {max_attempts: 5, backoff: 5m, interval: 30s, dead_letter_topic: case-report-dead-letter}
//	    processors:
//	      - postgres:
//	          url: ${CHANGEFEED_REPORTING_URL}   # default: the errors table's database
//	          table: reporting.cases
//	          columns: [{name: name, field: name, type: text}]
//	      - elasticsearch: {urls: [http://localhost:9200], index: cases}
//	      - custom: sms-once            # a name registered in the Registry
//	        name: sms                   # processor name; default: the custom name
//	        options: {template: "…"}
//
// ${VAR} is replaced by the environment variable VAR (secrets stay out of
// the file); $ alone is left as it is. Unknown keys are errors, and every
// error names the pillow and the field.
package pillowconf

import (
	"bytes"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/changefeed/changefeed/internal/yamlline"
)

// ErrConfig marks an invalid file.
var ErrConfig = errors.New("invalid pillows file")

// File is the YAML document.
type File struct {
	Stores  Stores   `yaml:"stores"`
	Pillows []Pillow `yaml:"pillows"`
}

// Stores are shared by every pillow of the file. A stub's
// data_source_type and data_source_name select one.
type Stores struct {
	Postgres []PostgresStore `yaml:"postgres"`
	Couch    []CouchStore    `yaml:"couch"`
}

// PostgresStore is one source database and the tables of its document
// sources.
type PostgresStore struct {
	URL    string          `yaml:"url"`
	Tables []PostgresTable `yaml:"tables"`
}

// PostgresTable maps a data_source_name to a table (docstore.PostgresTable).
type PostgresTable struct {
	Source        string `yaml:"source"`
	Table         string `yaml:"table"`
	IDColumn      string `yaml:"id_column"`
	TypeColumn    string `yaml:"type_column"`
	DomainColumn  string `yaml:"domain_column"`
	DeletedColumn string `yaml:"deleted_column"`
}

// CouchStore is one CouchDB server; Databases are the data_source_names it
// serves (empty: all).
type CouchStore struct {
	URL       string   `yaml:"url"`
	Databases []string `yaml:"databases"`
}

// Pillow is one pillow's definition.
type Pillow struct {
	Name       string      `yaml:"name"`
	Topics     []string    `yaml:"topics"`
	Group      string      `yaml:"group"`
	Filter     Filter      `yaml:"filter"`
	Batch      Batch       `yaml:"batch"`
	Retry      Retry       `yaml:"retry"`
	DedupSize  int         `yaml:"dedup_size"`
	Processors []Processor `yaml:"processors"`
}

// Filter selects stubs; empty lists match all.
type Filter struct {
	DocumentTypes []string `yaml:"document_types"`
	Domains       []string `yaml:"domains"`
}

// Batch bounds a batch.
type Batch struct {
	MaxStubs int      `yaml:"max_stubs"`
	MaxWait  Duration `yaml:"max_wait"`
}

// Retry configures per-document error retries.
type Retry struct {
	MaxAttempts     int      `yaml:"max_attempts"`
	Backoff         Duration `yaml:"backoff"`
	Interval        Duration `yaml:"interval"`
	DeadLetterTopic string   `yaml:"dead_letter_topic"`
}

// Processor is exactly one of Postgres, Elasticsearch or Custom.
type Processor struct {
	// Name overrides the processor's name (errors table, metrics).
	Name          string        `yaml:"name"`
	Postgres      *PostgresSink `yaml:"postgres"`
	Elasticsearch *ElasticSink  `yaml:"elasticsearch"`
	Custom        string        `yaml:"custom"`
	Options       yaml.Node     `yaml:"options"`
}

// PostgresSink is a reporting table (sink/pgsink).
type PostgresSink struct {
	// URL of the reporting database; default: the errors table's.
	URL     string   `yaml:"url"`
	Table   string   `yaml:"table"`
	Columns []Column `yaml:"columns"`
}

// Column maps a document field to a column.
type Column struct {
	Name  string `yaml:"name"`
	Field string `yaml:"field"`
	Type  string `yaml:"type"`
}

// ElasticSink is an Elasticsearch index (sink/essink).
type ElasticSink struct {
	URLs  []string `yaml:"urls"`
	Index string   `yaml:"index"`
	// Mapping is the index mapping as YAML (or a string of JSON).
	Mapping  yaml.Node `yaml:"mapping"`
	Username string    `yaml:"username"`
	Password string    `yaml:"password"`
	APIKey   string    `yaml:"api_key"`
	Refresh  bool      `yaml:"refresh"`
}

// Duration reads "100ms", "5m".
type Duration time.Duration

// UnmarshalYAML parses a Go duration string.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	var s string
	if err := n.Decode(&s); err != nil {
		return err
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	*d = Duration(v)
	return nil
}

var envRE = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)\}`)

// Parse reads and validates a file. getenv resolves ${VAR}; a variable that
// is unset is an error.
func Parse(data []byte, getenv func(string) string) (*File, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConfig, yamlline.Parse(data, err))
	}
	// Expand ${VAR} in scalar values only (not in comments or keys).
	var missing []string
	var walk func(n *yaml.Node)
	walk = func(n *yaml.Node) {
		if n.Kind == yaml.ScalarNode {
			n.Value = envRE.ReplaceAllStringFunc(n.Value, func(m string) string {
				name := envRE.FindStringSubmatch(m)[1]
				v := getenv(name)
				if v == "" {
					missing = append(missing, fmt.Sprintf("%s (line %d)", name, n.Line))
				}
				return v
			})
		}
		for i, c := range n.Content {
			if n.Kind == yaml.MappingNode && i%2 == 0 {
				continue // a key
			}
			walk(c)
		}
	}
	walk(&root)
	if len(missing) > 0 {
		return nil, fmt.Errorf("%w: environment variables not set: %s", ErrConfig, strings.Join(missing, ", "))
	}
	var buf bytes.Buffer
	if err := yaml.NewEncoder(&buf).Encode(&root); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	dec := yaml.NewDecoder(&buf)
	dec.KnownFields(true)
	var f File
	reencoded := slices.Clone(buf.Bytes())
	if err := dec.Decode(&f); err != nil {
		// The decoder read the re-encoded text: name the lines of the file.
		var re yaml.Node
		_ = yaml.Unmarshal(reencoded, &re)
		return nil, fmt.Errorf("%w: %w", ErrConfig, yamlline.Remap(yamlline.Parse(reencoded, err), &root, &re))
	}
	if path, err := f.validate(); err != nil {
		line := yamlline.Of(&root, yamlline.Split(path)...)
		return nil, fmt.Errorf("%w: line %d: %s", ErrConfig, line, strings.TrimPrefix(err.Error(), ErrConfig.Error()+": "))
	}
	return &f, nil
}

func perr(pillow, field, format string, args ...any) error {
	return fmt.Errorf("%w: pillow %s: %s: %s", ErrConfig, pillow, field, fmt.Sprintf(format, args...))
}

// Validate checks what can be checked without connecting anywhere. Errors
// name the pillow (or store) and the field.
func (f *File) Validate() error {
	_, err := f.validate()
	return err
}

// validate is Validate that also returns the path of the value an error is
// about ("pillows[1].batch.max_wait"), for its line.
func (f *File) validate() (path string, err error) {
	pillowAt := func(i int, field string) string { return fmt.Sprintf("pillows[%d].%s", i, field) }
	seenSource := map[string]string{}
	for i, s := range f.Stores.Postgres {
		at := fmt.Sprintf("stores.postgres[%d]", i)
		if s.URL == "" {
			return at + ".url", fmt.Errorf("%w: %s.url: required", ErrConfig, at)
		}
		if len(s.Tables) == 0 {
			return at + ".tables", fmt.Errorf("%w: %s.tables: at least one table", ErrConfig, at)
		}
		for j, t := range s.Tables {
			tat := fmt.Sprintf("%s.tables[%d]", at, j)
			switch {
			case t.Source == "":
				return tat + ".source", fmt.Errorf("%w: %s.source: required (the stubs' data_source_name)", ErrConfig, tat)
			case t.Table == "":
				return tat + ".table", fmt.Errorf("%w: %s.table: required", ErrConfig, tat)
			case t.IDColumn == "":
				return tat + ".id_column", fmt.Errorf("%w: %s.id_column: required", ErrConfig, tat)
			}
			k := "sql/" + t.Source
			if prev, ok := seenSource[k]; ok {
				return tat + ".source", fmt.Errorf("%w: %s.source: data_source_name %q already served by %s", ErrConfig, tat, t.Source, prev)
			}
			seenSource[k] = tat
		}
	}
	for i, s := range f.Stores.Couch {
		at := fmt.Sprintf("stores.couch[%d]", i)
		if s.URL == "" {
			return at + ".url", fmt.Errorf("%w: %s.url: required", ErrConfig, at)
		}
		dbs := s.Databases
		if len(dbs) == 0 {
			dbs = []string{""}
		}
		for _, db := range dbs {
			k := "couch/" + db
			if prev, ok := seenSource[k]; ok {
				return at + ".databases", fmt.Errorf("%w: %s.databases: database %q already served by %s", ErrConfig, at, db, prev)
			}
			seenSource[k] = at
		}
	}
	if len(f.Pillows) == 0 {
		return "pillows", fmt.Errorf("%w: pillows: at least one pillow", ErrConfig)
	}
	names := map[string]bool{}
	for i, p := range f.Pillows {
		name := p.Name
		if name == "" {
			return pillowAt(i, "name"), perr(fmt.Sprintf("#%d", i), "name", "required")
		}
		if names[name] {
			return pillowAt(i, "name"), perr(name, "name", "defined twice")
		}
		names[name] = true
		if len(p.Topics) == 0 {
			return pillowAt(i, "topics"), perr(name, "topics", "at least one topic")
		}
		if p.Batch.MaxStubs < 0 {
			return pillowAt(i, "batch.max_stubs"), perr(name, "batch.max_stubs", "must be positive")
		}
		if p.Batch.MaxWait < 0 {
			return pillowAt(i, "batch.max_wait"), perr(name, "batch.max_wait", "must be positive")
		}
		if p.Retry.MaxAttempts < 0 {
			return pillowAt(i, "retry.max_attempts"), perr(name, "retry.max_attempts", "must be positive")
		}
		if p.Retry.Backoff < 0 {
			return pillowAt(i, "retry.backoff"), perr(name, "retry.backoff", "must be positive")
		}
		if len(p.Processors) == 0 {
			return pillowAt(i, "processors"), perr(name, "processors", "at least one processor")
		}
		for j, pr := range p.Processors {
			at := fmt.Sprintf("processors[%d]", j)
			kinds := 0
			if pr.Postgres != nil {
				kinds++
				if pr.Postgres.Table == "" {
					return pillowAt(i, at+".postgres.table"), perr(name, at+".postgres.table", "required")
				}
				if len(pr.Postgres.Columns) == 0 {
					return pillowAt(i, at+".postgres.columns"), perr(name, at+".postgres.columns", "at least one column")
				}
				for k, c := range pr.Postgres.Columns {
					if c.Name == "" {
						field := fmt.Sprintf("%s.postgres.columns[%d].name", at, k)
						return pillowAt(i, field), perr(name, field, "required")
					}
				}
			}
			if pr.Elasticsearch != nil {
				kinds++
				if len(pr.Elasticsearch.URLs) == 0 {
					return pillowAt(i, at+".elasticsearch.urls"), perr(name, at+".elasticsearch.urls", "at least one URL")
				}
				if pr.Elasticsearch.Index == "" {
					return pillowAt(i, at+".elasticsearch.index"), perr(name, at+".elasticsearch.index", "required")
				}
			}
			if pr.Custom != "" {
				kinds++
			}
			if kinds != 1 {
				return pillowAt(i, at), perr(name, at, "exactly one of postgres, elasticsearch or custom")
			}
			if pr.Options.Kind != 0 && pr.Custom == "" {
				return pillowAt(i, at+".options"), perr(name, at+".options", "only custom processors take options")
			}
		}
	}
	return "", nil
}

// Names returns the pillow names in file order.
func (f *File) Names() []string {
	out := make([]string, len(f.Pillows))
	for i, p := range f.Pillows {
		out[i] = p.Name
	}
	return out
}

// Find returns the named pillow's definition.
func (f *File) Find(name string) (*Pillow, bool) {
	for i := range f.Pillows {
		if f.Pillows[i].Name == name {
			return &f.Pillows[i], true
		}
	}
	return nil, false
}

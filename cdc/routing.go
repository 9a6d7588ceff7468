package cdc

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/changefeed/changefeed/internal/yamlline"
)

// Default topics, as in CommCare HQ.
const (
	TopicCaseSQL  = "case-sql"
	TopicFormSQL  = "form-sql"
	TopicSMS      = "sms"
	TopicLedger   = "ledger"
	TopicLocation = "location"
	// TopicMeta receives anything the routing does not map.
	TopicMeta = "meta"
	// DefaultControlTopic receives table-level events (TRUNCATE).
	DefaultControlTopic = "changefeed-control"
)

// DefaultTypeTopics maps HQ document types to HQ's topics. A table without
// an explicit topic, and a published-from-anywhere stub without a topic
// field, go to the topic of their document type, or to TopicMeta.
func DefaultTypeTopics() map[string]string {
	return map[string]string{
		"CommCareCase":       TopicCaseSQL,
		"XFormInstance":      TopicFormSQL,
		"XFormArchived":      TopicFormSQL,
		"XFormDeprecated":    TopicFormSQL,
		"XFormDuplicate":     TopicFormSQL,
		"XFormError":         TopicFormSQL,
		"SubmissionErrorLog": TopicFormSQL,
		"SMS":                TopicSMS,
		"LedgerValue":        TopicLedger,
		"SQLLocation":        TopicLocation,
		"Location":           TopicLocation,
	}
}

// Routing says how rows of published tables become stubs. Load it with
// LoadRouting or ParseRouting; the zero value routes nothing (only
// published-from-anywhere messages).
type Routing struct {
	// File is where the routing came from, for error messages.
	File   string
	Tables []TableRoute
	// TypeTopics maps document_type to topic (DefaultTypeTopics plus the
	// file's document_type_topics).
	TypeTopics map[string]string
	// ExtraTopics are further topics a published-from-anywhere stub may name.
	ExtraTopics []string
	// DefaultTopic receives what nothing else maps (TopicMeta).
	DefaultTopic string
}

// TableRoute is one table's mapping.
type TableRoute struct {
	Schema, Name string
	// Topic; empty means by document type (TypeTopics), else DefaultTopic.
	Topic string
	// DataSourceName is the stub's data_source_name; default the table name.
	DataSourceName string
	// DocumentType is a constant document_type, or DocumentTypeColumn the
	// column holding it (exactly one is set).
	DocumentType       string
	DocumentTypeColumn string
	// IDColumn holds the document id. For a child table ParentIDColumn holds
	// the id of the document the row belongs to instead (exactly one is set).
	IDColumn       string
	ParentIDColumn string
	DomainColumn   string
	SubtypeColumn  string
	// DeletedColumn is a boolean column: true means the document is deleted.
	DeletedColumn string
	// DeletedSuffix: a document_type (from DocumentTypeColumn) ending in it
	// means deleted, as HQ's "CommCareCase-Deleted".
	DeletedSuffix string
}

// QualifiedName is schema.table as written in messages (unquoted).
func (t *TableRoute) QualifiedName() string { return t.Schema + "." + t.Name }

// IsChild reports whether rows publish their parent's stub.
func (t *TableRoute) IsChild() bool { return t.ParentIDColumn != "" }

// docIDColumn is the column whose value is the stub's document_id.
func (t *TableRoute) docIDColumn() string {
	if t.IsChild() {
		return t.ParentIDColumn
	}
	return t.IDColumn
}

// columns returns the routed columns with the YAML field naming each.
func (t *TableRoute) columns() []fieldColumn {
	var out []fieldColumn
	add := func(field, col string) {
		if col != "" {
			out = append(out, fieldColumn{field, col})
		}
	}
	add("id_column", t.IDColumn)
	add("parent.id_column", t.ParentIDColumn)
	add("document_type_column", t.DocumentTypeColumn)
	add("domain_column", t.DomainColumn)
	add("subtype_column", t.SubtypeColumn)
	add("deletion.column", t.DeletedColumn)
	return out
}

type fieldColumn struct{ field, column string }

// topicPattern is Kafka's legal topic name.
var topicPattern = regexp.MustCompile(`^[a-zA-Z0-9._-]{1,249}$`)

// LoadRouting reads and validates a routing file.
func LoadRouting(path string) (*Routing, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: routing file %s: %w", ErrConfig, path, err)
	}
	return ParseRouting(path, b)
}

type routingYAML struct {
	Tables             []yaml.Node       `yaml:"tables"`
	Topics             []string          `yaml:"topics"`
	DocumentTypeTopics map[string]string `yaml:"document_type_topics"`
	DefaultTopic       string            `yaml:"default_topic"`
}

type tableYAML struct {
	Table              string `yaml:"table"`
	Topic              string `yaml:"topic"`
	DataSourceName     string `yaml:"data_source_name"`
	DocumentType       string `yaml:"document_type"`
	DocumentTypeColumn string `yaml:"document_type_column"`
	IDColumn           string `yaml:"id_column"`
	DomainColumn       string `yaml:"domain_column"`
	SubtypeColumn      string `yaml:"subtype_column"`
	Deletion           *struct {
		Column        string `yaml:"column"`
		DocTypeSuffix string `yaml:"doc_type_suffix"`
	} `yaml:"deletion"`
	Parent *struct {
		IDColumn string `yaml:"id_column"`
	} `yaml:"parent"`
}

var tableKeys = map[string][]string{
	"":         {"table", "topic", "data_source_name", "document_type", "document_type_column", "id_column", "domain_column", "subtype_column", "deletion", "parent"},
	"deletion": {"column", "doc_type_suffix"},
	"parent":   {"id_column"},
}

// ParseRouting parses and validates routing YAML; file names it in errors.
func ParseRouting(file string, data []byte) (*Routing, error) {
	fail := func(format string, args ...any) error {
		return fmt.Errorf("%w: routing file %s: %s", ErrConfig, file, fmt.Sprintf(format, args...))
	}
	var raw routingYAML
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&raw); err != nil && !errors.Is(err, io.EOF) {
		return nil, fail("%v", yamlline.Parse(data, err))
	}
	// Decoded again as a tree: where each value is, for the errors below.
	var root yaml.Node
	_ = yaml.Unmarshal(data, &root)
	line := func(path ...string) int { return yamlline.Of(&root, path...) }
	r := &Routing{File: file, TypeTopics: DefaultTypeTopics(), DefaultTopic: TopicMeta}
	if raw.DefaultTopic != "" {
		if !topicPattern.MatchString(raw.DefaultTopic) {
			return nil, fail("line %d: field default_topic: %q is not a valid Kafka topic name", line("default_topic"), raw.DefaultTopic)
		}
		r.DefaultTopic = raw.DefaultTopic
	}
	for dt, topic := range raw.DocumentTypeTopics {
		if dt == "" || !topicPattern.MatchString(topic) {
			return nil, fail("line %d: field document_type_topics: %q: %q is not a valid Kafka topic name", line("document_type_topics", dt), dt, topic)
		}
		r.TypeTopics[dt] = topic
	}
	for i, topic := range raw.Topics {
		if !topicPattern.MatchString(topic) {
			return nil, fail("line %d: field topics: %q is not a valid Kafka topic name", line("topics", fmt.Sprintf("[%d]", i)), topic)
		}
		r.ExtraTopics = append(r.ExtraTopics, topic)
	}
	seen := map[string]bool{}
	for i := range raw.Tables {
		n := &raw.Tables[i]
		t, err := parseTable(n)
		name := t.QualifiedName()
		if t.Name == "" {
			name = fmt.Sprintf("#%d (line %d)", i+1, n.Line)
		}
		if err != nil {
			return nil, fail("table %s: %v", name, yamlline.With(n.Line, err))
		}
		if seen[name] {
			return nil, fail("table %s: line %d: field table: listed twice", name, n.Line)
		}
		seen[name] = true
		r.Tables = append(r.Tables, t)
	}
	return r, nil
}

func parseTable(n *yaml.Node) (TableRoute, error) {
	var y tableYAML
	var t TableRoute
	if n.Kind != yaml.MappingNode {
		return t, fmt.Errorf("line %d: want a mapping with a table field", n.Line)
	}
	// Read the table name first so that later errors can name it.
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == "table" {
			t.Schema, t.Name = splitTable(n.Content[i+1].Value)
		}
	}
	if err := checkKeys(n, ""); err != nil {
		return t, err
	}
	if err := n.Decode(&y); err != nil {
		return t, err
	}
	if y.Table == "" {
		return t, errors.New("field table: required")
	}
	if t.Schema == "" || t.Name == "" || strings.Count(y.Table, ".") > 1 {
		return t, fmt.Errorf("field table: %q: want table or schema.table", y.Table)
	}
	if t.Schema == "changefeed" {
		return t, errors.New("field table: the changefeed schema is changefeed's own and cannot be published")
	}
	t.Topic = y.Topic
	t.DataSourceName = y.DataSourceName
	t.DocumentType = y.DocumentType
	t.DocumentTypeColumn = y.DocumentTypeColumn
	t.IDColumn = y.IDColumn
	t.DomainColumn = y.DomainColumn
	t.SubtypeColumn = y.SubtypeColumn
	if y.Deletion != nil {
		t.DeletedColumn = y.Deletion.Column
		t.DeletedSuffix = y.Deletion.DocTypeSuffix
	}
	if y.Parent != nil {
		t.ParentIDColumn = y.Parent.IDColumn
		if t.ParentIDColumn == "" {
			return t, errors.New("field parent.id_column: required when parent is set")
		}
	}
	if t.DataSourceName == "" {
		t.DataSourceName = t.Name
	}
	switch {
	case t.Topic != "" && !topicPattern.MatchString(t.Topic):
		return t, fmt.Errorf("field topic: %q is not a valid Kafka topic name", t.Topic)
	case t.DocumentType == "" && t.DocumentTypeColumn == "":
		return t, errors.New("field document_type: required (a constant), or document_type_column (a column)")
	case t.DocumentType != "" && t.DocumentTypeColumn != "":
		return t, errors.New("fields document_type and document_type_column: set only one")
	case t.IDColumn == "" && t.ParentIDColumn == "":
		return t, errors.New("field id_column: required (or parent.id_column for a child table)")
	case t.IDColumn != "" && t.ParentIDColumn != "":
		return t, errors.New("fields id_column and parent.id_column: set only one (a child table publishes its parent's stub)")
	case t.IsChild() && (t.DeletedColumn != "" || t.DeletedSuffix != ""):
		return t, errors.New("field deletion: a child table's rows never delete their parent document; remove deletion")
	case t.DeletedSuffix != "" && t.DocumentTypeColumn == "":
		return t, errors.New("field deletion.doc_type_suffix: needs document_type_column")
	case y.Deletion != nil && t.DeletedColumn == "" && t.DeletedSuffix == "":
		return t, errors.New("field deletion: set column or doc_type_suffix (a DELETE is always a deletion)")
	}
	return t, nil
}

// checkKeys rejects unknown keys in a table mapping and its sub-mappings, so
// a typo names its table.
func checkKeys(n *yaml.Node, path string) error {
	allowed := tableKeys[path]
	for i := 0; i+1 < len(n.Content); i += 2 {
		k := n.Content[i].Value
		full := k
		if path != "" {
			full = path + "." + k
		}
		if !slices.Contains(allowed, k) {
			return fmt.Errorf("field %s: unknown (line %d)", full, n.Content[i].Line)
		}
		if v := n.Content[i+1]; path == "" && (k == "deletion" || k == "parent") {
			if v.Kind != yaml.MappingNode {
				return fmt.Errorf("field %s: want a mapping (line %d)", k, v.Line)
			}
			if err := checkKeys(v, k); err != nil {
				return err
			}
		}
	}
	return nil
}

func splitTable(s string) (schema, name string) {
	if schema, name, ok := strings.Cut(s, "."); ok {
		return schema, name
	}
	return "public", s
}

// topicFor is the topic of a document type.
func (r *Routing) topicFor(docType string) string {
	if t, ok := r.TypeTopics[docType]; ok {
		return t
	}
	return r.DefaultTopic
}

// Table returns the route of schema.name, or nil.
func (r *Routing) Table(schema, name string) *TableRoute {
	for i := range r.Tables {
		if r.Tables[i].Schema == schema && r.Tables[i].Name == name {
			return &r.Tables[i]
		}
	}
	return nil
}

// Topics returns every topic the routing can publish to, sorted, control
// topic excluded.
func (r *Routing) Topics() []string {
	set := map[string]bool{r.DefaultTopic: true}
	for _, t := range r.TypeTopics {
		set[t] = true
	}
	for _, t := range r.ExtraTopics {
		set[t] = true
	}
	for i := range r.Tables {
		if r.Tables[i].Topic != "" {
			set[r.Tables[i].Topic] = true
		}
	}
	out := make([]string, 0, len(set))
	for t := range set {
		out = append(out, t)
	}
	sort.Strings(out)
	return out
}

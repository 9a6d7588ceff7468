package couchsource

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/changefeed/changefeed/internal/yamlline"
)

// DeletedSuffix marks a soft-deleted document's doc_type ("CommCareCase-Deleted").
const DeletedSuffix = "-Deleted"

// UnknownDocType is the document_type of a document without a doc_type
// (and of a deletion whose earlier revisions are gone): a stub must name a type.
const UnknownDocType = "Unknown"

// DesignDocType is the document_type of design documents when they are
// published (Routing.IncludeDesignDocs).
const DesignDocType = "_design"

// ErrRouting marks an invalid routing configuration.
var ErrRouting = errors.New("couch routing")

// Rule says where the stubs of one doc_type go and which document fields
// fill the stub.
type Rule struct {
	// Topic receives the stubs.
	Topic string
	// DomainField is the top-level document field holding the domain.
	DomainField string
	// SubtypeField is the top-level document field holding the subtype (a
	// case's type, a form's xmlns); empty for none.
	SubtypeField string
}

// Fields names the top-level document fields that fill a stub.
type Fields struct {
	// DomainField holds the domain. Default "domain".
	DomainField string `yaml:"domain_field"`
	// SubtypeField holds the subtype. Default: no subtype.
	SubtypeField string `yaml:"subtype_field"`
}

// Routing maps doc_type to topic. The file has the SQL routing's keys for
// what the two share (default_topic, document_type_topics) and adds what
// only documents have:
//
//	default_topic: meta
//	document_type_topics:          # doc_type → topic, over the defaults
//	  MyDoc: my-topic
//	document_fields:               # doc_type → fields filling the stub
//	  MyDoc: {domain_field: project, subtype_field: kind}
//	include_design_docs: false
//	selector: {doc_type: {"$in": [CommCareCase, XFormInstance]}}
//
// Entries are added to the defaults (DefaultRouting) or replace the default
// of the same doc_type. A doc_type ending in "-Deleted" follows its base
// type's rule and marks a deletion.
type Routing struct {
	// DefaultTopic receives every doc_type without a topic. Default "meta".
	DefaultTopic string `yaml:"default_topic"`
	// TypeTopics maps doc_type to topic.
	TypeTopics map[string]string `yaml:"document_type_topics"`
	// Fields maps doc_type to the fields that fill its stubs; other
	// doc_types use the "domain" field and no subtype.
	Fields map[string]Fields `yaml:"document_fields"`
	// IncludeDesignDocs publishes design documents (document_type
	// "_design", default topic). Default false: they are skipped (their
	// changes still advance the checkpoint).
	IncludeDesignDocs bool `yaml:"include_design_docs"`
	// Selector, when set, is sent to CouchDB as _changes?filter=_selector so
	// that the server drops non-matching changes. CouchDB 2+ supports it;
	// pouchdb-server 4.2 does not (it fails the request).
	Selector map[string]any `yaml:"selector"`
}

// DefaultRouting returns CommCare HQ's topics for Couch documents.
func DefaultRouting() *Routing {
	return &Routing{
		DefaultTopic: "meta",
		TypeTopics: map[string]string{
			"CommCareCase":  "case",
			"XFormInstance": "form",
			// The other form-like doc types HQ sends to the form topic.
			"XFormArchived":      "form",
			"XFormDeprecated":    "form",
			"XFormDuplicate":     "form",
			"XFormError":         "form",
			"SubmissionErrorLog": "form",
			"CommCareUser":       "commcare-user",
			"WebUser":            "web-user",
			"Group":              "group",
			"Domain":             "domain",
			"Application":        "app",
			"LinkedApplication":  "app",
			"RemoteApp":          "app",
		},
		Fields: map[string]Fields{
			"CommCareCase":       {SubtypeField: "type"},
			"XFormInstance":      {SubtypeField: "xmlns"},
			"XFormArchived":      {SubtypeField: "xmlns"},
			"XFormDeprecated":    {SubtypeField: "xmlns"},
			"XFormDuplicate":     {SubtypeField: "xmlns"},
			"XFormError":         {SubtypeField: "xmlns"},
			"SubmissionErrorLog": {SubtypeField: "xmlns"},
			// A Domain document's own name is its domain.
			"Domain": {DomainField: "name"},
		},
	}
}

// LoadRouting reads a routing file over the defaults; path "" returns the
// defaults. Errors name the file, the doc_type and the field.
func LoadRouting(path string) (*Routing, error) {
	r := DefaultRouting()
	if path == "" {
		return r, r.validate("defaults", nil)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: routing file %s: %w", ErrRouting, path, err)
	}
	return parseRouting(path, b)
}

// parseRouting reads a routing file's content over the defaults; path
// names it in errors.
func parseRouting(path string, b []byte) (*Routing, error) {
	r := DefaultRouting()
	var file Routing
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&file); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: routing file %s: %w", ErrRouting, path, yamlline.Parse(b, err))
	}
	// Decoded again as a tree: where each value is, for the errors below.
	var root yaml.Node
	_ = yaml.Unmarshal(b, &root)
	if file.DefaultTopic != "" {
		r.DefaultTopic = file.DefaultTopic
	}
	r.IncludeDesignDocs = file.IncludeDesignDocs
	r.Selector = file.Selector
	for dt, topic := range file.TypeTopics {
		r.TypeTopics[dt] = topic
	}
	for dt, f := range file.Fields {
		r.Fields[dt] = f
	}
	if err := r.validate("routing file "+path, &root); err != nil {
		return nil, err
	}
	return r, nil
}

var (
	topicRE = regexp.MustCompile(`^[a-zA-Z0-9._-]{1,249}$`)
	fieldRE = regexp.MustCompile(`^[^\x00-\x1f"\\]{1,128}$`)
)

// validate fills defaults and checks every entry; where names the file
// and root, when not nil, is the file's content, for line numbers.
func (r *Routing) validate(where string, root *yaml.Node) error {
	if r.DefaultTopic == "" {
		r.DefaultTopic = "meta"
	}
	if r.TypeTopics == nil {
		r.TypeTopics = map[string]string{}
	}
	if r.Fields == nil {
		r.Fields = map[string]Fields{}
	}
	// at is where an error is: the file and its line.
	at := func(path ...string) string {
		if root == nil {
			return where
		}
		return fmt.Sprintf("%s: line %d", where, yamlline.Of(root, path...))
	}
	if !topicRE.MatchString(r.DefaultTopic) {
		return fmt.Errorf("%w: %s: field default_topic: %q is not a valid Kafka topic name", ErrRouting, at("default_topic"), r.DefaultTopic)
	}
	if r.Selector != nil {
		if _, err := json.Marshal(r.Selector); err != nil {
			return fmt.Errorf("%w: %s: field selector: %w", ErrRouting, at("selector"), err)
		}
	}
	checkType := func(field, key, dt string) error {
		switch {
		case dt == "":
			return fmt.Errorf("%w: %s: field %s: empty doc_type", ErrRouting, at(key, dt), field)
		case strings.HasSuffix(dt, DeletedSuffix):
			return fmt.Errorf("%w: %s: field %s: %s: name the base doc_type; %q documents follow its entry", ErrRouting, at(key, dt), field, dt, DeletedSuffix)
		}
		return nil
	}
	for dt, topic := range r.TypeTopics {
		if err := checkType("document_type_topics", "document_type_topics", dt); err != nil {
			return err
		}
		if !topicRE.MatchString(topic) {
			return fmt.Errorf("%w: %s: field document_type_topics: %s: %q is not a valid Kafka topic name", ErrRouting, at("document_type_topics", dt), dt, topic)
		}
	}
	for dt, f := range r.Fields {
		if err := checkType("document_fields", "document_fields", dt); err != nil {
			return err
		}
		if f.DomainField == "" {
			f.DomainField = "domain"
		}
		if !fieldRE.MatchString(f.DomainField) {
			return fmt.Errorf("%w: %s: field document_fields: %s: domain_field: invalid field name %q", ErrRouting, at("document_fields", dt, "domain_field"), dt, f.DomainField)
		}
		if f.SubtypeField != "" && !fieldRE.MatchString(f.SubtypeField) {
			return fmt.Errorf("%w: %s: field document_fields: %s: subtype_field: invalid field name %q", ErrRouting, at("document_fields", dt, "subtype_field"), dt, f.SubtypeField)
		}
		r.Fields[dt] = f
	}
	return nil
}

// Route returns the rule for a doc_type, and whether the doc_type marks a
// deletion.
func (r *Routing) Route(docType string) (rule Rule, deleted bool) {
	base, deleted := strings.CutSuffix(docType, DeletedSuffix)
	rule = Rule{Topic: r.DefaultTopic, DomainField: "domain"}
	if t, ok := r.TypeTopics[base]; ok {
		rule.Topic = t
	}
	if f, ok := r.Fields[base]; ok {
		rule.DomainField, rule.SubtypeField = f.DomainField, f.SubtypeField
	}
	return rule, deleted
}

// Topics lists every topic the routing can send to, sorted.
func (r *Routing) Topics() []string {
	topics := []string{r.DefaultTopic}
	for _, t := range r.TypeTopics {
		if !slices.Contains(topics, t) {
			topics = append(topics, t)
		}
	}
	slices.Sort(topics)
	return topics
}

// fields returns the top-level document fields a stub needs: the projection.
func (r *Routing) fields() map[string]bool {
	keep := map[string]bool{"_id": true, "_rev": true, "_deleted": true, "doc_type": true, "domain": true}
	for _, f := range r.Fields {
		keep[f.DomainField] = true
		if f.SubtypeField != "" {
			keep[f.SubtypeField] = true
		}
	}
	return keep
}

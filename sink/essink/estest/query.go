package estest

import (
	"encoding/json"
	"fmt"
	"math/big"
	"slices"
	"strconv"
	"strings"
	"time"
)

// matches evaluates the supported subset of the query DSL against one
// document. A nil query matches everything.
func matches(q map[string]any, id string, src map[string]any) (bool, error) {
	if len(q) == 0 {
		return true, nil
	}
	if len(q) != 1 {
		return false, fmt.Errorf("[query] malformed query, expected a single query type, got %d", len(q))
	}
	for typ, body := range q {
		args, _ := body.(map[string]any)
		switch typ {
		case "match_all":
			return true, nil
		case "match_none":
			return false, nil
		case "term":
			field, value, err := single(typ, args)
			if err != nil {
				return false, err
			}
			if m, ok := value.(map[string]any); ok {
				value = m["value"]
			}
			return anyEqual(values(src, field), []any{value}), nil
		case "terms":
			field, value, err := single(typ, args)
			if err != nil {
				return false, err
			}
			list, ok := value.([]any)
			if !ok {
				return false, fmt.Errorf("[terms] query does not support [%s] with a non-array value", field)
			}
			return anyEqual(values(src, field), list), nil
		case "exists":
			field, _ := args["field"].(string)
			if field == "" {
				return false, fmt.Errorf("[exists] must be provided with a [field]")
			}
			return slices.ContainsFunc(values(src, field), func(v any) bool { return v != nil }), nil
		case "ids":
			list, _ := args["values"].([]any)
			return slices.Contains(list, any(id)), nil
		case "bool":
			return matchBool(args, id, src)
		default:
			return false, fmt.Errorf("estest: unsupported query [%s] (the test double serves match_all, term, terms, exists, ids and bool)", typ)
		}
	}
	return false, nil
}

func single(typ string, args map[string]any) (string, any, error) {
	if len(args) != 1 {
		return "", nil, fmt.Errorf("[%s] query doesn't support multiple fields", typ)
	}
	for f, v := range args {
		return f, v, nil
	}
	return "", nil, nil
}

func matchBool(args map[string]any, id string, src map[string]any) (bool, error) {
	clauses := func(k string) []map[string]any {
		var out []map[string]any
		switch v := args[k].(type) {
		case map[string]any:
			out = append(out, v)
		case []any:
			for _, e := range v {
				if m, ok := e.(map[string]any); ok {
					out = append(out, m)
				}
			}
		}
		return out
	}
	for _, k := range []string{"must", "filter"} {
		for _, c := range clauses(k) {
			if ok, err := matches(c, id, src); err != nil || !ok {
				return false, err
			}
		}
	}
	for _, c := range clauses("must_not") {
		if ok, err := matches(c, id, src); err != nil || ok {
			return false, err
		}
	}
	should := clauses("should")
	if len(should) == 0 || len(clauses("must"))+len(clauses("filter")) > 0 {
		return true, nil
	}
	for _, c := range should {
		if ok, err := matches(c, id, src); err != nil || ok {
			return ok, err
		}
	}
	return false, nil
}

// values returns the values at a dotted path, arrays flattened (as
// Elasticsearch indexes arrays of objects).
func values(v any, path string) []any {
	if path == "" {
		if a, ok := v.([]any); ok {
			return a
		}
		return []any{v}
	}
	head, rest, _ := strings.Cut(path, ".")
	var out []any
	switch x := v.(type) {
	case map[string]any:
		if c, ok := x[head]; ok {
			out = append(out, values(c, rest)...)
		}
	case []any:
		for _, e := range x {
			out = append(out, values(e, path)...)
		}
	}
	return out
}

// anyEqual reports whether some stored value equals some query value. A
// number equals a string holding the same number, as Elasticsearch coerces
// query values to the field's type.
func anyEqual(stored, query []any) bool {
	for _, s := range stored {
		for _, q := range query {
			if equal(s, q) {
				return true
			}
		}
	}
	return false
}

func equal(a, b any) bool {
	ra, an := number(a)
	rb, bn := number(b)
	if an && bn {
		return ra.Cmp(rb) == 0
	}
	sa, aok := a.(string)
	sb, bok := b.(string)
	if aok && bok {
		return sa == sb
	}
	ba, aok := a.(bool)
	bb, bok := b.(bool)
	return aok && bok && ba == bb
}

func number(v any) (*big.Rat, bool) {
	var s string
	switch x := v.(type) {
	case json.Number:
		s = string(x)
	case float64:
		s = strconv.FormatFloat(x, 'g', -1, 64)
	case string:
		s = x
	default:
		return nil, false
	}
	if strings.ContainsAny(s, "/xXpP_") {
		return nil, false
	}
	return new(big.Rat).SetString(s)
}

var metadataFields = []string{"_id", "_index", "_source", "_routing", "_version", "_seq_no", "_primary_term",
	"_field_names", "_ignored", "_tier", "_doc_count", "_data_stream_timestamp", "_nested_path", "_feature"}

// checkSource checks a source against the explicit mapping and returns the
// reason of a document_parsing_exception, or "".
func checkSource(mappings map[string]any, doc map[string]any, id string) string {
	for k := range doc {
		if slices.Contains(metadataFields, k) {
			return fmt.Sprintf("[1:2] Field [%s] is a metadata field and cannot be added inside a document. Use the index API request parameters.", k)
		}
	}
	props, _ := mappings["properties"].(map[string]any)
	return checkObject(props, doc, "", id)
}

func checkObject(props map[string]any, obj map[string]any, prefix, id string) string {
	for k, v := range obj {
		prop, _ := props[k].(map[string]any)
		if prop == nil {
			continue
		}
		if r := checkField(prop, v, prefix+k, id); r != "" {
			return r
		}
	}
	return ""
}

func checkField(prop map[string]any, v any, path, id string) string {
	if enabled, ok := prop["enabled"].(bool); ok && !enabled {
		return ""
	}
	typ, _ := prop["type"].(string)
	if typ == "" && prop["properties"] != nil {
		typ = "object"
	}
	if arr, ok := v.([]any); ok {
		for _, e := range arr {
			if r := checkField(prop, e, path, id); r != "" {
				return r
			}
		}
		return ""
	}
	if v == nil {
		return ""
	}
	bad := func() string {
		b, _ := json.Marshal(v)
		return fmt.Sprintf("[1:2] failed to parse field [%s] of type [%s] in document with id '%s'. Preview of field's value: '%s'", path, typ, id, b)
	}
	_, isMap := v.(map[string]any)
	switch typ {
	case "long", "integer", "short", "byte", "unsigned_long", "double", "float", "half_float", "scaled_float":
		if _, ok := number(v); !ok {
			return bad()
		}
	case "boolean":
		switch x := v.(type) {
		case bool:
		case string:
			if x != "true" && x != "false" && x != "" {
				return bad()
			}
		default:
			return bad()
		}
	case "date":
		switch x := v.(type) {
		case json.Number:
		case string:
			if !isDate(x) {
				return bad()
			}
		default:
			return bad()
		}
	case "keyword", "text", "match_only_text", "wildcard", "constant_keyword":
		if isMap {
			return bad()
		}
	case "object", "nested":
		m, ok := v.(map[string]any)
		if !ok {
			return fmt.Sprintf("object mapping for [%s] tried to parse field [%s] as object, but found a concrete value", path, path)
		}
		props, _ := prop["properties"].(map[string]any)
		return checkObject(props, m, path+".", id)
	}
	return ""
}

func isDate(s string) bool {
	for _, l := range []string{time.RFC3339Nano, "2006-01-02T15:04:05.999999999", "2006-01-02T15:04", "2006-01-02"} {
		if _, err := time.Parse(l, s); err == nil {
			return true
		}
	}
	_, err := strconv.ParseInt(s, 10, 64)
	return err == nil
}

// fieldTypes are the mapping types the double accepts (it checks values of
// only some of them, see checkField).
var fieldTypes = []string{"text", "keyword", "match_only_text", "wildcard", "constant_keyword",
	"long", "integer", "short", "byte", "unsigned_long", "double", "float", "half_float", "scaled_float",
	"boolean", "date", "date_nanos", "object", "nested", "flattened", "ip", "binary", "geo_point",
	"geo_shape", "completion", "search_as_you_type", "token_count", "dense_vector", "sparse_vector",
	"alias", "version", "integer_range", "long_range", "float_range", "double_range", "date_range", "ip_range"}

// checkMapping rejects unknown field types, as Elasticsearch does with
// "No handler for type [x] declared on field [y]".
func checkMapping(m map[string]any) string {
	props, _ := m["properties"].(map[string]any)
	for name, p := range props {
		prop, ok := p.(map[string]any)
		if !ok {
			return fmt.Sprintf("Expected map for property [fields] on field [%s] but got a class java.lang.String", name)
		}
		if typ, ok := prop["type"].(string); ok && !slices.Contains(fieldTypes, typ) {
			return fmt.Sprintf("No handler for type [%s] declared on field [%s]", typ, name)
		}
		if r := checkMapping(prop); r != "" {
			return r
		}
	}
	return ""
}

// Package yamlline gives configuration errors a line number: the line of a
// value in a YAML document, found after the document was decoded and
// checked, and a line for the parser's own errors that lack one.
package yamlline

import (
	"bytes"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"unicode/utf8"

	"gopkg.in/yaml.v3"
)

var lineRE = regexp.MustCompile(`\bline \d+`)

// HasLine reports whether an error message names a line.
func HasLine(err error) bool { return lineRE.MatchString(err.Error()) }

// With prefixes err with "line N: " unless it names a line already.
func With(line int, err error) error {
	if err == nil || HasLine(err) {
		return err
	}
	return fmt.Errorf("line %d: %w", max(line, 1), err)
}

// Parse gives an error of the YAML parser a line when it has none: the
// reader's errors (a control character, invalid UTF-8) are placed at the
// first such byte of data, anything else at its last line (the parser ran
// out of input).
func Parse(data []byte, err error) error {
	if err == nil || HasLine(err) {
		return err
	}
	line := 1 + bytes.Count(bytes.TrimRight(data, "\n"), []byte{'\n'})
	for i := 0; i < len(data); {
		r, n := utf8.DecodeRune(data[i:])
		if r == utf8.RuneError && n == 1 || r < 0x20 && r != '\t' && r != '\n' && r != '\r' || r == 0x7f {
			line = 1 + bytes.Count(data[:i], []byte{'\n'})
			break
		}
		i += n
	}
	return With(line, err)
}

// Of returns the line of the value at path in root, a decoded document:
// path is mapping keys and "[i]" for sequence items (see Split). Where the
// path ends early (a key that is missing), it is the line of the last node
// found; for a key found, the line of the key.
func Of(root *yaml.Node, path ...string) int {
	n := root
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	line := n.Line
	for _, part := range path {
		next, keyLine := child(n, part)
		if next == nil {
			break
		}
		n, line = next, keyLine
	}
	return max(line, 1)
}

// Split turns a dotted path as "pillows[2].processors[0].postgres.table"
// into the parts Of takes: "pillows", "[2]", "processors", "[0]", …
func Split(path string) []string {
	var parts []string
	for _, p := range strings.Split(path, ".") {
		for p != "" {
			i := strings.IndexByte(p, '[')
			switch {
			case i < 0:
				parts = append(parts, p)
				p = ""
			case i > 0:
				parts = append(parts, p[:i])
				p = p[i:]
			default:
				j := strings.IndexByte(p, ']')
				if j < 0 {
					return parts
				}
				parts = append(parts, p[:j+1])
				p = p[j+1:]
			}
		}
	}
	return parts
}

func child(n *yaml.Node, part string) (*yaml.Node, int) {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	if strings.HasPrefix(part, "[") {
		i, err := strconv.Atoi(strings.Trim(part, "[]"))
		if err != nil || n.Kind != yaml.SequenceNode || i < 0 || i >= len(n.Content) {
			return nil, 0
		}
		return n.Content[i], n.Content[i].Line
	}
	if n.Kind != yaml.MappingNode {
		return nil, 0
	}
	// The last of duplicate keys is the one decoded.
	for i := len(n.Content) - 2; i >= 0; i -= 2 {
		if n.Content[i].Value == part {
			return n.Content[i+1], n.Content[i].Line
		}
	}
	return nil, 0
}

// Remap rewrites the line numbers of err, which is about text re-encoded
// from the tree orig (as re, decoded from that text), into orig's lines:
// the two trees have the same shape, so their nodes pair up. A line that
// pairs with no node is left as it is.
func Remap(err error, orig, re *yaml.Node) error {
	if err == nil {
		return nil
	}
	lines := map[int]int{}
	var walk func(a, b *yaml.Node)
	walk = func(a, b *yaml.Node) {
		if _, ok := lines[b.Line]; !ok {
			lines[b.Line] = a.Line
		}
		for i := 0; i < len(a.Content) && i < len(b.Content); i++ {
			walk(a.Content[i], b.Content[i])
		}
	}
	walk(orig, re)
	msg := lineRE.ReplaceAllStringFunc(err.Error(), func(m string) string {
		n, convErr := strconv.Atoi(strings.TrimPrefix(m, "line "))
		if l, ok := lines[n]; ok && convErr == nil && l > 0 {
			return "line " + strconv.Itoa(l)
		}
		return m
	})
	return errors.New(msg)
}

package couchsource

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// The projection: CouchDB has no field projection on _changes, and
// include_docs returns whole documents. A stub needs a handful of top-level
// fields, so the follower rewrites the response while it streams: every
// change row's "doc" object is reduced to the wanted fields, and everything
// else in it is skipped byte by byte without being kept. kivik then parses
// rows of a few hundred bytes, whatever the size of the documents, and the
// follower's memory does not depend on document size.

const (
	// maxKeyLen bounds a key that is compared with the wanted fields;
	// longer keys are skipped unread (no wanted field is that long).
	maxKeyLen = 256
	// maxFieldLen bounds a kept value. A wanted field whose value is larger
	// (a doc_type holding a megabyte string) is dropped, not truncated: a
	// truncated value would be wrong, a missing one routes to the default.
	maxFieldLen = 64 << 10
	// maxOuterDepth bounds nesting outside documents. Change rows nest four
	// levels at most (longpoll: object, results array, row, changes array).
	maxOuterDepth = 16
)

// errSyntax marks a response that is not the JSON a _changes feed sends (an
// HTML error page, a truncated line). The feed is retried.
var errSyntax = errors.New("malformed _changes response")

// projector copies a JSON stream from r to w, reducing objects to the keep
// fields: each "doc" member's object in feed mode, the top-level object in
// document mode.
type projector struct {
	r    *bufio.Reader
	w    *bufio.Writer
	keep map[string]bool
	// docMode projects the top-level object itself (a document GET) instead
	// of the "doc" members of change rows.
	docMode bool

	key  []byte // scratch: the current key
	val  []byte // scratch: a kept value
	open []bool // scratch: containers open in a skipped value
}

// flushingReader flushes the projector's output before every read of the
// input that may block, so that a live row reaches kivik as soon as its
// last byte arrived instead of waiting for the next row to fill a buffer.
type flushingReader struct {
	r io.Reader
	w *bufio.Writer
}

func (f flushingReader) Read(p []byte) (int, error) {
	if err := f.w.Flush(); err != nil {
		return 0, err
	}
	return f.r.Read(p)
}

// projectStream returns a reader yielding the projection of body. It runs a
// goroutine that stops when body ends or the returned reader is closed;
// closing the returned reader closes body.
func projectStream(body io.ReadCloser, keep map[string]bool, docMode bool) io.ReadCloser {
	pr, pw := io.Pipe()
	out := bufio.NewWriterSize(pw, 16<<10)
	p := &projector{
		r:       bufio.NewReaderSize(flushingReader{r: body, w: out}, 32<<10),
		w:       out,
		keep:    keep,
		docMode: docMode,
	}
	go func() {
		err := p.run()
		if err == nil {
			err = out.Flush()
		}
		// A nil error closes the pipe with io.EOF.
		pw.CloseWithError(err)
		body.Close()
	}()
	return &projectedBody{pr: pr, body: body}
}

type projectedBody struct {
	pr   *io.PipeReader
	body io.Closer
}

func (b *projectedBody) Read(p []byte) (int, error) { return b.pr.Read(p) }

// Close stops the projection: the goroutine's next write fails and the
// response body is closed, which also unblocks a pending read.
func (b *projectedBody) Close() error {
	b.pr.Close()
	return b.body.Close()
}

// run copies top-level values until the input ends.
func (p *projector) run() error {
	for {
		c, err := p.nonSpace(true)
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if p.docMode && c == '{' {
			if err := p.projectObject(0); err != nil {
				return unexpected(err)
			}
			continue
		}
		if err := p.copyValue(c, 0, false); err != nil {
			return unexpected(err)
		}
	}
}

// unexpected turns an io.EOF inside a value into io.ErrUnexpectedEOF: the
// connection ended mid-row.
func unexpected(err error) error {
	if err == io.EOF {
		return fmt.Errorf("%w: %w", errSyntax, io.ErrUnexpectedEOF)
	}
	return err
}

// nonSpace returns the next byte that is not JSON whitespace. With copyWS
// it writes the whitespace through: between top-level values it separates
// rows (continuous feeds end each with a newline) and literals ("1 2").
func (p *projector) nonSpace(copyWS bool) (byte, error) {
	for {
		c, err := p.r.ReadByte()
		if err != nil {
			return 0, err
		}
		switch c {
		case ' ', '\t', '\r', '\n':
			if copyWS {
				p.w.WriteByte(c)
			}
		default:
			return c, nil
		}
	}
}

// copyValue copies the value starting with c. isDoc says the value is a
// change row's "doc" member.
func (p *projector) copyValue(c byte, depth int, isDoc bool) error {
	if depth > maxOuterDepth {
		return fmt.Errorf("%w: nested deeper than %d levels outside a document", errSyntax, maxOuterDepth)
	}
	switch c {
	case '{':
		if isDoc {
			return p.projectObject(depth)
		}
		p.w.WriteByte('{')
		for i := 0; ; i++ {
			c, err := p.nonSpace(false)
			if err != nil {
				return err
			}
			if c == '}' {
				return p.w.WriteByte('}')
			}
			if i > 0 {
				if c != ',' {
					return fmt.Errorf("%w: want ',' or '}' in an object, got %q", errSyntax, c)
				}
				p.w.WriteByte(',')
				if c, err = p.nonSpace(false); err != nil {
					return err
				}
			}
			if c != '"' {
				return fmt.Errorf("%w: want a key, got %q", errSyntax, c)
			}
			key, long, err := p.readKey()
			if err != nil {
				return err
			}
			p.w.WriteByte('"')
			p.w.Write(key)
			if long {
				// Not a key of the feed format: copy the rest of it,
				// closing quote included.
				if err := p.scanString(p.w, nil); err != nil {
					return err
				}
			} else {
				p.w.WriteByte('"')
			}
			if err := p.colon(); err != nil {
				return err
			}
			p.w.WriteByte(':')
			v, err := p.nonSpace(false)
			if err != nil {
				return err
			}
			doc := !long && !p.docMode && keyIs(key, "doc")
			if err := p.copyValue(v, depth+1, doc); err != nil {
				return err
			}
		}
	case '[':
		p.w.WriteByte('[')
		for i := 0; ; i++ {
			c, err := p.nonSpace(false)
			if err != nil {
				return err
			}
			if c == ']' {
				return p.w.WriteByte(']')
			}
			if i > 0 {
				if c != ',' {
					return fmt.Errorf("%w: want ',' or ']' in an array, got %q", errSyntax, c)
				}
				p.w.WriteByte(',')
				if c, err = p.nonSpace(false); err != nil {
					return err
				}
			}
			if err := p.copyValue(c, depth+1, false); err != nil {
				return err
			}
		}
	case '"':
		p.w.WriteByte('"')
		return p.scanString(p.w, nil)
	default:
		return p.scanLiteral(c, p.w, nil, false)
	}
}

func (p *projector) colon() error {
	c, err := p.nonSpace(false)
	if err != nil {
		return err
	}
	if c != ':' {
		return fmt.Errorf("%w: want ':', got %q", errSyntax, c)
	}
	return nil
}

// projectObject reads an object (its '{' consumed) and writes only the keep
// members. Every other member's value is skipped without being kept. depth
// is the number of containers around the object.
func (p *projector) projectObject(depth int) error {
	p.w.WriteByte('{')
	n := 0
	for i := 0; ; i++ {
		c, err := p.nonSpace(false)
		if err != nil {
			return err
		}
		if c == '}' {
			return p.w.WriteByte('}')
		}
		if i > 0 {
			if c != ',' {
				return fmt.Errorf("%w: want ',' or '}' in a document, got %q", errSyntax, c)
			}
			if c, err = p.nonSpace(false); err != nil {
				return err
			}
		}
		if c != '"' {
			return fmt.Errorf("%w: want a key in a document, got %q", errSyntax, c)
		}
		key, long, err := p.readKey()
		if err != nil {
			return err
		}
		if long {
			if err := p.scanString(nil, nil); err != nil {
				return err
			}
		}
		if err := p.colon(); err != nil {
			return err
		}
		v, err := p.nonSpace(false)
		if err != nil {
			return err
		}
		if long || !p.wanted(key) {
			if err := p.skipValue(v, nil, depth+1); err != nil {
				return err
			}
			continue
		}
		p.val = p.val[:0]
		if err := p.skipValue(v, &p.val, depth+1); err != nil {
			return err
		}
		if len(p.val) > maxFieldLen {
			// Dropped, see maxFieldLen; written as null so that it still
			// overrides an earlier member of the same name, as the last
			// of duplicate keys does in a full decode.
			p.val = append(p.val[:0], "null"...)
		}
		if n > 0 {
			p.w.WriteByte(',')
		}
		n++
		p.w.WriteByte('"')
		p.w.Write(key)
		p.w.WriteString(`":`)
		p.w.Write(p.val)
	}
}

// wanted reports whether a raw (still escaped) key is a keep field.
func (p *projector) wanted(raw []byte) bool {
	if bytes.IndexByte(raw, '\\') < 0 {
		return p.keep[string(raw)]
	}
	s, ok := unescapeKey(raw)
	return ok && p.keep[s]
}

// keyIs reports whether a raw (still escaped) key is s.
func keyIs(raw []byte, s string) bool {
	if bytes.IndexByte(raw, '\\') < 0 {
		return string(raw) == s
	}
	k, ok := unescapeKey(raw)
	return ok && k == s
}

func unescapeKey(raw []byte) (string, bool) {
	var s string
	err := json.Unmarshal(append(append([]byte{'"'}, raw...), '"'), &s)
	return s, err == nil
}

// readKey reads a string's raw bytes (its opening quote consumed) up to
// maxKeyLen. long reports that the key goes on and its rest is unread.
func (p *projector) readKey() (key []byte, long bool, err error) {
	p.key = p.key[:0]
	var st strState
	for {
		c, err := p.r.ReadByte()
		if err != nil {
			return nil, false, err
		}
		closed, err := st.step(c)
		if err != nil {
			return nil, false, err
		}
		if closed {
			return p.key, false, nil
		}
		p.key = append(p.key, c)
		if len(p.key) >= maxKeyLen {
			err := st.carry(p)
			return p.key, true, err
		}
	}
}

// strState checks a string's bytes as encoding/json does: no control
// characters, only its escapes. Invalid UTF-8 is accepted (a decoder
// replaces it).
type strState struct {
	esc bool // after a backslash
	hex int  // hex digits of a \u escape still to come
}

// step takes the next byte of a string; closed reports its closing quote.
func (st *strState) step(c byte) (closed bool, err error) {
	switch {
	case st.esc:
		st.esc = false
		switch c {
		case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
		case 'u':
			st.hex = 4
		default:
			return false, fmt.Errorf("%w: invalid escape %q in a string", errSyntax, c)
		}
	case st.hex > 0:
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
			return false, fmt.Errorf("%w: invalid \\u escape in a string", errSyntax)
		}
		st.hex--
	case c == '\\':
		st.esc = true
	case c == '"':
		return true, nil
	case c < 0x20:
		return false, fmt.Errorf("%w: control character %q in a string", errSyntax, c)
	}
	return false, nil
}

// carry hands a string's state to the scan of its rest (scanString starts
// from a clean state, so an escape cut by maxKeyLen is finished here).
func (st *strState) carry(p *projector) error {
	for st.esc || st.hex > 0 {
		c, err := p.r.ReadByte()
		if err != nil {
			return err
		}
		if _, err := st.step(c); err != nil {
			return err
		}
		p.key = append(p.key, c)
	}
	return nil
}

// scanString consumes a string's bytes after its opening quote, through its
// closing quote, checking them (strState), writing them to w and appending
// them to buf when non-nil.
func (p *projector) scanString(w *bufio.Writer, buf *[]byte) error {
	var st strState
	for {
		chunk, err := p.r.ReadSlice('"')
		if err != nil && err != bufio.ErrBufferFull {
			return err
		}
		closed := false
		for _, c := range chunk {
			if closed, err = st.step(c); err != nil {
				return err
			}
		}
		if w != nil {
			w.Write(chunk)
		}
		if buf != nil && len(*buf) <= maxFieldLen {
			*buf = append(*buf, chunk...)
		}
		if closed {
			return nil
		}
	}
}

// scanLiteral consumes a number, true, false or null starting with c. With
// check it must be one, as encoding/json reads them; without, the bytes
// are copied for the reader of the projection to judge.
func (p *projector) scanLiteral(c byte, w *bufio.Writer, buf *[]byte, check bool) error {
	if !isLiteralByte(c) {
		return fmt.Errorf("%w: unexpected %q", errSyntax, c)
	}
	var lit litState
	for {
		if check && !lit.step(c) {
			return fmt.Errorf("%w: invalid literal", errSyntax)
		}
		if w != nil {
			w.WriteByte(c)
		}
		if buf != nil && len(*buf) <= maxFieldLen {
			*buf = append(*buf, c)
		}
		next, err := p.r.ReadByte()
		if err == io.EOF {
			break // a literal may end the stream
		}
		if err != nil {
			return err
		}
		if !isLiteralByte(next) {
			if err := p.r.UnreadByte(); err != nil {
				return err
			}
			break
		}
		c = next
	}
	if check && !lit.done() {
		return fmt.Errorf("%w: invalid literal", errSyntax)
	}
	return nil
}

func isLiteralByte(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c == '-' || c == '+' || c == '.' || c == 'E'
}

// litState recognises true, false, null and JSON numbers byte by byte.
type litState struct {
	word  string // the keyword being read, or "" for a number
	n     int    // bytes read
	state int8   // of a number: see step
}

// Number states: 1 after '-', 2 a leading 0, 3 integer digits, 4 after
// '.', 5 fraction digits, 6 after 'e', 7 after the exponent's sign, 8
// exponent digits. 2, 3, 5 and 8 may end a number.
func (l *litState) step(c byte) bool {
	l.n++
	if l.n == 1 {
		switch c {
		case 't':
			l.word = "true"
		case 'f':
			l.word = "false"
		case 'n':
			l.word = "null"
		}
	}
	if l.word != "" {
		return l.n <= len(l.word) && l.word[l.n-1] == c
	}
	digit := c >= '0' && c <= '9'
	switch {
	case l.state == 0 && c == '-':
		l.state = 1
	case (l.state == 0 || l.state == 1) && c == '0':
		l.state = 2
	case (l.state == 0 || l.state == 1) && digit:
		l.state = 3
	case l.state == 3 && digit:
	case (l.state == 2 || l.state == 3) && c == '.':
		l.state = 4
	case (l.state == 4 || l.state == 5) && digit:
		l.state = 5
	case (l.state == 2 || l.state == 3 || l.state == 5) && (c == 'e' || c == 'E'):
		l.state = 6
	case l.state == 6 && (c == '+' || c == '-'):
		l.state = 7
	case (l.state == 6 || l.state == 7 || l.state == 8) && digit:
		l.state = 8
	default:
		return false
	}
	return true
}

func (l *litState) done() bool {
	if l.word != "" {
		return l.n == len(l.word)
	}
	return l.state == 2 || l.state == 3 || l.state == 5 || l.state == 8
}

// maxDepth is encoding/json's nesting limit: a document nested deeper is
// refused as a full decode refuses it.
const maxDepth = 10000

// skipValue consumes the value starting with c, checking it as
// encoding/json would, without recursion, so that a deeply nested document
// costs no stack. depth is the number of containers around it. With buf
// non-nil it keeps the value's bytes (without whitespace) while they fit
// in maxFieldLen.
func (p *projector) skipValue(c byte, buf *[]byte, depth int) error {
	// open holds the containers opened inside the value, one bit each
	// (1: object), so that memory stays bounded.
	open := p.open[:0]
	defer func() { p.open = open[:0] }()
	push := func(obj bool) error {
		if depth+len(open)+1 > maxDepth {
			return fmt.Errorf("%w: nested deeper than %d levels", errSyntax, maxDepth)
		}
		open = append(open, obj)
		return nil
	}
	for {
		// c starts a value.
		switch c {
		case '{', '[':
			if err := push(c == '{'); err != nil {
				return err
			}
			keepByte(buf, c)
			var err error
			if c, err = p.nonSpace(false); err != nil {
				return err
			}
			if c == '}' && open[len(open)-1] || c == ']' && !open[len(open)-1] {
				open = open[:len(open)-1]
				keepByte(buf, c)
				break // the value ended
			}
			if open[len(open)-1] {
				if c, err = p.member(c, buf); err != nil {
					return err
				}
			}
			continue // c starts the first value
		case '"':
			keepByte(buf, c)
			if err := p.scanString(nil, buf); err != nil {
				return err
			}
		default:
			if err := p.scanLiteral(c, nil, buf, true); err != nil {
				return err
			}
		}
		// A value ended: close containers or move to the next member.
		for {
			if len(open) == 0 {
				return nil
			}
			var err error
			if c, err = p.nonSpace(false); err != nil {
				return err
			}
			obj := open[len(open)-1]
			switch {
			case c == '}' && obj || c == ']' && !obj:
				open = open[:len(open)-1]
				keepByte(buf, c)
				continue
			case c == ',':
				keepByte(buf, c)
				if c, err = p.nonSpace(false); err != nil {
					return err
				}
				if obj {
					if c, err = p.member(c, buf); err != nil {
						return err
					}
				}
			default:
				return fmt.Errorf("%w: unexpected %q after a value", errSyntax, c)
			}
			break
		}
	}
}

// member reads an object member's key and colon, c being the key's
// opening quote, and returns the first byte of its value.
func (p *projector) member(c byte, buf *[]byte) (byte, error) {
	if c != '"' {
		return 0, fmt.Errorf("%w: want a key, got %q", errSyntax, c)
	}
	keepByte(buf, c)
	if err := p.scanString(nil, buf); err != nil {
		return 0, err
	}
	if err := p.colon(); err != nil {
		return 0, err
	}
	keepByte(buf, ':')
	return p.nonSpace(false)
}

func keepByte(buf *[]byte, c byte) {
	if buf != nil && len(*buf) <= maxFieldLen {
		*buf = append(*buf, c)
	}
}

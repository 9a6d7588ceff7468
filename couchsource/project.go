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

	key []byte // scratch: the current key
	val []byte // scratch: a kept value
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
			if err := p.projectObject(); err != nil {
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

// nonSpace returns the next byte that is not JSON whitespace. With copy it
// writes newlines through (continuous feeds separate rows by them).
func (p *projector) nonSpace(copyNL bool) (byte, error) {
	for {
		c, err := p.r.ReadByte()
		if err != nil {
			return 0, err
		}
		switch c {
		case ' ', '\t', '\r':
		case '\n':
			if copyNL {
				p.w.WriteByte('\n')
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
			return p.projectObject()
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
			doc := !long && !p.docMode && string(key) == "doc"
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
		return p.scanLiteral(c, p.w, nil)
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
// members. Every other member's value is skipped without being kept.
func (p *projector) projectObject() error {
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
			if err := p.skipValue(v, nil); err != nil {
				return err
			}
			continue
		}
		p.val = p.val[:0]
		if err := p.skipValue(v, &p.val); err != nil {
			return err
		}
		if len(p.val) > maxFieldLen {
			continue // dropped, see maxFieldLen
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
	var s string
	if err := json.Unmarshal(append(append([]byte{'"'}, raw...), '"'), &s); err != nil {
		return false
	}
	return p.keep[s]
}

// readKey reads a string's raw bytes (its opening quote consumed) up to
// maxKeyLen. long reports that the key goes on and its rest is unread.
func (p *projector) readKey() (key []byte, long bool, err error) {
	p.key = p.key[:0]
	for {
		c, err := p.r.ReadByte()
		if err != nil {
			return nil, false, err
		}
		switch c {
		case '"':
			return p.key, false, nil
		case '\\':
			e, err := p.r.ReadByte()
			if err != nil {
				return nil, false, err
			}
			p.key = append(p.key, c, e)
		default:
			p.key = append(p.key, c)
		}
		if len(p.key) >= maxKeyLen {
			return p.key, true, nil
		}
	}
}

// scanString consumes a string's bytes after its opening quote, through its
// closing quote, writing them to w and appending them to buf when non-nil.
func (p *projector) scanString(w *bufio.Writer, buf *[]byte) error {
	escaped := false
	for {
		chunk, err := p.r.ReadSlice('"')
		if err != nil && err != bufio.ErrBufferFull {
			return err
		}
		if w != nil {
			w.Write(chunk)
		}
		if buf != nil && len(*buf) <= maxFieldLen {
			*buf = append(*buf, chunk...)
		}
		if err == bufio.ErrBufferFull {
			escaped = endsEscaped(chunk, escaped)
			continue
		}
		// chunk ends with '"': it closes the string unless escaped.
		if !endsEscaped(chunk[:len(chunk)-1], escaped) {
			return nil
		}
		escaped = false
	}
}

// endsEscaped reports whether the byte after b is escaped: b ends in an odd
// run of backslashes (counting a run carried over from the previous chunk).
func endsEscaped(b []byte, carried bool) bool {
	n := 0
	for i := len(b) - 1; i >= 0 && b[i] == '\\'; i-- {
		n++
	}
	if n == len(b) && carried {
		n++
	}
	return n%2 == 1
}

// scanLiteral consumes a number, true, false or null starting with c.
func (p *projector) scanLiteral(c byte, w *bufio.Writer, buf *[]byte) error {
	if !isLiteralByte(c) {
		return fmt.Errorf("%w: unexpected %q", errSyntax, c)
	}
	for {
		if w != nil {
			w.WriteByte(c)
		}
		if buf != nil && len(*buf) <= maxFieldLen {
			*buf = append(*buf, c)
		}
		next, err := p.r.ReadByte()
		if err == io.EOF {
			return nil // a literal may end the stream
		}
		if err != nil {
			return err
		}
		if !isLiteralByte(next) {
			return p.r.UnreadByte()
		}
		c = next
	}
}

func isLiteralByte(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c == '-' || c == '+' || c == '.' || c == 'E'
}

// skipValue consumes the value starting with c without recursion, so that a
// deeply nested document costs no stack. With buf non-nil it keeps the
// value's bytes (without whitespace) while they fit in maxFieldLen.
func (p *projector) skipValue(c byte, buf *[]byte) error {
	depth := 0
	for {
		switch c {
		case '{', '[':
			depth++
			keepByte(buf, c)
		case '}', ']':
			depth--
			keepByte(buf, c)
			if depth < 0 {
				return fmt.Errorf("%w: unbalanced %q", errSyntax, c)
			}
		case ',', ':':
			if depth == 0 {
				return fmt.Errorf("%w: unexpected %q", errSyntax, c)
			}
			keepByte(buf, c)
		case '"':
			keepByte(buf, c)
			if err := p.scanString(nil, buf); err != nil {
				return err
			}
		default:
			if err := p.scanLiteral(c, nil, buf); err != nil {
				return err
			}
		}
		if depth == 0 {
			return nil
		}
		var err error
		if c, err = p.nonSpace(false); err != nil {
			return err
		}
	}
}

func keepByte(buf *[]byte, c byte) {
	if buf != nil && len(*buf) <= maxFieldLen {
		*buf = append(*buf, c)
	}
}

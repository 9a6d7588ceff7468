package doc

import (
	"errors"
	"fmt"
	"sort"
	"strings"
)

// ErrTransient marks a failure of a store or sink itself (unreachable,
// timed out, overloaded): no document is at fault. The caller retries the
// whole batch later without moving its offset and without recording
// per-document errors.
var ErrTransient = errors.New("transient failure")

// ErrNotFound marks a document the store no longer has; pillows treat it as a
// deletion.
var ErrNotFound = errors.New("document not found")

// Errors holds per-document failures keyed by document id: every document of
// the batch that is not in the map succeeded.
type Errors map[string]error

func (e Errors) Error() string {
	ids := make([]string, 0, len(e))
	for id := range e {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	var b strings.Builder
	fmt.Fprintf(&b, "%d document(s) failed", len(e))
	for i, id := range ids {
		if i == 3 {
			b.WriteString(", …")
			break
		}
		fmt.Fprintf(&b, "; %s: %v", id, e[id])
	}
	return b.String()
}

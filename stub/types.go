package stub

import (
	"fmt"
	"strings"
)

// DeletedSuffix marks a soft-deleted document's type: HQ soft-deletes by
// renaming the doc_type ("CommCareCase" → "CommCareCase-Deleted").
const DeletedSuffix = "-Deleted"

// UnknownDocType is the document_type of a deletion whose type could not be
// found (a CouchDB tombstone whose previous revision was compacted away).
const UnknownDocType = "Unknown"

// BaseType is the document type without DeletedSuffix: a soft-deleted
// "CommCareCase-Deleted" is a CommCareCase for every consumer that selects
// by type.
func (s *Stub) BaseType() string {
	return strings.TrimSuffix(s.DocumentType, DeletedSuffix)
}

// ErrNoVersion marks a stub that names a document but carries no version a
// consumer can order it by: a SQL stub without a commit LSN. Every such stub
// would have the version (0/0, 0), so after a first write every later one is
// refused as not newer and the document never updates. It wraps ErrInvalid.
var ErrNoVersion = fmt.Errorf("%w: no version", ErrInvalid)

// ValidateVersion checks that s carries a version consumers can order by.
// Validate does not, because a stub is also written without one, by the
// application, before the publisher assigns it (a logical message).
func (s *Stub) ValidateVersion() error {
	if s.DataSourceType == SourceSQL && s.LSN == 0 {
		return fmt.Errorf("%w: sql stub of %s without lsn", ErrNoVersion, s.DocumentID)
	}
	return nil
}

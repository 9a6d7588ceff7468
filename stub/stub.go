package stub

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Source is where a document lives, HQ's data_source_type.
type Source string

const (
	SourceSQL   Source = "sql"
	SourceCouch Source = "couch"
)

// Stub names one changed document. It does not carry the document: consumers
// fetch the current state from the document store, so a stub that arrives twice
// or late is harmless once its version is compared.
type Stub struct {
	DocumentID           string `json:"document_id"`
	DocumentRev          string `json:"document_rev,omitempty"`
	DataSourceType       Source `json:"data_source_type"`
	DataSourceName       string `json:"data_source_name"`
	DocumentType         string `json:"document_type"`
	DocumentSubtype      string `json:"document_subtype,omitempty"`
	Domain               string `json:"domain,omitempty"`
	IsDeletion           bool   `json:"is_deletion"`
	AssociatedDocumentID string `json:"associated_document_id,omitempty"`
	// PublishTimestamp is when this copy was published; lag is measured from it.
	PublishTimestamp time.Time `json:"publish_timestamp"`
	// OriginalPublicationDatetime survives republication (retries, replays).
	OriginalPublicationDatetime time.Time `json:"original_publication_datetime"`
	Attempts                    int       `json:"attempts"`

	// SQL version: the transaction's commit LSN and the change's position in it.
	LSN             LSN       `json:"lsn,omitzero"`
	TxOrdinal       uint32    `json:"tx_ordinal,omitzero"`
	XID             uint32    `json:"xid,omitzero"`
	CommitTimestamp time.Time `json:"commit_timestamp,omitzero"`

	// Couch position: the feed seq of this change (opaque). The version is
	// DocumentRev.
	Seq Seq `json:"seq,omitzero"`
}

// ErrInvalid marks a stub that fails validation.
var ErrInvalid = errors.New("invalid stub")

// Validate checks the fields every consumer relies on.
func (s *Stub) Validate() error {
	switch {
	case s.DocumentID == "":
		return fmt.Errorf("%w: document_id is empty", ErrInvalid)
	case s.DataSourceType != SourceSQL && s.DataSourceType != SourceCouch:
		return fmt.Errorf("%w: data_source_type %q is neither %q nor %q", ErrInvalid, s.DataSourceType, SourceSQL, SourceCouch)
	case s.DataSourceName == "":
		return fmt.Errorf("%w: data_source_name is empty", ErrInvalid)
	case s.DocumentType == "":
		return fmt.Errorf("%w: document_type is empty", ErrInvalid)
	}
	if s.DataSourceType == SourceCouch && s.DocumentRev != "" {
		if _, err := ParseRev(s.DocumentRev); err != nil {
			return fmt.Errorf("%w: %w", ErrInvalid, err)
		}
	}
	return nil
}

// SQLVersion returns the stub's SQL version.
func (s *Stub) SQLVersion() SQLVersion {
	return SQLVersion{CommitLSN: s.LSN, Ordinal: s.TxOrdinal}
}

// Key is the Kafka record key: the document id, so that one document's stubs
// stay in one partition and in order.
func (s *Stub) Key() []byte { return []byte(s.DocumentID) }

// Marshal encodes the stub as the Kafka record value.
func (s *Stub) Marshal() ([]byte, error) { return json.Marshal(s) }

// Unmarshal decodes and validates a record value. It decodes exactly as
// encoding/json does (unknown keys ignored, keys matched case-insensitively,
// the last of duplicate keys winning); stubs as the publisher and the
// follower write them take a faster path with the same result.
func Unmarshal(b []byte) (*Stub, error) {
	s := new(Stub)
	if !decodeFast(b, s) {
		*s = Stub{}
		if err := json.Unmarshal(b, s); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
		}
	}
	if err := s.Validate(); err != nil {
		return nil, err
	}
	return s, nil
}

package cdc

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// The publisher leaves Relation, Truncate and logical decoding Message to
// pglogrepl's decoders, which trust their input: they index past the end
// of a short message (a panic), allocate a Truncate's relation list before
// checking that the message holds it, and read a Message prefix that lacks
// its terminator as if it had one. PostgreSQL never sends such messages,
// but a malformed one must end the session with an error, not the process
// (FuzzPgoutput found all three).

// libDecoder is a pglogrepl message.
type libDecoder interface{ Decode(src []byte) error }

// decodeLib runs a pglogrepl decoder on src (the message after its type
// byte) after the checks it lacks; a panic of the decoder is an error.
func decodeLib(kind byte, d libDecoder, src []byte) (err error) {
	switch kind {
	case 'T':
		if len(src) < 5 || uint64(len(src)) < 5+4*uint64(binary.BigEndian.Uint32(src)) {
			return fmt.Errorf("pgoutput truncate: %w", errShortMessage)
		}
	case 'M':
		if len(src) < 14 || bytes.IndexByte(src[9:], 0) < 0 {
			return fmt.Errorf("pgoutput message: %w", errShortMessage)
		}
	}
	defer func() {
		if recover() != nil {
			err = fmt.Errorf("pgoutput %c: %w", kind, errShortMessage)
		}
	}()
	return d.Decode(src)
}

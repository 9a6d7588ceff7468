package cdc

import (
	"fmt"
	"strings"

	"github.com/changefeed/changefeed/stub"
)

// GapAcceptance accepts one possible gap, and only that one: the gap the
// publisher refused to start over, named by the slot and the checkpoint LSN
// it printed (the position whose changes after it may be missing). A
// standing "accept every gap" setting would silently accept the next gap
// too, months later; an acceptance that names its gap cannot. The zero value
// accepts nothing.
type GapAcceptance struct {
	Slot       string
	Checkpoint stub.LSN
}

// IsZero reports whether g accepts nothing.
func (g GapAcceptance) IsZero() bool { return g == GapAcceptance{} }

// String is the form ParseGapAcceptance reads: <slot>@<checkpoint LSN>.
func (g GapAcceptance) String() string {
	if g.IsZero() {
		return ""
	}
	return g.Slot + "@" + g.Checkpoint.String()
}

// ParseGapAcceptance reads <slot>@<checkpoint LSN>, e.g.
// "changefeed@0/1A2B3C4", as printed by the refusal. "" is the zero value.
func ParseGapAcceptance(s string) (GapAcceptance, error) {
	if s == "" {
		return GapAcceptance{}, nil
	}
	slot, lsn, ok := strings.Cut(s, "@")
	if !ok {
		return GapAcceptance{}, fmt.Errorf("%w: --allow-new-slot %q must be <slot>@<checkpoint LSN>, exactly as printed by the refusal to start (a plain true/false is no longer accepted: it would accept every future gap too)", ErrConfig, s)
	}
	if err := ValidateName("--allow-new-slot slot", slot); err != nil {
		return GapAcceptance{}, err
	}
	l, err := stub.ParseLSN(lsn)
	if err != nil {
		return GapAcceptance{}, fmt.Errorf("%w: --allow-new-slot %q: %w", ErrConfig, s, err)
	}
	return GapAcceptance{Slot: slot, Checkpoint: l}, nil
}

package cdc

import (
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strings"
)

// Sentinels for the conditions a caller (the command, a supervisor, a test)
// must act on. Errors returned by this package wrap one of them where one
// applies; check with errors.Is.
var (
	// ErrConfig: invalid settings or routing file. Fix the configuration.
	ErrConfig = errors.New("cdc: invalid configuration")
	// ErrPrecondition: a start-up check failed (wal_level, privilege,
	// missing table, replica identity, slot plugin, lost slot). Fix the
	// database.
	ErrPrecondition = errors.New("cdc: start-up check failed")
	// ErrPossibleGap: the slot is missing while a checkpoint exists, or the
	// slot is ahead of the checkpoint. Changes may have been skipped.
	ErrPossibleGap = errors.New("cdc: possible gap between checkpoint and slot")
	// ErrSlotBusy: another process streams the slot and the wait timed out.
	ErrSlotBusy = errors.New("cdc: replication slot is active in another process")
	// ErrProduce: Kafka refused a stub for good.
	ErrProduce = errors.New("cdc: produce failed")
	// ErrSchema: a published table no longer matches the routing (a routed
	// column is gone).
	ErrSchema = errors.New("cdc: table does not match routing")
)

// namePattern is what slot and publication names must match: PostgreSQL
// slot names allow only these characters, and keeping publication names to
// the same set lets them be passed to pgoutput without quoting issues.
var namePattern = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

// ValidateName checks a slot or publication name; field names the setting in
// the error.
func ValidateName(field, name string) error {
	if !namePattern.MatchString(name) {
		return fmt.Errorf("%w: %s %q must match %s", ErrConfig, field, name, namePattern)
	}
	return nil
}

const masked = "xxxxx"

// kvPassword matches password=... in a keyword/value connection string.
var kvPassword = regexp.MustCompile(`(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)`)

// MaskURL returns a PostgreSQL connection string (URL or keyword/value form)
// fit for logs and errors: any password is replaced. A URL too malformed to
// parse is not echoed at all.
func MaskURL(s string) string {
	if strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://") {
		u, err := url.Parse(s)
		if err != nil {
			return "(malformed PostgreSQL URL, not shown)"
		}
		if _, has := u.User.Password(); has {
			u.User = url.UserPassword(u.User.Username(), masked)
		}
		q := u.Query()
		for k := range q {
			if strings.EqualFold(k, "password") {
				q.Set(k, masked)
			}
		}
		if len(q) > 0 {
			u.RawQuery = q.Encode()
		}
		return u.String()
	}
	return kvPassword.ReplaceAllString(s, "${1}"+masked)
}

// URLHasPassword reports whether a connection string carries a password
// (used to keep passwords off the command line).
func URLHasPassword(s string) bool {
	if strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://") {
		u, err := url.Parse(s)
		if err != nil {
			// Cannot tell: assume the worst.
			return strings.Contains(s, "@") || strings.Contains(strings.ToLower(s), "password")
		}
		if _, has := u.User.Password(); has {
			return true
		}
		for k := range u.Query() {
			if strings.EqualFold(k, "password") {
				return true
			}
		}
		return false
	}
	return kvPassword.MatchString(s)
}

// errInvalidURL is what replaces pgx's parse errors, which can echo the URL
// with its password.
func errInvalidURL(s string) error {
	return fmt.Errorf("%w: cannot parse the PostgreSQL URL %s (not shown in full; check its syntax and percent-encoding)", ErrConfig, MaskURL(s))
}

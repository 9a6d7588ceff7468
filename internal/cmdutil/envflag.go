package cmdutil

import (
	"errors"
	"flag"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// EnvFlags registers flags on a FlagSet whose defaults come from the
// environment: a variable that is set and not empty replaces the built-in
// default, and a flag given on the command line replaces both. The usage of
// each flag ends with the variable's name, as in "… ($CHANGEFEED_X)".
//
// A variable holding a value of the wrong type is collected as an error
// (see Err) and the flag's default becomes the type's zero value.
type EnvFlags struct {
	fs     *flag.FlagSet
	getenv func(string) string
	errs   []error
}

// NewEnvFlags returns an EnvFlags that registers on fs and reads the
// environment with getenv (os.Getenv, or a map in tests).
func NewEnvFlags(fs *flag.FlagSet, getenv func(string) string) *EnvFlags {
	return &EnvFlags{fs: fs, getenv: getenv}
}

// FlagSet is the set the flags are registered on.
func (e *EnvFlags) FlagSet() *flag.FlagSet { return e.fs }

// Getenv reads an environment variable with the EnvFlags' getenv.
func (e *EnvFlags) Getenv(name string) string { return e.getenv(name) }

// Err joins the errors of the variables that did not parse, in the order
// their flags were registered; nil when there are none.
func (e *EnvFlags) Err() error { return errors.Join(e.errs...) }

func usageWithEnv(usage, env string) string { return usage + " ($" + env + ")" }

// String registers a string flag.
func (e *EnvFlags) String(p *string, name, env, def, usage string) {
	if v := e.getenv(env); v != "" {
		def = v
	}
	e.fs.StringVar(p, name, def, usageWithEnv(usage, env))
}

// Bool registers a boolean flag; the variable takes strconv.ParseBool's
// values.
func (e *EnvFlags) Bool(p *bool, name, env string, def bool, usage string) {
	if v := e.getenv(env); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			e.errs = append(e.errs, fmt.Errorf("$%s: %q is not a boolean", env, v))
		}
		def = b
	}
	e.fs.BoolVar(p, name, def, usageWithEnv(usage, env))
}

// Int registers an integer flag.
func (e *EnvFlags) Int(p *int, name, env string, def int, usage string) {
	if v := e.getenv(env); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			e.errs = append(e.errs, fmt.Errorf("$%s: %q is not an integer", env, v))
		}
		def = n
	}
	e.fs.IntVar(p, name, def, usageWithEnv(usage, env))
}

// Duration registers a duration flag; the variable takes
// time.ParseDuration's syntax.
func (e *EnvFlags) Duration(p *time.Duration, name, env string, def time.Duration, usage string) {
	if v := e.getenv(env); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			e.errs = append(e.errs, fmt.Errorf("$%s: %q is not a duration", env, v))
		}
		def = d
	}
	e.fs.DurationVar(p, name, def, usageWithEnv(usage, env))
}

// SplitList splits a comma-separated list, trimming blanks and dropping
// empty items.
func SplitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

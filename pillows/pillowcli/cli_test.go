package pillowcli

import (
	"bytes"
	"context"
	"flag"
	"io"
	"strings"
	"testing"
)

// The errors-table URL may carry a password; help output and usage errors
// must never print it.
func TestHelpNeverPrintsPassword(t *testing.T) {
	env := map[string]string{"CHANGEFEED_POSTGRES_URL": "postgres://u:S3CRETPW@127.0.0.1:1/db"}
	getenv := func(k string) string { return env[k] }
	for _, args := range [][]string{{"run", "-h"}, {"list", "-h"}, {"checkpoints", "show", "-h"}, {"run", "--bogus"}} {
		var out, errOut bytes.Buffer
		Main(context.Background(), args, getenv, &out, &errOut, nil)
		if all := out.String() + errOut.String(); strings.Contains(all, "S3CRETPW") {
			t.Fatalf("pillow %v printed the password:\n%s", args, all)
		}
	}
}

func TestPostgresURLFromEnvironment(t *testing.T) {
	var s settings
	getenv := func(k string) string {
		if k == "CHANGEFEED_POSTGRES_URL" {
			return "postgres://from-env/db"
		}
		return ""
	}
	fs := newFlagSet()
	s.bind(fs, getenv)
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	s.finish()
	if s.postgresURL != "postgres://from-env/db" {
		t.Fatalf("postgresURL = %q, want the environment's", s.postgresURL)
	}
}

func newFlagSet() *flag.FlagSet {
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return fs
}

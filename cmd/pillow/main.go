// Command pillow runs pillows and their checkpoint tools; see package
// pillows/pillowcli for the commands, settings and exit codes. It has no
// custom processors: a deployment with its own builds its own main that
// calls pillowcli.Main with a pillowconf.Registry.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/changefeed/changefeed/pillows/pillowcli"
	"github.com/changefeed/changefeed/pillows/pillowconf"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	code := pillowcli.Main(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr, pillowconf.Registry{})
	stop()
	os.Exit(code)
}

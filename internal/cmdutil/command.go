package cmdutil

import (
	"context"
	"log/slog"
	"strings"

	"github.com/changefeed/changefeed/migrations"
)

// Subcommand splits a leading subcommand off args: the first argument when it
// is not a flag, else def.
func Subcommand(args []string, def string) (string, []string) {
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		return args[0], args[1:]
	}
	return def, args
}

// Migrate is the migrate subcommand: it applies changefeed's migrations to
// postgresURL and returns the exit status, 0 or 1 (logged as "migrate
// failed").
func Migrate(ctx context.Context, postgresURL string, log *slog.Logger) int {
	if err := migrations.Up(ctx, postgresURL, log); err != nil {
		log.Error("migrate failed", "err", err)
		return 1
	}
	log.Info("migrations applied")
	return 0
}

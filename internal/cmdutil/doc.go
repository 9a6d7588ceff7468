// Package cmdutil holds what the changefeed commands (cdc-publisher,
// couch-follower, pillow) wire the same way: flags whose defaults come from
// CHANGEFEED_* environment variables, the Kafka connection flags, the JSON
// logger and the HTTP server of /metrics, /healthz and /readyz. Each command
// keeps its own flags, defaults, messages and exit codes; this package only
// removes the copies.
package cmdutil

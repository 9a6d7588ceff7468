package cmdutil

import "errors"

// BindPostgresURL registers --postgres-url for a PostgreSQL URL that must not
// carry a password, which would show in the process list: the password goes
// in $CHANGEFEED_POSTGRES_URL, $PGPASSWORD or ~/.pgpass. hasPassword says
// whether a URL carries one. The returned function, called after parsing,
// gives the flag's URL, else $CHANGEFEED_POSTGRES_URL; it is an error when
// the flag carries a password or neither is set.
func BindPostgresURL(ef *EnvFlags, hasPassword func(string) bool) func() (string, error) {
	var flagURL string
	ef.FlagSet().StringVar(&flagURL, "postgres-url", "", "PostgreSQL URL without a password (put the password in $CHANGEFEED_POSTGRES_URL, $PGPASSWORD or ~/.pgpass); default $CHANGEFEED_POSTGRES_URL")
	return func() (string, error) {
		if flagURL != "" && hasPassword(flagURL) {
			return "", errors.New("--postgres-url carries a password, which would show in the process list: put it in $CHANGEFEED_POSTGRES_URL, $PGPASSWORD or ~/.pgpass")
		}
		u := ef.Getenv("CHANGEFEED_POSTGRES_URL")
		if flagURL != "" {
			u = flagURL
		}
		if u == "" {
			return "", errors.New("no PostgreSQL URL: set $CHANGEFEED_POSTGRES_URL or --postgres-url")
		}
		return u, nil
	}
}

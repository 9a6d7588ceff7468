package couchsource

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/http"
)

// The identity of a database incarnation.
//
// The checkpoint must not be applied to a different database that happens
// to have the same name (deleted and recreated, or restored). Servers do not
// give databases a usable identity: CouchDB 2/3 report instance_start_time
// "0"; CouchDB 1.x and pouchdb-server report the time the database was
// opened, which changes at every server restart and does not change when a
// database is deleted and recreated while the server runs. So the follower
// writes its own marker: a _local document holding a random id. _local
// documents are not replicated and do not appear in _changes or update_seq;
// a recreated database does not have it. The checkpoint stores the id next
// to the seq.
//
// Writing the marker needs write access to the database. Without it the
// identity is "" and a recreated database is detected only by the other
// signals (a rejected seq, an integer seq beyond update_seq).

// IdentityDocID is the marker document's id.
const IdentityDocID = "_local/changefeed-identity"

type identityDoc struct {
	Identity string `json:"identity"`
}

// identity returns the database's identity, creating the marker when it
// is missing and create is set.
func (d *dbFollower) identity(ctx context.Context, create bool) (string, error) {
	for attempt := 0; attempt < 3; attempt++ {
		var doc identityDoc
		err := d.db.Get(ctx, IdentityDocID).ScanDoc(&doc)
		switch status := httpStatus(err); {
		case err == nil && doc.Identity != "":
			return doc.Identity, nil
		case err == nil:
			// A marker without an id: replace it.
		case status == http.StatusNotFound:
			if !create {
				return "", nil
			}
		default:
			return "", err
		}
		id := newIdentity()
		_, err = d.db.Put(ctx, IdentityDocID, identityDoc{Identity: id})
		switch status := httpStatus(err); {
		case err == nil:
			d.log.Info("database identity marker written", "identity", id, "doc", IdentityDocID)
			return id, nil
		case status == http.StatusConflict:
			continue // another follower wrote one: read it
		case status == http.StatusUnauthorized || status == http.StatusForbidden:
			d.log.Warn("cannot write the identity marker (no write access): a recreated database is detected only by a rejected or out-of-range seq",
				"doc", IdentityDocID, "err", err)
			return "", nil
		default:
			return "", err
		}
	}
	return "", errors.New("identity marker: concurrent writers kept conflicting")
}

func newIdentity() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

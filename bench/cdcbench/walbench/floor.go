package walbench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/jackc/pgx/v5/pgtype"
)

// FloorOptions say what to stream and how much decoding to do.
type FloorOptions struct {
	// Slot to stream (a copy of a dataset's base slot) and the publication.
	Slot, Publication string
	// EndLSN: stop after the first commit at or after it (Dataset.EndLSN).
	EndLSN pglogrepl.LSN
	// ProtoVersion of pgoutput: 1 (default; a transaction is sent when it
	// commits) or 2 (large transactions are streamed while in progress).
	ProtoVersion int
	// Values also converts every text column to a Go value with pgtype, as
	// pglogrepl's demo does. Off, the floor parses every message and every
	// column of every tuple (pglogrepl.Parse) and touches each value's bytes.
	Values bool
	// StatusInterval between standby status updates (default 10 s). The
	// floor confirms what it received: its slot is a throwaway copy.
	StatusInterval time.Duration
}

// FloorResult is what a floor run saw.
type FloorResult struct {
	Changes  int64 // inserts, updates and deletes of committed transactions
	Txs      int64
	Messages int64 // pgoutput messages
	Bytes    int64 // pgoutput payload bytes received
	// ValueBytes is the sum of the column values' lengths (keeps the
	// compiler from dropping the decoding).
	ValueBytes int64
	// LastCommitEnd is the end LSN of the last transaction.
	LastCommitEnd pglogrepl.LSN
	// Elapsed runs from START_REPLICATION to the last commit.
	Elapsed time.Duration
	// WalsenderCPU is the CPU time of the walsender that served the run,
	// when PostgreSQL runs on this host (0 otherwise).
	WalsenderCPU time.Duration
}

// Floor streams opts.Slot with a bare pglogrepl loop until the dataset's last
// commit: the throughput any pgoutput consumer on this machine can reach.
// connString is a PostgreSQL URL or DSN; replication=database is added.
func Floor(ctx context.Context, connString string, opts FloorOptions) (FloorResult, error) {
	if opts.ProtoVersion == 0 {
		opts.ProtoVersion = 1
	}
	if opts.StatusInterval <= 0 {
		opts.StatusInterval = 10 * time.Second
	}
	cfg, err := pgconn.ParseConfig(connString)
	if err != nil {
		// pgconn's parse errors can echo the URL, password included.
		return FloorResult{}, errors.New("floor: invalid PostgreSQL URL")
	}
	cfg.RuntimeParams["replication"] = "database"
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return FloorResult{}, fmt.Errorf("floor: connect: %w", err)
	}
	defer conn.Close(context.Background())
	// The receive loop uses context.Background (no per-message context
	// watcher); closing the connection is how ctx ends it.
	stop := context.AfterFunc(ctx, func() { _ = conn.Conn().Close() })
	defer stop()

	args := []string{
		"proto_version '" + strconv.Itoa(opts.ProtoVersion) + "'",
		"publication_names '" + opts.Publication + "'",
		"messages 'true'",
	}
	if opts.ProtoVersion >= 2 {
		args = append(args, "streaming 'true'")
	}
	start := time.Now()
	if err := pglogrepl.StartReplication(ctx, conn, opts.Slot, 0,
		pglogrepl.StartReplicationOptions{Mode: pglogrepl.LogicalReplication, PluginArgs: args}); err != nil {
		return FloorResult{}, fmt.Errorf("floor: start replication on %s: %w", opts.Slot, err)
	}
	d := decoder{values: opts.Values, rels: map[uint32]*pglogrepl.RelationMessage{}, types: pgtype.NewMap()}
	if opts.ProtoVersion >= 2 {
		d.relsV2 = map[uint32]*pglogrepl.RelationMessageV2{}
		d.streamed = map[uint32]int64{}
	}
	var received pglogrepl.LSN
	nextStatus := time.Now().Add(opts.StatusInterval)
	status := func() error {
		nextStatus = time.Now().Add(opts.StatusInterval)
		return pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{
			WALWritePosition: received, WALFlushPosition: received, WALApplyPosition: received,
		})
	}
	for {
		msg, err := conn.ReceiveMessage(context.Background())
		if err != nil {
			if ctx.Err() != nil {
				return d.res, fmt.Errorf("floor: %w", ctx.Err())
			}
			return d.res, fmt.Errorf("floor: receive: %w", err)
		}
		cd, ok := msg.(*pgproto3.CopyData)
		if !ok {
			if e, ok := msg.(*pgproto3.ErrorResponse); ok {
				return d.res, fmt.Errorf("floor: %w", pgconn.ErrorResponseToPgError(e))
			}
			return d.res, fmt.Errorf("floor: unexpected message %T", msg)
		}
		switch cd.Data[0] {
		case pglogrepl.PrimaryKeepaliveMessageByteID:
			k, err := pglogrepl.ParsePrimaryKeepaliveMessage(cd.Data[1:])
			if err != nil {
				return d.res, err
			}
			if k.ReplyRequested {
				if err := status(); err != nil {
					return d.res, err
				}
			}
		case pglogrepl.XLogDataByteID:
			x, err := pglogrepl.ParseXLogData(cd.Data[1:])
			if err != nil {
				return d.res, err
			}
			d.res.Messages++
			d.res.Bytes += int64(len(x.WALData))
			done, err := d.decode(x.WALData, opts.EndLSN)
			if err != nil {
				return d.res, err
			}
			if end := d.res.LastCommitEnd; end > received {
				received = end
			}
			if done {
				d.res.Elapsed = time.Since(start)
				_ = status()
				if cpu, err := WalsenderCPU(conn.PID()); err == nil {
					d.res.WalsenderCPU = cpu
				}
				return d.res, nil
			}
			if d.res.Messages&1023 == 0 && time.Now().After(nextStatus) {
				if err := status(); err != nil {
					return d.res, err
				}
			}
		}
	}
}

type decoder struct {
	values   bool
	rels     map[uint32]*pglogrepl.RelationMessage
	relsV2   map[uint32]*pglogrepl.RelationMessageV2
	types    *pgtype.Map
	inStream bool
	xid      uint32           // transaction being streamed (v2)
	streamed map[uint32]int64 // changes of streamed, uncommitted transactions (v2)
	pending  int64            // changes of the current non-streamed transaction
	res      FloorResult
}

// decode handles one pgoutput message and reports whether it was the
// commit of the dataset's last transaction.
func (d *decoder) decode(data []byte, end pglogrepl.LSN) (bool, error) {
	if d.relsV2 != nil {
		return d.decodeV2(data, end)
	}
	m, err := pglogrepl.Parse(data)
	if err != nil {
		return false, fmt.Errorf("floor: parse: %w", err)
	}
	switch m := m.(type) {
	case *pglogrepl.RelationMessage:
		d.rels[m.RelationID] = m
	case *pglogrepl.BeginMessage:
		d.pending = 0
	case *pglogrepl.InsertMessage:
		return false, d.change(m.RelationID, m.Tuple, nil)
	case *pglogrepl.UpdateMessage:
		return false, d.change(m.RelationID, m.NewTuple, m.OldTuple)
	case *pglogrepl.DeleteMessage:
		return false, d.change(m.RelationID, nil, m.OldTuple)
	case *pglogrepl.CommitMessage:
		return d.commit(m.CommitLSN, m.TransactionEndLSN, d.pending, end), nil
	}
	return false, nil
}

func (d *decoder) decodeV2(data []byte, end pglogrepl.LSN) (bool, error) {
	m, err := pglogrepl.ParseV2(data, d.inStream)
	if err != nil {
		return false, fmt.Errorf("floor: parse: %w", err)
	}
	switch m := m.(type) {
	case *pglogrepl.RelationMessageV2:
		d.relsV2[m.RelationID] = m
		d.rels[m.RelationID] = &m.RelationMessage
	case *pglogrepl.BeginMessage:
		d.pending = 0
	case *pglogrepl.StreamStartMessageV2:
		d.inStream, d.xid = true, m.Xid
	case *pglogrepl.StreamStopMessageV2:
		d.inStream = false
	case *pglogrepl.InsertMessageV2:
		return false, d.change(m.RelationID, m.Tuple, nil)
	case *pglogrepl.UpdateMessageV2:
		return false, d.change(m.RelationID, m.NewTuple, m.OldTuple)
	case *pglogrepl.DeleteMessageV2:
		return false, d.change(m.RelationID, nil, m.OldTuple)
	case *pglogrepl.StreamAbortMessageV2:
		delete(d.streamed, m.Xid)
	case *pglogrepl.StreamCommitMessageV2:
		n := d.streamed[m.Xid]
		delete(d.streamed, m.Xid)
		return d.commit(m.CommitLSN, m.TransactionEndLSN, n, end), nil
	case *pglogrepl.CommitMessage:
		return d.commit(m.CommitLSN, m.TransactionEndLSN, d.pending, end), nil
	}
	return false, nil
}

func (d *decoder) commit(commitLSN, endLSN pglogrepl.LSN, changes int64, end pglogrepl.LSN) bool {
	d.res.Txs++
	d.res.Changes += changes
	d.res.LastCommitEnd = endLSN
	return commitLSN >= end
}

// change decodes one row change's tuples.
func (d *decoder) change(rel uint32, tuples ...*pglogrepl.TupleData) error {
	r, ok := d.rels[rel]
	if !ok {
		return fmt.Errorf("floor: change for unknown relation %d", rel)
	}
	for _, t := range tuples {
		if t == nil {
			continue
		}
		for i, c := range t.Columns {
			if c.DataType != pglogrepl.TupleDataTypeText {
				continue
			}
			d.res.ValueBytes += int64(len(c.Data))
			if d.values && i < len(r.Columns) {
				if err := d.decodeValue(c.Data, r.Columns[i].DataType); err != nil {
					return err
				}
			}
		}
	}
	if d.inStream {
		d.streamed[d.xid]++
	} else {
		d.pending++
	}
	return nil
}

func (d *decoder) decodeValue(data []byte, oid uint32) error {
	t, ok := d.types.TypeForOID(oid)
	if !ok {
		return nil
	}
	if _, err := t.Codec.DecodeValue(d.types, oid, pgtype.TextFormatCode, data); err != nil {
		return fmt.Errorf("floor: decode %s value: %w", t.Name, err)
	}
	return nil
}

// WalsenderCPU returns the CPU time (user + system) the PostgreSQL backend
// pid has used, read from /proc. It works only when PostgreSQL runs on this
// host in the same PID namespace (not in a container): the process must be a
// walsender, or an error is returned.
func WalsenderCPU(pid uint32) (time.Duration, error) {
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return 0, err
	}
	if !strings.Contains(string(cmdline), "walsender") {
		return 0, fmt.Errorf("process %d is not a local walsender", pid)
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name (which may hold spaces) start at state.
	i := strings.LastIndexByte(string(stat), ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	// USER_HZ is 100 on Linux for every architecture Go supports.
	return time.Duration(utime+stime) * 10 * time.Millisecond, nil
}

package checkpoints_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/changefeed/changefeed/pillows/checkpoints"
)

const topic = "changes"

func setup(t *testing.T) (context.Context, *kgo.Client, *kadm.Client, *checkpoints.Tool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, topic))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	cl, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...), kgo.DefaultProduceTopic(topic), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	// 10 records in each partition.
	for p := range int32(3) {
		for i := range 10 {
			r := &kgo.Record{Partition: p, Value: []byte(fmt.Sprint(i)), Timestamp: time.UnixMilli(int64(1000 * (i + 1)))}
			if err := cl.ProduceSync(ctx, r).FirstErr(); err != nil {
				t.Fatal(err)
			}
		}
	}
	adm := kadm.NewClient(cl)
	return ctx, cl, adm, checkpoints.New(adm)
}

func commit(t *testing.T, ctx context.Context, adm *kadm.Client, group string, at ...int64) {
	t.Helper()
	os := kadm.Offsets{}
	for p, o := range at {
		if o >= 0 {
			os.Add(kadm.Offset{Topic: topic, Partition: int32(p), At: o, LeaderEpoch: -1})
		}
	}
	if resp, err := adm.CommitOffsets(ctx, group, os); err != nil || resp.Error() != nil {
		t.Fatalf("commit: %v %v", err, resp.Error())
	}
}

func committed(t *testing.T, ctx context.Context, tool *checkpoints.Tool, group string) []int64 {
	t.Helper()
	rows, err := tool.Show(ctx, group, []string{topic})
	if err != nil {
		t.Fatal(err)
	}
	out := make([]int64, len(rows))
	for i, r := range rows {
		out[i] = r.Committed
	}
	return out
}

func TestShowCopyMergeReset(t *testing.T) {
	ctx, _, adm, tool := setup(t)
	commit(t, ctx, adm, "old", 3, 7, -1)
	rows, err := tool.Show(ctx, "old", nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 3 || rows[0].Lag != 7 || rows[1].Lag != 3 || rows[2].Committed != -1 || rows[2].Lag != 10 || rows[0].End != 10 {
		t.Fatalf("show = %+v", rows)
	}

	// copy: the new group starts exactly where the old one is; a partition
	// without commit gets the log start (where the old one would resume).
	if _, err := tool.Copy(ctx, "old", "new", nil); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(committed(t, ctx, tool, "new")); got != "[3 7 0]" {
		t.Fatalf("copied = %s", got)
	}

	// merge takes the minimum per partition.
	commit(t, ctx, adm, "b", 5, 2, 9)
	if _, err := tool.Merge(ctx, []string{"old", "b"}, "merged", nil); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(committed(t, ctx, tool, "merged")); got != "[3 2 0]" {
		t.Fatalf("merged = %s", got)
	}

	if _, err := tool.SetToHead(ctx, "b", nil); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(committed(t, ctx, tool, "b")); got != "[10 10 10]" {
		t.Fatalf("head = %s", got)
	}
	if _, err := tool.ResetToEarliest(ctx, "b", nil); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(committed(t, ctx, tool, "b")); got != "[0 0 0]" {
		t.Fatalf("earliest = %s", got)
	}
	// Record i has timestamp (i+1) seconds: at 4.5s the first is offset 4.
	if _, err := tool.ResetToTime(ctx, "b", nil, time.UnixMilli(4500)); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(committed(t, ctx, tool, "b")); got != "[4 4 4]" {
		t.Fatalf("to time = %s", got)
	}
}

// Merging the groups of pillows on different topics keeps each topic's
// position: a group counts only for the topics it has commits on. Before,
// each topic was merged with the other group's "no commit" (the log start)
// and replayed from its start.
func TestMergeDisjointTopics(t *testing.T) {
	ctx, cl, adm, tool := setup(t)
	const other = "other"
	if _, err := adm.CreateTopic(ctx, 2, 1, nil, other); err != nil {
		t.Fatal(err)
	}
	for p := range int32(2) {
		for range 6 {
			if err := cl.ProduceSync(ctx, &kgo.Record{Topic: other, Partition: p, Value: []byte("x")}).FirstErr(); err != nil {
				t.Fatal(err)
			}
		}
	}
	commit(t, ctx, adm, "cases", 3, 7, 5)
	os := kadm.Offsets{}
	os.Add(kadm.Offset{Topic: other, Partition: 0, At: 4, LeaderEpoch: -1})
	os.Add(kadm.Offset{Topic: other, Partition: 1, At: 6, LeaderEpoch: -1})
	if resp, err := adm.CommitOffsets(ctx, "forms", os); err != nil || resp.Error() != nil {
		t.Fatalf("commit: %v %v", err, resp.Error())
	}
	if _, err := tool.Merge(ctx, []string{"cases", "forms"}, "merged", nil); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(committed(t, ctx, tool, "merged")); got != "[3 7 5]" {
		t.Fatalf("merged %s = %s, want [3 7 5]", topic, got)
	}
	rows, err := tool.Show(ctx, "merged", []string{other})
	if err != nil {
		t.Fatal(err)
	}
	got := map[int32]int64{}
	for _, r := range rows {
		got[r.Partition] = r.Committed
	}
	if got[0] != 4 || got[1] != 6 {
		t.Fatalf("merged %s = %v, want 0:4 1:6", other, got)
	}
}

// Every writing tool refuses a group with live members.
func TestRefusesLiveGroup(t *testing.T) {
	ctx, cl, adm, tool := setup(t)
	commit(t, ctx, adm, "idle", 1, 1, 1)
	live, err := kgo.NewClient(kgo.SeedBrokers(cl.OptValue(kgo.SeedBrokers).([]string)...), kgo.ConsumerGroup("live"), kgo.ConsumeTopics(topic))
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ds, err := adm.DescribeGroups(ctx, "live")
		if err == nil && len(ds["live"].Members) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("consumer never joined")
		}
		pctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		live.PollFetches(pctx)
		cancel()
	}
	checks := map[string]func() error{
		"reset":       func() error { _, err := tool.ResetToEarliest(ctx, "live", []string{topic}); return err },
		"set-to-head": func() error { _, err := tool.SetToHead(ctx, "live", []string{topic}); return err },
		"to-time":     func() error { _, err := tool.ResetToTime(ctx, "live", []string{topic}, time.Now()); return err },
		"copy into":   func() error { _, err := tool.Copy(ctx, "idle", "live", nil); return err },
		"copy from":   func() error { _, err := tool.Copy(ctx, "live", "idle", []string{topic}); return err },
		"merge":       func() error { _, err := tool.Merge(ctx, []string{"idle", "live"}, "x", nil); return err },
	}
	for name, f := range checks {
		if err := f(); !errors.Is(err, checkpoints.ErrGroupActive) {
			t.Errorf("%s on a live group: err = %v, want ErrGroupActive", name, err)
		}
	}
}

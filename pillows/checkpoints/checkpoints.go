// Package checkpoints inspects and moves the committed offsets of pillow
// consumer groups with kadm (HQ's split_pillow_checkpoints and
// merge_pillow_checkpoints).
//
// Every tool that writes refuses to act on a group with live members: a
// running consumer would overwrite the new offsets with its own marks, or
// keep processing from where it is. Stop the pillow's processes first.
// Copy and Merge also refuse live source groups, whose offsets would be
// stale by the time they are copied.
package checkpoints

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
)

// ErrGroupActive means the group has live members.
var ErrGroupActive = errors.New("consumer group has live members; stop its pillow processes first")

// ErrNoTopics means no topics were given and the group has no commits to
// take them from.
var ErrNoTopics = errors.New("no topics: the group has no committed offsets; name the topics")

// Tool runs the checkpoint operations.
type Tool struct{ adm *kadm.Client }

// New uses adm.
func New(adm *kadm.Client) *Tool { return &Tool{adm: adm} }

// Row is one partition of a group.
type Row struct {
	Group     string
	Topic     string
	Partition int32
	// Committed is the group's committed offset, -1 when none (the
	// pillow then starts at the log start).
	Committed int64
	Start     int64 // log start offset
	End       int64 // log end offset (high watermark)
	// Lag is End minus the offset consumption resumes at.
	Lag int64
	// Gone is true when Committed is below Start: retention deleted
	// records the group never processed (the pillow refuses to run).
	Gone bool
}

// Show returns the committed, start and end offsets of every partition of
// topics (default: the topics the group has commits for).
func (t *Tool) Show(ctx context.Context, group string, topics []string) ([]Row, error) {
	committed, topics, err := t.committed(ctx, group, topics)
	if err != nil {
		return nil, err
	}
	starts, ends, err := t.bounds(ctx, topics)
	if err != nil {
		return nil, err
	}
	var rows []Row
	for topic, parts := range ends {
		for p, end := range parts {
			r := Row{Group: group, Topic: topic, Partition: p, Committed: -1, End: end.Offset, Start: starts[topic][p].Offset}
			if c, ok := committed.Lookup(topic, p); ok && c.Err == nil && c.At >= 0 {
				r.Committed = c.At
			}
			resume := r.Committed
			if resume < 0 {
				resume = r.Start
			}
			r.Gone = r.Committed >= 0 && r.Committed < r.Start
			r.Lag = max(0, r.End-resume)
			rows = append(rows, r)
		}
	}
	sort.Slice(rows, func(i, j int) bool {
		if rows[i].Topic != rows[j].Topic {
			return rows[i].Topic < rows[j].Topic
		}
		return rows[i].Partition < rows[j].Partition
	})
	return rows, nil
}

// ResetToEarliest commits the log start of every partition.
func (t *Tool) ResetToEarliest(ctx context.Context, group string, topics []string) (kadm.Offsets, error) {
	return t.setFromListed(ctx, group, topics, func(topics []string) (kadm.ListedOffsets, error) {
		return t.adm.ListStartOffsets(ctx, topics...)
	})
}

// SetToHead commits the log end of every partition: the pillow skips
// everything published so far.
func (t *Tool) SetToHead(ctx context.Context, group string, topics []string) (kadm.Offsets, error) {
	return t.setFromListed(ctx, group, topics, func(topics []string) (kadm.ListedOffsets, error) {
		return t.adm.ListEndOffsets(ctx, topics...)
	})
}

// ResetToTime commits, per partition, the first offset whose record
// timestamp is at or after at (the log end when there is none).
func (t *Tool) ResetToTime(ctx context.Context, group string, topics []string, at time.Time) (kadm.Offsets, error) {
	return t.setFromListed(ctx, group, topics, func(topics []string) (kadm.ListedOffsets, error) {
		after, err := t.adm.ListOffsetsAfterMilli(ctx, at.UnixMilli(), topics...)
		if err != nil {
			return nil, err
		}
		ends, err := t.adm.ListEndOffsets(ctx, topics...)
		if err != nil {
			return nil, err
		}
		for topic, parts := range after {
			for p, o := range parts {
				if o.Offset < 0 {
					o.Offset = ends[topic][p].Offset
					parts[p] = o
				}
			}
		}
		return after, nil
	})
}

// Copy commits from's offsets into to (HQ's split_pillow_checkpoints: a
// new pillow starts exactly where the old one stopped). Partitions from has
// no commit for get the log start, which is where from would resume.
func (t *Tool) Copy(ctx context.Context, from, to string, topics []string) (kadm.Offsets, error) {
	return t.Merge(ctx, []string{from}, to, topics)
}

// Merge commits into into, per partition, the minimum of the groups'
// offsets (HQ's merge_pillow_checkpoints): the merged pillow processes
// everything any of them had not. Only the groups that consume a topic
// count for it, a group consuming a topic being one with a commit on some
// partition of it: merging a group of topic A with a group of topic B keeps
// both positions instead of replaying each topic from its start. A group
// with commits on a topic but none for one of its partitions counts as the
// log start there, and so does a topic no group has commits on.
func (t *Tool) Merge(ctx context.Context, groups []string, into string, topics []string) (kadm.Offsets, error) {
	if len(groups) == 0 {
		return nil, errors.New("merge: no source groups")
	}
	if slices.Contains(groups, into) && len(groups) == 1 {
		return nil, fmt.Errorf("copy: source and target are both %s", into)
	}
	if err := t.requireIdle(ctx, append(slices.Clone(groups), into)...); err != nil {
		return nil, err
	}
	all := map[string]kadm.OffsetResponses{}
	var topicSet []string
	for _, g := range groups {
		resp, err := t.adm.FetchOffsets(ctx, g)
		if err != nil {
			return nil, fmt.Errorf("fetch offsets of %s: %w", g, err)
		}
		if err := resp.Error(); err != nil {
			return nil, fmt.Errorf("fetch offsets of %s: %w", g, err)
		}
		all[g] = resp
		for topic := range resp {
			if !slices.Contains(topicSet, topic) {
				topicSet = append(topicSet, topic)
			}
		}
	}
	if len(topics) > 0 {
		topicSet = topics
	}
	if len(topicSet) == 0 {
		return nil, ErrNoTopics
	}
	starts, ends, err := t.bounds(ctx, topicSet)
	if err != nil {
		return nil, err
	}
	out := make(kadm.Offsets)
	for topic, parts := range ends {
		for p := range parts {
			at := int64(-1)
			for _, g := range groups {
				if _, consumes := all[g][topic]; !consumes {
					continue
				}
				o := starts[topic][p].Offset
				if c, ok := all[g].Lookup(topic, p); ok && c.Err == nil && c.At >= 0 {
					o = c.At
				}
				if at < 0 || o < at {
					at = o
				}
			}
			if at < 0 { // no group consumes the topic
				at = starts[topic][p].Offset
			}
			out.Add(kadm.Offset{Topic: topic, Partition: p, At: at, LeaderEpoch: -1})
		}
	}
	return out, t.commit(ctx, into, out)
}

func (t *Tool) setFromListed(ctx context.Context, group string, topics []string, list func([]string) (kadm.ListedOffsets, error)) (kadm.Offsets, error) {
	if err := t.requireIdle(ctx, group); err != nil {
		return nil, err
	}
	_, topics, err := t.committed(ctx, group, topics)
	if err != nil {
		return nil, err
	}
	listed, err := list(topics)
	if err != nil {
		return nil, fmt.Errorf("list offsets: %w", err)
	}
	if err := listed.Error(); err != nil {
		return nil, fmt.Errorf("list offsets: %w", err)
	}
	out := make(kadm.Offsets)
	for topic, parts := range listed {
		for p, o := range parts {
			out.Add(kadm.Offset{Topic: topic, Partition: p, At: o.Offset, LeaderEpoch: -1})
		}
	}
	return out, t.commit(ctx, group, out)
}

// committed returns the group's commits and the topics to act on.
func (t *Tool) committed(ctx context.Context, group string, topics []string) (kadm.OffsetResponses, []string, error) {
	resp, err := t.adm.FetchOffsets(ctx, group)
	if err != nil {
		return nil, nil, fmt.Errorf("fetch offsets of %s: %w", group, err)
	}
	if err := resp.Error(); err != nil {
		return nil, nil, fmt.Errorf("fetch offsets of %s: %w", group, err)
	}
	if len(topics) == 0 {
		for topic := range resp {
			topics = append(topics, topic)
		}
		sort.Strings(topics)
	}
	if len(topics) == 0 {
		return nil, nil, fmt.Errorf("group %s: %w", group, ErrNoTopics)
	}
	return resp, topics, nil
}

func (t *Tool) bounds(ctx context.Context, topics []string) (kadm.ListedOffsets, kadm.ListedOffsets, error) {
	starts, err := t.adm.ListStartOffsets(ctx, topics...)
	if err == nil {
		err = starts.Error()
	}
	if err != nil {
		return nil, nil, fmt.Errorf("list start offsets: %w", err)
	}
	ends, err := t.adm.ListEndOffsets(ctx, topics...)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		return nil, nil, fmt.Errorf("list end offsets: %w", err)
	}
	return starts, ends, nil
}

// requireIdle refuses groups with live members.
func (t *Tool) requireIdle(ctx context.Context, groups ...string) error {
	described, err := t.adm.DescribeGroups(ctx, groups...)
	if err != nil {
		return fmt.Errorf("describe groups: %w", err)
	}
	var busy []string
	for _, g := range groups {
		d, ok := described[g]
		if !ok {
			continue
		}
		if errors.Is(d.Err, kerr.GroupIDNotFound) {
			continue // no such group yet: nobody is in it
		}
		if d.Err != nil {
			return fmt.Errorf("describe group %s: %w", g, d.Err)
		}
		if len(d.Members) > 0 {
			busy = append(busy, fmt.Sprintf("%s (%d members, %s)", g, len(d.Members), d.State))
		}
	}
	if len(busy) > 0 {
		return fmt.Errorf("%w: %s", ErrGroupActive, strings.Join(busy, ", "))
	}
	return nil
}

func (t *Tool) commit(ctx context.Context, group string, os kadm.Offsets) error {
	resp, err := t.adm.CommitOffsets(ctx, group, os)
	if err == nil {
		err = resp.Error()
	}
	if err != nil {
		return fmt.Errorf("commit offsets of %s: %w", group, err)
	}
	return nil
}

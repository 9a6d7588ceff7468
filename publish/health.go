package publish

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// Problem kinds the background check tracks.
const (
	problemAuth  = "auth"
	problemTopic = "topic"
)

// health is what the background check found: the problems that last now
// (each with when it began), the causes already logged, the topics to watch,
// and the producer's final failure.
type health struct {
	mu       sync.Mutex
	problems map[string]*problem
	logged   map[string]bool
	watched  map[string][16]byte // topic → its ID when ensured

	failOnce sync.Once
	failed   chan struct{}
	fatal    error
}

type problem struct {
	since time.Time
	err   error
}

func (h *health) init() {
	h.problems = map[string]*problem{}
	h.logged = map[string]bool{}
	h.watched = map[string][16]byte{}
	h.failed = make(chan struct{})
}

// current returns the lasting problems as one error, nil if none.
func (h *health) current() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	var errs []error
	for _, k := range []string{problemAuth, problemTopic} {
		if pr := h.problems[k]; pr != nil {
			errs = append(errs, pr.err)
		}
	}
	return errors.Join(errs...)
}

func (h *health) watch(topics map[string]topicInfo) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for t, info := range topics {
		h.watched[t] = info.id
	}
}

func (h *health) topics() map[string][16]byte {
	h.mu.Lock()
	defer h.mu.Unlock()
	return maps.Clone(h.watched)
}

// Err returns why the producer failed for good, nil while it has not.
func (p *Producer) Err() error {
	select {
	case <-p.health.failed:
		return p.health.fatal
	default:
		return nil
	}
}

// Failed is closed when the producer has failed for good; Err says why.
func (p *Producer) Failed() <-chan struct{} { return p.health.failed }

// StopOnFailure returns a context that is cancelled when the producer fails
// for good (or ctx is done), for the source's Run: the source then stops as
// on SIGTERM, confirming only what Kafka acknowledged, and the caller reports
// Err. Call cancel to release it.
func (p *Producer) StopOnFailure(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(ctx)
	go func() {
		select {
		case <-p.health.failed:
			cancel(p.health.fatal)
		case <-ctx.Done():
		}
	}()
	return ctx, func() { cancel(context.Canceled) }
}

// fail ends the producer for good with err; the first failure wins.
func (p *Producer) fail(err error) {
	p.health.failOnce.Do(func() {
		p.log.Error("kafka producer failed for good; stopping", "err", err)
		p.health.fatal = err
		close(p.health.failed)
	})
}

// dataLossDetected is franz-go's ProducerOnDataLossDetected hook: the broker
// no longer has records it acknowledged (an unclean leader election, a
// truncated or replaced log). The sources may already have checkpointed past
// them, so this cannot be repaired by replay: stop and alert.
func (p *Producer) dataLossDetected(topic string, partition int32) {
	p.metrics.dataLoss.Inc()
	p.fail(fmt.Errorf("%w: topic %s partition %d: the broker no longer has records it acknowledged (unclean leader election or truncated log); stubs there may be missing, resync that topic's consumers (backfill)", ErrDataLoss, topic, partition))
}

// checkLoop runs check every CheckInterval until ctx is done.
func (p *Producer) checkLoop(ctx context.Context) {
	defer close(p.checkDone)
	t := time.NewTicker(p.opts.CheckInterval)
	defer t.Stop()
	for {
		p.check(ctx)
		select {
		case <-ctx.Done():
			return
		case <-p.health.failed:
			return
		case <-t.C:
		}
	}
}

// check asks a broker for the watched topics (uncached, never auto-creating
// them) and updates the problems: a SASL/TLS refusal, or topics missing.
func (p *Producer) check(ctx context.Context) {
	topics := p.health.topics()
	req := kmsg.NewPtrMetadataRequest()
	req.Topics = []kmsg.MetadataRequestTopic{} // none rather than all when nothing is watched
	for t := range topics {
		rt := kmsg.NewMetadataRequestTopic()
		rt.Topic = kmsg.StringPtr(t)
		req.Topics = append(req.Topics, rt)
	}
	cctx, cancel := context.WithTimeout(ctx, max(p.opts.CheckInterval, 5*time.Second))
	resp, err := req.RequestWith(cctx, p.cl)
	cancel()
	if ctx.Err() != nil {
		return
	}
	if err != nil {
		// An unreachable broker is an outage: the producer stalls and
		// retries (Ping fails meanwhile). Only a refusal is a problem
		// that retrying may never cure.
		if cause := authCause(err); cause != "" {
			p.report(problemAuth, cause, fmt.Errorf("%w: %s", ErrAuth, cause))
		}
		return
	}
	p.clear(problemAuth)
	var missing []string
	for _, t := range resp.Topics {
		if t.Topic == nil {
			continue
		}
		// A topic deleted and created again under the same name has a new
		// ID; the client keeps producing to the old one and stalls, and
		// the stubs in the old one are gone all the same.
		id, zero := topics[*t.Topic], [16]byte{}
		if t.ErrorCode == kerr.UnknownTopicOrPartition.Code || (t.ErrorCode == 0 && id != zero && t.TopicID != zero && t.TopicID != id) {
			missing = append(missing, *t.Topic)
		}
	}
	if len(missing) == 0 {
		p.clear(problemTopic)
		return
	}
	slices.Sort(missing)
	cause := "topic deleted: " + strings.Join(missing, ",")
	p.report(problemTopic, cause, fmt.Errorf("%w: %s no longer exist(s) or was recreated; stubs published to it and not yet consumed are gone. "+
		"The producer stops; at the next start it recreates the topic, and that topic's consumers must be resynced (backfill)",
		ErrTopicDeleted, strings.Join(missing, ", ")))
}

// report records a lasting problem: logged once per distinct cause, failing
// readiness at once and the producer after FailAfter.
func (p *Producer) report(kind, cause string, err error) {
	now := time.Now()
	h := &p.health
	h.mu.Lock()
	pr := h.problems[kind]
	if pr == nil {
		pr = &problem{since: now}
		h.problems[kind] = pr
	}
	pr.err = err
	since := pr.since
	first := !h.logged[cause]
	h.logged[cause] = true
	h.mu.Unlock()
	p.metrics.problems.WithLabelValues(kind).Set(1)
	if first {
		p.log.Error("kafka: retrying cannot cure this by itself; not ready", "cause", cause, "fails_in", (p.opts.FailAfter - now.Sub(since)).Round(time.Millisecond))
	}
	if now.Sub(since) >= p.opts.FailAfter {
		p.fail(fmt.Errorf("%w (for %s)", err, now.Sub(since).Round(time.Second)))
	}
}

func (p *Producer) clear(kind string) {
	h := &p.health
	h.mu.Lock()
	pr := h.problems[kind]
	delete(h.problems, kind)
	if pr != nil {
		// A cause seen again after a recovery is news again.
		clear(h.logged)
	}
	h.mu.Unlock()
	p.metrics.problems.WithLabelValues(kind).Set(0)
	if pr != nil {
		p.log.Info("kafka problem cleared", "kind", kind, "lasted", time.Since(pr.since).Round(time.Millisecond))
	}
}

// saslHook watches SASL exchanges: a broker that closes the connection
// during authentication (what Kafka does after a failed SaslHandshake v0
// exchange, and kfake always) returns no error code to classify, only EOF.
type saslHook struct{ p *Producer }

func (h saslHook) OnBrokerE2E(_ kgo.BrokerMetadata, key int16, e2e kgo.BrokerE2E) {
	if key != int16(kmsg.SASLAuthenticate) && key != int16(kmsg.SASLHandshake) {
		return
	}
	err := e2e.ReadErr
	if err == nil {
		err = e2e.WriteErr
	}
	if err == nil || errors.Is(err, kgo.ErrClientClosed) || errors.Is(err, context.Canceled) {
		return
	}
	cause := "SASL: the broker closed the connection during authentication (wrong user, password or mechanism?)"
	h.p.report(problemAuth, cause, fmt.Errorf("%w: %s", ErrAuth, cause))
}

// authCause describes err if it is a SASL or TLS refusal, "" otherwise.
func authCause(err error) string {
	switch {
	case errors.Is(err, kerr.SaslAuthenticationFailed), errors.Is(err, kerr.IllegalSaslState),
		errors.Is(err, kerr.UnsupportedSaslMechanism):
		return "SASL: " + err.Error()
	}
	var (
		verify   *tls.CertificateVerificationError
		unknown  x509.UnknownAuthorityError
		hostname x509.HostnameError
		invalid  x509.CertificateInvalidError
		alert    tls.AlertError
		header   tls.RecordHeaderError
	)
	if errors.As(err, &verify) || errors.As(err, &unknown) || errors.As(err, &hostname) ||
		errors.As(err, &invalid) || errors.As(err, &alert) || errors.As(err, &header) {
		return "TLS: " + err.Error()
	}
	return ""
}

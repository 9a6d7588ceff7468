// Package embedkafka starts an in-memory Kafka-protocol cluster (kfake) in the
// process, for demos. It is kept apart from internal/cmdutil so that only the
// binaries offering --embedded-kafka link kfake.
//
// Nothing survives the process: never use it where data matters.
package embedkafka

import (
	"fmt"

	"github.com/twmb/franz-go/pkg/kfake"
)

// Start runs a one-broker cluster on a loopback port and returns its
// addresses and a function that stops it. Topics are created on first use,
// as a demo expects.
func Start() (brokers []string, stop func(), err error) {
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.AllowAutoTopicCreation())
	if err != nil {
		return nil, nil, fmt.Errorf("start embedded Kafka: %w", err)
	}
	return cluster.ListenAddrs(), cluster.Close, nil
}

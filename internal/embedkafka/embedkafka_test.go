package embedkafka

import (
	"context"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

func TestStartProducesAndStops(t *testing.T) {
	brokers, stop, err := Start()
	if err != nil {
		t.Fatal(err)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.AllowAutoTopicCreation())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := cl.ProduceSync(ctx, &kgo.Record{Topic: "demo", Value: []byte("v")}).FirstErr(); err != nil {
		t.Fatalf("produce to a topic created on first use: %v", err)
	}
	cl.Close()
	stop()
	cl2, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl2.Close()
	short, cancel2 := context.WithTimeout(context.Background(), time.Second)
	defer cancel2()
	if err := cl2.Ping(short); err == nil {
		t.Fatal("cluster still answers after stop")
	}
}

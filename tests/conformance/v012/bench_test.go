package conformance

import (
	"fmt"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/containerd/nri/pkg/api"
)

// BenchmarkCreateContainer measures sequential CreateContainer round trips
// through the adaptation (runtime lock, ttrpc over the multiplexed socket,
// the plugin's handler, merging the adjustment), the cost a plugin adds to
// every container creation. Run it with a fixed count, e.g.
//
//	go test -run '^$' -bench CreateContainer -benchtime 5000x
//
// It reports ns/op and the latency percentiles of the timed run.
func BenchmarkCreateContainer(b *testing.B) {
	h := newHarness(b)
	h.setState(fakeState(1, 1, 0))
	h.startRuntime()
	h.startPlugin()
	h.waitRegistered(registerTimeout)
	c := ctx(b)
	pod := fakePod(900)
	if err := runPodSandbox(c, h.rt, pod); err != nil {
		b.Fatalf("RunPodSandbox: %v", err)
	}
	// Warm up connections, allocators and the plugin's code paths.
	for i := 0; i < 50; i++ {
		h.mustCreate(c, pod, fakeCtr(pod, fmt.Sprintf("warm-%d", i), "warm", api.ContainerState_CONTAINER_CREATED, 0))
	}

	ctrs := make([]*api.Container, b.N)
	for i := range ctrs {
		ctrs[i] = fakeCtr(pod, fmt.Sprintf("bench-id-%06d", i), fmt.Sprintf("bench-%06d", i),
			api.ContainerState_CONTAINER_CREATED, 0)
	}
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		blk := h.rt.BlockPluginSync() // as a runtime does around each CRI request
		rpl, err := h.rt.CreateContainer(c, &api.CreateContainerRequest{Pod: pod, Container: ctrs[i]})
		blk.Unblock()
		lat = append(lat, time.Since(t0))
		if err != nil {
			b.Fatalf("CreateContainer #%d: %v", i, err)
		}
		if len(rpl.GetAdjust().GetMounts()) != 1 {
			b.Fatalf("CreateContainer #%d: %s", i, checkAdjustment(rpl, ctrs[i]))
		}
	}
	b.StopTimer()

	slices.Sort(lat)
	pct := func(p float64) float64 {
		i := int(p*float64(len(lat))+0.5) - 1
		i = max(0, min(i, len(lat)-1))
		return float64(lat[i].Nanoseconds()) / 1e3
	}
	b.ReportMetric(pct(0.50), "p50-µs")
	b.ReportMetric(pct(0.90), "p90-µs")
	b.ReportMetric(pct(0.99), "p99-µs")
	b.ReportMetric(pct(1.00), "max-µs")
	if b.N >= 100 {
		fmt.Fprintf(os.Stderr, "CreateContainer round trips through adaptation v0.12.2 (%s), n=%d: "+
			"p50 %.0f µs, p90 %.0f µs, p99 %.0f µs, max %.0f µs\n",
			h.bin, b.N, pct(0.50), pct(0.90), pct(0.99), pct(1.00))
	}
}

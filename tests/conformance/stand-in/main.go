// Command stand-in is a Go implementation of the conformance plugin contract
// (see ../README.md). It is built on NRI's own pkg/stub, so it is known to
// speak the protocol correctly; running the conformance suites against it
// proves that the harness itself is right. The Rust example plugin
// (backends/nri/examples/conformance.rs) must pass the same suites.
//
//	stand-in --socket PATH --name NAME --idx NN --log FILE [--create-delay-ms N]
//
// When NRI_PLUGIN_SOCKET is set (the plugin was launched by the runtime) the
// inherited fd is used instead of dialing and name/index come from
// NRI_PLUGIN_NAME/NRI_PLUGIN_IDX; the process exits when that connection ends.
// Otherwise the plugin reconnects with exponential backoff (100 ms .. 2 s).
//
// STANDIN_FAULT (comma-separated) makes it break the contract on purpose, so
// that ../selftest.sh can check that each conformance case is able to fail:
//
//	no-split       answer more=false to split Synchronize chunks
//	unimplemented  answer Unimplemented to the v0.12 dedicated event RPCs
//	wide-mask      also subscribe UPDATE_POD_SANDBOX (0x800, invalid before NRI v0.10)
//	no-reconnect   exit when the connection ends
//	bad-adjust     put a wrong value in NRI_CONFORMANCE
//	no-refuse      let fail-start* containers start
//	slow-create    take 3 s in CreateContainer (beyond the runtime's 2 s timeout)
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/containerd/nri/pkg/api"
	"github.com/containerd/nri/pkg/stub"
	"github.com/containerd/ttrpc"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var faults = map[string]bool{}

func init() {
	for _, f := range strings.Split(os.Getenv("STANDIN_FAULT"), ",") {
		if f = strings.TrimSpace(f); f != "" {
			faults[f] = true
		}
	}
}

type viaKey struct{}

type plugin struct {
	logMu       sync.Mutex
	logFile     *os.File
	createDelay time.Duration

	cfgMu      sync.Mutex
	nriVersion string // raw ConfigureRequest.NRI_version of the current connection
}

func defaultLogPath() string {
	if p := os.Getenv("NRI_CONFORMANCE_LOG"); p != "" {
		return p
	}
	return "/tmp/nri-conformance.log"
}

func main() {
	var (
		socket  = flag.String("socket", api.DefaultSocketPath, "NRI socket to dial")
		name    = flag.String("name", "conformance", "plugin name")
		idx     = flag.String("idx", "10", "plugin index (two digits)")
		logPath = flag.String("log", defaultLogPath(), "JSON-lines event log (appended)")
		delayMs = flag.Int("create-delay-ms", 0, "sleep this long in CreateContainer")
	)
	flag.Parse()

	logrus.SetLevel(logrus.WarnLevel)

	f, err := os.OpenFile(*logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		fmt.Fprintf(os.Stderr, "stand-in: open log: %v\n", err)
		os.Exit(1)
	}
	p := &plugin{logFile: f, createDelay: time.Duration(*delayMs) * time.Millisecond}

	preConnected := os.Getenv(api.PluginSocketEnvVar) != ""
	backoff := 100 * time.Millisecond
	for {
		opts := []stub.Option{
			stub.WithOnClose(func() {}), // keep the process alive, we reconnect ourselves
			stub.WithTTRPCOptions(nil, []ttrpc.ServerOpt{ttrpc.WithUnaryServerInterceptor(p.intercept)}),
		}
		if !preConnected {
			opts = append(opts, stub.WithPluginName(*name), stub.WithPluginIdx(*idx), stub.WithSocketPath(*socket))
		}
		s, err := stub.New(p, opts...)
		if err != nil {
			fmt.Fprintf(os.Stderr, "stand-in: create stub: %v\n", err)
			os.Exit(1)
		}
		start := time.Now()
		err = s.Run(context.Background())
		if preConnected || faults["no-reconnect"] {
			fmt.Fprintf(os.Stderr, "stand-in: pre-connected session ended: %v\n", err)
			os.Exit(0)
		}
		if time.Since(start) > 2*time.Second {
			backoff = 100 * time.Millisecond // the session was up: start over
		}
		fmt.Fprintf(os.Stderr, "stand-in: session ended (%v), reconnecting in %v\n", err, backoff)
		time.Sleep(backoff)
		backoff = min(2*backoff, 2*time.Second)
	}
}

// intercept records whether a call arrived as a dedicated RPC or as
// StateChange, and captures the raw NRI version sent in Configure (the stub
// may replace an empty one with a guess).
func (p *plugin) intercept(ctx context.Context, unmarshal ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, method ttrpc.Method) (interface{}, error) {
	via := "rpc"
	name := info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:]
	switch name {
	case "RunPodSandbox", "StopPodSandbox", "RemovePodSandbox", "PostCreateContainer",
		"StartContainer", "PostStartContainer", "RemoveContainer", "PostUpdateContainer",
		"UpdatePodSandbox", "PostUpdatePodSandbox":
		if faults["unimplemented"] {
			return nil, status.Errorf(codes.Unimplemented, "%s not implemented (fault injection)", name)
		}
	case "Synchronize":
		if faults["no-split"] {
			rpl, err := method(ctx, unmarshal)
			if r, ok := rpl.(*api.SynchronizeResponse); ok && err == nil {
				r.More = false
			}
			return rpl, err
		}
	}
	switch {
	case strings.HasSuffix(info.FullMethod, "/StateChange"):
		via = "state_change"
	case strings.HasSuffix(info.FullMethod, "/Configure"):
		req := &api.ConfigureRequest{}
		if err := unmarshal(req); err == nil {
			p.cfgMu.Lock()
			p.nriVersion = req.NRIVersion
			p.cfgMu.Unlock()
		}
	}
	rpl, err := method(context.WithValue(ctx, viaKey{}, via), unmarshal)
	if r, ok := rpl.(*api.ConfigureResponse); ok && err == nil && faults["wide-mask"] {
		r.Events |= 1 << (int32(api.Event_UPDATE_POD_SANDBOX) - 1)
	}
	return rpl, err
}

func (p *plugin) write(rec map[string]any) {
	b, _ := json.Marshal(rec)
	p.logMu.Lock()
	defer p.logMu.Unlock()
	_, _ = p.logFile.Write(append(b, '\n'))
}

func (p *plugin) event(ctx context.Context, name string, pod *api.PodSandbox, ctr *api.Container) {
	via, _ := ctx.Value(viaKey{}).(string)
	rec := map[string]any{"event": name, "pod": pod.GetName(), "container": ctr.GetName(), "via": via}
	if ctr != nil {
		rec["pid"] = ctr.GetPid()
	} else {
		rec["pid"] = pod.GetPid()
	}
	p.write(rec)
}

func (p *plugin) Configure(_ context.Context, _, runtime, _ string) (api.EventMask, error) {
	p.cfgMu.Lock()
	v := p.nriVersion
	p.cfgMu.Unlock()
	p.write(map[string]any{"event": "Configure", "runtime": runtime, "nri_version": v})
	var m api.EventMask
	m.Set(api.Event_RUN_POD_SANDBOX, api.Event_STOP_POD_SANDBOX, api.Event_REMOVE_POD_SANDBOX,
		api.Event_CREATE_CONTAINER, api.Event_POST_CREATE_CONTAINER, api.Event_START_CONTAINER,
		api.Event_POST_START_CONTAINER, api.Event_STOP_CONTAINER, api.Event_REMOVE_CONTAINER)
	return m, nil
}

// Synchronize is called by the stub once per complete (possibly split) sync.
func (p *plugin) Synchronize(_ context.Context, pods []*api.PodSandbox, ctrs []*api.Container) ([]*api.ContainerUpdate, error) {
	p.write(map[string]any{"event": "Synchronize", "pods": len(pods), "containers": len(ctrs)})
	return nil, nil
}

func (p *plugin) RunPodSandbox(ctx context.Context, pod *api.PodSandbox) error {
	p.event(ctx, "RunPodSandbox", pod, nil)
	return nil
}

func (p *plugin) StopPodSandbox(ctx context.Context, pod *api.PodSandbox) error {
	p.event(ctx, "StopPodSandbox", pod, nil)
	return nil
}

func (p *plugin) RemovePodSandbox(ctx context.Context, pod *api.PodSandbox) error {
	p.event(ctx, "RemovePodSandbox", pod, nil)
	return nil
}

func (p *plugin) CreateContainer(ctx context.Context, pod *api.PodSandbox, ctr *api.Container) (*api.ContainerAdjustment, []*api.ContainerUpdate, error) {
	p.event(ctx, "CreateContainer", pod, ctr)
	if p.createDelay > 0 {
		time.Sleep(p.createDelay)
	}
	if faults["slow-create"] {
		time.Sleep(3 * time.Second)
	}
	value := ctr.GetName()
	if faults["bad-adjust"] {
		value = "wrong"
	}
	adj := &api.ContainerAdjustment{}
	adj.AddMount(&api.Mount{
		Destination: "/run/conformance",
		Type:        "bind",
		Source:      "/tmp/nri-conformance/" + ctr.GetId(),
		Options:     []string{"rbind", "ro", "nosuid", "nodev"},
	})
	adj.AddEnv("NRI_CONFORMANCE", value)
	return adj, nil, nil
}

func (p *plugin) PostCreateContainer(ctx context.Context, pod *api.PodSandbox, ctr *api.Container) error {
	p.event(ctx, "PostCreateContainer", pod, ctr)
	return nil
}

func (p *plugin) StartContainer(ctx context.Context, pod *api.PodSandbox, ctr *api.Container) error {
	p.event(ctx, "StartContainer", pod, ctr)
	if strings.HasPrefix(ctr.GetName(), "fail-start") && !faults["no-refuse"] {
		return fmt.Errorf("conformance: refusing to start container %q", ctr.GetName())
	}
	return nil
}

func (p *plugin) PostStartContainer(ctx context.Context, pod *api.PodSandbox, ctr *api.Container) error {
	p.event(ctx, "PostStartContainer", pod, ctr)
	return nil
}

func (p *plugin) StopContainer(ctx context.Context, pod *api.PodSandbox, ctr *api.Container) ([]*api.ContainerUpdate, error) {
	p.event(ctx, "StopContainer", pod, ctr)
	return nil, nil
}

func (p *plugin) RemoveContainer(ctx context.Context, pod *api.PodSandbox, ctr *api.Container) error {
	p.event(ctx, "RemoveContainer", pod, ctr)
	return nil
}

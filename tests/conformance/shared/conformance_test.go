// Conformance cases, shared by the v012 and v008 modules (symlinked).

package conformance

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/nri/pkg/api"
	"google.golang.org/protobuf/proto"
)

// startRegistered starts a runtime whose Synchronize reports the given state,
// launches the plugin and waits for it to be registered.
func startRegistered(t *testing.T, nPods, nCtrs int, extraArgs ...string) *harness {
	t.Helper()
	h := newHarness(t)
	h.setState(fakeState(nPods, nCtrs, 0))
	h.startRuntime()
	h.startPlugin(extraArgs...)
	d := h.waitRegistered(registerTimeout)
	t.Logf("plugin registered %v after launch", d.Round(time.Millisecond))
	return h
}

// (1) RegisterPlugin -> Configure -> Synchronize with the runtime's state.
func TestRegisterConfigureSynchronize(t *testing.T) {
	h := startRegistered(t, 3, 5)
	entries := h.waitLog("Configure and Synchronize", 5*time.Second, func(e []logEntry) bool {
		return countEvent(e, "Synchronize") >= 1
	})
	if len(entries) < 2 || entries[0].Event != "Configure" || entries[1].Event != "Synchronize" {
		t.Fatalf("log must start with Configure then Synchronize, got:\n%s", joinEntries(entries))
	}
	if len(entries) != 2 {
		t.Errorf("expected exactly 2 log entries after registration, got:\n%s", joinEntries(entries))
	}
	cfg, syn := entries[0], entries[1]
	if cfg.Runtime != runtimeName {
		t.Errorf("Configure: runtime = %q, want %q (ConfigureRequest.runtime_name)", cfg.Runtime, runtimeName)
	}
	if cfg.NRIVersion == nil {
		t.Errorf("Configure: log entry has no nri_version field: %s", cfg)
	} else if want := expectedConfigureNRIVersion(); *cfg.NRIVersion != want {
		t.Errorf("Configure: nri_version = %q, want %q (ConfigureRequest.NRI_version)", *cfg.NRIVersion, want)
	}
	if syn.Pods != 3 || syn.Containers != 5 {
		t.Errorf("Synchronize: pods=%d containers=%d, want pods=3 containers=5", syn.Pods, syn.Containers)
	}
	if len(h.deprecations) != 0 {
		t.Errorf("runtime recorded deprecation warnings: %q", h.deprecations)
	}
}

// (2) RunPodSandbox then CreateContainer returns the bind mount and env var.
func TestCreateContainerAdjustment(t *testing.T) {
	h := startRegistered(t, 1, 1)
	c := ctx(t)
	pod := fakePod(100)
	ctr := fakeCtr(pod, "ctr-id-adjust", "app", api.ContainerState_CONTAINER_CREATED, 0)

	if err := h.blocked(func() error { return runPodSandbox(c, h.rt, pod) }); err != nil {
		t.Fatalf("RunPodSandbox: %v", err)
	}
	h.mustCreate(c, pod, ctr)

	entries := h.waitLog("CreateContainer", 5*time.Second, func(e []logEntry) bool {
		return countEvent(e, "CreateContainer") == 1
	})
	ev := filterLog(entries, "RunPodSandbox", "CreateContainer")
	if len(ev) != 2 || ev[0].Event != "RunPodSandbox" || ev[1].Event != "CreateContainer" {
		t.Fatalf("expected RunPodSandbox then CreateContainer in the log, got:\n%s", joinEntries(entries))
	}
	if ev[0].Pod != pod.Name || ev[0].Container != "" {
		t.Errorf("RunPodSandbox logged pod=%q container=%q, want pod=%q container=\"\"", ev[0].Pod, ev[0].Container, pod.Name)
	}
	if ev[1].Pod != pod.Name || ev[1].Container != ctr.Name {
		t.Errorf("CreateContainer logged pod=%q container=%q, want %q/%q", ev[1].Pod, ev[1].Container, pod.Name, ctr.Name)
	}
}

// (3) StartContainer fails for fail-start* containers, succeeds otherwise.
func TestStartContainerFailure(t *testing.T) {
	h := startRegistered(t, 1, 1)
	c := ctx(t)
	pod := fakePod(200)
	if err := h.blocked(func() error { return runPodSandbox(c, h.rt, pod) }); err != nil {
		t.Fatalf("RunPodSandbox: %v", err)
	}

	bad := fakeCtr(pod, "ctr-id-bad", "fail-start-x", api.ContainerState_CONTAINER_CREATED, 0)
	h.mustCreate(c, pod, bad)
	bad.Pid = 3001
	err := h.blocked(func() error { return startContainer(c, h.rt, pod, bad) })
	if err == nil {
		t.Errorf("StartContainer(%s) succeeded, want an error containing %q", bad.Name, "refusing to start")
	} else {
		t.Logf("StartContainer(%s) error as seen by the runtime: %q", bad.Name, err.Error())
		if !strings.Contains(err.Error(), "refusing to start") {
			t.Errorf("StartContainer(%s) error %q does not contain %q", bad.Name, err, "refusing to start")
		}
	}

	good := fakeCtr(pod, "ctr-id-good", "app", api.ContainerState_CONTAINER_CREATED, 0)
	h.mustCreate(c, pod, good)
	good.Pid = 3002
	if err := h.blocked(func() error { return startContainer(c, h.rt, pod, good) }); err != nil {
		t.Errorf("StartContainer(%s) failed: %v", good.Name, err)
	}

	// A deliberate error must not cost the plugin its registration.
	h.mustCreate(c, pod, fakeCtr(pod, "ctr-id-after", "after", api.ContainerState_CONTAINER_CREATED, 0))
	h.waitLog("both StartContainer calls", 5*time.Second, func(e []logEntry) bool {
		return countEvent(e, "StartContainer") == 2
	})
}

// (4) All nine subscribed events arrive, in order, via the expected path
// (dedicated RPCs on v0.12, StateChange on v0.8); unsubscribed ones do not.
func TestEventDelivery(t *testing.T) {
	h := startRegistered(t, 1, 1)
	c := ctx(t)
	pod := fakePod(300)
	ctr := fakeCtr(pod, "ctr-id-life", "lifecycle", api.ContainerState_CONTAINER_CREATED, 0)

	steps := []struct {
		name string
		fn   func() error
	}{
		{"RunPodSandbox", func() error { return runPodSandbox(c, h.rt, pod) }},
		{"UpdatePodSandbox (unsubscribed)", func() error { return unsubscribedPodEvents(c, h.rt, pod) }},
		{"CreateContainer", func() error {
			if msg := h.createContainer(c, pod, ctr); msg != "" {
				return fmt.Errorf("%s", msg)
			}
			return nil
		}},
		{"PostCreateContainer", func() error { return postCreateContainer(c, h.rt, pod, ctr) }},
		{"StartContainer", func() error {
			ctr.Pid = 4343
			ctr.State = api.ContainerState_CONTAINER_RUNNING
			return startContainer(c, h.rt, pod, ctr)
		}},
		{"PostStartContainer", func() error { return postStartContainer(c, h.rt, pod, ctr) }},
		{"UpdateContainer (unsubscribed)", func() error {
			_, err := h.rt.UpdateContainer(c, &api.UpdateContainerRequest{Pod: pod, Container: ctr,
				LinuxResources: &api.LinuxResources{}})
			return err
		}},
		{"PostUpdateContainer (unsubscribed)", func() error { return postUpdateContainer(c, h.rt, pod, ctr) }},
		{"StopContainer", func() error {
			_, err := h.rt.StopContainer(c, &api.StopContainerRequest{Pod: pod, Container: ctr})
			return err
		}},
		{"RemoveContainer", func() error {
			ctr.State = api.ContainerState_CONTAINER_STOPPED
			return removeContainer(c, h.rt, pod, ctr)
		}},
		{"StopPodSandbox", func() error { return stopPodSandbox(c, h.rt, pod) }},
		{"RemovePodSandbox", func() error { return removePodSandbox(c, h.rt, pod) }},
	}
	for _, s := range steps {
		if err := h.blocked(s.fn); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
	}

	type want struct {
		event, container, via string
		pid                   uint32
	}
	wants := []want{
		{"RunPodSandbox", "", expectedVia, pod.Pid},
		{"CreateContainer", ctr.Name, "rpc", 0},
		{"PostCreateContainer", ctr.Name, expectedVia, 0},
		{"StartContainer", ctr.Name, expectedVia, 4343},
		{"PostStartContainer", ctr.Name, expectedVia, 4343},
		{"StopContainer", ctr.Name, "rpc", 4343},
		{"RemoveContainer", ctr.Name, expectedVia, 4343},
		{"StopPodSandbox", "", expectedVia, pod.Pid},
		{"RemovePodSandbox", "", expectedVia, pod.Pid},
	}
	entries := h.waitLog("RemovePodSandbox", 5*time.Second, func(e []logEntry) bool {
		return countEvent(e, "RemovePodSandbox") == 1
	})
	var got []logEntry
	for _, e := range entries {
		if e.Event != "Configure" && e.Event != "Synchronize" {
			got = append(got, e)
		}
	}
	if len(got) != len(wants) {
		t.Errorf("expected %d event entries (nine subscribed events, nothing for unsubscribed ones), got %d:\n%s",
			len(wants), len(got), joinEntries(got))
	}
	for i := 0; i < len(wants) && i < len(got); i++ {
		w, g := wants[i], got[i]
		var problems []string
		if g.Event != w.event {
			problems = append(problems, fmt.Sprintf("event %q, want %q", g.Event, w.event))
		}
		if g.Pod != pod.Name {
			problems = append(problems, fmt.Sprintf("pod %q, want %q", g.Pod, pod.Name))
		}
		if g.Container != w.container {
			problems = append(problems, fmt.Sprintf("container %q, want %q", g.Container, w.container))
		}
		if g.Via != w.via {
			problems = append(problems, fmt.Sprintf("via %q, want %q", g.Via, w.via))
		}
		if g.Pid == nil {
			problems = append(problems, "no pid field")
		} else if *g.Pid != w.pid {
			problems = append(problems, fmt.Sprintf("pid %d, want %d (container pid for container events, pod pid for pod events)", *g.Pid, w.pid))
		}
		if len(problems) > 0 {
			t.Errorf("entry %d %s: %s", i, g, strings.Join(problems, "; "))
		}
	}
	if len(h.deprecations) != 0 {
		t.Errorf("runtime recorded deprecation warnings (plugin fell back to StateChange?): %q", h.deprecations)
	}
}

// (5) A Synchronize larger than 4 MiB is split by the runtime; the plugin
// must echo more=true and report the totals once.
func TestSplitSynchronize(t *testing.T) {
	const nPods, nCtrs, pad = 500, 2500, 2000
	h := newHarness(t)
	pods, ctrs := fakeState(nPods, nCtrs, pad)
	size := proto.Size(&api.SynchronizeRequest{Pods: pods, Containers: ctrs})
	if size <= 4<<20 {
		t.Fatalf("harness bug: sync payload is only %d bytes, need > 4 MiB", size)
	}
	t.Logf("unsplit Synchronize payload would be %d bytes (%.1f MiB)", size, float64(size)/(1<<20))
	h.setState(pods, ctrs)
	// The adaptation reports each chunk at debug level; that is how we know it split.
	h.startRuntime()
	setDebugLogging()
	h.startPlugin()
	h.waitRegistered(registerTimeout)

	if chunks := strings.Count(h.rtLog.String(), "(more: true)"); chunks == 0 {
		t.Errorf("runtime log shows no sync chunk with more=true: the request was not split")
	} else {
		t.Logf("runtime sent %d chunk(s) with more=true before the final one", chunks)
	}
	entries := h.waitLog("Synchronize", 5*time.Second, func(e []logEntry) bool {
		return countEvent(e, "Synchronize") >= 1
	})
	syn := filterLog(entries, "Synchronize")
	if len(syn) != 1 {
		t.Errorf("plugin logged Synchronize %d times, want once per complete sync:\n%s", len(syn), joinEntries(syn))
	}
	if syn[0].Pods != nPods || syn[0].Containers != nCtrs {
		t.Errorf("Synchronize: pods=%d containers=%d, want the totals pods=%d containers=%d",
			syn[0].Pods, syn[0].Containers, nPods, nCtrs)
	}
	c := ctx(t)
	pod := fakePod(500)
	h.mustCreate(c, pod, fakeCtr(pod, "ctr-id-after-split", "after-split", api.ContainerState_CONTAINER_CREATED, 0))
	if h.pluginExited() {
		t.Errorf("plugin process exited")
	}
}

// (6) The runtime restarts on the same socket; the plugin re-registers by
// itself. The first runtime is a separate process that is killed (see
// helperRuntime for why an in-process Stop is not a restart).
func TestRuntimeRestart(t *testing.T) {
	h := newHarness(t)
	first := h.startHelperRuntime(2, 2)
	h.startPlugin()
	first.expect(t, "SYNCED", registerTimeout)
	h.waitLog("the first Synchronize", 5*time.Second, func(e []logEntry) bool {
		return countEvent(e, "Synchronize") == 1
	})

	first.kill()                        // the socket file stays behind, as after a crash or restart
	time.Sleep(1500 * time.Millisecond) // let the plugin see EOF and fail a few dials
	if h.pluginExited() {
		t.Fatalf("plugin exited when the runtime went away (%v); it must reconnect", h.cmd.ProcessState)
	}
	h.setState(fakeState(4, 7, 0))
	h.startRuntime()
	d := h.waitRegistered(registerTimeout)
	t.Logf("plugin re-registered %v after the new runtime started", d.Round(time.Millisecond))

	c := ctx(t)
	pod := fakePod(600)
	h.mustCreate(c, pod, fakeCtr(pod, "ctr-id-after", "after-restart", api.ContainerState_CONTAINER_CREATED, 0))
	entries := h.waitLog("a second Synchronize", 5*time.Second, func(e []logEntry) bool {
		return countEvent(e, "Synchronize") >= 2
	})
	if n := countEvent(entries, "Configure"); n != 2 {
		t.Errorf("Configure logged %d times, want 2", n)
	}
	syn := filterLog(entries, "Synchronize")
	if len(syn) != 2 || syn[0].Pods != 2 || syn[0].Containers != 2 || syn[1].Pods != 4 || syn[1].Containers != 7 {
		t.Errorf("want Synchronize pods=2 containers=2, then pods=4 containers=7, got:\n%s", joinEntries(syn))
	}
}

// (7) 200 concurrent CreateContainer calls all get their own adjustment.
func TestConcurrentCreate(t *testing.T) {
	const n = 200
	h := startRegistered(t, 1, 1, "--create-delay-ms", "5")
	c := ctx(t)
	pod := fakePod(700)
	if err := h.blocked(func() error { return runPodSandbox(c, h.rt, pod) }); err != nil {
		t.Fatalf("RunPodSandbox: %v", err)
	}
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		failures []string
	)
	start := time.Now()
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			ctr := fakeCtr(pod, fmt.Sprintf("ctr-id-conc-%03d", i), fmt.Sprintf("conc-%03d", i),
				api.ContainerState_CONTAINER_CREATED, 0)
			if msg := h.createContainer(c, pod, ctr); msg != "" {
				mu.Lock()
				failures = append(failures, msg)
				mu.Unlock()
			}
		}(i)
	}
	wg.Wait()
	t.Logf("%d concurrent CreateContainer calls took %v", n, time.Since(start).Round(time.Millisecond))
	if len(failures) > 0 {
		show := failures
		if len(show) > 5 {
			show = show[:5]
		}
		t.Fatalf("%d of %d CreateContainer calls failed, e.g.:\n  %s", len(failures), n, strings.Join(show, "\n  "))
	}
	entries := h.waitLog(fmt.Sprintf("%d CreateContainer entries", n), 5*time.Second, func(e []logEntry) bool {
		return countEvent(e, "CreateContainer") >= n
	})
	seen := map[string]bool{}
	for _, e := range filterLog(entries, "CreateContainer") {
		seen[e.Container] = true
	}
	if len(seen) != n {
		t.Errorf("log shows %d distinct containers in CreateContainer, want %d", len(seen), n)
	}
}

// (8) Pre-connected mode: the runtime launches the plugin from its plugin dir
// with fd 3 and only NRI_PLUGIN_* in the environment.
func TestPreConnected(t *testing.T) {
	t.Run("wrapper-script", func(t *testing.T) {
		h := newHarness(t)
		h.setState(fakeState(2, 3, 0))
		// The runtime passes no arguments; the wrapper supplies the log path.
		script := fmt.Sprintf("#!/bin/sh\nexec %s --log %s \"$@\"\n", shellQuote(h.bin), shellQuote(h.logPath))
		path := filepath.Join(h.pluginDir, pluginIdx+"-"+pluginName)
		if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		h.startRuntime() // launches, registers and synchronizes before returning
		c := ctx(t)
		pod := fakePod(800)
		if err := h.blocked(func() error { return runPodSandbox(c, h.rt, pod) }); err != nil {
			t.Fatalf("RunPodSandbox: %v", err)
		}
		if msg := h.createContainer(c, pod, fakeCtr(pod, "ctr-id-pre", "pre", api.ContainerState_CONTAINER_CREATED, 0)); msg != "" {
			t.Fatalf("launched plugin did not adjust the container (not registered?): %s", msg)
		}
		entries := h.waitLog("Configure, Synchronize and CreateContainer", 5*time.Second, func(e []logEntry) bool {
			return countEvent(e, "CreateContainer") == 1
		})
		if len(entries) < 2 || entries[0].Event != "Configure" || entries[1].Event != "Synchronize" {
			t.Fatalf("log must start with Configure then Synchronize, got:\n%s", joinEntries(entries))
		}
		if entries[1].Pods != 2 || entries[1].Containers != 3 {
			t.Errorf("Synchronize: pods=%d containers=%d, want 2/3", entries[1].Pods, entries[1].Containers)
		}
		rp := filterLog(entries, "RunPodSandbox")
		if len(rp) != 1 || rp[0].Via != expectedVia {
			t.Errorf("want one RunPodSandbox with via=%s, got:\n%s", expectedVia, joinEntries(rp))
		}
	})
	t.Run("plain-symlink", func(t *testing.T) {
		// Exactly what a node operator does: a symlink, no arguments, and
		// the plugin must cope with the runtime's bare environment.
		h := newHarness(t)
		h.setState(fakeState(1, 1, 0))
		if err := os.Symlink(h.bin, filepath.Join(h.pluginDir, pluginIdx+"-"+pluginName)); err != nil {
			t.Fatal(err)
		}
		h.startRuntime()
		c := ctx(t)
		pod := fakePod(801)
		if msg := h.createContainer(c, pod, fakeCtr(pod, "ctr-id-sym", "sym", api.ContainerState_CONTAINER_CREATED, 0)); msg != "" {
			t.Fatalf("plugin launched through a plain symlink did not adjust the container: %s", msg)
		}
	})
}

// (9) Replies larger than 4096 bytes. NRI's Go multiplexer hands ttrpc one
// frame per read through a 4096-byte buffer, so a plugin that writes a large
// reply as one frame kills its connection. A 10 KB container name
// makes the CreateContainer reply (env value) and the log line large.
func TestLargeReply(t *testing.T) {
	h := startRegistered(t, 1, 1)
	c := ctx(t)
	pod := fakePod(900)
	name := "big-" + strings.Repeat("n", 10000)
	ctr := fakeCtr(pod, "ctr-id-"+strings.Repeat("i", 5000), name, api.ContainerState_CONTAINER_CREATED, 0)
	h.mustCreate(c, pod, ctr)
	// And the connection is still healthy afterwards.
	h.mustCreate(c, pod, fakeCtr(pod, "ctr-id-small", "small", api.ContainerState_CONTAINER_CREATED, 0))
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

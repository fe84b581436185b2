// Shared conformance harness. This file lives in tests/conformance/shared and
// is symlinked into the v012 and v008 modules, which compile it against
// different versions of github.com/containerd/nri. The version-specific
// differences (how non-dedicated events are delivered) are in each module's
// version_test.go.

package conformance

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	nri "github.com/containerd/nri/pkg/adaptation"
	"github.com/containerd/nri/pkg/api"
	"github.com/sirupsen/logrus"
)

const (
	pluginEnvVar   = "NRI_CONFORMANCE_PLUGIN"
	runtimeName    = "conformance-runtime"
	runtimeVersion = "0.0.1"
	pluginName     = "conformance"
	pluginIdx      = "10"

	mountDest   = "/run/conformance"
	mountType   = "bind"
	mountSource = "/tmp/nri-conformance/" // + container id
	envKey      = "NRI_CONFORMANCE"

	registerTimeout = 10 * time.Second

	// The test binary re-executes itself as a throw-away runtime process
	// when this is set (see helperRuntime).
	helperEnv = "NRI_CONFORMANCE_HELPER_RUNTIME"
)

var mountOptions = []string{"rbind", "ro", "nosuid", "nodev"}

// lockedBuffer collects the adaptation's (logrus) output for failure reports.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// harness is one runtime (adaptation) plus at most one external plugin process.
type harness struct {
	tb        testing.TB
	bin       string
	dir       string
	sock      string
	pluginDir string
	confDir   string
	logPath   string
	errPath   string
	rtLog     *lockedBuffer

	mu           sync.Mutex
	pods         []*api.PodSandbox
	ctrs         []*api.Container
	startupSync  bool       // next syncFn call is the one made inside Start()
	syncs        chan error // result of every post-startup plugin synchronization
	deprecations []string   // filled by the v012 deprecation recorder

	rt      *nri.Adaptation
	cmd     *exec.Cmd
	cmdDone chan struct{}
}

func pluginBinary(tb testing.TB) string {
	bin := os.Getenv(pluginEnvVar)
	if bin == "" {
		tb.Skipf("%s is not set: point it at the conformance plugin binary "+
			"(tests/conformance/run.sh builds the Rust example and sets it)", pluginEnvVar)
	}
	abs, err := filepath.Abs(bin)
	if err != nil {
		tb.Fatalf("%s=%q: %v", pluginEnvVar, bin, err)
	}
	if st, err := os.Stat(abs); err != nil || st.Mode()&0o111 == 0 {
		tb.Fatalf("%s=%q is not an executable file (%v)", pluginEnvVar, bin, err)
	}
	return abs
}

func newHarness(tb testing.TB) *harness {
	bin := pluginBinary(tb)
	// Short path: the socket must fit in sun_path (108 bytes).
	dir, err := os.MkdirTemp("", "nric-")
	if err != nil {
		tb.Fatal(err)
	}
	h := &harness{
		tb:        tb,
		bin:       bin,
		dir:       dir,
		sock:      filepath.Join(dir, "nri.sock"),
		pluginDir: filepath.Join(dir, "plugins"),
		confDir:   filepath.Join(dir, "conf.d"),
		logPath:   filepath.Join(dir, "plugin.log"),
		errPath:   filepath.Join(dir, "plugin.stderr"),
		rtLog:     &lockedBuffer{},
		syncs:     make(chan error, 64),
	}
	for _, d := range []string{h.pluginDir, h.confDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			tb.Fatal(err)
		}
	}
	logrus.SetOutput(h.rtLog)
	logrus.SetLevel(logrus.InfoLevel)
	if os.Getenv("NRI_CONFORMANCE_DEBUG") != "" {
		logrus.SetLevel(logrus.DebugLevel)
	}
	tb.Cleanup(func() {
		if h.rt != nil {
			h.rt.Stop()
		}
		h.stopPlugin()
		if tb.Failed() || os.Getenv("NRI_CONFORMANCE_DEBUG") != "" {
			h.dumpDiagnostics()
		}
		_ = os.RemoveAll(dir)
	})
	return h
}

func tail(s string, n int) string {
	if len(s) > n {
		return "...\n" + s[len(s)-n:]
	}
	return s
}

func (h *harness) dumpDiagnostics() {
	h.tb.Logf("---- runtime (adaptation) log ----\n%s", tail(h.rtLog.String(), 6000))
	if b, err := os.ReadFile(filepath.Join(h.dir, "helper-runtime.stderr")); err == nil {
		h.tb.Logf("---- helper runtime process log ----\n%s", tail(string(b), 4000))
	}
	if b, err := os.ReadFile(h.errPath); err == nil {
		h.tb.Logf("---- plugin stderr ----\n%s", tail(string(b), 6000))
	}
	if b, err := os.ReadFile(h.logPath); err == nil {
		h.tb.Logf("---- plugin event log ----\n%s", tail(string(b), 4000))
	}
}

// setState sets what the runtime reports in Synchronize.
func (h *harness) setState(pods []*api.PodSandbox, ctrs []*api.Container) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.pods, h.ctrs = pods, ctrs
}

func (h *harness) syncFn(ctx context.Context, cb nri.SyncCB) error {
	h.mu.Lock()
	pods, ctrs, startup := h.pods, h.ctrs, h.startupSync
	h.startupSync = false
	h.mu.Unlock()

	_, err := cb(ctx, pods, ctrs)
	if !startup {
		select {
		case h.syncs <- err:
		default:
		}
	}
	return err
}

func (h *harness) updateFn(context.Context, []*nri.ContainerUpdate) ([]*nri.ContainerUpdate, error) {
	return nil, nil
}

// startRuntime creates and starts a fresh adaptation on the harness paths.
// Pre-installed plugins in h.pluginDir are launched and synchronized by Start.
func (h *harness) startRuntime() {
	h.tb.Helper()
	opts := append([]nri.Option{
		nri.WithSocketPath(h.sock),
		nri.WithPluginPath(h.pluginDir),
		nri.WithPluginConfigPath(h.confDir),
	}, runtimeOptions(h)...)
	rt, err := nri.New(runtimeName, runtimeVersion, h.syncFn, h.updateFn, opts...)
	if err != nil {
		h.tb.Fatalf("adaptation.New: %v", err)
	}
	h.mu.Lock()
	h.startupSync = true
	h.mu.Unlock()
	if err := rt.Start(); err != nil {
		h.tb.Fatalf("adaptation.Start: %v", err)
	}
	h.rt = rt
}

func (h *harness) stopRuntime() {
	if h.rt != nil {
		h.rt.Stop()
		h.rt = nil
	}
}

// startPlugin launches the plugin binary as an external plugin dialing h.sock.
func (h *harness) startPlugin(extra ...string) {
	h.tb.Helper()
	args := append([]string{"--socket", h.sock, "--name", pluginName, "--idx", pluginIdx,
		"--log", h.logPath}, extra...)
	cmd := exec.Command(h.bin, args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "NRI_PLUGIN_") { // never inherit pre-connected mode
			cmd.Env = append(cmd.Env, kv)
		}
	}
	errf, err := os.OpenFile(h.errPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		h.tb.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = errf, errf
	if err := cmd.Start(); err != nil {
		h.tb.Fatalf("starting plugin %s: %v", h.bin, err)
	}
	errf.Close()
	h.cmd = cmd
	h.cmdDone = make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(h.cmdDone)
	}()
}

func (h *harness) pluginExited() bool {
	if h.cmdDone == nil {
		return false
	}
	select {
	case <-h.cmdDone:
		return true
	default:
		return false
	}
}

func (h *harness) stopPlugin() {
	if h.cmd == nil {
		return
	}
	_ = h.cmd.Process.Kill()
	<-h.cmdDone
	h.cmd = nil
}

// waitRegistered waits until an external plugin has completed RegisterPlugin,
// Configure and Synchronize and has been added to the adaptation's plugin list.
func (h *harness) waitRegistered(timeout time.Duration) time.Duration {
	h.tb.Helper()
	start := time.Now()
	deadline := time.After(timeout)
	var failures []string
	for {
		select {
		case err := <-h.syncs:
			if err != nil {
				failures = append(failures, err.Error())
				continue
			}
			// The accept loop holds the sync lock until the plugin is listed.
			h.rt.BlockPluginSync().Unblock()
			if len(failures) > 0 {
				h.tb.Errorf("plugin registered only after %d failed synchronization(s): %s",
					len(failures), summarize(failures))
			}
			return time.Since(start)
		case <-deadline:
			exited := ""
			if h.pluginExited() {
				exited = fmt.Sprintf(" (plugin process exited: %v)", h.cmd.ProcessState)
			}
			hint := ""
			if len(failures) == 0 {
				hint = " (so RegisterPlugin or Configure failed: see the runtime log)"
			}
			h.tb.Fatalf("plugin did not register and synchronize within %v%s; failed syncs: %s%s",
				timeout, exited, summarize(failures), hint)
			return 0
		}
	}
}

// summarize lists distinct messages with their counts.
func summarize(msgs []string) string {
	if len(msgs) == 0 {
		return "none"
	}
	var order []string
	count := map[string]int{}
	for _, m := range msgs {
		if count[m] == 0 {
			order = append(order, m)
		}
		count[m]++
	}
	var parts []string
	for _, m := range order {
		parts = append(parts, fmt.Sprintf("%q x%d", m, count[m]))
	}
	return strings.Join(parts, ", ")
}

// ---- fake state ----

func fakePod(i int) *api.PodSandbox {
	return &api.PodSandbox{
		Id:        fmt.Sprintf("pod-id-%04d", i),
		Name:      fmt.Sprintf("pod-%04d", i),
		Uid:       fmt.Sprintf("00000000-0000-0000-0000-%012d", i),
		Namespace: "default",
		Labels:    map[string]string{"app": "conformance"},
		Pid:       uint32(10000 + i),
	}
}

func fakeCtr(pod *api.PodSandbox, id, name string, state api.ContainerState, pid uint32) *api.Container {
	return &api.Container{
		Id:           id,
		PodSandboxId: pod.Id,
		Name:         name,
		State:        state,
		Args:         []string{"/bin/sleep", "infinity"},
		Env:          []string{"PATH=/usr/bin:/bin"},
		Pid:          pid,
	}
}

// fakeState returns nPods pods and nCtrs running containers spread over them;
// each container carries an annotation of padBytes bytes.
func fakeState(nPods, nCtrs, padBytes int) ([]*api.PodSandbox, []*api.Container) {
	pods := make([]*api.PodSandbox, nPods)
	for i := range pods {
		pods[i] = fakePod(i)
	}
	pad := strings.Repeat("x", padBytes)
	ctrs := make([]*api.Container, nCtrs)
	for i := range ctrs {
		pod := pods[i%nPods]
		ctrs[i] = fakeCtr(pod, fmt.Sprintf("ctr-id-%05d", i), fmt.Sprintf("ctr-%05d", i),
			api.ContainerState_CONTAINER_RUNNING, uint32(20000+i))
		if padBytes > 0 {
			ctrs[i].Annotations = map[string]string{"conformance/padding": pad}
		}
	}
	return pods, ctrs
}

// ---- plugin event log ----

type logEntry struct {
	Event      string  `json:"event"`
	Runtime    string  `json:"runtime"`
	NRIVersion *string `json:"nri_version"`
	Pods       int     `json:"pods"`
	Containers int     `json:"containers"`
	Pod        string  `json:"pod"`
	Container  string  `json:"container"`
	Pid        *uint32 `json:"pid"`
	Via        string  `json:"via"`
	raw        string
}

func (e logEntry) String() string { return e.raw }

func (h *harness) readLog() []logEntry {
	h.tb.Helper()
	f, err := os.Open(h.logPath)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		h.tb.Fatalf("reading plugin log: %v", err)
	}
	defer f.Close()
	var out []logEntry
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		var e logEntry
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			// Possibly a line still being written; the caller polls again.
			continue
		}
		e.raw = line
		out = append(out, e)
	}
	return out
}

func filterLog(entries []logEntry, events ...string) []logEntry {
	var out []logEntry
	for _, e := range entries {
		for _, ev := range events {
			if e.Event == ev {
				out = append(out, e)
				break
			}
		}
	}
	return out
}

// waitLog polls the plugin log until cond holds and returns the entries.
func (h *harness) waitLog(what string, timeout time.Duration, cond func([]logEntry) bool) []logEntry {
	h.tb.Helper()
	deadline := time.Now().Add(timeout)
	for {
		entries := h.readLog()
		if cond(entries) {
			return entries
		}
		if time.Now().After(deadline) {
			h.tb.Fatalf("plugin log never showed %s within %v; log has %d entries:\n%s",
				what, timeout, len(entries), joinEntries(entries))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func countEvent(entries []logEntry, ev string) int {
	return len(filterLog(entries, ev))
}

func joinEntries(entries []logEntry) string {
	var b strings.Builder
	for _, e := range entries {
		b.WriteString("  ")
		b.WriteString(e.raw)
		b.WriteByte('\n')
	}
	return b.String()
}

// ---- assertions on the runtime's view ----

func ctx(tb testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	tb.Cleanup(cancel)
	return c
}

// createContainer drives CreateContainer inside BlockPluginSync and checks the
// merged adjustment; it returns a description of what is wrong, or "".
func (h *harness) createContainer(c context.Context, pod *api.PodSandbox, ctr *api.Container) string {
	b := h.rt.BlockPluginSync()
	defer b.Unblock()
	rpl, err := h.rt.CreateContainer(c, &api.CreateContainerRequest{Pod: pod, Container: ctr})
	if err != nil {
		return fmt.Sprintf("CreateContainer(%s) failed: %v", ctr.Name, err)
	}
	return checkAdjustment(rpl, ctr)
}

func checkAdjustment(rpl *api.CreateContainerResponse, ctr *api.Container) string {
	var problems []string
	adj := rpl.GetAdjust()
	if adj == nil {
		return fmt.Sprintf("CreateContainer(%s): no adjustment at all (is the plugin registered?)", ctr.Name)
	}
	var found []*api.Mount
	for _, m := range adj.Mounts {
		if m.Destination == mountDest {
			found = append(found, m)
		}
	}
	switch {
	case len(found) == 0 && len(adj.Mounts) == 0 && len(adj.Env) == 0:
		return fmt.Sprintf("CreateContainer(%s): empty adjustment: the plugin is not registered, "+
			"or it timed out or failed fatally and the runtime dropped it (fail-open)", ctr.Name)
	case len(found) == 0:
		problems = append(problems, fmt.Sprintf("no mount at %s (mounts: %v)", mountDest, adj.Mounts))
	case len(found) > 1:
		problems = append(problems, fmt.Sprintf("%d mounts at %s: %v", len(found), mountDest, found))
	default:
		m := found[0]
		if m.Type != mountType {
			problems = append(problems, fmt.Sprintf("mount type %q, want %q", m.Type, mountType))
		}
		if want := mountSource + ctr.Id; m.Source != want {
			problems = append(problems, fmt.Sprintf("mount source %q, want %q", m.Source, want))
		}
		if strings.Join(m.Options, ",") != strings.Join(mountOptions, ",") {
			problems = append(problems, fmt.Sprintf("mount options %q, want %q", m.Options, mountOptions))
		}
	}
	if len(adj.Mounts) != 1 {
		problems = append(problems, fmt.Sprintf("expected exactly 1 mount, got %d: %v", len(adj.Mounts), adj.Mounts))
	}
	var env []*api.KeyValue
	for _, kv := range adj.Env {
		if kv.Key == envKey {
			env = append(env, kv)
		}
	}
	switch {
	case len(env) != 1:
		problems = append(problems, fmt.Sprintf("want exactly one env %s=%s, got env %v", envKey, ctr.Name, adj.Env))
	case env[0].Value != ctr.Name:
		problems = append(problems, fmt.Sprintf("env %s=%q, want %q", envKey, env[0].Value, ctr.Name))
	}
	if len(adj.Env) != 1 {
		problems = append(problems, fmt.Sprintf("expected exactly 1 env var, got %v", adj.Env))
	}
	if len(rpl.Update) != 0 || len(rpl.Evict) != 0 {
		problems = append(problems, fmt.Sprintf("unexpected updates %v / evictions %v", rpl.Update, rpl.Evict))
	}
	if len(problems) == 0 {
		return ""
	}
	return fmt.Sprintf("CreateContainer(%s id=%s): %s", ctr.Name, ctr.Id, strings.Join(problems, "; "))
}

func (h *harness) mustCreate(c context.Context, pod *api.PodSandbox, ctr *api.Container) {
	h.tb.Helper()
	if msg := h.createContainer(c, pod, ctr); msg != "" {
		h.tb.Fatal(msg)
	}
}

// blocked runs fn inside BlockPluginSync, as a runtime does for CRI requests.
func (h *harness) blocked(fn func() error) error {
	b := h.rt.BlockPluginSync()
	defer b.Unblock()
	return fn()
}

func setDebugLogging() { logrus.SetLevel(logrus.DebugLevel) }

// ---- a runtime in a separate process ----
//
// adaptation.Stop() closes the listener and kills launched plugins but leaves
// external plugins' connections open, so an in-process Stop is not what a
// plugin sees when containerd or CRI-O restarts. The process exit is: the
// kernel closes every connection and the socket file is left behind, stale.

func TestMain(m *testing.M) {
	if spec := os.Getenv(helperEnv); spec != "" {
		os.Exit(helperRuntime(spec))
	}
	os.Exit(m.Run())
}

// helperRuntime runs an adaptation until killed. spec is "SOCKET,DIR,PODS,CTRS".
// It prints STARTED once listening and SYNCED (or SYNC-FAILED) per plugin sync.
func helperRuntime(spec string) int {
	var sock, dir string
	var nPods, nCtrs int
	parts := strings.Split(spec, ",")
	if len(parts) != 4 {
		fmt.Fprintf(os.Stderr, "bad %s=%q\n", helperEnv, spec)
		return 2
	}
	sock, dir = parts[0], parts[1]
	fmt.Sscan(parts[2], &nPods)
	fmt.Sscan(parts[3], &nCtrs)
	pods, ctrs := fakeState(nPods, nCtrs, 0)
	var started bool
	var mu sync.Mutex
	syncFn := func(c context.Context, cb nri.SyncCB) error {
		_, err := cb(c, pods, ctrs)
		mu.Lock()
		defer mu.Unlock()
		if started {
			if err != nil {
				fmt.Printf("SYNC-FAILED %v\n", err)
			} else {
				fmt.Println("SYNCED")
			}
		}
		return err
	}
	update := func(context.Context, []*nri.ContainerUpdate) ([]*nri.ContainerUpdate, error) { return nil, nil }
	rt, err := nri.New(runtimeName, runtimeVersion, syncFn, update, nri.WithSocketPath(sock),
		nri.WithPluginPath(dir), nri.WithPluginConfigPath(dir))
	if err == nil {
		err = rt.Start()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "helper runtime: %v\n", err)
		return 1
	}
	mu.Lock()
	started = true
	fmt.Println("STARTED")
	mu.Unlock()
	select {}
}

type helperProc struct {
	cmd   *exec.Cmd
	lines chan string
}

func (h *harness) startHelperRuntime(nPods, nCtrs int) *helperProc {
	h.tb.Helper()
	empty := filepath.Join(h.dir, "helper-empty")
	if err := os.MkdirAll(empty, 0o755); err != nil {
		h.tb.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s,%s,%d,%d", helperEnv, h.sock, empty, nPods, nCtrs))
	errf, err := os.Create(filepath.Join(h.dir, "helper-runtime.stderr"))
	if err != nil {
		h.tb.Fatal(err)
	}
	defer errf.Close()
	cmd.Stderr = errf
	out, err := cmd.StdoutPipe()
	if err != nil {
		h.tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		h.tb.Fatalf("starting helper runtime: %v", err)
	}
	p := &helperProc{cmd: cmd, lines: make(chan string, 16)}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		close(p.lines)
	}()
	h.tb.Cleanup(p.kill)
	p.expect(h.tb, "STARTED", 10*time.Second)
	return p
}

func (p *helperProc) expect(tb testing.TB, want string, timeout time.Duration) {
	tb.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-p.lines:
			if !ok {
				tb.Fatalf("helper runtime exited before printing %s", want)
			}
			if l == want {
				return
			}
			if strings.HasPrefix(l, "SYNC-FAILED") {
				tb.Errorf("helper runtime: %s", l)
			}
		case <-deadline:
			tb.Fatalf("helper runtime did not print %s within %v", want, timeout)
		}
	}
}

func (p *helperProc) kill() {
	if p.cmd.ProcessState == nil {
		_ = p.cmd.Process.Kill()
		_ = p.cmd.Wait()
	}
}

// NRI v0.12.x runtime side (containerd 2.3, NRI main): every subscribed event
// has a dedicated RPC; StateChange is only a fallback for plugins that answer
// Unimplemented, which the runtime reports as a deprecation.

package conformance

import (
	"context"
	"fmt"

	nri "github.com/containerd/nri/pkg/adaptation"
	"github.com/containerd/nri/pkg/api"
	nriversion "github.com/containerd/nri/pkg/version"
)

const expectedVia = "rpc"

// expectedConfigureNRIVersion is what this adaptation puts in ConfigureRequest.NRI_version.
func expectedConfigureNRIVersion() string { return nriversion.GetFromBuildInfo() }

type deprecationRecorder struct{ h *harness }

func (d deprecationRecorder) PluginWarning(_ context.Context, dep nri.Deprecation, plugin, details string) {
	d.h.mu.Lock()
	defer d.h.mu.Unlock()
	d.h.deprecations = append(d.h.deprecations, fmt.Sprintf("%s: %s (%s)", plugin, dep, details))
}

func runtimeOptions(h *harness) []nri.Option {
	return []nri.Option{nri.WithDeprecationRecorder(deprecationRecorder{h})}
}

func runPodSandbox(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox) error {
	return rt.RunPodSandbox(c, &api.RunPodSandboxRequest{Pod: pod})
}

func stopPodSandbox(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox) error {
	return rt.StopPodSandbox(c, &api.StopPodSandboxRequest{Pod: pod})
}

func removePodSandbox(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox) error {
	return rt.RemovePodSandbox(c, &api.RemovePodSandboxRequest{Pod: pod})
}

func postCreateContainer(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox, ctr *api.Container) error {
	return rt.PostCreateContainer(c, &api.PostCreateContainerRequest{Pod: pod, Container: ctr})
}

func startContainer(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox, ctr *api.Container) error {
	return rt.StartContainer(c, &api.StartContainerRequest{Pod: pod, Container: ctr})
}

func postStartContainer(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox, ctr *api.Container) error {
	return rt.PostStartContainer(c, &api.PostStartContainerRequest{Pod: pod, Container: ctr})
}

func postUpdateContainer(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox, ctr *api.Container) error {
	return rt.PostUpdateContainer(c, &api.PostUpdateContainerRequest{Pod: pod, Container: ctr})
}

func removeContainer(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox, ctr *api.Container) error {
	return rt.RemoveContainer(c, &api.RemoveContainerRequest{Pod: pod, Container: ctr})
}

// unsubscribedPodEvents sends the pod events added in v0.10 that the plugin
// does not subscribe to; the plugin must never see them.
func unsubscribedPodEvents(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox) error {
	if _, err := rt.UpdatePodSandbox(c, &api.UpdatePodSandboxRequest{Pod: pod,
		LinuxResources: &api.LinuxResources{}}); err != nil {
		return err
	}
	return rt.PostUpdatePodSandbox(c, &api.PostUpdatePodSandboxRequest{Pod: pod})
}

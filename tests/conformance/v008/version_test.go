// NRI v0.8.0 runtime side (containerd 2.0 and 2.1): only CreateContainer,
// UpdateContainer and StopContainer are dedicated RPCs; every other event is
// delivered as StateChange{event}. Configure carries no NRI version.

package conformance

import (
	"context"

	nri "github.com/containerd/nri/pkg/adaptation"
	"github.com/containerd/nri/pkg/api"
)

const expectedVia = "state_change"

func expectedConfigureNRIVersion() string { return "" }

func runtimeOptions(*harness) []nri.Option { return nil }

func ev(pod *api.PodSandbox, ctr *api.Container) *api.StateChangeEvent {
	return &api.StateChangeEvent{Pod: pod, Container: ctr}
}

func runPodSandbox(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox) error {
	return rt.RunPodSandbox(c, ev(pod, nil))
}

func stopPodSandbox(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox) error {
	return rt.StopPodSandbox(c, ev(pod, nil))
}

func removePodSandbox(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox) error {
	return rt.RemovePodSandbox(c, ev(pod, nil))
}

func postCreateContainer(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox, ctr *api.Container) error {
	return rt.PostCreateContainer(c, ev(pod, ctr))
}

func startContainer(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox, ctr *api.Container) error {
	return rt.StartContainer(c, ev(pod, ctr))
}

func postStartContainer(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox, ctr *api.Container) error {
	return rt.PostStartContainer(c, ev(pod, ctr))
}

func postUpdateContainer(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox, ctr *api.Container) error {
	return rt.PostUpdateContainer(c, ev(pod, ctr))
}

func removeContainer(c context.Context, rt *nri.Adaptation, pod *api.PodSandbox, ctr *api.Container) error {
	return rt.RemoveContainer(c, ev(pod, ctr))
}

// v0.8 has no pod update events.
func unsubscribedPodEvents(context.Context, *nri.Adaptation, *api.PodSandbox) error { return nil }

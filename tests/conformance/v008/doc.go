// Package conformance runs the NRI plugin conformance suite against the
// runtime side of github.com/containerd/nri v0.8.0 (see ../README.md).
package conformance

// scc-admission runs OpenShift's own SecurityContextConstraints admission plugin
// (github.com/openshift/apiserver-library-go, sccadmission: the code the OpenShift API
// server runs for every pod) over the rendered OpenShift manifest (openshift/
// nri-identity-injector.yaml): the pod the DaemonSet would create must be admitted under the
// manifest's SCC, and each widened variant of it must be refused.
//
//	scc-admission MANIFEST
//
// The manifest's Namespace, SCCs and RBAC objects are what admission sees: the pod's
// service account may use an SCC only if the manifest's RBAC grants "use" on it, checked by
// Kubernetes' own RBAC authorizer. Admission refuses to run until OpenShift's standard SCCs
// exist; they are present here as inert placeholders that nobody may use (the pod names its
// SCC with openshift.io/required-scc, so only that one is evaluated).
//
// Prints one line per case, "admitted <case> scc=<name>" or "refused <case>: <reason>",
// and exits 1 if any case does not end as expected.
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	securityv1 "github.com/openshift/api/security/v1"
	"github.com/openshift/apiserver-library-go/pkg/securitycontextconstraints/sccadmission"
	securityfake "github.com/openshift/client-go/security/clientset/versioned/fake"
	securityinformers "github.com/openshift/client-go/security/informers/externalversions"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/apiserver/pkg/admission"
	"k8s.io/apiserver/pkg/authentication/serviceaccount"
	"k8s.io/client-go/informers"
	kubefake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/kubernetes/pkg/api/legacyscheme"
	coreapi "k8s.io/kubernetes/pkg/apis/core"
	_ "k8s.io/kubernetes/pkg/apis/core/install"
	"k8s.io/kubernetes/plugin/pkg/auth/authorizer/rbac"
)

// OpenShift's standard SCC names (admission waits for all of them).
var standardSCCs = []string{
	"anyuid", "hostaccess", "hostmount-anyuid", "hostnetwork", "hostnetwork-v2",
	"nonroot", "nonroot-v2", "privileged", "restricted", "restricted-v2",
}

// manifest is what admission needs from the rendered file.
type manifest struct {
	namespaces []runtime.Object
	sccs       []runtime.Object
	rbac       []runtime.Object
	daemonSet  *appsv1.DaemonSet
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: scc-admission MANIFEST")
		os.Exit(2)
	}
	if err := run(os.Args[1]); err != nil {
		fmt.Fprintln(os.Stderr, "scc-admission:", err)
		os.Exit(1)
	}
}

func load(path string) (*manifest, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		corev1.AddToScheme, appsv1.AddToScheme, rbacv1.AddToScheme, securityv1.Install,
	} {
		if err := add(scheme); err != nil {
			return nil, err
		}
	}
	// Strict: a field this version of the SCC API does not know is an error, not dropped.
	decoder := serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
	m := &manifest{}
	reader := utilyaml.NewYAMLReader(bufioReader(raw))
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, err
		}
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		obj, gvk, err := decoder.Decode(doc, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		switch o := obj.(type) {
		case *corev1.Namespace:
			allocate(o)
			m.namespaces = append(m.namespaces, o)
		case *securityv1.SecurityContextConstraints:
			m.sccs = append(m.sccs, o)
		case *rbacv1.ClusterRole, *rbacv1.ClusterRoleBinding, *rbacv1.Role, *rbacv1.RoleBinding:
			m.rbac = append(m.rbac, o)
		case *appsv1.DaemonSet:
			if m.daemonSet != nil {
				return nil, fmt.Errorf("%s: more than one DaemonSet", path)
			}
			m.daemonSet = o
		case *corev1.ServiceAccount, *corev1.ConfigMap:
		default:
			return nil, fmt.Errorf("%s: unexpected %s", path, gvk)
		}
	}
	if m.daemonSet == nil || len(m.sccs) == 0 || len(m.namespaces) == 0 {
		return nil, fmt.Errorf("%s: expected a Namespace, an SCC and a DaemonSet", path)
	}
	return m, nil
}

// allocate adds what OpenShift's cluster policy controller gives every namespace as soon as
// it exists, and SCC admission waits for: a block of UIDs and GIDs and an MCS level. The
// values are of the usual form; the daemon's SCC pins its own user and level, so they do
// not matter to it.
func allocate(ns *corev1.Namespace) {
	if ns.Annotations == nil {
		ns.Annotations = map[string]string{}
	}
	for k, v := range map[string]string{
		securityv1.UIDRangeAnnotation:           "1000680000/10000",
		securityv1.SupplementalGroupsAnnotation: "1000680000/10000",
		securityv1.MCSAnnotation:                "s0:c26,c15",
	} {
		if _, ok := ns.Annotations[k]; !ok {
			ns.Annotations[k] = v
		}
	}
}

// admitter is OpenShift's SCC admission plugin wired to the manifest's objects.
type admitter struct {
	plugin admission.MutationInterface
	valid  admission.ValidationInterface
}

func newAdmitter(ctx context.Context, m *manifest) (*admitter, error) {
	sccs := append([]runtime.Object(nil), m.sccs...)
	for _, name := range standardSCCs {
		sccs = append(sccs, placeholderSCC(name))
	}
	kube := kubefake.NewSimpleClientset(append(append([]runtime.Object(nil), m.namespaces...), m.rbac...)...)
	// Created through the typed client: the fake's object tracker would file objects given
	// to its constructor under a guessed plural ("securitycontextconstraintses").
	security := securityfake.NewSimpleClientset()
	for _, o := range sccs {
		scc := o.(*securityv1.SecurityContextConstraints)
		if _, err := security.SecurityV1().SecurityContextConstraints().Create(ctx, scc, metav1.CreateOptions{}); err != nil {
			return nil, err
		}
	}
	kubeInformers := informers.NewSharedInformerFactory(kube, 0)
	securityInformers := securityinformers.NewSharedInformerFactory(security, 0)

	rbacInformers := kubeInformers.Rbac().V1()
	authz := rbac.New(
		&rbac.RoleGetter{Lister: rbacInformers.Roles().Lister()},
		&rbac.RoleBindingLister{Lister: rbacInformers.RoleBindings().Lister()},
		&rbac.ClusterRoleGetter{Lister: rbacInformers.ClusterRoles().Lister()},
		&rbac.ClusterRoleBindingLister{Lister: rbacInformers.ClusterRoleBindings().Lister()},
	)

	plugin := sccadmission.NewConstraint()
	plugin.SetSecurityInformers(securityInformers.Security().V1().SecurityContextConstraints())
	plugin.SetExternalKubeInformerFactory(kubeInformers)
	plugin.SetAuthorizer(authz)
	if err := plugin.ValidateInitialization(); err != nil {
		return nil, err
	}
	kubeInformers.Start(ctx.Done())
	securityInformers.Start(ctx.Done())
	for typ, ok := range kubeInformers.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return nil, fmt.Errorf("informer for %v did not sync", typ)
		}
	}
	for typ, ok := range securityInformers.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return nil, fmt.Errorf("informer for %v did not sync", typ)
		}
	}
	return &admitter{plugin: plugin, valid: plugin}, nil
}

// placeholderSCC satisfies admission's check that the standard SCCs exist; it is usable by
// nobody (no users, no groups, no RBAC) and admits nothing beyond restricted.
func placeholderSCC(name string) *securityv1.SecurityContextConstraints {
	return &securityv1.SecurityContextConstraints{
		ObjectMeta:               metav1.ObjectMeta{Name: name},
		RunAsUser:                securityv1.RunAsUserStrategyOptions{Type: securityv1.RunAsUserStrategyMustRunAsNonRoot},
		SELinuxContext:           securityv1.SELinuxContextStrategyOptions{Type: securityv1.SELinuxStrategyMustRunAs, SELinuxOptions: &corev1.SELinuxOptions{Level: "s0:c1,c0"}},
		FSGroup:                  securityv1.FSGroupStrategyOptions{Type: securityv1.FSGroupStrategyRunAsAny},
		SupplementalGroups:       securityv1.SupplementalGroupsStrategyOptions{Type: securityv1.SupplementalGroupsStrategyRunAsAny},
		RequiredDropCapabilities: []corev1.Capability{"ALL"},
		Volumes:                  []securityv1.FSType{securityv1.FSTypeConfigMap},
	}
}

// admit runs the plugin as the API server does for a pod the DaemonSet controller creates:
// mutation, then validation. It returns the SCC the pod was admitted under.
func (a *admitter) admit(ctx context.Context, v1pod *corev1.Pod) (*coreapi.Pod, error) {
	pod := &coreapi.Pod{}
	legacyscheme.Scheme.Default(v1pod)
	if err := legacyscheme.Scheme.Convert(v1pod, pod, nil); err != nil {
		return nil, err
	}
	creator := serviceaccount.UserInfo("kube-system", "daemon-set-controller", "")
	attrs := admission.NewAttributesRecord(pod, nil, coreapi.Kind("Pod").WithVersion(""),
		pod.Namespace, pod.Name, coreapi.Resource("pods").WithVersion(""), "",
		admission.Create, &metav1.CreateOptions{}, false, creator)
	if err := a.plugin.Admit(ctx, attrs, nil); err != nil {
		return nil, err
	}
	if err := a.valid.Validate(ctx, attrs, nil); err != nil {
		return nil, err
	}
	return pod, nil
}

// A case: the DaemonSet's pod, changed or not, whether admission must take it, and what
// must then hold of the admitted (possibly mutated) pod.
type testCase struct {
	name   string
	admit  bool
	change func(*corev1.Pod)
	check  func(*coreapi.Pod) error
}

// dropsAll: the SCC's requiredDropCapabilities are enforced by mutation, not refusal.
func dropsAll(p *coreapi.Pod) error {
	for _, c := range p.Spec.Containers[0].SecurityContext.Capabilities.Drop {
		if c == "ALL" {
			return nil
		}
	}
	return fmt.Errorf("admitted without dropping ALL: %v", p.Spec.Containers[0].SecurityContext.Capabilities)
}

func daemonContainer(p *corev1.Pod) *corev1.Container { return &p.Spec.Containers[0] }

func cases() []testCase {
	return []testCase{
		{"the DaemonSet's pod", true, func(*corev1.Pod) {}, dropsAll},
		{"with capability SYS_ADMIN added", false, func(p *corev1.Pod) {
			c := daemonContainer(p)
			c.SecurityContext.Capabilities.Add = append(c.SecurityContext.Capabilities.Add, "SYS_ADMIN")
		}, nil},
		{"with capability NET_ADMIN added", false, func(p *corev1.Pod) {
			c := daemonContainer(p)
			c.SecurityContext.Capabilities.Add = append(c.SecurityContext.Capabilities.Add, "NET_ADMIN")
		}, nil},
		{"without dropping ALL capabilities (admission adds the drop)", true, func(p *corev1.Pod) {
			daemonContainer(p).SecurityContext.Capabilities.Drop = nil
		}, dropsAll},
		{"with the host network namespace", false, func(p *corev1.Pod) { p.Spec.HostNetwork = true }, nil},
		{"with the host PID namespace", false, func(p *corev1.Pod) { p.Spec.HostPID = true }, nil},
		{"with the host IPC namespace", false, func(p *corev1.Pod) { p.Spec.HostIPC = true }, nil},
		{"privileged", false, func(p *corev1.Pod) {
			t := true
			daemonContainer(p).SecurityContext.Privileged = &t
		}, nil},
		{"with privilege escalation", false, func(p *corev1.Pod) {
			t := true
			daemonContainer(p).SecurityContext.AllowPrivilegeEscalation = &t
		}, nil},
		{"with a writable root file system", false, func(p *corev1.Pod) {
			f := false
			daemonContainer(p).SecurityContext.ReadOnlyRootFilesystem = &f
		}, nil},
		{"as uid 1000", false, func(p *corev1.Pod) {
			u := int64(1000)
			daemonContainer(p).SecurityContext.RunAsUser = &u
		}, nil},
		{"as SELinux type container_t", false, func(p *corev1.Pod) {
			p.Spec.SecurityContext.SELinuxOptions.Type = "container_t"
		}, nil},
		{"as SELinux type unconfined_t", false, func(p *corev1.Pod) {
			p.Spec.SecurityContext.SELinuxOptions.Type = "unconfined_t"
		}, nil},
		{"with an emptyDir volume", false, func(p *corev1.Pod) {
			p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: "scratch", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
		}, nil},
		{"with a host port", false, func(p *corev1.Pod) {
			daemonContainer(p).Ports[0].HostPort = 9464
		}, nil},
		{"unconfined by seccomp", false, func(p *corev1.Pod) {
			daemonContainer(p).SecurityContext.SeccompProfile = &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeUnconfined}
		}, nil},
		{"with a sysctl", false, func(p *corev1.Pod) {
			p.Spec.SecurityContext.Sysctls = []corev1.Sysctl{{Name: "net.ipv4.ping_group_range", Value: "0 1"}}
		}, nil},
		{"run by another service account", false, func(p *corev1.Pod) { p.Spec.ServiceAccountName = "default" }, nil},
	}
}

func run(path string) error {
	m, err := load(path)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ds := m.daemonSet
	required := ds.Spec.Template.Annotations[securityv1.RequiredSCCAnnotation]
	var scc *securityv1.SecurityContextConstraints
	for _, o := range m.sccs {
		if s := o.(*securityv1.SecurityContextConstraints); s.Name == required {
			scc = s
		}
	}
	if scc == nil {
		return fmt.Errorf("the pod template's %s annotation %q names no SCC of the manifest", securityv1.RequiredSCCAnnotation, required)
	}
	a, err := newAdmitter(ctx, m)
	if err != nil {
		return err
	}
	failed := 0
	for i, c := range cases() {
		pod := &corev1.Pod{
			ObjectMeta: *ds.Spec.Template.ObjectMeta.DeepCopy(),
			Spec:       *ds.Spec.Template.Spec.DeepCopy(),
		}
		pod.Namespace = ds.Namespace
		pod.Name = fmt.Sprintf("%s-case%d", ds.Name, i)
		if c.name == "with the host PID namespace" && pod.Spec.HostPID {
			// The DaemonSet runs in PID mode (chart value hostPID): not a widening.
			continue
		}
		c.change(pod)
		admitted, err := a.admit(ctx, pod)
		switch {
		case err == nil:
			got := admitted.Annotations[securityv1.ValidatedSCCAnnotation]
			fmt.Printf("admitted %s scc=%s\n", c.name, got)
			if !c.admit || got != scc.Name {
				failed++
				fmt.Printf("  UNEXPECTED: want %s\n", want(c.admit, scc.Name))
			} else if c.check != nil {
				if err := c.check(admitted); err != nil {
					failed++
					fmt.Printf("  UNEXPECTED: %v\n", err)
				}
			}
		default:
			fmt.Printf("refused %s: %s\n", c.name, firstLine(err.Error()))
			if c.admit {
				failed++
				fmt.Printf("  UNEXPECTED: want %s\n", want(c.admit, scc.Name))
			}
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d cases did not end as expected", failed)
	}
	return nil
}

func want(admit bool, scc string) string {
	if admit {
		return "admitted under " + scc
	}
	return "refused"
}

// firstLine keeps a refusal short: the reasons, without the prefix every refusal has.
func firstLine(s string) string {
	if _, after, ok := strings.Cut(s, "unable to validate against any security context constraint: "); ok {
		s = after
	}
	if len(s) > 400 {
		s = s[:400] + "..."
	}
	return strings.ReplaceAll(s, "\n", " ")
}

func stripComments(doc []byte) []byte {
	var out bytes.Buffer
	for _, line := range bytes.Split(doc, []byte("\n")) {
		if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' {
			out.Write(line)
			out.WriteByte('\n')
		}
	}
	return out.Bytes()
}

func bufioReader(b []byte) *bufio.Reader { return bufio.NewReader(bytes.NewReader(b)) }

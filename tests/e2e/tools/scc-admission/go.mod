module example.invalid/nii-e2e/scc-admission

go 1.24.0

require (
	github.com/openshift/api v0.0.0-20260213204242-d34f11c515b3
	github.com/openshift/apiserver-library-go v0.0.0-20230816171015-6bfafa975bfb
	github.com/openshift/client-go v0.0.0-20230503144108-75015d2347cb
	k8s.io/api v0.34.1
	k8s.io/apimachinery v0.34.1
	k8s.io/apiserver v0.27.1
	k8s.io/client-go v0.27.1
	k8s.io/kubernetes v1.27.1
)

require (
	github.com/beorn7/perks v1.0.1 // indirect
	github.com/blang/semver/v4 v4.0.0 // indirect
	github.com/cespare/xxhash/v2 v2.1.2 // indirect
	github.com/davecgh/go-spew v1.1.2-0.20180830191138-d8f796af33cc // indirect
	github.com/docker/distribution v2.8.1+incompatible // indirect
	github.com/emicklei/go-restful/v3 v3.11.0 // indirect
	github.com/evanphx/json-patch v4.12.0+incompatible // indirect
	github.com/go-logr/logr v1.4.2 // indirect
	github.com/go-openapi/jsonpointer v0.21.0 // indirect
	github.com/go-openapi/jsonreference v0.20.2 // indirect
	github.com/go-openapi/swag v0.23.0 // indirect
	github.com/gogo/protobuf v1.3.2 // indirect
	github.com/golang/protobuf v1.5.3 // indirect
	github.com/google/gnostic v0.5.7-v3refs // indirect
	github.com/google/go-cmp v0.7.0 // indirect
	github.com/google/gofuzz v1.2.0 // indirect
	github.com/google/uuid v1.6.0 // indirect
	github.com/josharian/intern v1.0.0 // indirect
	github.com/json-iterator/go v1.1.12 // indirect
	github.com/mailru/easyjson v0.7.7 // indirect
	github.com/matttproud/golang_protobuf_extensions v1.0.2 // indirect
	github.com/modern-go/concurrent v0.0.0-20180306012644-bacd9c7ef1dd // indirect
	github.com/modern-go/reflect2 v1.0.3-0.20250322232337-35a7c28c31ee // indirect
	github.com/munnerz/goautoneg v0.0.0-20191010083416-a7dc8b61c822 // indirect
	github.com/opencontainers/go-digest v1.0.0 // indirect
	github.com/openshift/library-go v0.0.0-20230503173034-95ca3c14e50a // indirect
	github.com/pkg/errors v0.9.1 // indirect
	github.com/prometheus/client_golang v1.14.0 // indirect
	github.com/prometheus/client_model v0.3.0 // indirect
	github.com/prometheus/common v0.37.0 // indirect
	github.com/prometheus/procfs v0.8.0 // indirect
	github.com/spf13/pflag v1.0.6 // indirect
	go.yaml.in/yaml/v2 v2.4.2 // indirect
	golang.org/x/net v0.38.0 // indirect
	golang.org/x/oauth2 v0.0.0-20220411215720-9780585627b5 // indirect
	golang.org/x/sys v0.31.0 // indirect
	golang.org/x/term v0.30.0 // indirect
	golang.org/x/text v0.23.0 // indirect
	golang.org/x/time v0.0.0-20220210224613-90d013bbcef8 // indirect
	google.golang.org/appengine v1.6.7 // indirect
	google.golang.org/protobuf v1.36.5 // indirect
	gopkg.in/inf.v0 v0.9.1 // indirect
	gopkg.in/yaml.v2 v2.4.0 // indirect
	gopkg.in/yaml.v3 v3.0.1 // indirect
	k8s.io/component-base v0.27.1 // indirect
	k8s.io/component-helpers v0.25.0 // indirect
	k8s.io/klog/v2 v2.130.1 // indirect
	k8s.io/kube-openapi v0.0.0-20250710124328-f3f2b991d03b // indirect
	k8s.io/utils v0.0.0-20250604170112-4c0f3b243397 // indirect
	sigs.k8s.io/json v0.0.0-20241014173422-cfa47c3a1cc8 // indirect
	sigs.k8s.io/structured-merge-diff/v4 v4.2.3 // indirect
	sigs.k8s.io/yaml v1.6.0 // indirect
)

replace k8s.io/api => k8s.io/api v0.27.1

replace k8s.io/apiextensions-apiserver => k8s.io/apiextensions-apiserver v0.27.1

replace k8s.io/apimachinery => k8s.io/apimachinery v0.27.1

replace k8s.io/apiserver => k8s.io/apiserver v0.27.1

replace k8s.io/cli-runtime => k8s.io/cli-runtime v0.27.1

replace k8s.io/client-go => k8s.io/client-go v0.27.1

replace k8s.io/cloud-provider => k8s.io/cloud-provider v0.27.1

replace k8s.io/cluster-bootstrap => k8s.io/cluster-bootstrap v0.27.1

replace k8s.io/code-generator => k8s.io/code-generator v0.27.1

replace k8s.io/component-base => k8s.io/component-base v0.27.1

replace k8s.io/component-helpers => k8s.io/component-helpers v0.27.1

replace k8s.io/controller-manager => k8s.io/controller-manager v0.27.1

replace k8s.io/cri-api => k8s.io/cri-api v0.27.1

replace k8s.io/csi-translation-lib => k8s.io/csi-translation-lib v0.27.1

replace k8s.io/dynamic-resource-allocation => k8s.io/dynamic-resource-allocation v0.27.1

replace k8s.io/kms => k8s.io/kms v0.27.1

replace k8s.io/kube-aggregator => k8s.io/kube-aggregator v0.27.1

replace k8s.io/kube-controller-manager => k8s.io/kube-controller-manager v0.27.1

replace k8s.io/kube-proxy => k8s.io/kube-proxy v0.27.1

replace k8s.io/kube-scheduler => k8s.io/kube-scheduler v0.27.1

replace k8s.io/kubectl => k8s.io/kubectl v0.27.1

replace k8s.io/kubelet => k8s.io/kubelet v0.27.1

replace k8s.io/legacy-cloud-providers => k8s.io/legacy-cloud-providers v0.27.1

replace k8s.io/metrics => k8s.io/metrics v0.27.1

replace k8s.io/mount-utils => k8s.io/mount-utils v0.27.1

replace k8s.io/pod-security-admission => k8s.io/pod-security-admission v0.27.1

replace k8s.io/sample-apiserver => k8s.io/sample-apiserver v0.27.1

replace k8s.io/sample-cli-plugin => k8s.io/sample-cli-plugin v0.27.1

replace k8s.io/sample-controller => k8s.io/sample-controller v0.27.1

replace k8s.io/kube-openapi => k8s.io/kube-openapi v0.0.0-20230308215209-15aac26d736a

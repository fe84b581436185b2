//! The shipped manifests (`deploy/` for Kubernetes, `openshift/` for OpenShift, both rendered
//! from `charts/nri-identity-injector`) agree with the daemon and with themselves, checked
//! offline: no cluster, no container engine. The configuration in each ConfigMap is loaded by
//! the daemon's own loader with the environment the DaemonSet sets, and every path, port,
//! name and permission the daemon depends on is compared with what the manifests provide.
//! `tests/e2e/openshift.sh` runs the real tools on them (helm, Ignition, OpenShift's SCC
//! admission, an API server with OpenShift's CRDs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nri_identity_injector::annotation::{self, PodRef};
use nri_identity_injector::config::{Attestation, Config, Overrides};
use nri_identity_injector::k8s::ClientAuth;
use serde_json::Value;

const MANIFEST: &str = "deploy/nri-identity-injector.yaml";
const OPENSHIFT_MANIFEST: &str = "openshift/nri-identity-injector.yaml";
const OPENSHIFT_MACHINECONFIGS: &[&str] = &[
    "openshift/machineconfig-worker.yaml",
    "openshift/machineconfig-master.yaml",
];
const OPENSHIFT_NODE_DISRUPTION_POLICY: &str = "openshift/node-disruption-policy.yaml";
const EXAMPLE: &str = "deploy/example-pod.yaml";
const OPENSHIFT_EXAMPLE: &str = "openshift/example-pod.yaml";
const CONTAINERFILE: &str = "deploy/Containerfile";
const SPIRE_SNIPPET: &str = "deploy/spire-agent-snippet.conf";
/// Where the kubelet mounts a pod's service account token and the cluster CA.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// What the downward API would give the daemon on an example node.
const FIELD_REFS: &[(&str, &str)] = &[
    ("status.hostIP", "10.0.0.5"),
    ("status.podIP", "10.244.1.7"),
    ("spec.nodeName", "node-1"),
    ("metadata.namespace", "nri-identity-injector"),
];
const CONTAINER: &str = "nri-identity-injector";

fn repo_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn documents(rel: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(&repo_file(rel))
        .unwrap_or_else(|e| panic!("{rel} does not parse as YAML: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// The one document of `kind` named `name`.
fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} {name}, found {}",
        found.len()
    );
    found[0]
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"))
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// One manifest (Kubernetes or OpenShift), parsed once per test.
struct Deploy {
    file: &'static str,
    docs: Vec<Value>,
}

impl Deploy {
    /// The Kubernetes manifest (`deploy/`).
    fn load() -> Self {
        Self::load_file(MANIFEST)
    }

    /// The OpenShift manifest (`openshift/`).
    fn openshift() -> Self {
        Self::load_file(OPENSHIFT_MANIFEST)
    }

    fn load_file(file: &'static str) -> Self {
        Deploy {
            file,
            docs: documents(file),
        }
    }

    /// Both manifests, for the checks that hold for each. A failure prints which.
    fn all() -> Vec<Self> {
        [MANIFEST, OPENSHIFT_MANIFEST]
            .into_iter()
            .map(|file| {
                println!("checking {file}");
                Self::load_file(file)
            })
            .collect()
    }

    fn daemonset(&self) -> &Value {
        object(&self.docs, "DaemonSet", "nri-identity-injector")
    }

    fn pod_spec(&self) -> &Value {
        &self.daemonset()["spec"]["template"]["spec"]
    }

    fn container(&self) -> &Value {
        array(&self.pod_spec()["containers"])
            .iter()
            .find(|c| c["name"] == CONTAINER)
            .expect("the DaemonSet has the daemon's container")
    }

    fn namespace(&self) -> &str {
        str_of(&self.daemonset()["metadata"]["namespace"], "namespace")
    }

    fn service_account(&self) -> &str {
        str_of(&self.pod_spec()["serviceAccountName"], "serviceAccountName")
    }

    fn config_toml(&self) -> &str {
        let cm = object(&self.docs, "ConfigMap", "nri-identity-injector");
        str_of(&cm["data"]["config.toml"], "ConfigMap data config.toml")
    }

    /// The container's environment as the kubelet would set it on the example node:
    /// `valueFrom.fieldRef` resolved, `$(VAR)` references to earlier variables expanded.
    fn environment(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = Vec::new();
        for var in array(&self.container()["env"]) {
            let name = str_of(&var["name"], "env name").to_owned();
            let value = if let Some(v) = var["value"].as_str() {
                expand(v, &env)
            } else {
                let field = str_of(&var["valueFrom"]["fieldRef"]["fieldPath"], "fieldPath");
                FIELD_REFS
                    .iter()
                    .find(|(f, _)| *f == field)
                    .unwrap_or_else(|| panic!("no example value for fieldRef {field}"))
                    .1
                    .to_owned()
            };
            env.push((name, value));
        }
        env
    }

    /// The daemon's configuration in the pod: the ConfigMap's file, the DaemonSet's
    /// environment, and no flags beyond `--config` (checked by
    /// `the_image_entrypoint_reads_the_configmap_file`).
    fn config(&self) -> Config {
        let file = std::env::temp_dir().join(format!(
            "nii-deploy-manifests-{}-{:x}.toml",
            std::process::id(),
            unique_suffix()
        ));
        std::fs::write(&file, self.config_toml()).unwrap();
        let loaded = Config::load(Some(&file), self.environment(), &Overrides::default());
        let _ = std::fs::remove_file(&file);
        loaded.unwrap_or_else(|e| {
            panic!("{}: the ConfigMap's config.toml is refused: {e}", self.file)
        })
    }

    fn volume(&self, name: &str) -> &Value {
        array(&self.pod_spec()["volumes"])
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    }

    /// The volumeMount whose mountPath is the deepest ancestor of (or equal to) `path`.
    fn mount_containing(&self, path: &Path) -> Option<&Value> {
        array(&self.container()["volumeMounts"])
            .iter()
            .filter(|m| path.starts_with(str_of(&m["mountPath"], "mountPath")))
            .max_by_key(|m| str_of(&m["mountPath"], "mountPath").len())
    }

    /// A port of the container by name or number.
    fn container_port(&self, port: &Value) -> u64 {
        if let Some(n) = port.as_u64() {
            return n;
        }
        let name = str_of(port, "port");
        array(&self.container()["ports"])
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port named {name}"))
    }
}

/// A per-call suffix for temporary file names (tests run in parallel threads).
fn unique_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Kubernetes' `$(VAR)` expansion in env values: a reference to a variable defined earlier
/// in the list is replaced, any other is kept as written, and `$$` stands for `$`.
fn expand(value: &str, defined: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest
            .strip_prefix("$(")
            .and_then(|r| r.find(')').map(|j| (&r[..j], &r[j + 1..])))
        {
            match defined.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&rest[..name.len() + 3]),
            }
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The configuration as JSON, to read fields by their file key whatever their Rust type.
fn config_json(config: &Config) -> Value {
    serde_json::to_value(config).unwrap()
}

/// `Ki`, `Mi`, `Gi` quantities in bytes.
fn quantity_bytes(q: &str) -> u64 {
    for (suffix, unit) in [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)] {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().unwrap() * unit;
        }
    }
    q.parse()
        .unwrap_or_else(|_| panic!("unsupported quantity {q}"))
}

// === the tests ===

#[test]
fn every_manifest_document_parses_and_names_its_kind_and_name() {
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["deploy", "openshift"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let before = files.len();
        files.extend(
            std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml")),
        );
        assert!(files.len() >= before + 2, "expected manifests in {dir:?}");
    }
    files.sort();
    let cluster_scoped = [
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "SecurityContextConstraints",
        "MachineConfig",
        "MachineConfiguration",
    ];
    for file in files {
        let rel = file.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap();
        let docs = documents(rel.to_str().unwrap());
        assert!(!docs.is_empty(), "{rel:?} has no document");
        for d in &docs {
            let kind = str_of(&d["kind"], "kind");
            assert!(
                d["apiVersion"].is_string(),
                "{rel:?}: {kind} has no apiVersion"
            );
            assert!(
                d["metadata"]["name"].is_string(),
                "{rel:?}: {kind} has no name"
            );
            if !cluster_scoped.contains(&kind) {
                assert!(
                    d["metadata"]["namespace"].is_string(),
                    "{rel:?}: {kind} {} names no namespace",
                    d["metadata"]["name"]
                );
            }
        }
    }
}

#[test]
fn the_configmap_configuration_loads_with_the_daemonsets_environment_in_selectors_mode() {
    for deploy in Deploy::all() {
        let config = deploy.config();
        let json = config_json(&config);
        assert_eq!(
            json["kubelet_url"], "https://10.0.0.5:10250",
            "the kubelet is the node's own, on its secure port"
        );
        assert_eq!(config.default_attestation(), Attestation::Selectors);
        assert_eq!(
            config.plugin_name, "identity-injector",
            "the name required-plugins annotations use"
        );
    }
}

#[test]
fn host_paths_the_daemon_names_are_mounted_from_the_same_host_path() {
    for deploy in Deploy::all() {
        let config = deploy.config();
        let mut paths: Vec<(&str, &Path)> = vec![
            ("nri_socket", &config.nri_socket),
            ("agent_socket", &config.agent_socket),
            ("artifact_root", &config.artifact_root),
        ];
        paths.extend(
            config
                .allowed_agent_sockets
                .iter()
                .map(|p| ("allowed_agent_sockets", p.as_path())),
        );
        for (field, path) in paths {
            let mount = deploy
                .mount_containing(path)
                .unwrap_or_else(|| panic!("{field} {} is in no volumeMount", path.display()));
            let mount_path = str_of(&mount["mountPath"], "mountPath");
            let volume = deploy.volume(str_of(&mount["name"], "volume name"));
            let host_path = volume["hostPath"]["path"]
                .as_str()
                .unwrap_or_else(|| panic!("{field}: volume {} is not a hostPath", volume["name"]));
            assert_eq!(
                host_path, mount_path,
                "{field}: the daemon must see the host path at the same path"
            );
            if field == "artifact_root" {
                assert_ne!(
                    mount["readOnly"], true,
                    "the artifact root must be writable"
                );
            } else {
                // The socket's directory, so that a recreated socket shows through.
                assert_ne!(
                    Path::new(mount_path),
                    path,
                    "{field}: mount the socket's directory, not the socket"
                );
            }
        }
    }
}

#[test]
fn the_kubelet_is_verified_with_a_mounted_ca_and_given_the_service_account_token() {
    for deploy in Deploy::all() {
        let endpoint = deploy
            .config()
            .kubelet_endpoint()
            .expect("the kubelet is configured");
        assert_eq!(endpoint.url.to_string(), "https://10.0.0.5:10250");
        let tls = endpoint.tls.expect("the secure port speaks TLS");
        assert_eq!(
            tls.server_name, "10.0.0.5",
            "the node's IP, as its serving certificate names it"
        );
        let ca = tls.ca.expect("the serving certificate is verified");
        let ClientAuth::Token(token) = tls.auth else {
            panic!("the daemon authenticates with its service account token")
        };
        assert_ne!(deploy.pod_spec()["automountServiceAccountToken"], false);
        // The token and, by default, the CA are where the kubelet mounts them: the image
        // has no /var/run -> /run link. No volume of ours may hide them.
        let mut in_service_account = vec![("token", &token)];
        match deploy.mount_containing(&ca) {
            None => in_service_account.push(("CA", &ca)),
            // Otherwise the CA is one host file (OpenShift's kubelet-serving bundle),
            // read-only at its own path, and nothing else of the host.
            Some(mount) => {
                assert_eq!(Path::new(str_of(&mount["mountPath"], "mountPath")), ca);
                assert_eq!(mount["readOnly"], true, "the CA is mounted read-only");
                let volume = deploy.volume(str_of(&mount["name"], "name"));
                assert_eq!(
                    volume["hostPath"]["type"], "File",
                    "the file, not its directory"
                );
                assert_eq!(Path::new(str_of(&volume["hostPath"]["path"], "path")), ca);
            }
        }
        for (what, path) in in_service_account {
            assert!(
                path.starts_with(SERVICE_ACCOUNT_DIR),
                "the {what} {} is not in {SERVICE_ACCOUNT_DIR}",
                path.display()
            );
            assert!(
                deploy.mount_containing(path).is_none(),
                "the {what} is shadowed by a volumeMount"
            );
        }
    }
}

#[test]
fn probes_and_scrape_hints_use_the_port_the_daemon_serves_on() {
    for deploy in Deploy::all() {
        let config = deploy.config();
        let addr = config.http_address.expect("http_address is set");
        assert!(
            !addr.ip().is_loopback(),
            "{addr}: the kubelet probes the pod's IP, not its loopback"
        );
        let c = deploy.container();
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"], path, "{probe}");
            assert_eq!(
                deploy.container_port(&get["port"]),
                u64::from(addr.port()),
                "{probe} port"
            );
        }
        let hints = &deploy.daemonset()["spec"]["template"]["metadata"]["annotations"];
        if let Some(port) = hints["prometheus.io/port"].as_str() {
            assert_eq!(port, addr.port().to_string(), "prometheus.io/port");
        }
    }
}

#[test]
fn the_grace_period_outlasts_the_drain_timeout() {
    for deploy in Deploy::all() {
        let config = deploy.config();
        let grace = deploy.pod_spec()["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds is set");
        assert!(
            grace * 1000 > config.drain_timeout_ms,
            "terminationGracePeriodSeconds {grace} s must exceed drain_timeout_ms {}",
            config.drain_timeout_ms
        );
    }
}

#[test]
fn the_cluster_role_grants_get_on_nodes_pods_and_nodes_proxy_to_the_daemon_only() {
    for deploy in Deploy::all() {
        let role = object(&deploy.docs, "ClusterRole", "nri-identity-injector");
        let mut granted: Vec<(String, String)> = Vec::new();
        for rule in array(&role["rules"]) {
            assert_eq!(
                rule["apiGroups"],
                serde_json::json!([""]),
                "core group only"
            );
            assert!(rule["resourceNames"].is_null() || rule["resourceNames"].is_array());
            for r in array(&rule["resources"]) {
                for v in array(&rule["verbs"]) {
                    granted.push((str_of(r, "resource").into(), str_of(v, "verb").into()));
                }
            }
        }
        granted.sort();
        assert_eq!(
            granted,
            [
                ("nodes/pods".to_string(), "get".to_string()),
                ("nodes/proxy".to_string(), "get".to_string())
            ],
            "exactly what the kubelet's /pods needs, with or without KubeletFineGrainedAuthz"
        );
        let binding = object(&deploy.docs, "ClusterRoleBinding", "nri-identity-injector");
        assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
        assert_eq!(binding["roleRef"]["name"], "nri-identity-injector");
        let subjects = array(&binding["subjects"]);
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0]["kind"], "ServiceAccount");
        assert_eq!(subjects[0]["name"], deploy.service_account());
        assert_eq!(subjects[0]["namespace"], deploy.namespace());
        object(&deploy.docs, "ServiceAccount", deploy.service_account());
    }
}

#[test]
fn the_daemon_runs_as_root_with_only_the_capabilities_it_needs() {
    for deploy in Deploy::all() {
        let spec = deploy.pod_spec();
        for host_ns in ["hostPID", "hostNetwork", "hostIPC"] {
            assert_ne!(
                spec[host_ns], true,
                "{host_ns} is not needed in selectors mode"
            );
        }
        let sc = &deploy.container()["securityContext"];
        assert_eq!(sc["runAsUser"], 0);
        assert_ne!(sc["privileged"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        let added: Vec<&str> = array(&sc["capabilities"]["add"])
            .iter()
            .map(|c| str_of(c, "capability"))
            .collect();
        assert!(added.contains(&"CHOWN"), "files go to the container's user");
        for cap in &added {
            assert!(
                ["CHOWN", "DAC_OVERRIDE"].contains(cap),
                "{cap} is more than the daemon needs"
            );
        }
    }
}

#[test]
fn the_memory_limit_leaves_room_above_the_measured_footprint() {
    for deploy in Deploy::all() {
        let resources = &deploy.container()["resources"];
        let request = quantity_bytes(str_of(&resources["requests"]["memory"], "memory request"));
        let limit = quantity_bytes(str_of(&resources["limits"]["memory"], "memory limit"));
        // README "Performance": 4.3 MiB idle, 12.2 MiB with 500 live identities.
        assert!(
            request >= 12 << 20,
            "request {request} below the 500-identity figure"
        );
        assert!(limit >= 2 * request, "limit {limit} leaves no headroom");
        assert!(
            resources["limits"]["cpu"].is_null(),
            "a CPU limit would throttle answers containerd waits for"
        );
    }
}

#[test]
fn one_daemon_per_node_at_a_time_during_rolling_updates() {
    for deploy in Deploy::all() {
        let strategy = &deploy.daemonset()["spec"]["updateStrategy"];
        assert_eq!(strategy["type"], "RollingUpdate");
        let surge = &strategy["rollingUpdate"]["maxSurge"];
        assert!(
            surge.is_null() || *surge == 0 || *surge == "0%",
            "two daemons on a node would both add the mount"
        );
        assert_eq!(
            deploy.pod_spec()["priorityClassName"],
            "system-node-critical"
        );
        assert_eq!(
            deploy.pod_spec()["tolerations"],
            serde_json::json!([{"operator": "Exists"}])
        );
    }
}

#[test]
fn the_image_entrypoint_reads_the_configmap_file() {
    for deploy in Deploy::all() {
        let containerfile = repo_file(CONTAINERFILE);
        let line = |instruction: &str| {
            containerfile
                .lines()
                .find_map(|l| l.strip_prefix(instruction))
                .unwrap_or_else(|| panic!("no {instruction} in {CONTAINERFILE}"))
                .trim()
                .to_owned()
        };
        let entrypoint: Vec<String> = serde_json::from_str(&line("ENTRYPOINT ")).unwrap();
        let copy_line = line("COPY ");
        let copy: Vec<&str> = copy_line.split_whitespace().collect();
        assert_eq!(line("FROM "), "scratch");
        assert_eq!(copy.len(), 2, "COPY <binary> <path>");
        assert_eq!(
            entrypoint[0], copy[1],
            "the entrypoint is the copied binary"
        );
        // `make release` writes the binary the image copies.
        let makefile = repo_file("Makefile");
        let make_var = |name: &str| {
            makefile
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} := ")))
                .unwrap_or_else(|| panic!("no {name} in the Makefile"))
                .trim()
                .to_owned()
        };
        let release_bin =
            make_var("RELEASE_BIN").replace("$(RELEASE_TARGET)", &make_var("RELEASE_TARGET"));
        assert_eq!(
            copy[0], release_bin,
            "the image copies what `make release` builds"
        );
        // Only --config: the configuration is the ConfigMap plus the environment.
        assert_eq!(entrypoint[1..3], ["run", "--config"]);
        assert_eq!(entrypoint.len(), 4, "{entrypoint:?}");
        let config_path = Path::new(&entrypoint[3]);
        let mount = deploy
            .mount_containing(config_path)
            .expect("the --config file is in a volumeMount");
        assert_eq!(
            Path::new(str_of(&mount["mountPath"], "mountPath")),
            config_path.parent().unwrap()
        );
        let volume = deploy.volume(str_of(&mount["name"], "name"));
        assert_eq!(volume["configMap"]["name"], "nri-identity-injector");
        assert_eq!(
            config_path.file_name().unwrap().to_str().unwrap(),
            "config.toml",
            "the ConfigMap key"
        );
        // And the container does not override the entrypoint.
        let c = deploy.container();
        assert!(c["command"].is_null() && c["args"].is_null());
        // The image is this version of the daemon.
        let image = str_of(&c["image"], "image");
        assert!(
            image.ends_with(&format!(":{}", env!("CARGO_PKG_VERSION"))),
            "{image} is not version {}",
            env!("CARGO_PKG_VERSION")
        );
    }
}

#[test]
fn the_example_pod_requires_the_plugin_under_its_configured_name() {
    for (deploy, example) in [
        (Deploy::load(), EXAMPLE),
        (Deploy::openshift(), OPENSHIFT_EXAMPLE),
    ] {
        let config = deploy.config();
        let full_name = format!("{}-{}", config.plugin_index, config.plugin_name);
        let policy = config.annotation_policy();
        let docs = documents(example);
        let templates: Vec<&Value> = docs
            .iter()
            .filter_map(|d| match d["kind"].as_str() {
                Some("Pod") => Some(d),
                Some("Deployment" | "DaemonSet" | "StatefulSet" | "Job") => {
                    Some(&d["spec"]["template"])
                }
                _ => None,
            })
            .collect();
        assert!(!templates.is_empty(), "{example} has no pod");
        let mut checked = 0;
        for pod in templates {
            let annotations: BTreeMap<String, String> =
                serde_json::from_value(pod["metadata"]["annotations"].clone()).unwrap_or_default();
            for c in array(&pod["spec"]["containers"]) {
                let name = str_of(&c["name"], "container name");
                let request = annotation::request_for_container(
                    &annotations,
                    PodRef {
                        namespace: "identity-demo",
                        name: "example",
                    },
                    name,
                    &policy,
                )
                .unwrap_or_else(|e| panic!("the daemon refuses the example's annotation: {e}"));
                let Some(request) = request else { continue };
                assert_eq!(request.agent_address, config.agent_socket);
                // NRI's lookup order: container key, pod key, bare key.
                let key = "required-plugins.noderesource.dev";
                let value = [
                    format!("{key}/container.{name}"),
                    format!("{key}/pod"),
                    key.into(),
                ]
                .iter()
                .find_map(|k| annotations.get(k))
                .unwrap_or_else(|| panic!("container {name} does not require the plugin"));
                let required: Vec<String> = serde_saphyr::from_str(value)
                    .unwrap_or_else(|e| panic!("{key} is not a YAML list of names: {e}"));
                assert!(
                    required.contains(&full_name) || required.contains(&config.plugin_name),
                    "{required:?} does not name {full_name}"
                );
                checked += 1;
            }
        }
        assert!(checked > 0, "{example} has no annotated container");
    }
}

#[test]
fn the_spire_snippet_authorises_the_daemonsets_service_account() {
    let deploy = Deploy::load();
    let config = deploy.config();
    let snippet = repo_file(SPIRE_SNIPPET);
    let (ns, sa) = (deploy.namespace(), deploy.service_account());
    let id = format!("spiffe://example.org/ns/{ns}/sa/{sa}");
    let delegates = snippet
        .split_once("authorized_delegates = [")
        .and_then(|(_, s)| s.split(']').next())
        .expect("the snippet sets authorized_delegates");
    assert!(delegates.contains(&format!("\"{id}\"")), "{delegates}");
    assert!(
        snippet.contains(&format!(
            "admin_socket_path = \"{}\"",
            config.agent_socket.display()
        )),
        "the agent's admin socket is the daemon's agent_socket"
    );
    for selector in [format!("k8s:ns:{ns}"), format!("k8s:sa:{sa}")] {
        assert!(
            snippet.contains(&format!("-spiffeID {id}"))
                && snippet.contains(&format!("-selector {selector}")),
            "the registration entry for {id} has {selector}"
        );
    }
}

// === OpenShift (openshift/) ===

/// The one document of `kind` in an OpenShift file.
fn only<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

fn strings(v: &Value) -> Vec<&str> {
    array(v).iter().map(|s| str_of(s, "string")).collect()
}

#[test]
fn the_openshift_daemon_serves_cri_o_and_labels_files_for_every_container() {
    let config = Deploy::openshift().config();
    let json = config_json(&config);
    assert_eq!(json["runtime"], "cri-o", "CRI-O is OpenShift's runtime");
    assert_eq!(
        json["selinux_label"], "shared",
        "SELinux is enforcing on every RHCOS node: said explicitly, not detected"
    );
    assert_eq!(config.default_attestation(), Attestation::Selectors);
}

#[test]
fn the_openshift_pod_names_its_scc_and_asks_for_no_more_than_it_allows() {
    // tests/e2e/openshift.sh runs OpenShift's own SCC admission on the same file; this is
    // the offline, field-by-field agreement between the pod template and the SCC.
    let deploy = Deploy::openshift();
    let scc = only(&deploy.docs, "SecurityContextConstraints");
    let scc_name = str_of(&scc["metadata"]["name"], "SCC name");
    let template = &deploy.daemonset()["spec"]["template"];
    assert_eq!(
        template["metadata"]["annotations"]["openshift.io/required-scc"], scc_name,
        "the pod is admitted under this SCC or not at all"
    );
    let spec = deploy.pod_spec();
    let sc = &deploy.container()["securityContext"];
    // SELinux: exactly spc_t at s0, at pod level, and what the SCC pins.
    let pod_selinux = &spec["securityContext"]["seLinuxOptions"];
    assert_eq!(pod_selinux["type"], "spc_t");
    assert_eq!(scc["seLinuxContext"]["type"], "MustRunAs");
    assert_eq!(scc["seLinuxContext"]["seLinuxOptions"], *pod_selinux);
    // Capabilities: all dropped, the added ones are exactly the allowed ones.
    assert_eq!(strings(&scc["requiredDropCapabilities"]), ["ALL"]);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        strings(&scc["allowedCapabilities"]),
        strings(&sc["capabilities"]["add"])
    );
    assert!(array(&scc["defaultAddCapabilities"]).is_empty());
    // User: root, and only root.
    assert_eq!(scc["runAsUser"]["type"], "MustRunAs");
    assert_eq!(scc["runAsUser"]["uid"], sc["runAsUser"]);
    // Privileges, root file system, seccomp.
    assert_eq!(scc["allowPrivilegedContainer"], false);
    assert_eq!(scc["allowPrivilegeEscalation"], false);
    assert_eq!(scc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&scc["seccompProfiles"]), ["runtime/default"]);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    // Host namespaces: what the pod uses, nothing else.
    assert_eq!(scc["allowHostPID"], spec["hostPID"]);
    for field in ["allowHostNetwork", "allowHostIPC", "allowHostPorts"] {
        assert_eq!(scc[field], false, "{field}");
    }
    // Volumes: the SCC allows exactly the kinds the pod uses (the service account token
    // is a projected volume the API server adds).
    let mut used: Vec<&str> = array(&spec["volumes"])
        .iter()
        .map(|v| {
            ["configMap", "hostPath", "projected", "secret", "emptyDir"]
                .into_iter()
                .find(|k| !v[*k].is_null())
                .unwrap_or_else(|| panic!("volume {} of an unexpected kind", v["name"]))
        })
        .chain(["projected"])
        .collect();
    used.sort_unstable();
    used.dedup();
    let mut allowed = strings(&scc["volumes"]);
    allowed.sort_unstable();
    assert_eq!(allowed, used);
    assert_eq!(scc["allowHostDirVolumePlugin"], true);
    // Granted by RBAC only.
    assert!(array(&scc["users"]).is_empty() && array(&scc["groups"]).is_empty());
}

#[test]
fn only_the_daemons_service_account_may_use_the_scc_in_its_namespace() {
    let deploy = Deploy::openshift();
    let scc_name = str_of(
        &only(&deploy.docs, "SecurityContextConstraints")["metadata"]["name"],
        "SCC name",
    );
    let role = object(&deploy.docs, "ClusterRole", "nri-identity-injector-scc");
    assert_eq!(
        role["rules"],
        serde_json::json!([{
            "apiGroups": ["security.openshift.io"],
            "resources": ["securitycontextconstraints"],
            "resourceNames": [scc_name],
            "verbs": ["use"],
        }])
    );
    let binding = only(&deploy.docs, "RoleBinding");
    assert_eq!(binding["metadata"]["namespace"], deploy.namespace());
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], "nri-identity-injector-scc");
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{
            "kind": "ServiceAccount",
            "name": deploy.service_account(),
            "namespace": deploy.namespace(),
        }])
    );
}

#[test]
fn the_openshift_namespace_allows_privileged_pods_and_keeps_its_labels() {
    let deploy = Deploy::openshift();
    let ns = object(&deploy.docs, "Namespace", deploy.namespace());
    let labels = &ns["metadata"]["labels"];
    for mode in ["enforce", "audit", "warn"] {
        assert_eq!(
            labels[format!("pod-security.kubernetes.io/{mode}")],
            "privileged",
            "{mode}: hostPath volumes need the privileged level"
        );
    }
    assert_eq!(
        labels["security.openshift.io/scc.podSecurityLabelSync"], "false",
        "OpenShift's label syncer must not rewrite them"
    );
}

#[test]
fn the_machineconfigs_enable_nri_where_the_daemon_connects() {
    use base64::Engine as _;
    let config = Deploy::openshift().config();
    let policy = documents(OPENSHIFT_NODE_DISRUPTION_POLICY);
    let policy_files =
        array(&only(&policy, "MachineConfiguration")["spec"]["nodeDisruptionPolicy"]["files"]);
    assert_eq!(policy_files.len(), 1);
    for (file, role) in OPENSHIFT_MACHINECONFIGS.iter().zip(["worker", "master"]) {
        let docs = documents(file);
        let mc = only(&docs, "MachineConfig");
        assert_eq!(
            mc["metadata"]["labels"]["machineconfiguration.openshift.io/role"],
            role
        );
        let files = array(&mc["spec"]["config"]["storage"]["files"]);
        assert_eq!(files.len(), 1, "{file}: one file");
        let path = str_of(&files[0]["path"], "path");
        assert!(path.starts_with("/etc/crio/crio.conf.d/") && path.ends_with(".conf"));
        assert_eq!(
            policy_files[0]["path"], path,
            "the NodeDisruptionPolicy covers the file the MachineConfig writes"
        );
        let source = str_of(&files[0]["contents"]["source"], "contents.source");
        let b64 = source
            .strip_prefix("data:text/plain;charset=utf-8;base64,")
            .expect("an inline base64 data URL");
        let dropin = String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("valid base64"),
        )
        .unwrap();
        let lines: Vec<&str> = dropin.lines().map(str::trim).collect();
        assert!(lines.contains(&"[crio.nri]") && lines.contains(&"enable_nri = true"));
        assert!(
            lines.contains(
                &format!("nri_listen = {:?}", config.nri_socket.display().to_string()).as_str()
            ),
            "CRI-O listens where the daemon connects ({})",
            config.nri_socket.display()
        );
        assert!(lines.contains(&"nri_disable_connections = false"));
        assert!(lines.contains(&"nri_validator_reject_oci_hook_adjustment = false"));
    }
    assert_eq!(
        policy_files[0]["actions"],
        serde_json::json!([{"type": "Restart", "restart": {"serviceName": "crio.service"}}]),
        "CRI-O reads NRI settings only at start: a restart, not a reload"
    );
}

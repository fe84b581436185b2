//! Runtime and sandbox policy: what differs between containerd and CRI-O, and between pods
//! whose containers are host processes and pods that run in a VM (Kata Containers).
//!
//! Two independent axes:
//!
//! * the **runtime** ([`RuntimeKind`], one per daemon): how it reports events — which image
//!   annotation it sets, whether a failed NRI StartContainer stops the container;
//! * the **sandbox** ([`SandboxKind`], per pod, from its runtime handler): whether a container
//!   is a host process (named by PID or by selectors) or lives in a VM guest (named by
//!   selectors only, files reaching it through the sandbox's shared file system).
//!
//! A backend is policy, not side effects: the engine asks [`Backends::plan`] how to serve a
//! container and carries out the plan through its host seam, so it never learns which runtime
//! or sandbox it serves.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The container runtime, parsed once from configuration or from what the runtime reports in
/// NRI Configure; never compared as a string afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum RuntimeKind {
    #[serde(rename = "containerd")]
    #[cfg_attr(feature = "clap", value(name = "containerd"))]
    Containerd,
    #[serde(rename = "cri-o", alias = "crio")]
    #[cfg_attr(feature = "clap", value(name = "cri-o", alias = "crio"))]
    CriO,
}

impl RuntimeKind {
    /// The runtime from NRI Configure's `runtime_name` (`containerd`, `cri-o`).
    pub fn from_nri_runtime_name(name: &str) -> Option<RuntimeKind> {
        match name {
            "containerd" => Some(RuntimeKind::Containerd),
            "cri-o" => Some(RuntimeKind::CriO),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Containerd => "containerd",
            RuntimeKind::CriO => "cri-o",
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the SPIRE agent is told which workload a container is: the one type for the
/// annotation's `attestation`, the daemon's configuration and the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Attestation {
    /// The agent attests the container's init process by its host PID.
    Pid,
    /// The daemon sends the selectors the agent's attestor would produce for the container.
    Selectors,
}

impl Attestation {
    /// The spelling in annotations and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Attestation::Pid => "pid",
            Attestation::Selectors => "selectors",
        }
    }
}

impl fmt::Display for Attestation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a pod's containers run, from the pod's runtime handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SandboxKind {
    /// Host processes (runc, crun): the PID the runtime reports is the container's.
    Process,
    /// A VM guest (Kata Containers): the PID the runtime reports is the hypervisor's or the
    /// shim's, and files reach the guest only through the sandbox's share.
    Vm(VmShare),
}

/// How a VM sandbox makes host files visible in its guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmShare {
    /// A shared file system (virtio-fs): files replaced on the host reach the guest.
    Shared,
    /// No shared file system (Firecracker with block devices, confidential guests): files are
    /// copied into the guest once, when the container is created; rotation never reaches it.
    CopyOnce,
}

impl fmt::Display for SandboxKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SandboxKind::Process => "process",
            SandboxKind::Vm(VmShare::Shared) => "VM (shared file system)",
            SandboxKind::Vm(VmShare::CopyOnce) => "VM (files copied once)",
        })
    }
}

/// A runtime-handler name or a prefix pattern (`kata*`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct HandlerPattern {
    text: String,
    prefix: bool,
}

impl HandlerPattern {
    fn parse(s: &str) -> Result<HandlerPattern, String> {
        let (text, prefix) = match s.strip_suffix('*') {
            Some(p) => (p, true),
            None => (s, false),
        };
        let ok = !text.is_empty()
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ok {
            return Err(format!(
                "{s:?} is not a runtime handler name (letters, digits, '-', '_', '.', optionally ending in '*')"
            ));
        }
        Ok(HandlerPattern {
            text: text.to_owned(),
            prefix,
        })
    }

    fn matches(&self, handler: &str) -> bool {
        if self.prefix {
            handler.starts_with(&self.text)
        } else {
            handler == self.text
        }
    }
}

/// Which runtime handlers run pods in VMs, parsed once from configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SandboxClasses {
    vm: Vec<HandlerPattern>,
    copy_once: Vec<HandlerPattern>,
}

impl SandboxClasses {
    /// `vm`: handlers whose pods run in a VM with a shared file system; `copy_once`: VM
    /// handlers without one. A handler matching both is copy-once: treating a copy-once
    /// guest as shared would promise rotations that never arrive.
    pub fn new<S: AsRef<str>>(vm: &[S], copy_once: &[S]) -> Result<SandboxClasses, String> {
        let parse = |list: &[S]| {
            list.iter()
                .map(|s| HandlerPattern::parse(s.as_ref()))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(SandboxClasses {
            vm: parse(vm)?,
            copy_once: parse(copy_once)?,
        })
    }

    /// The sandbox kind of a pod with this runtime handler (empty: the runtime's default
    /// handler, a process sandbox unless configured otherwise).
    pub fn classify(&self, runtime_handler: &str) -> SandboxKind {
        if self.copy_once.iter().any(|p| p.matches(runtime_handler)) {
            SandboxKind::Vm(VmShare::CopyOnce)
        } else if self.vm.iter().any(|p| p.matches(runtime_handler)) {
            SandboxKind::Vm(VmShare::Shared)
        } else {
            SandboxKind::Process
        }
    }
}

/// What the runtime told us about a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub id: String,
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub runtime_handler: String,
}

impl PodInfo {
    /// The pod's directory name: its UID, or its sandbox ID where a runtime reports no UID.
    pub fn key(&self) -> &str {
        if self.uid.is_empty() {
            &self.id
        } else {
            &self.uid
        }
    }
}

/// What the runtime told us about a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    /// Host PID of the container's init process; `None` before the task exists.
    pub pid: Option<i32>,
    /// uid/gid the container runs as, where the runtime reports it.
    pub user: Option<(u32, u32)>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub cgroups_path: String,
    pub image: String,
    /// Destinations and sources of the container's mounts, as the runtime reports them.
    pub mounts: Vec<(PathBuf, PathBuf)>,
    pub running: bool,
}

/// A bind mount of the per-container directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub destination: PathBuf,
    pub source: PathBuf,
    pub kind: &'static str,
    pub options: Vec<&'static str>,
}

impl MountSpec {
    /// The per-container directory, not its files, mounted read-only at `cert_dir`, so files
    /// replaced by rename show through. Kata's shim shares the same bind-mount source into the
    /// guest through virtio-fs, so one mount serves both sandbox kinds.
    pub fn identity_dir(host_dir: &Path, cert_dir: &Path) -> MountSpec {
        MountSpec {
            destination: cert_dir.to_owned(),
            source: host_dir.to_owned(),
            kind: "bind",
            options: vec!["rbind", "ro", "nosuid", "nodev", "noexec"],
        }
    }

    /// One executable file mounted read-only at `destination`: runnable (no `noexec`), but
    /// never setuid and never a device.
    pub fn executable_file(host_file: &Path, destination: &Path) -> MountSpec {
        MountSpec {
            destination: destination.to_owned(),
            source: host_file.to_owned(),
            kind: "bind",
            options: vec!["bind", "ro", "nosuid", "nodev"],
        }
    }
}

/// An OCI hook (`path`, `args` with `args[0]` the program name, as `execv` takes them, `env`,
/// and a `timeout` after which the runtime kills it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSpec {
    pub path: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub timeout_s: u32,
}

/// What CreateContainer adds to a container's OCI configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Injection {
    pub mounts: Vec<MountSpec>,
    /// OCI `startContainer` hooks: run by the runtime in the container's namespaces, as the
    /// container's user, after the start call and before the workload is executed; when one
    /// fails, the workload never runs.
    pub start_container_hooks: Vec<HookSpec>,
}

/// When the identity must be on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryPoint {
    /// Inside CreateContainer, before the container exists: selectors need no process.
    CreateContainer,
    /// Inside StartContainer: the init process exists (and is the one the agent attests) but
    /// has not run the workload.
    StartContainer,
}

/// How the engine serves one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub sandbox: SandboxKind,
    pub attestation: Attestation,
    pub delivery: DeliveryPoint,
    /// The container gets a start guard: an OCI `startContainer` hook that keeps the
    /// workload from running until its files are in place, whether or not the daemon is
    /// alive when the container starts. Only for delivery at StartContainer to pods that must
    /// not run without their identity.
    pub start_guard: bool,
    /// Whether an error answered to StartContainer keeps the container from running. Where
    /// it does not, the start guard holds the workload and the first delivery goes on in the
    /// background after a failed start.
    pub start_error_stops_container: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    #[error("the container has no process yet (PID 0), so it cannot be named by PID")]
    NoPid,
    #[error(
        "pods of runtime handler {handler:?} run in a VM, where the PID the runtime reports is the hypervisor's: use `attestation: selectors` (the default for such pods)"
    )]
    PidInVm { handler: String },
    #[error(
        "pods of runtime handler {handler:?} run in a VM without a shared file system: files are copied into the guest once and rotations never reach it; the pod must accept that with `copy_once: true` in its annotation"
    )]
    CopyOnceNotAccepted { handler: String },
    #[error("{runtime} cannot name workloads by PID: {why}")]
    PidModeUnsupported {
        runtime: RuntimeKind,
        why: &'static str,
    },
}

/// Why PID mode needs the start guard on a runtime that ignores StartContainer errors.
const START_ERRORS_IGNORED: &str = "it starts containers even when the plugin fails StartContainer, and the start guard that would hold them is off (start_guard = false); turn it on, or use selectors mode (set kubelet_url)";

/// The policy of one runtime. Every method is one every new runtime must decide, so none has
/// a default body.
pub trait RuntimeBackend: Send + Sync + 'static {
    fn kind(&self) -> RuntimeKind;

    /// Whether an error answered to NRI StartContainer keeps the container from running.
    /// Where it does not, a PID-mode identity needs a guard the runtime itself enforces.
    fn start_failure_stops_container(&self) -> bool;

    /// The image reference the container was created from, as the pod spec wrote it where
    /// the runtime records that (NRI's own image field comes first).
    fn image_reference<'a>(&self, container: &'a ContainerInfo) -> Option<&'a str>;

    /// Keys the runtime merges into the sandbox labels NRI reports that are not the pod's
    /// own labels (they never become `pod-label` selectors).
    fn sandbox_label_keys(&self) -> &'static [&'static str];
}

/// containerd (2.x) with runc: StartContainer carries the init PID and can fail the start.
#[derive(Debug, Clone, Default)]
pub struct Containerd;

/// containerd's container annotation with the image the container was created from: the pod
/// spec's `image` as written (CRI `UserSpecifiedImage`), else containerd's image name.
pub const CONTAINERD_IMAGE_ANNOTATION: &str = "io.kubernetes.cri.image-name";

impl RuntimeBackend for Containerd {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Containerd
    }

    fn start_failure_stops_container(&self) -> bool {
        true
    }

    fn image_reference<'a>(&self, c: &'a ContainerInfo) -> Option<&'a str> {
        nonempty(&c.image).or_else(|| {
            c.annotations
                .get(CONTAINERD_IMAGE_ANNOTATION)
                .and_then(|s| nonempty(s))
        })
    }

    fn sandbox_label_keys(&self) -> &'static [&'static str] {
        // Merged into the sandbox labels by containerd 2.x's CRI plugin.
        &[
            "io.cri-containerd.kind",
            "oci_runtime_type",
            "selinux_label",
        ]
    }
}

/// CRI-O: the init PID exists from PostCreateContainer on, but an error answered to NRI
/// StartContainer is only logged and the container starts anyway.
#[derive(Debug, Clone, Default)]
pub struct CriO;

/// CRI-O's container annotation with the image as the pod spec wrote it.
pub const CRIO_IMAGE_ANNOTATION: &str = "io.kubernetes.cri-o.ImageName";

impl RuntimeBackend for CriO {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::CriO
    }

    fn start_failure_stops_container(&self) -> bool {
        false
    }

    fn image_reference<'a>(&self, c: &'a ContainerInfo) -> Option<&'a str> {
        nonempty(&c.image).or_else(|| {
            c.annotations
                .get(CRIO_IMAGE_ANNOTATION)
                .and_then(|s| nonempty(s))
        })
    }

    fn sandbox_label_keys(&self) -> &'static [&'static str] {
        // CRI-O labels the sandbox as its infra container, named `POD`.
        &["io.kubernetes.container.name"]
    }
}

fn nonempty(s: &str) -> Option<&str> {
    Some(s).filter(|s| !s.is_empty())
}

/// The closed set of runtime backends.
#[derive(Debug, Clone)]
pub enum AnyRuntime {
    Containerd(Containerd),
    CriO(CriO),
}

impl AnyRuntime {
    pub fn for_kind(kind: RuntimeKind) -> AnyRuntime {
        match kind {
            RuntimeKind::Containerd => AnyRuntime::Containerd(Containerd),
            RuntimeKind::CriO => AnyRuntime::CriO(CriO),
        }
    }

    fn get(&self) -> &dyn RuntimeBackend {
        match self {
            AnyRuntime::Containerd(b) => b,
            AnyRuntime::CriO(b) => b,
        }
    }
}

impl RuntimeBackend for AnyRuntime {
    fn kind(&self) -> RuntimeKind {
        self.get().kind()
    }
    fn start_failure_stops_container(&self) -> bool {
        self.get().start_failure_stops_container()
    }
    fn image_reference<'a>(&self, c: &'a ContainerInfo) -> Option<&'a str> {
        self.get().image_reference(c)
    }
    fn sandbox_label_keys(&self) -> &'static [&'static str] {
        self.get().sandbox_label_keys()
    }
}

/// The runtime the daemon serves and the sandbox classes of its pods.
#[derive(Debug, Clone)]
pub struct Backends {
    pub runtime: AnyRuntime,
    pub sandboxes: SandboxClasses,
    /// Whether containers served at StartContainer get a start guard (the daemon's
    /// `start_guard` setting).
    pub start_guard: bool,
}

/// What a pod's annotation asks of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PodChoices {
    /// The pod's `attestation`, if it chose one.
    pub attestation: Option<Attestation>,
    /// The pod's consent to files that never rotate (`copy_once`).
    pub accepts_copy_once: bool,
    /// The pod must not run without its identity (`on_failure: fail`).
    pub fail_closed: bool,
}

impl Backends {
    /// Backends without the start guard.
    pub fn new(runtime: RuntimeKind, sandboxes: SandboxClasses) -> Backends {
        Backends {
            runtime: AnyRuntime::for_kind(runtime),
            sandboxes,
            start_guard: false,
        }
    }

    pub fn with_start_guard(mut self, on: bool) -> Backends {
        self.start_guard = on;
        self
    }

    /// How to serve a container of `pod`: `pod_choices` come from its annotation, `default`
    /// is the daemon's naming mode.
    pub fn plan(
        &self,
        pod: &PodInfo,
        pod_choices: PodChoices,
        default: Attestation,
    ) -> Result<Plan, BackendError> {
        let PodChoices {
            attestation: requested,
            accepts_copy_once,
            fail_closed,
        } = pod_choices;
        let sandbox = self.sandboxes.classify(&pod.runtime_handler);
        let attestation = match sandbox {
            SandboxKind::Process => requested.unwrap_or(default),
            SandboxKind::Vm(share) => {
                if requested == Some(Attestation::Pid) {
                    return Err(BackendError::PidInVm {
                        handler: pod.runtime_handler.clone(),
                    });
                }
                if share == VmShare::CopyOnce && !accepts_copy_once {
                    return Err(BackendError::CopyOnceNotAccepted {
                        handler: pod.runtime_handler.clone(),
                    });
                }
                Attestation::Selectors
            }
        };
        let delivery = match attestation {
            Attestation::Pid => DeliveryPoint::StartContainer,
            Attestation::Selectors => DeliveryPoint::CreateContainer,
        };
        let at_start = delivery == DeliveryPoint::StartContainer;
        let start_error_stops_container = self.runtime.start_failure_stops_container();
        // With `on_failure: continue` the pod accepts running without its files, which is
        // all a runtime that ignores start errors can give without the guard.
        if at_start && fail_closed && !start_error_stops_container && !self.start_guard {
            return Err(BackendError::PidModeUnsupported {
                runtime: self.runtime.kind(),
                why: START_ERRORS_IGNORED,
            });
        }
        Ok(Plan {
            sandbox,
            attestation,
            delivery,
            start_guard: at_start && fail_closed && self.start_guard,
            start_error_stops_container,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(handler: &str) -> PodInfo {
        PodInfo {
            runtime_handler: handler.into(),
            ..Default::default()
        }
    }

    /// A pod that must not run without its identity, with these choices.
    fn choose(attestation: Option<Attestation>, accepts_copy_once: bool) -> PodChoices {
        PodChoices {
            attestation,
            accepts_copy_once,
            fail_closed: true,
        }
    }

    fn classes() -> SandboxClasses {
        SandboxClasses::new(&["kata*", "vm-runc"], &["kata-fc", "kata-qemu-tdx*"]).unwrap()
    }

    #[test]
    fn runtime_names_parse_once_into_kinds() {
        assert_eq!(
            RuntimeKind::from_nri_runtime_name("containerd"),
            Some(RuntimeKind::Containerd)
        );
        assert_eq!(
            RuntimeKind::from_nri_runtime_name("cri-o"),
            Some(RuntimeKind::CriO)
        );
        assert_eq!(RuntimeKind::from_nri_runtime_name("docker"), None);
    }

    #[test]
    fn handlers_classify_into_sandbox_kinds_with_copy_once_winning() {
        let c = classes();
        assert_eq!(c.classify(""), SandboxKind::Process);
        assert_eq!(c.classify("runc"), SandboxKind::Process);
        assert_eq!(c.classify("kata"), SandboxKind::Vm(VmShare::Shared));
        assert_eq!(c.classify("kata-qemu"), SandboxKind::Vm(VmShare::Shared));
        assert_eq!(c.classify("vm-runc"), SandboxKind::Vm(VmShare::Shared));
        assert_eq!(c.classify("vm-runc2"), SandboxKind::Process);
        assert_eq!(c.classify("kata-fc"), SandboxKind::Vm(VmShare::CopyOnce));
        assert_eq!(
            c.classify("kata-qemu-tdx-2"),
            SandboxKind::Vm(VmShare::CopyOnce)
        );
    }

    #[test]
    fn handler_patterns_are_names_or_prefixes() {
        assert!(SandboxClasses::new(&["*"], &[] as &[&str]).is_err());
        assert!(SandboxClasses::new(&["ka*ta"], &[] as &[&str]).is_err());
        assert!(SandboxClasses::new(&["kata qemu"], &[] as &[&str]).is_err());
        assert!(SandboxClasses::new(&[""], &[] as &[&str]).is_err());
    }

    #[test]
    fn process_pods_take_the_pods_choice_then_the_default() {
        let b = Backends::new(RuntimeKind::Containerd, classes());
        let p = b
            .plan(&pod("runc"), choose(None, false), Attestation::Pid)
            .unwrap();
        assert_eq!(
            (p.sandbox, p.attestation, p.delivery),
            (
                SandboxKind::Process,
                Attestation::Pid,
                DeliveryPoint::StartContainer
            )
        );
        let p = b
            .plan(
                &pod(""),
                choose(Some(Attestation::Selectors), false),
                Attestation::Pid,
            )
            .unwrap();
        assert_eq!(p.delivery, DeliveryPoint::CreateContainer);
    }

    #[test]
    fn vm_pods_are_named_by_selectors_and_refuse_pid_mode() {
        let b = Backends::new(RuntimeKind::Containerd, classes());
        let p = b
            .plan(&pod("kata-qemu"), choose(None, false), Attestation::Pid)
            .unwrap();
        assert_eq!(p.attestation, Attestation::Selectors);
        assert_eq!(p.delivery, DeliveryPoint::CreateContainer);
        let e = b
            .plan(
                &pod("kata-qemu"),
                choose(Some(Attestation::Pid), false),
                Attestation::Selectors,
            )
            .unwrap_err();
        assert!(matches!(e, BackendError::PidInVm { .. }));
        assert!(e.to_string().contains("hypervisor"), "{e}");
    }

    #[test]
    fn copy_once_vms_need_the_pods_consent() {
        let b = Backends::new(RuntimeKind::Containerd, classes());
        let e = b
            .plan(&pod("kata-fc"), choose(None, false), Attestation::Selectors)
            .unwrap_err();
        assert!(e.to_string().contains("copy_once: true"), "{e}");
        let p = b
            .plan(&pod("kata-fc"), choose(None, true), Attestation::Selectors)
            .unwrap();
        assert_eq!(p.sandbox, SandboxKind::Vm(VmShare::CopyOnce));
    }

    #[test]
    fn cri_o_refuses_start_time_delivery_it_would_not_enforce_without_the_guard() {
        let b = Backends::new(RuntimeKind::CriO, classes());
        let e = b
            .plan(&pod(""), choose(None, false), Attestation::Pid)
            .unwrap_err();
        assert!(e.to_string().contains("selectors"), "{e}");
        assert!(e.to_string().contains("start_guard"), "{e}");
        assert!(
            b.plan(&pod(""), choose(None, false), Attestation::Selectors)
                .is_ok()
        );
        // A pod that accepts running without its files needs no enforcement.
        let lenient = PodChoices {
            fail_closed: false,
            ..choose(None, false)
        };
        let p = b.plan(&pod(""), lenient, Attestation::Pid).unwrap();
        assert!(!p.start_guard);
    }

    #[test]
    fn cri_o_serves_pid_mode_behind_the_start_guard_and_keeps_trying_after_a_failed_start() {
        let b = Backends::new(RuntimeKind::CriO, classes()).with_start_guard(true);
        let p = b
            .plan(&pod(""), choose(None, false), Attestation::Pid)
            .unwrap();
        assert_eq!(p.delivery, DeliveryPoint::StartContainer);
        assert!(p.start_guard);
        assert!(!p.start_error_stops_container);
    }

    #[test]
    fn the_start_guard_is_for_start_time_delivery_to_pods_that_fail_closed_only() {
        let b = Backends::new(RuntimeKind::Containerd, classes()).with_start_guard(true);
        let pid = b
            .plan(&pod("runc"), choose(None, false), Attestation::Pid)
            .unwrap();
        assert!(pid.start_guard && pid.start_error_stops_container);
        let lenient = PodChoices {
            fail_closed: false,
            ..choose(None, false)
        };
        assert!(
            !b.plan(&pod("runc"), lenient, Attestation::Pid)
                .unwrap()
                .start_guard
        );
        let selectors = b
            .plan(&pod("runc"), choose(None, false), Attestation::Selectors)
            .unwrap();
        assert!(!selectors.start_guard, "served inside CreateContainer");
        let vm = b
            .plan(&pod("kata-qemu"), choose(None, false), Attestation::Pid)
            .unwrap();
        assert!(!vm.start_guard, "VM pods are served inside CreateContainer");
        let off = Backends::new(RuntimeKind::Containerd, classes());
        assert!(
            !off.plan(&pod("runc"), choose(None, false), Attestation::Pid)
                .unwrap()
                .start_guard
        );
    }

    #[test]
    fn an_executable_mount_runs_but_is_read_only_without_suid_or_devices() {
        let m = MountSpec::executable_file(Path::new("/run/nii/.guard/g"), Path::new("/.g"));
        for opt in ["ro", "nosuid", "nodev"] {
            assert!(m.options.contains(&opt), "{opt}");
        }
        assert!(!m.options.contains(&"noexec"));
    }

    #[test]
    fn each_runtime_names_the_image_from_its_own_annotation() {
        let mut c = ContainerInfo::default();
        c.annotations
            .insert(CONTAINERD_IMAGE_ANNOTATION.into(), "busybox:1".into());
        c.annotations
            .insert(CRIO_IMAGE_ANNOTATION.into(), "alpine:3".into());
        assert_eq!(Containerd.image_reference(&c), Some("busybox:1"));
        assert_eq!(CriO.image_reference(&c), Some("alpine:3"));
        c.image = "docker.io/library/nginx:1".into();
        assert_eq!(CriO.image_reference(&c), Some("docker.io/library/nginx:1"));
    }

    #[test]
    fn the_identity_mount_is_read_only_without_exec_suid_or_devices() {
        let m = MountSpec::identity_dir(Path::new("/run/nii/p/c"), Path::new("/var/certs"));
        assert_eq!(m.destination, Path::new("/var/certs"));
        assert_eq!(m.source, Path::new("/run/nii/p/c"));
        for opt in ["ro", "nosuid", "nodev", "noexec"] {
            assert!(m.options.contains(&opt), "{opt}");
        }
    }

    #[test]
    fn pod_key_falls_back_to_the_sandbox_id() {
        let mut p = PodInfo {
            id: "sb".into(),
            ..Default::default()
        };
        assert_eq!(p.key(), "sb");
        p.uid = "u-1".into();
        assert_eq!(p.key(), "u-1");
    }
}

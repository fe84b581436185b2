//! Runtime backends: what differs between containerd, CRI-O and VM-isolated (Kata) pods.
//!
//! A backend is policy, not side effects: it says how the per-container directory is mounted
//! into the container, which label the directory needs, and how the workload is named to the
//! SPIRE agent (by PID or by selectors). The engine carries out the side effects through its
//! host seam, so it never learns which runtime it serves.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub mod k8s;

/// The container runtime, parsed once from configuration or from what the runtime reports in
/// NRI Configure; never compared as a string afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeKind {
    Containerd,
    #[serde(rename = "cri-o", alias = "crio")]
    CriO,
    Kata,
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
            RuntimeKind::Kata => "kata",
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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

/// How the workload is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamingMode {
    /// By the container's init PID: the agent attests the process itself.
    Pid,
    /// By selectors derived from what the runtime reports about the pod and container.
    Selectors,
}

/// A selector as the SPIRE agent understands it (`type:value`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    pub kind: String,
    pub value: String,
}

/// When the identity must be on disk, per runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryPoint {
    /// containerd: StartContainer can fail the start, and the init PID exists there.
    StartContainer,
    /// Runtimes that only log StartContainer errors (CRI-O) or whose PIDs name no workload
    /// (VMs): the files must be there at CreateContainer, so only selectors work.
    CreateContainer,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    #[error("the container has no process yet (PID 0), so it cannot be named by PID")]
    NoPid,
    #[error("{runtime} cannot name workloads by PID: {why}")]
    PidModeUnsupported {
        runtime: RuntimeKind,
        why: &'static str,
    },
    #[error("{runtime} does not report {what}, which selectors mode needs")]
    MissingMetadata {
        runtime: RuntimeKind,
        what: &'static str,
    },
}

/// The policy of one runtime.
pub trait Backend: Send + Sync + 'static {
    fn kind(&self) -> RuntimeKind;

    /// The mount to add at CreateContainer. The directory, not the files, is mounted, so
    /// atomically replaced files show through.
    fn mount(&self, host_dir: &Path, cert_dir: &Path) -> MountSpec {
        MountSpec {
            destination: cert_dir.to_owned(),
            source: host_dir.to_owned(),
            kind: "bind",
            options: vec!["rbind", "ro", "nosuid", "nodev", "noexec"],
        }
    }

    /// The `security.selinux` label the directory and its files need, if any.
    fn dir_label(&self, _pod: &PodInfo, _container: &ContainerInfo) -> Option<String> {
        None
    }

    /// When files must be on disk for a container asked for in `mode`.
    fn delivery_point(&self, mode: NamingMode) -> DeliveryPoint;

    /// The naming mode to use when neither the pod nor the configuration chose one.
    fn default_mode(&self) -> NamingMode;

    /// Checks that `mode` is possible on this runtime.
    fn check_mode(&self, mode: NamingMode) -> Result<(), BackendError>;
}

/// containerd (2.x) with runc: StartContainer carries the init PID and can fail the start.
#[derive(Debug, Clone, Default)]
pub struct Containerd;

impl Backend for Containerd {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Containerd
    }

    fn delivery_point(&self, mode: NamingMode) -> DeliveryPoint {
        match mode {
            NamingMode::Pid => DeliveryPoint::StartContainer,
            NamingMode::Selectors => DeliveryPoint::CreateContainer,
        }
    }

    fn default_mode(&self) -> NamingMode {
        NamingMode::Pid
    }

    fn check_mode(&self, _mode: NamingMode) -> Result<(), BackendError> {
        Ok(())
    }
}

/// The closed set of backends, chosen by configuration.
#[derive(Debug, Clone)]
pub enum AnyBackend {
    Containerd(Containerd),
}

impl AnyBackend {
    pub fn for_kind(kind: RuntimeKind) -> Option<AnyBackend> {
        match kind {
            RuntimeKind::Containerd => Some(AnyBackend::Containerd(Containerd)),
            RuntimeKind::CriO | RuntimeKind::Kata => None,
        }
    }
}

impl Backend for AnyBackend {
    fn kind(&self) -> RuntimeKind {
        match self {
            AnyBackend::Containerd(b) => b.kind(),
        }
    }
    fn mount(&self, host_dir: &Path, cert_dir: &Path) -> MountSpec {
        match self {
            AnyBackend::Containerd(b) => b.mount(host_dir, cert_dir),
        }
    }
    fn dir_label(&self, pod: &PodInfo, container: &ContainerInfo) -> Option<String> {
        match self {
            AnyBackend::Containerd(b) => b.dir_label(pod, container),
        }
    }
    fn delivery_point(&self, mode: NamingMode) -> DeliveryPoint {
        match self {
            AnyBackend::Containerd(b) => b.delivery_point(mode),
        }
    }
    fn default_mode(&self) -> NamingMode {
        match self {
            AnyBackend::Containerd(b) => b.default_mode(),
        }
    }
    fn check_mode(&self, mode: NamingMode) -> Result<(), BackendError> {
        match self {
            AnyBackend::Containerd(b) => b.check_mode(mode),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn containerd_mounts_the_directory_read_only_without_exec_suid_or_devices() {
        let m = Containerd.mount(Path::new("/run/nii/p/c"), Path::new("/var/certs"));
        assert_eq!(m.destination, Path::new("/var/certs"));
        assert_eq!(m.source, Path::new("/run/nii/p/c"));
        for opt in ["ro", "nosuid", "nodev", "noexec"] {
            assert!(m.options.contains(&opt), "{opt}");
        }
    }

    #[test]
    fn containerd_delivers_pid_identities_at_start() {
        assert_eq!(
            Containerd.delivery_point(NamingMode::Pid),
            DeliveryPoint::StartContainer
        );
        assert_eq!(Containerd.default_mode(), NamingMode::Pid);
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

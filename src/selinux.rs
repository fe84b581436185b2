//! SELinux labels of the identity files.
//!
//! No runtime relabels a mount that an NRI plugin adds, so on a host enforcing SELinux a
//! container may read the files only if they carry a label its process is allowed to read:
//! `container_file_t`, at an MCS level the process dominates. The daemon sets the label as the
//! `security.selinux` extended attribute through its host seam (no libselinux needed), on the
//! directory and on every file before it is renamed into place.
//!
//! * **shared**: `container_file_t:s0`, readable by every container (like a `:z` volume);
//!   the directory being mounted into one container only, plus file modes, keeps other
//!   containers out. What SPIRE's CSI driver and OpenShift's own SPIRE integration use.
//! * **private**: `container_file_t` at the pod's own MCS level (`s0:cX,cY`, like a `:Z`
//!   volume): under enforcing SELinux only that pod's processes can read it. NRI carries no
//!   label, so the level is learnt from the `linux.mountLabel` of the sandbox's OCI
//!   configuration, which the runtime keeps on the host ([`LabelSource`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::host::{HostError, HostOps, validate_component};

/// The label readable by every container (`s0`: the shared level, like a `:z` volume), which
/// SPIRE's CSI driver also gives its files.
pub const SHARED_CONTAINER_FILE_LABEL: &str = "system_u:object_r:container_file_t:s0";

/// User, role and type of every label the daemon sets; the level follows.
const CONTAINER_FILE_PREFIX: &str = "system_u:object_r:container_file_t:";

/// A sandbox's OCI configuration is a few kilobytes; anything near this is not one.
const MAX_SPEC_BYTES: usize = 4 << 20;

/// The part of a sandbox's OCI runtime spec the label is read from. Only `linux` is parsed:
/// the rest (the process, hooks) is the runtime's business, and a field there the daemon never
/// reads cannot fail the lookup (nor bring `oci_spec`'s process validation, and its regular
/// expression engine, into the binary).
#[derive(Deserialize)]
struct SandboxSpec {
    linux: Option<oci_spec::runtime::Linux>,
}

/// Which label the identity files get (configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SelinuxLabel {
    /// `shared` where the host has SELinux enabled, else `off`.
    #[default]
    Auto,
    /// No label is set: the files inherit whatever the file system gives them.
    Off,
    /// `system_u:object_r:container_file_t:s0`, readable by every container.
    Shared,
    /// `container_file_t` at the pod's own MCS level, readable by that pod's containers only.
    Private,
}

impl SelinuxLabel {
    /// `auto` resolved against the host: SELinux is enabled when its file system is mounted.
    pub fn resolve(self, selinuxfs: &Path) -> LabelPolicy {
        match self {
            SelinuxLabel::Auto if selinux_enabled(selinuxfs) => LabelPolicy::Shared,
            SelinuxLabel::Auto | SelinuxLabel::Off => LabelPolicy::Off,
            SelinuxLabel::Shared => LabelPolicy::Shared,
            SelinuxLabel::Private => LabelPolicy::Private,
        }
    }
}

/// Whether the kernel has SELinux enabled (its file system mounted at `selinuxfs`).
pub fn selinux_enabled(selinuxfs: &Path) -> bool {
    selinuxfs.join("enforce").exists()
}

/// Where the kernel mounts the SELinux file system when SELinux is enabled.
pub const SELINUXFS: &str = "/sys/fs/selinux";

/// The label policy in force, `auto` resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LabelPolicy {
    #[default]
    Off,
    Shared,
    Private,
}

impl fmt::Display for LabelPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LabelPolicy::Off => "off",
            LabelPolicy::Shared => "shared",
            LabelPolicy::Private => "private",
        })
    }
}

/// Why a pod's private label could not be learnt. Every variant means the files would get a
/// label other than the one asked for, so the container is refused rather than served with a
/// weaker (shared) one.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("selinux_label = \"private\": sandbox ID {id:?} cannot name a file")]
    SandboxId {
        id: String,
        #[source]
        source: HostError,
    },
    #[error(
        "selinux_label = \"private\": cannot read the sandbox's OCI configuration {path} (is runtime_state_dir where the runtime keeps its sandboxes?)"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: HostError,
    },
    #[error("selinux_label = \"private\": {path} is not an OCI runtime configuration")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "selinux_label = \"private\": the sandbox's mount label {label:?} in {path} has no single MCS level"
    )]
    Level { path: PathBuf, label: String },
}

/// Learns the label of each pod's files, as the [`LabelPolicy`] says. Owned next to the
/// artifact writer: it reads what the runtime keeps through the host seam, and knows no
/// runtime (where the runtime keeps a sandbox's configuration is the caller's to say).
#[derive(Debug, Clone)]
pub struct LabelSource {
    policy: LabelPolicy,
    host: Arc<dyn HostOps>,
    shared: Arc<str>,
}

impl LabelSource {
    pub fn new(policy: LabelPolicy, host: Arc<dyn HostOps>) -> LabelSource {
        LabelSource {
            policy,
            host,
            shared: Arc::from(SHARED_CONTAINER_FILE_LABEL),
        }
    }

    pub fn policy(&self) -> LabelPolicy {
        self.policy
    }

    /// The label of what every pod's containers share (the start guard's binary): the
    /// shared label wherever labels are set at all.
    pub fn shared_label(&self) -> Option<Arc<str>> {
        (self.policy != LabelPolicy::Off).then(|| self.shared.clone())
    }

    /// The label for the files of the pod whose sandbox is `sandbox_id`; `spec_path` names
    /// where the runtime keeps that sandbox's OCI configuration (asked only for private
    /// labels). A sandbox without a mount label (SELinux off in the runtime, or a pod the
    /// runtime does not separate: host PID or IPC namespace, privileged) gets the shared label,
    /// which is what such a pod's processes can read.
    pub fn label(
        &self,
        sandbox_id: &str,
        spec_path: impl FnOnce(&str) -> PathBuf,
    ) -> Result<Option<Arc<str>>, LabelError> {
        match self.policy {
            LabelPolicy::Off => Ok(None),
            LabelPolicy::Shared => Ok(Some(self.shared.clone())),
            LabelPolicy::Private => {
                validate_component(sandbox_id).map_err(|source| LabelError::SandboxId {
                    id: sandbox_id.to_owned(),
                    source,
                })?;
                let path = spec_path(sandbox_id);
                let bytes =
                    self.host
                        .read_runtime_file(&path, MAX_SPEC_BYTES)
                        .map_err(|source| LabelError::Read {
                            path: path.clone(),
                            source,
                        })?;
                let spec: SandboxSpec =
                    serde_json::from_slice(&bytes).map_err(|source| LabelError::Parse {
                        path: path.clone(),
                        source,
                    })?;
                let mount_label = spec
                    .linux
                    .as_ref()
                    .and_then(|l| l.mount_label().as_deref())
                    .filter(|l| !l.is_empty());
                match mount_label {
                    None => Ok(Some(self.shared.clone())),
                    Some(label) => match mcs_level(label) {
                        Some(level) => {
                            Ok(Some(Arc::from(format!("{CONTAINER_FILE_PREFIX}{level}"))))
                        }
                        None => Err(LabelError::Level {
                            path,
                            label: label.to_owned(),
                        }),
                    },
                }
            }
        }
    }
}

/// The MLS part of an SELinux context (`user:role:type:level`), if it is one level:
/// a sensitivity `sN`, optionally with categories `cN` or ranges `cN.cM`, comma-separated. A
/// range of levels (`s0-s0:c0.c1023`, what unconfined processes run at) is not a pod's level.
fn mcs_level(context: &str) -> Option<&str> {
    let mut parts = context.splitn(4, ':');
    let (_user, _role, _type) = (parts.next()?, parts.next()?, parts.next()?);
    let level = parts.next()?;
    let (sensitivity, categories) = match level.split_once(':') {
        Some((s, c)) => (s, Some(c)),
        None => (level, None),
    };
    let number = |s: &str, prefix: char| {
        s.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit()))
    };
    if !number(sensitivity, 's') {
        return None;
    }
    if let Some(categories) = categories {
        let valid = categories
            .split(',')
            .all(|item| match item.split_once('.') {
                Some((lo, hi)) => number(lo, 'c') && number(hi, 'c'),
                None => number(item, 'c'),
            });
        if !valid {
            return None;
        }
    }
    Some(level)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{Op, RecordingHost};

    #[test]
    fn auto_means_shared_only_where_selinux_is_enabled() {
        let dir = std::env::temp_dir().join(format!("nii-selinuxfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(SelinuxLabel::Auto.resolve(&dir), LabelPolicy::Off);
        std::fs::write(dir.join("enforce"), "1").unwrap();
        assert_eq!(SelinuxLabel::Auto.resolve(&dir), LabelPolicy::Shared);
        assert_eq!(SelinuxLabel::Off.resolve(&dir), LabelPolicy::Off);
        assert_eq!(SelinuxLabel::Private.resolve(&dir), LabelPolicy::Private);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_mcs_level_is_one_sensitivity_with_categories() {
        for (context, level) in [
            (
                "system_u:object_r:container_file_t:s0:c1,c2",
                Some("s0:c1,c2"),
            ),
            ("system_u:object_r:container_file_t:s0", Some("s0")),
            (
                "system_u:object_r:container_file_t:s0:c0.c255",
                Some("s0:c0.c255"),
            ),
            ("system_u:object_r:container_file_t:s0-s0:c0.c1023", None),
            ("system_u:object_r:container_file_t", None),
            ("system_u:object_r:container_file_t:s0:c1,", None),
            ("system_u:object_r:container_file_t:s0:x1", None),
            ("system_u:object_r:container_file_t:s0:c1\n", None),
            ("", None),
        ] {
            assert_eq!(mcs_level(context), level, "{context:?}");
        }
    }

    const SANDBOX: &str = "0123abcd";

    fn spec_path(id: &str) -> PathBuf {
        PathBuf::from("/state/overlay-containers")
            .join(id)
            .join("userdata/config.json")
    }

    fn source_with_spec(json: &str) -> (LabelSource, Arc<RecordingHost>) {
        let host = Arc::new(RecordingHost::new());
        host.plant_file(spec_path(SANDBOX), json.as_bytes(), 0o600, 0);
        (LabelSource::new(LabelPolicy::Private, host.clone()), host)
    }

    fn spec(mount_label: Option<&str>) -> String {
        let linux = match mount_label {
            Some(l) => serde_json::json!({ "mountLabel": l, "namespaces": [] }),
            None => serde_json::json!({ "namespaces": [] }),
        };
        serde_json::json!({ "ociVersion": "1.2.0", "process": { "cwd": "/", "user": { "uid": 0, "gid": 0 } }, "root": { "path": "rootfs" }, "linux": linux })
            .to_string()
    }

    #[test]
    fn private_labels_take_the_sandboxs_mcs_level_from_its_oci_configuration() {
        let (source, host) = source_with_spec(&spec(Some(
            "system_u:object_r:container_file_t:s0:c123,c456",
        )));
        let label = source.label(SANDBOX, spec_path).unwrap().unwrap();
        assert_eq!(&*label, "system_u:object_r:container_file_t:s0:c123,c456");
        assert_eq!(
            host.ops(),
            vec![Op::ReadRuntimeFile {
                path: spec_path(SANDBOX)
            }]
        );
    }

    #[test]
    fn a_sandbox_without_a_mount_label_gets_the_shared_level() {
        for json in [spec(None), spec(Some(""))] {
            let (source, _) = source_with_spec(&json);
            let label = source.label(SANDBOX, spec_path).unwrap().unwrap();
            assert_eq!(&*label, SHARED_CONTAINER_FILE_LABEL);
        }
    }

    #[test]
    fn private_labels_that_cannot_be_learnt_are_errors_naming_the_setting() {
        let (source, _) = source_with_spec("{not json");
        let e = source.label(SANDBOX, spec_path).unwrap_err();
        assert!(matches!(e, LabelError::Parse { .. }), "{e}");

        let (source, _) = source_with_spec(&spec(Some("system_u:system_r:spc_t:s0-s0:c0.c1023")));
        let e = source.label(SANDBOX, spec_path).unwrap_err();
        assert!(e.to_string().contains("no single MCS level"), "{e}");

        let (source, _) = source_with_spec(&spec(None));
        let e = source.label("other", spec_path).unwrap_err();
        assert!(matches!(e, LabelError::Read { .. }), "{e}");
        assert!(e.to_string().contains("runtime_state_dir"), "{e}");

        let e = source.label("../x", spec_path).unwrap_err();
        assert!(matches!(e, LabelError::SandboxId { .. }), "{e}");
    }

    #[test]
    fn off_and_shared_read_nothing() {
        let host = Arc::new(RecordingHost::new());
        let off = LabelSource::new(LabelPolicy::Off, host.clone());
        assert_eq!(off.label(SANDBOX, |_| unreachable!()).unwrap(), None);
        let shared = LabelSource::new(LabelPolicy::Shared, host.clone());
        assert_eq!(
            shared
                .label(SANDBOX, |_| unreachable!())
                .unwrap()
                .as_deref(),
            Some(SHARED_CONTAINER_FILE_LABEL)
        );
        assert!(host.ops().is_empty());
    }
}

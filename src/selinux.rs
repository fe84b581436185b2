//! SELinux labels of the identity files.
//!
//! No runtime relabels a mount that an NRI plugin adds, so on a host enforcing SELinux a
//! container may read the files only if they carry a label its process is allowed to read:
//! `container_file_t`, at an MCS level the process dominates. The daemon sets the label as the
//! `security.selinux` extended attribute through its host seam (no libselinux needed), on the
//! directory and on every file before it is renamed into place.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The label readable by every container (`s0`: the shared level, like a `:z` volume), which
/// SPIRE's CSI driver also gives its files.
pub const SHARED_CONTAINER_FILE_LABEL: &str = "system_u:object_r:container_file_t:s0";

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
    /// Not offered on the command line: this version refuses it.
    #[value(skip)]
    Private,
}

impl SelinuxLabel {
    /// `auto` resolved against the host: SELinux is enabled when its file system is mounted.
    pub fn resolve(self, selinuxfs: &Path) -> SelinuxLabel {
        match self {
            SelinuxLabel::Auto if selinuxfs.join("enforce").exists() => SelinuxLabel::Shared,
            SelinuxLabel::Auto => SelinuxLabel::Off,
            other => other,
        }
    }
}

/// Where the kernel mounts the SELinux file system when SELinux is enabled.
pub const SELINUXFS: &str = "/sys/fs/selinux";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_means_shared_only_where_selinux_is_enabled() {
        let dir = std::env::temp_dir().join(format!("nii-selinuxfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(SelinuxLabel::Auto.resolve(&dir), SelinuxLabel::Off);
        std::fs::write(dir.join("enforce"), "1").unwrap();
        assert_eq!(SelinuxLabel::Auto.resolve(&dir), SelinuxLabel::Shared);
        assert_eq!(SelinuxLabel::Off.resolve(&dir), SelinuxLabel::Off);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

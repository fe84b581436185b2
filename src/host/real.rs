//! [`RealHost`]: the syscalls, through rustix's safe wrappers.

use std::ffi::{CStr, CString};
use std::fs::{DirBuilder, File};
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::fs::{
    AtFlags, Dir, FileType, Mode, OFlags, XattrFlags, fchmod, fchown, fsetxattr, fstat, fsync,
    mkdirat, open, openat, renameat, statat, unlinkat,
};
use rustix::io::Errno;
use rustix::process::{Gid, Pid, PidfdFlags, Uid, geteuid, pidfd_open};

use super::{
    DirHandle, FileAttrs, HostError, HostOps, Owner, Pidfd, TEMP_PREFIX, check_attrs, split_root,
    validate_component,
};

/// Directory depth [`RealHost::remove_all`] descends to. The daemon only creates flat
/// directories; the bound keeps a hostile tree from exhausting the stack or fds.
const MAX_REMOVE_DEPTH: usize = 16;
/// Random characters in a temporary file name; with `O_EXCL` a collision only costs a retry.
const TEMP_RANDOM_CHARS: usize = 12;
const TEMP_ATTEMPTS: usize = 16;
/// Block size of [`RealHost::file_matches`].
const COMPARE_BLOCK: usize = 64 * 1024;

/// The host itself. Stateless; every directory is held as an fd in a [`DirHandle`].
#[derive(Debug, Default, Clone, Copy)]
pub struct RealHost;

impl RealHost {
    pub fn new() -> Self {
        Self
    }

    /// Checks, once at startup, that only root (or the daemon's own user) can change what
    /// the path to the artifact root leads to: every existing directory above it, as
    /// written and with symlinks resolved, is owned by root or by us and is not writable by
    /// group or others unless sticky (as `/tmp` is). Opening the root and everything below
    /// it never follows a symlink; its ancestors are configuration and are followed, which
    /// this check makes safe. Ownership and modes of root-owned directories cannot be
    /// changed by anyone else later, so checking once suffices.
    pub fn check_root_ancestors(root: &Path) -> Result<(), HostError> {
        let euid = geteuid().as_raw();
        let check = |dir: &Path| -> Result<(), HostError> {
            let meta = match std::fs::metadata(dir) {
                Ok(m) => m,
                // Created later by the daemon itself, root-owned 0755.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(HostError::io("checking directory", dir, e)),
            };
            let unsafe_because = |reason: String| HostError::UnsafeAncestor {
                path: dir.to_path_buf(),
                reason,
            };
            if meta.uid() != 0 && meta.uid() != euid {
                return Err(unsafe_because(format!("owned by uid {}", meta.uid())));
            }
            let mode = meta.permissions().mode();
            if mode & 0o022 != 0 && mode & 0o1000 == 0 {
                return Err(unsafe_because(format!(
                    "writable by group or others (mode {:04o})",
                    mode & 0o7777
                )));
            }
            Ok(())
        };
        let Some(parent) = root.parent() else {
            return Ok(());
        };
        for dir in parent.ancestors() {
            check(dir)?;
        }
        if let Some(existing) = parent.ancestors().find(|p| p.exists())
            && let Ok(real) = std::fs::canonicalize(existing)
        {
            for dir in real.ancestors() {
                check(dir)?;
            }
        }
        Ok(())
    }
}

fn dir_fd(dir: &DirHandle) -> Result<BorrowedFd<'_>, HostError> {
    dir.fd().ok_or_else(|| HostError::ForeignHandle {
        path: dir.path().to_path_buf(),
    })
}

/// `O_NOFOLLOW | O_DIRECTORY`: fails with `ELOOP`/`ENOTDIR` on a symlink or a non-directory.
/// `O_RDONLY` rather than `O_PATH`, because the fd is also used for `getdents`, `fchmod`,
/// `fsync` and `fsetxattr`, which refuse `O_PATH` fds.
fn open_dir_nofollow(parent: BorrowedFd<'_>, name: &str) -> Result<OwnedFd, Errno> {
    openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn mode_bits(mode: u32) -> Mode {
    Mode::from_raw_mode(mode)
}

/// An existing directory is accepted only if the daemon owns it: anything else under the root
/// was made by someone else, who could also have made it a trap.
fn check_owned_dir(fd: &OwnedFd, path: &Path, mode: u32) -> Result<(), HostError> {
    let st = fstat(fd).map_err(|e| HostError::io("stat", path, e))?;
    let euid = geteuid().as_raw();
    if st.st_uid != euid {
        return Err(HostError::ForeignOwner {
            path: path.to_path_buf(),
            uid: st.st_uid,
            expected: euid,
        });
    }
    if st.st_mode & 0o7777 != mode {
        fchmod(fd, mode_bits(mode)).map_err(|e| HostError::io("chmod", path, e))?;
    }
    Ok(())
}

fn ensure_dir_at(
    parent: BorrowedFd<'_>,
    parent_path: &Path,
    name: &str,
    mode: u32,
) -> Result<DirHandle, HostError> {
    let path = parent_path.join(name);
    // Two rounds cover "created by us, then opened"; a third is a concurrent remover.
    for _ in 0..3 {
        match open_dir_nofollow(parent, name) {
            Ok(fd) => {
                // Also corrects the mode mkdirat got through the umask.
                check_owned_dir(&fd, &path, mode)?;
                return Ok(DirHandle::real(path, fd));
            }
            Err(Errno::NOENT) => match mkdirat(parent, name, mode_bits(mode)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(HostError::io("creating directory", path, e)),
            },
            Err(Errno::LOOP | Errno::NOTDIR) => return Err(HostError::NotADirectory { path }),
            Err(e) => return Err(HostError::io("opening directory", path, e)),
        }
    }
    Err(HostError::io("creating directory", path, Errno::NOENT))
}

fn random_temp_name() -> String {
    let mut name = String::with_capacity(TEMP_PREFIX.len() + TEMP_RANDOM_CHARS);
    name.push_str(TEMP_PREFIX);
    name.extend(std::iter::repeat_with(fastrand::alphanumeric).take(TEMP_RANDOM_CHARS));
    name
}

/// Everything after `O_CREAT` of a temp file; the caller unlinks the file if this fails.
fn fill_temp(
    fd: OwnedFd,
    path: &Path,
    contents: &[u8],
    attrs: FileAttrs<'_>,
) -> Result<(), HostError> {
    // The create mode went through the umask; fchmod gives exactly what was asked.
    fchmod(&fd, mode_bits(attrs.mode)).map_err(|e| HostError::io("chmod", path, e))?;
    if let Some(label) = attrs.selinux_label {
        // Labelled before any content exists, so the key is never readable under a wrong label.
        fsetxattr(
            &fd,
            super::SELINUX_XATTR,
            label.as_bytes(),
            XattrFlags::empty(),
        )
        .map_err(|e| HostError::io("setting selinux label on", path, e))?;
    }
    let mut file = File::from(fd);
    file.write_all(contents)
        .map_err(|e| HostError::io("writing", path, e))?;
    if let Some(owner) = attrs.owner {
        fchown(
            &file,
            Some(Uid::from_raw(owner.uid)),
            Some(Gid::from_raw(owner.gid)),
        )
        .map_err(|e| HostError::io("chown", path, e))?;
    }
    // Data on disk before the rename publishes the name, or a crash could leave the final
    // name pointing at an empty file.
    file.sync_all().map_err(|e| HostError::io("fsync", path, e))
}

/// Removes `name` in `parent` and its contents. Entries are unlinked without following
/// anything: `unlinkat` removes a symlink itself, and a subdirectory is opened `O_NOFOLLOW`.
fn remove_all_at(
    parent: BorrowedFd<'_>,
    parent_path: &Path,
    name: &CStr,
    depth: usize,
) -> Result<(), HostError> {
    let path = parent_path.join(name.to_string_lossy().as_ref());
    let fd = match openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        // A symlink or a file where a directory was expected: remove the entry itself.
        Err(Errno::LOOP | Errno::NOTDIR) => {
            return match unlinkat(parent, name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(HostError::io("removing", path, e)),
            };
        }
        Err(e) => return Err(HostError::io("opening directory", path, e)),
    };
    if depth >= MAX_REMOVE_DEPTH {
        return Err(HostError::TooDeep {
            path,
            max: MAX_REMOVE_DEPTH,
        });
    }
    // Collect first: unlinking while reading the same directory stream may skip entries.
    let mut names: Vec<CString> = Vec::new();
    let mut dir = Dir::read_from(&fd).map_err(|e| HostError::io("reading directory", &path, e))?;
    while let Some(entry) = dir.read() {
        let entry = entry.map_err(|e| HostError::io("reading directory", &path, e))?;
        let entry_name = entry.file_name();
        if entry_name != c"." && entry_name != c".." {
            names.push(entry_name.to_owned());
        }
    }
    for entry_name in &names {
        match unlinkat(&fd, entry_name.as_c_str(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            // unlink(2) refuses directories with EISDIR on Linux.
            Err(Errno::ISDIR) => remove_all_at(fd.as_fd(), &path, entry_name, depth + 1)?,
            Err(e) => {
                return Err(HostError::io(
                    "removing",
                    path.join(entry_name.to_string_lossy().as_ref()),
                    e,
                ));
            }
        }
    }
    drop(fd);
    match unlinkat(parent, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(HostError::io("removing directory", path, e)),
    }
}

pub(super) fn pidfd_is_alive(fd: &OwnedFd, pid: u32) -> Result<bool, HostError> {
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        match poll(&mut fds, Some(&zero)) {
            Ok(0) => return Ok(true),
            Ok(_) => return Ok(false),
            Err(Errno::INTR) => {}
            Err(e) => {
                return Err(HostError::Process {
                    op: "polling pidfd",
                    pid,
                    error: e.into(),
                });
            }
        }
    }
}

// === impl HostOps for RealHost ===

impl HostOps for RealHost {
    fn open_root(&self, root: &Path) -> Result<DirHandle, HostError> {
        let (parent, name) = split_root(root)?;
        // The ancestors are configuration, not input: create them like `mkdir -p` would.
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| HostError::io("creating directory", parent, e))?;
        let parent_fd = open(
            parent,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| HostError::io("opening directory", parent, e))?;
        ensure_dir_at(parent_fd.as_fd(), parent, name, super::PRIVATE_DIR_MODE)
    }

    fn ensure_dir(
        &self,
        parent: &DirHandle,
        name: &str,
        mode: u32,
    ) -> Result<DirHandle, HostError> {
        validate_component(name)?;
        ensure_dir_at(dir_fd(parent)?, parent.path(), name, mode)
    }

    fn open_dir(&self, parent: &DirHandle, name: &str) -> Result<Option<DirHandle>, HostError> {
        validate_component(name)?;
        let path = parent.path().join(name);
        match open_dir_nofollow(dir_fd(parent)?, name) {
            Ok(fd) => Ok(Some(DirHandle::real(path, fd))),
            Err(Errno::NOENT) => Ok(None),
            Err(Errno::LOOP | Errno::NOTDIR) => Err(HostError::NotADirectory { path }),
            Err(e) => Err(HostError::io("opening directory", path, e)),
        }
    }

    fn list(&self, dir: &DirHandle) -> Result<Vec<String>, HostError> {
        let mut stream = Dir::read_from(dir_fd(dir)?)
            .map_err(|e| HostError::io("reading directory", dir.path(), e))?;
        let mut names = Vec::new();
        while let Some(entry) = stream.read() {
            let entry = entry.map_err(|e| HostError::io("reading directory", dir.path(), e))?;
            if let Ok(name) = entry.file_name().to_str()
                && name != "."
                && name != ".."
            {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn create_temp(
        &self,
        dir: &DirHandle,
        contents: &[u8],
        attrs: FileAttrs<'_>,
    ) -> Result<String, HostError> {
        check_attrs(&attrs)?;
        let dir_fd = dir_fd(dir)?;
        for _ in 0..TEMP_ATTEMPTS {
            let name = random_temp_name();
            let path = dir.path().join(&name);
            let fd = match openat(
                dir_fd,
                name.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                mode_bits(attrs.mode),
            ) {
                Ok(fd) => fd,
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(HostError::io("creating", path, e)),
            };
            if let Err(e) = fill_temp(fd, &path, contents, attrs) {
                // Best effort: the fill error is the one worth reporting.
                let _ = unlinkat(dir_fd, name.as_str(), AtFlags::empty());
                return Err(e);
            }
            return Ok(name);
        }
        Err(HostError::io(
            "creating temporary file in",
            dir.path(),
            Errno::EXIST,
        ))
    }

    fn file_matches(
        &self,
        dir: &DirHandle,
        name: &str,
        contents: &[u8],
    ) -> Result<bool, HostError> {
        validate_component(name)?;
        let path = dir.path().join(name);
        let fd = match openat(
            dir_fd(dir)?,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(false),
            Err(Errno::LOOP) => return Err(HostError::NotARegularFile { path }),
            Err(e) => return Err(HostError::io("opening", path, e)),
        };
        let st = fstat(&fd).map_err(|e| HostError::io("stat", &path, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(HostError::NotARegularFile { path });
        }
        if u64::try_from(st.st_size).ok() != u64::try_from(contents.len()).ok() {
            return Ok(false);
        }
        let mut file = File::from(fd);
        let mut block = vec![0u8; COMPARE_BLOCK];
        let mut expected = contents;
        loop {
            let n = file
                .read(&mut block)
                .map_err(|e| HostError::io("reading", &path, e))?;
            if n == 0 {
                return Ok(expected.is_empty());
            }
            match expected.split_at_checked(n) {
                Some((head, rest)) if head == &block[..n] => expected = rest,
                _ => return Ok(false),
            }
        }
    }

    fn rename(&self, dir: &DirHandle, from: &str, to: &str) -> Result<(), HostError> {
        validate_component(from)?;
        validate_component(to)?;
        let fd = dir_fd(dir)?;
        renameat(fd, from, fd, to).map_err(|e| HostError::io("renaming to", dir.path().join(to), e))
    }

    fn unlink(&self, dir: &DirHandle, name: &str) -> Result<bool, HostError> {
        validate_component(name)?;
        match unlinkat(dir_fd(dir)?, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(HostError::io("removing", dir.path().join(name), e)),
        }
    }

    fn fsync_dir(&self, dir: &DirHandle) -> Result<(), HostError> {
        fsync(dir_fd(dir)?).map_err(|e| HostError::io("fsync", dir.path(), e))
    }

    fn remove_all(&self, parent: &DirHandle, name: &str) -> Result<(), HostError> {
        validate_component(name)?;
        let name = CString::new(name).map_err(|_| HostError::InvalidComponent {
            component: name.to_owned(),
            reason: "contains NUL",
        })?;
        remove_all_at(dir_fd(parent)?, parent.path(), &name, 0)
    }

    fn remove_empty_dir(&self, parent: &DirHandle, name: &str) -> Result<bool, HostError> {
        validate_component(name)?;
        let path = parent.path().join(name);
        match unlinkat(dir_fd(parent)?, name, AtFlags::REMOVEDIR) {
            Ok(()) => Ok(true),
            Err(Errno::NOTEMPTY | Errno::EXIST | Errno::NOENT) => Ok(false),
            Err(Errno::NOTDIR) => Err(HostError::NotADirectory { path }),
            Err(e) => Err(HostError::io("removing directory", path, e)),
        }
    }

    fn set_xattr(
        &self,
        dir: &DirHandle,
        name: Option<&str>,
        attr: &str,
        value: &[u8],
    ) -> Result<(), HostError> {
        let dir_fd = dir_fd(dir)?;
        let Some(name) = name else {
            return fsetxattr(dir_fd, attr, value, XattrFlags::empty())
                .map_err(|e| HostError::io("setting xattr on", dir.path(), e));
        };
        validate_component(name)?;
        let path = dir.path().join(name);
        let is_file_or_dir = |mode: u32| {
            matches!(
                FileType::from_raw_mode(mode),
                FileType::RegularFile | FileType::Directory
            )
        };
        // Checked before opening so that opening cannot have a device's or a FIFO's side
        // effects, and again on the fd in case the entry was swapped in between.
        let st = statat(dir_fd, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| HostError::io("stat", &path, e))?;
        if !is_file_or_dir(st.st_mode) {
            return Err(HostError::NotARegularFile { path });
        }
        let fd = openat(
            dir_fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::LOOP => HostError::NotARegularFile { path: path.clone() },
            e => HostError::io("opening", &path, e),
        })?;
        let st = fstat(&fd).map_err(|e| HostError::io("stat", &path, e))?;
        if !is_file_or_dir(st.st_mode) {
            return Err(HostError::NotARegularFile { path });
        }
        fsetxattr(&fd, attr, value, XattrFlags::empty())
            .map_err(|e| HostError::io("setting xattr on", path, e))
    }

    fn open_pidfd(&self, pid: u32) -> Result<Pidfd, HostError> {
        let raw = i32::try_from(pid).map_err(|_| HostError::InvalidPid { pid })?;
        let target = Pid::from_raw(raw).ok_or(HostError::InvalidPid { pid })?;
        match pidfd_open(target, PidfdFlags::empty()) {
            Ok(fd) => Pidfd::real(pid, fd),
            Err(Errno::SRCH) => Err(HostError::NoSuchProcess { pid }),
            Err(e) => Err(HostError::Process {
                op: "pidfd_open",
                pid,
                error: e.into(),
            }),
        }
    }

    fn process_owner(&self, pid: u32) -> Result<Owner, HostError> {
        if pid == 0 {
            return Err(HostError::InvalidPid { pid });
        }
        let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|_| HostError::NoSuchProcess { pid })?;
        parse_status_owner(&text).ok_or(HostError::NoSuchProcess { pid })
    }

    fn read_runtime_file(&self, path: &Path, limit: usize) -> Result<Vec<u8>, HostError> {
        use std::io::Read as _;
        let refused = || HostError::UnreadableFile {
            path: path.to_path_buf(),
            limit,
        };
        let fd = open(
            path,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::LOOP => refused(),
            e => HostError::io("opening", path, e),
        })?;
        let st = fstat(&fd).map_err(|e| HostError::io("stat", path, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(refused());
        }
        let mut out = Vec::new();
        File::from(fd)
            .take(limit as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| HostError::io("reading", path, e))?;
        if out.len() > limit {
            return Err(refused());
        }
        Ok(out)
    }

    fn process_cgroup(&self, pid: u32) -> Result<String, HostError> {
        if pid == 0 {
            return Err(HostError::InvalidPid { pid });
        }
        let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(text),
            // ESRCH shows up when the process exits while the file is read.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(Errno::SRCH.raw_os_error()) =>
            {
                Err(HostError::NoSuchProcess { pid })
            }
            Err(e) => Err(HostError::io("reading", path, e)),
        }
    }
}

/// `Uid:` and `Gid:` lines of `/proc/<pid>/status` → the real ids (first column).
pub(crate) fn parse_status_owner(status: &str) -> Option<Owner> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok())
    };
    Some(Owner {
        uid: field("Uid:")?,
        gid: field("Gid:")?,
    })
}

#[cfg(test)]
mod owner_tests {
    use super::*;

    #[test]
    fn reads_the_real_ids_from_proc_status() {
        let status = "Name:\tsh\nUid:\t1001\t1001\t1001\t1001\nGid:\t1002\t1002\t1002\t1002\n";
        assert_eq!(
            parse_status_owner(status),
            Some(Owner {
                uid: 1001,
                gid: 1002
            })
        );
        assert_eq!(parse_status_owner("Name: x\n"), None);
    }

    #[test]
    fn own_process_owner_is_readable() {
        let me = RealHost::new().process_owner(std::process::id()).unwrap();
        assert_eq!(me.uid, rustix::process::getuid().as_raw());
    }
}

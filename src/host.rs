//! Every privileged side effect the daemon has on the host, behind one narrow trait.
//!
//! The daemon runs as root and writes into directories that are later bind-mounted into
//! containers, so each effect here is written against the classic root-daemon attacks:
//!
//! * **Symlinks.** Below the configured artifact root, every path component is opened with
//!   `O_NOFOLLOW | O_DIRECTORY` relative to its parent's fd (`openat`/`mkdirat`), never by
//!   path, so a symlink planted anywhere under the root is refused instead of followed. Files
//!   are created `O_CREAT | O_EXCL | O_NOFOLLOW` under a random temporary name and `renameat`
//!   over the final name, which replaces a symlink there rather than writing through it.
//! * **Names.** Pod UIDs and container IDs come from whoever created the pod; they are checked
//!   to be a single, ordinary path component ([`validate_component`]) before any syscall.
//! * **Modes.** Directories and files get their mode with `fchmod` after creation, so the
//!   daemon's umask never decides what a container can read.
//! * **Torn reads.** A file is never written in place: temp file, write, `fchown`, `fsync`,
//!   `renameat`, then `fsync` of the directory. A reader sees the old file or the new one.
//! * **PID reuse.** SPIRE does not guard the PID it attests against reuse; [`Pidfd`] is how the
//!   engine notices that the process it asked about is gone.
//!
//! Layout: `<root>/` (0700) / `<pod-uid>/` (0700) / `<container-id>/` (0755). Root and pod
//! directories are private to root; the container directory must be traversable by the
//! container's user once it is bind-mounted (only its own mode matters inside the container).
//!
//! [`RealHost`] does the syscalls (through rustix's safe wrappers; no `unsafe` here).
//! [`RecordingHost`] records typed [`Op`]s over an in-memory tree, can fail any chosen op,
//! and fakes processes, so callers are tested without root.

#![forbid(unsafe_code)]

#[cfg(any(test, feature = "testing"))]
mod fake;
mod real;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
#[cfg(any(test, feature = "testing"))]
use tokio::sync::watch;

#[cfg(any(test, feature = "testing"))]
pub use fake::{FakeNode, FakeProcess, RecordingHost, SplitHost};
pub use real::RealHost;

/// Mode of the artifact root and of the per-pod directories: root only.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of the per-container directory: the container's user must traverse it once mounted.
pub const CONTAINER_DIR_MODE: u32 = 0o755;
/// Prefix of temporary files. An interrupted write may leave such files behind; the artifact
/// writer sweeps them before its next write into the same directory.
pub const TEMP_PREFIX: &str = ".tmp-";
/// Extended attribute holding a file's SELinux context.
pub const SELINUX_XATTR: &str = "security.selinux";
/// `NAME_MAX` on Linux.
pub const MAX_COMPONENT_BYTES: usize = 255;

/// Owner given to a delivered file, usually the container's user and group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl From<(u32, u32)> for Owner {
    fn from((uid, gid): (u32, u32)) -> Self {
        Self { uid, gid }
    }
}

/// How a new file is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileAttrs<'a> {
    /// Permission bits, applied with `fchmod` (the umask does not apply).
    pub mode: u32,
    /// `fchown` target; `None` leaves the file owned by the daemon.
    pub owner: Option<Owner>,
    /// SELinux context set on the temporary file before it is renamed into place (the inode
    /// keeps it), so the file is never visible unlabelled. `None` leaves the inherited label.
    pub selinux_label: Option<&'a str>,
}

impl FileAttrs<'_> {
    /// A file with `mode`, owned by the daemon, with the inherited SELinux label.
    pub fn mode(mode: u32) -> Self {
        Self {
            mode,
            owner: None,
            selinux_label: None,
        }
    }
}

/// An open directory. From [`RealHost`] it holds a directory fd and every operation on it is
/// relative to that fd, so renaming or replacing a path component after it was opened cannot
/// redirect the daemon. From [`RecordingHost`] it is only a path into the fake tree.
#[derive(Clone)]
pub struct DirHandle {
    path: PathBuf,
    fd: Option<Arc<OwnedFd>>,
}

impl DirHandle {
    /// Where the directory was when it was opened (for messages and for the bind-mount source).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory fd, when the handle comes from [`RealHost`].
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_deref().map(AsFd::as_fd)
    }

    fn real(path: PathBuf, fd: OwnedFd) -> Self {
        Self {
            path,
            fd: Some(Arc::new(fd)),
        }
    }

    #[cfg(any(test, feature = "testing"))]
    fn fake(path: PathBuf) -> Self {
        Self { path, fd: None }
    }
}

impl fmt::Debug for DirHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirHandle")
            .field("path", &self.path)
            .field("has_fd", &self.fd.is_some())
            .finish()
    }
}

/// One side effect, as recorded by [`RecordingHost`], in the order performed. Paths are full
/// paths in the fake tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A directory was created with this mode.
    MkdirAt {
        path: PathBuf,
        mode: u32,
    },
    /// An existing directory's mode was corrected.
    Chmod {
        path: PathBuf,
        mode: u32,
    },
    /// A (temporary) file was created with `mode` and `len` bytes written and synced.
    WriteFile {
        path: PathBuf,
        len: usize,
        mode: u32,
    },
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
    },
    SetXattr {
        path: PathBuf,
        name: String,
        value: Vec<u8>,
    },
    /// `renameat` within one directory.
    Rename {
        dir: PathBuf,
        from: String,
        to: String,
    },
    Unlink {
        path: PathBuf,
    },
    /// A directory and everything under it was removed.
    RemoveAll {
        path: PathBuf,
    },
    /// An empty directory was removed.
    RemoveDir {
        path: PathBuf,
    },
    FsyncDir {
        path: PathBuf,
    },
    OpenPidfd {
        pid: u32,
    },
    /// A file the runtime keeps was read.
    ReadRuntimeFile {
        path: PathBuf,
    },
}

/// Why a host operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("invalid path component {component:?}: {reason}")]
    InvalidComponent {
        component: String,
        reason: &'static str,
    },
    #[error("invalid file attributes: {reason}")]
    InvalidFileAttrs { reason: &'static str },
    #[error("invalid artifact root {path}: {reason}")]
    InvalidRoot { path: PathBuf, reason: &'static str },
    #[error("refusing {path}: it is a symlink or not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "refusing the artifact root under {path}: it is {reason}, so someone other than root could replace what lies below it"
    )]
    UnsafeAncestor { path: PathBuf, reason: String },
    #[error("refusing {path}: it is a symlink or not a regular file")]
    NotARegularFile { path: PathBuf },
    #[error("refusing {path}: owned by uid {uid}, not by the daemon (uid {expected})")]
    ForeignOwner {
        path: PathBuf,
        uid: u32,
        expected: u32,
    },
    #[error("refusing {path}: nested deeper than {max} directories")]
    TooDeep { path: PathBuf, max: usize },
    #[error("directory handle for {path} does not come from this host implementation")]
    ForeignHandle { path: PathBuf },
    #[error("refusing {path}: it is a symlink, not a regular file or larger than {limit} bytes")]
    UnreadableFile { path: PathBuf, limit: usize },
    #[error("invalid pid {pid}")]
    InvalidPid { pid: u32 },
    #[error("no process with pid {pid}")]
    NoSuchProcess { pid: u32 },
    #[error("{op} {}: {error}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("{op} for pid {pid}: {error}")]
    Process {
        op: &'static str,
        pid: u32,
        error: io::Error,
    },
    /// A failure injected with [`RecordingHost::fail_when`].
    #[error("injected failure of {op:?}")]
    Injected { op: Box<Op> },
}

impl HostError {
    fn io(op: &'static str, path: impl Into<PathBuf>, source: impl Into<io::Error>) -> Self {
        Self::Io {
            op,
            path: path.into(),
            error: source.into(),
        }
    }

    /// The OS error kind, when the failure was a syscall error.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Self::Io { error, .. } | Self::Process { error, .. } => Some(error.kind()),
            _ => None,
        }
    }
}

/// Checks that `name` is one ordinary path component: non-empty, at most
/// [`MAX_COMPONENT_BYTES`] bytes, no `/`, no NUL, not `.` or `..`.
pub fn validate_component(name: &str) -> Result<(), HostError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > MAX_COMPONENT_BYTES {
        "longer than 255 bytes"
    } else if name.contains('/') {
        "contains '/'"
    } else if name.contains('\0') {
        "contains NUL"
    } else if name == "." || name == ".." {
        "is '.' or '..'"
    } else {
        return Ok(());
    };
    Err(HostError::InvalidComponent {
        component: name.chars().take(MAX_COMPONENT_BYTES).collect(),
        reason,
    })
}

/// Splits an artifact root into its (configured, trusted) parent and its last component.
fn split_root(root: &Path) -> Result<(&Path, &str), HostError> {
    let invalid = |reason| HostError::InvalidRoot {
        path: root.to_path_buf(),
        reason,
    };
    if !root.is_absolute() {
        return Err(invalid("not absolute"));
    }
    if root
        .components()
        .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
    {
        return Err(invalid("contains '.' or '..'"));
    }
    let (Some(parent), Some(name)) = (root.parent(), root.file_name()) else {
        return Err(invalid("is /"));
    };
    let name = name.to_str().ok_or_else(|| invalid("not UTF-8"))?;
    validate_component(name)?;
    Ok((parent, name))
}

/// Modes carry permission bits only: setuid, setgid or sticky on a delivered file is never
/// intended. `-1` is "leave unchanged" to `fchown`, never a real owner.
fn check_attrs(attrs: &FileAttrs<'_>) -> Result<(), HostError> {
    if attrs.mode & !0o777 != 0 {
        return Err(HostError::InvalidFileAttrs {
            reason: "mode has bits outside 0o777",
        });
    }
    if let Some(owner) = attrs.owner
        && (owner.uid == u32::MAX || owner.gid == u32::MAX)
    {
        return Err(HostError::InvalidFileAttrs {
            reason: "uid or gid is -1",
        });
    }
    Ok(())
}

/// Every privileged side effect of the daemon. Methods taking a `name` act on that single
/// component inside `dir` and never follow a symlink at `name`; implementations re-validate
/// `name` with [`validate_component`].
///
/// The calls are blocking syscalls (fast on the tmpfs the artifacts live on, but `fsync` may
/// wait); async callers should use `spawn_blocking`.
pub trait HostOps: Send + Sync + fmt::Debug {
    /// Opens the artifact root, creating it (0700) if missing. The root's ancestors are the
    /// administrator's configuration and are resolved normally (e.g. `/var/run` is a symlink
    /// on most distributions) and created if missing; the root itself is opened without
    /// following a symlink, must be owned by the daemon, and gets mode 0700.
    fn open_root(&self, root: &Path) -> Result<DirHandle, HostError>;

    /// Opens directory `name` in `parent`, creating it with `mode` if missing. An existing
    /// directory must be owned by the daemon (else [`HostError::ForeignOwner`]) and gets `mode`
    /// if it had another. A symlink or non-directory at `name` is refused.
    fn ensure_dir(&self, parent: &DirHandle, name: &str, mode: u32)
    -> Result<DirHandle, HostError>;

    /// Opens directory `name` in `parent` if it exists, without creating it.
    fn open_dir(&self, parent: &DirHandle, name: &str) -> Result<Option<DirHandle>, HostError>;

    /// Names in `dir` (not `.`/`..`); names that are not UTF-8 are left out.
    fn list(&self, dir: &DirHandle) -> Result<Vec<String>, HostError>;

    /// Creates a new file in `dir` under a fresh [`TEMP_PREFIX`] name with
    /// `O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC`, `fchmod`s it to `attrs.mode`, sets the
    /// SELinux label, writes all of `contents`, `fchown`s it, `fsync`s it and returns its
    /// name. On failure nothing is left behind.
    fn create_temp(
        &self,
        dir: &DirHandle,
        contents: &[u8],
        attrs: FileAttrs<'_>,
    ) -> Result<String, HostError>;

    /// Whether the regular file `name` in `dir` holds exactly `contents` (`false` when
    /// nothing is there), compared a block at a time so that a large file is never held in
    /// memory. A symlink or anything but a regular file is refused.
    fn file_matches(&self, dir: &DirHandle, name: &str, contents: &[u8])
    -> Result<bool, HostError>;

    /// `renameat(dir, from, dir, to)`: atomically replaces whatever is at `to` (a symlink
    /// there is replaced, not followed).
    fn rename(&self, dir: &DirHandle, from: &str, to: &str) -> Result<(), HostError>;

    /// Removes the non-directory `name` (a symlink itself, not its target). `Ok(false)` when
    /// nothing was there.
    fn unlink(&self, dir: &DirHandle, name: &str) -> Result<bool, HostError>;

    /// `fsync` of the directory, making earlier renames and unlinks in it durable.
    fn fsync_dir(&self, dir: &DirHandle) -> Result<(), HostError>;

    /// Removes `name` in `parent` and everything under it without following symlinks (a
    /// symlink is unlinked itself). Nothing there is not an error.
    fn remove_all(&self, parent: &DirHandle, name: &str) -> Result<(), HostError>;

    /// Removes directory `name` in `parent` if it is empty. `Ok(false)` when it is not empty
    /// or does not exist.
    fn remove_empty_dir(&self, parent: &DirHandle, name: &str) -> Result<bool, HostError>;

    /// Sets extended attribute `attr` (e.g. [`SELINUX_XATTR`]) on `dir` itself (`name` None,
    /// through the fd) or on the regular file or directory `name` in it (not followed).
    fn set_xattr(
        &self,
        dir: &DirHandle,
        name: Option<&str>,
        attr: &str,
        value: &[u8],
    ) -> Result<(), HostError>;

    /// A pidfd for host PID `pid`. Open it **before** asking SPIRE about the PID: if the
    /// pidfd is still alive after the answer, the answer was about this process. Called
    /// on a tokio runtime with IO enabled: the real pidfd is registered with its reactor.
    fn open_pidfd(&self, pid: u32) -> Result<Pidfd, HostError>;

    /// The contents of `/proc/<pid>/cgroup`, to check that `pid` is in the expected container
    /// (it names the container ID or the container's cgroups path). Read it after
    /// [`open_pidfd`](Self::open_pidfd) and check [`Pidfd::is_alive`] afterwards, so the text
    /// cannot belong to a recycled PID.
    fn process_cgroup(&self, pid: u32) -> Result<String, HostError>;

    /// The real uid and gid of `pid` (from `/proc/<pid>/status`): the owner for delivered
    /// files when the runtime does not report the container's user. At StartContainer the
    /// init process has already switched to the container's user.
    fn process_owner(&self, pid: u32) -> Result<Owner, HostError>;

    /// The contents of a regular file the runtime keeps (a sandbox's OCI configuration), of
    /// at most `limit` bytes. The path is the runtime's and resolved normally; a symlink as
    /// its last component, anything but a regular file, or a larger file is refused
    /// ([`HostError::UnreadableFile`]).
    fn read_runtime_file(&self, path: &Path, limit: usize) -> Result<Vec<u8>, HostError>;

    // === provided ===

    /// Writes `contents` to `name` in `dir` atomically: [`create_temp`](Self::create_temp),
    /// [`rename`](Self::rename) (the temp file is removed if that fails), then
    /// [`fsync_dir`](Self::fsync_dir).
    fn write_file_atomic(
        &self,
        dir: &DirHandle,
        name: &str,
        contents: &[u8],
        attrs: FileAttrs<'_>,
    ) -> Result<(), HostError> {
        validate_component(name)?;
        let temp = self.create_temp(dir, contents, attrs)?;
        if let Err(e) = self.rename(dir, &temp, name) {
            // Best effort: the rename error is the one worth reporting.
            let _ = self.unlink(dir, &temp);
            return Err(e);
        }
        self.fsync_dir(dir)
    }

    /// Opens (creating as needed) `<root>/<pod_uid>/<container_id>/`: root and pod directory
    /// 0700, container directory 0755, each opened relative to its parent without following
    /// symlinks.
    fn create_container_dir(
        &self,
        root: &Path,
        pod_uid: &str,
        container_id: &str,
    ) -> Result<DirHandle, HostError> {
        validate_component(pod_uid)?;
        validate_component(container_id)?;
        // A concurrent removal of the pod's last container may delete the pod directory
        // between opening it and creating the container directory in it; start over then.
        let mut attempt = 0;
        loop {
            let root_dir = self.open_root(root)?;
            let pod_dir = self.ensure_dir(&root_dir, pod_uid, PRIVATE_DIR_MODE)?;
            match self.ensure_dir(&pod_dir, container_id, CONTAINER_DIR_MODE) {
                Err(e) if attempt < 2 && e.io_kind() == Some(io::ErrorKind::NotFound) => {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Removes `<root>/<pod_uid>/<container_id>/` with its contents, then the pod directory if
    /// that left it empty. Missing directories are not an error.
    fn remove_container_dir(
        &self,
        root: &Path,
        pod_uid: &str,
        container_id: &str,
    ) -> Result<(), HostError> {
        validate_component(pod_uid)?;
        validate_component(container_id)?;
        let root_dir = self.open_root(root)?;
        let Some(pod_dir) = self.open_dir(&root_dir, pod_uid)? else {
            return Ok(());
        };
        self.remove_all(&pod_dir, container_id)?;
        self.remove_empty_dir(&root_dir, pod_uid)?;
        Ok(())
    }
}

// === impl Pidfd ===

/// A handle on one process that stays valid when its PID is reused.
#[derive(Debug)]
pub struct Pidfd {
    pid: u32,
    inner: PidfdInner,
}

#[derive(Debug)]
enum PidfdInner {
    /// Registered with the tokio reactor once, when opened: every waiter shares the one
    /// registration, so a container costs one descriptor however often its exit is awaited.
    Real(AsyncFd<OwnedFd>),
    /// `true` once the fake process has exited.
    #[cfg(any(test, feature = "testing"))]
    Fake(watch::Receiver<bool>),
}

impl Pidfd {
    /// A real pidfd, registered with the current tokio runtime's reactor (which must have IO
    /// enabled).
    fn real(pid: u32, fd: OwnedFd) -> Result<Pidfd, HostError> {
        let registering = |error| HostError::Process {
            op: "registering pidfd",
            pid,
            error,
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(registering(io::Error::other("no tokio runtime")));
        }
        Ok(Pidfd {
            pid,
            inner: PidfdInner::Real(register_readable(fd).map_err(registering)?),
        })
    }

    /// The PID it was opened for (meaningless once the process has exited).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The pidfd, for a real process.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.inner {
            PidfdInner::Real(fd) => Some(fd.get_ref().as_fd()),
            #[cfg(any(test, feature = "testing"))]
            PidfdInner::Fake(_) => None,
        }
    }

    /// Whether the process is still running. A pidfd becomes readable when the process exits
    /// (zombie or reaped), so this polls it with a zero timeout.
    pub fn is_alive(&self) -> Result<bool, HostError> {
        match &self.inner {
            PidfdInner::Real(fd) => real::pidfd_is_alive(fd.get_ref(), self.pid),
            #[cfg(any(test, feature = "testing"))]
            PidfdInner::Fake(rx) => Ok(!*rx.borrow()),
        }
    }

    /// Resolves when the process exits (at once if it already has). Cancel-safe; may be
    /// awaited repeatedly and by several waiters at once: the readiness is never cleared, as
    /// an exited process stays exited.
    pub async fn exited(&self) -> Result<(), HostError> {
        match &self.inner {
            PidfdInner::Real(fd) => {
                let _ready = fd.readable().await.map_err(|error| HostError::Process {
                    op: "waiting on pidfd",
                    pid: self.pid,
                    error,
                })?;
                Ok(())
            }
            #[cfg(any(test, feature = "testing"))]
            PidfdInner::Fake(rx) => {
                let mut rx = rx.clone();
                // The sender lives in the RecordingHost; if that is gone, nobody can make the
                // fake process exit, so treat it as exited rather than hang.
                let _ = rx.wait_for(|exited| *exited).await;
                Ok(())
            }
        }
    }
}

/// Registers `fd` with the tokio reactor for readability.
///
/// tokio 1.54 deprecated the safe `AsyncFd` constructors in favour of `unsafe fn register*`,
/// because an arbitrary `T: AsRawFd` may close or change its fd while registered. `OwnedFd`
/// can do neither while the `AsyncFd` owns it, so the safe constructor is sound here, and
/// this module forbids `unsafe`. If tokio ever removes it, the replacement is one rustix
/// epoll thread watching every pidfd.
#[allow(deprecated)]
fn register_readable(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::with_interest(fd, Interest::READABLE)
}

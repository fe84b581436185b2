//! [`RecordingHost`]: an in-memory host that records every side effect.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;
use zeroize::Zeroizing;

use super::{
    DirHandle, FileAttrs, HostError, HostOps, Op, Owner, Pidfd, PidfdInner, TEMP_PREFIX,
    check_attrs, split_root, validate_component,
};

/// One entry of the fake tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeNode {
    Dir {
        mode: u32,
        uid: u32,
        gid: u32,
        xattrs: BTreeMap<String, Vec<u8>>,
    },
    File {
        contents: Zeroizing<Vec<u8>>,
        mode: u32,
        uid: u32,
        gid: u32,
        xattrs: BTreeMap<String, Vec<u8>>,
    },
    Symlink {
        target: PathBuf,
    },
}

impl FakeNode {
    /// The file's contents, if this is a file.
    pub fn contents(&self) -> Option<&[u8]> {
        match self {
            Self::File { contents, .. } => Some(contents),
            _ => None,
        }
    }

    /// Permission bits of a file or directory.
    pub fn mode(&self) -> Option<u32> {
        match self {
            Self::Dir { mode, .. } | Self::File { mode, .. } => Some(*mode),
            Self::Symlink { .. } => None,
        }
    }

    /// `(uid, gid)` of a file or directory.
    pub fn owner(&self) -> Option<(u32, u32)> {
        match self {
            Self::Dir { uid, gid, .. } | Self::File { uid, gid, .. } => Some((*uid, *gid)),
            Self::Symlink { .. } => None,
        }
    }

    /// An extended attribute of a file or directory.
    pub fn xattr(&self, name: &str) -> Option<&[u8]> {
        match self {
            Self::Dir { xattrs, .. } | Self::File { xattrs, .. } => {
                xattrs.get(name).map(Vec::as_slice)
            }
            Self::Symlink { .. } => None,
        }
    }

    fn xattrs_mut(&mut self) -> Option<&mut BTreeMap<String, Vec<u8>>> {
        match self {
            Self::Dir { xattrs, .. } | Self::File { xattrs, .. } => Some(xattrs),
            Self::Symlink { .. } => None,
        }
    }
}

/// A fake process registered with [`RecordingHost::add_process`].
#[derive(Debug, Clone)]
pub struct FakeProcess {
    pid: u32,
    exited: Arc<watch::Sender<bool>>,
}

impl FakeProcess {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Makes every [`Pidfd`] of this process report the exit.
    pub fn exit(&self) {
        self.exited.send_replace(true);
    }
}

type FailurePredicate = Box<dyn Fn(&Op) -> bool + Send + Sync>;

struct FakeProc {
    process: FakeProcess,
    cgroup: String,
    owner: Owner,
}

#[derive(Default)]
struct State {
    tree: BTreeMap<PathBuf, FakeNode>,
    ops: Vec<Op>,
    failures: Vec<FailurePredicate>,
    processes: HashMap<u32, FakeProc>,
    next_temp: u64,
}

/// Records typed [`Op`]s in order over an in-memory tree. Acts as a daemon running as uid 0:
/// what it creates is owned by 0:0. Ancestors of the artifact root are implicit (never in the
/// tree); everything from the root down is.
///
/// Failure injection: [`fail_when`](Self::fail_when) makes an op fail before it has any
/// effect. Ops that fail are not recorded; cleanup the real host would do after a failure
/// (unlinking a half-made temp file) is applied and recorded as [`Op::Unlink`].
#[derive(Default)]
pub struct RecordingHost {
    state: Mutex<State>,
}

impl fmt::Debug for RecordingHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("RecordingHost")
            .field("nodes", &st.tree.len())
            .field("ops", &st.ops.len())
            .field("failures", &st.failures.len())
            .finish()
    }
}

fn not_found(op: &'static str, path: &Path) -> HostError {
    HostError::io(op, path, io::Error::from(io::ErrorKind::NotFound))
}

impl State {
    /// Records `op` unless a failure predicate matches it.
    fn perform(&mut self, op: Op) -> Result<(), HostError> {
        if self.failures.iter().any(|fails| fails(&op)) {
            return Err(HostError::Injected { op: Box::new(op) });
        }
        self.ops.push(op);
        Ok(())
    }

    fn require_dir(&self, path: &Path) -> Result<(), HostError> {
        match self.tree.get(path) {
            Some(FakeNode::Dir { .. }) => Ok(()),
            Some(_) => Err(HostError::NotADirectory {
                path: path.to_path_buf(),
            }),
            None => Err(not_found("opening directory", path)),
        }
    }

    fn children(&self, dir: &Path) -> impl Iterator<Item = &Path> {
        self.tree
            .range::<Path, _>((std::ops::Bound::Excluded(dir), std::ops::Bound::Unbounded))
            .map(|(p, _)| p.as_path())
            .take_while(move |p| p.starts_with(dir))
            .filter(move |p| p.parent() == Some(dir))
    }

    fn ensure_dir_path(&mut self, path: PathBuf, mode: u32) -> Result<DirHandle, HostError> {
        match self.tree.get(&path) {
            Some(FakeNode::Dir {
                mode: existing,
                uid,
                ..
            }) => {
                if *uid != 0 {
                    return Err(HostError::ForeignOwner {
                        path,
                        uid: *uid,
                        expected: 0,
                    });
                }
                if *existing != mode {
                    self.perform(Op::Chmod {
                        path: path.clone(),
                        mode,
                    })?;
                    if let Some(FakeNode::Dir { mode: m, .. }) = self.tree.get_mut(&path) {
                        *m = mode;
                    }
                }
            }
            Some(_) => return Err(HostError::NotADirectory { path }),
            None => {
                self.perform(Op::MkdirAt {
                    path: path.clone(),
                    mode,
                })?;
                self.tree.insert(
                    path.clone(),
                    FakeNode::Dir {
                        mode,
                        uid: 0,
                        gid: 0,
                        xattrs: BTreeMap::new(),
                    },
                );
            }
        }
        Ok(DirHandle::fake(path))
    }

    /// Undo of a half-made temp file, as the real host does it.
    fn discard(&mut self, path: PathBuf) {
        self.tree.remove(&path);
        self.ops.push(Op::Unlink { path });
    }
}

impl RecordingHost {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the recorded state from the others.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every op so far, in order.
    pub fn ops(&self) -> Vec<Op> {
        self.lock().ops.clone()
    }

    /// Every op so far, clearing the record.
    pub fn take_ops(&self) -> Vec<Op> {
        std::mem::take(&mut self.lock().ops)
    }

    /// Makes every later op for which `fails` returns true fail with [`HostError::Injected`],
    /// before it has any effect.
    pub fn fail_when(&self, fails: impl Fn(&Op) -> bool + Send + Sync + 'static) {
        self.lock().failures.push(Box::new(fails));
    }

    pub fn clear_failures(&self) {
        self.lock().failures.clear();
    }

    /// The node at `path`, if any.
    pub fn node(&self, path: impl AsRef<Path>) -> Option<FakeNode> {
        self.lock().tree.get(path.as_ref()).cloned()
    }

    /// The contents of the file at `path`, if it is a file.
    pub fn contents(&self, path: impl AsRef<Path>) -> Option<Vec<u8>> {
        self.lock()
            .tree
            .get(path.as_ref())
            .and_then(FakeNode::contents)
            .map(<[u8]>::to_vec)
    }

    /// Sorted names directly in `dir`.
    pub fn names(&self, dir: impl AsRef<Path>) -> Vec<String> {
        let st = self.lock();
        st.children(dir.as_ref())
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect()
    }

    /// Puts a symlink at `path`, as an attacker would.
    pub fn plant_symlink(&self, path: impl Into<PathBuf>, target: impl Into<PathBuf>) {
        self.lock().tree.insert(
            path.into(),
            FakeNode::Symlink {
                target: target.into(),
            },
        );
    }

    /// Puts a file at `path` without recording an op.
    pub fn plant_file(&self, path: impl Into<PathBuf>, contents: &[u8], mode: u32, uid: u32) {
        self.lock().tree.insert(
            path.into(),
            FakeNode::File {
                contents: Zeroizing::new(contents.to_vec()),
                mode,
                uid,
                gid: uid,
                xattrs: BTreeMap::new(),
            },
        );
    }

    /// Puts a directory at `path` without recording an op.
    pub fn plant_dir(&self, path: impl Into<PathBuf>, mode: u32, uid: u32) {
        self.lock().tree.insert(
            path.into(),
            FakeNode::Dir {
                mode,
                uid,
                gid: uid,
                xattrs: BTreeMap::new(),
            },
        );
    }

    /// Registers a running process with this cgroup text (as in `/proc/<pid>/cgroup`). A pid
    /// registered again is a new process (PID reuse): old pidfds keep watching the old one.
    pub fn add_process(&self, pid: u32, cgroup: impl Into<String>) -> FakeProcess {
        let process = FakeProcess {
            pid,
            exited: Arc::new(watch::Sender::new(false)),
        };
        self.lock().processes.insert(
            pid,
            FakeProc {
                process: process.clone(),
                cgroup: cgroup.into(),
                owner: Owner { uid: 0, gid: 0 },
            },
        );
        process
    }

    /// Sets the uid/gid a registered process runs as (default root).
    pub fn set_process_owner(&self, pid: u32, owner: Owner) {
        if let Some(p) = self.lock().processes.get_mut(&pid) {
            p.owner = owner;
        }
    }

    /// Makes the process exit and forgets its PID.
    pub fn exit_process(&self, pid: u32) {
        if let Some(p) = self.lock().processes.remove(&pid) {
            p.process.exit();
        }
    }
}

// === impl HostOps for RecordingHost ===

impl HostOps for RecordingHost {
    fn open_root(&self, root: &Path) -> Result<DirHandle, HostError> {
        split_root(root)?;
        self.lock()
            .ensure_dir_path(root.to_path_buf(), super::PRIVATE_DIR_MODE)
    }

    fn ensure_dir(
        &self,
        parent: &DirHandle,
        name: &str,
        mode: u32,
    ) -> Result<DirHandle, HostError> {
        validate_component(name)?;
        let mut st = self.lock();
        st.require_dir(parent.path())?;
        st.ensure_dir_path(parent.path().join(name), mode)
    }

    fn open_dir(&self, parent: &DirHandle, name: &str) -> Result<Option<DirHandle>, HostError> {
        validate_component(name)?;
        let path = parent.path().join(name);
        match self.lock().tree.get(&path) {
            Some(FakeNode::Dir { .. }) => Ok(Some(DirHandle::fake(path))),
            Some(_) => Err(HostError::NotADirectory { path }),
            None => Ok(None),
        }
    }

    fn list(&self, dir: &DirHandle) -> Result<Vec<String>, HostError> {
        self.lock().require_dir(dir.path())?;
        Ok(self.names(dir.path()))
    }

    fn create_temp(
        &self,
        dir: &DirHandle,
        contents: &[u8],
        attrs: FileAttrs<'_>,
    ) -> Result<String, HostError> {
        check_attrs(&attrs)?;
        let mut st = self.lock();
        st.require_dir(dir.path())?;
        st.next_temp += 1;
        let name = format!("{TEMP_PREFIX}fake{:06}", st.next_temp);
        let path = dir.path().join(&name);
        st.perform(Op::WriteFile {
            path: path.clone(),
            len: contents.len(),
            mode: attrs.mode,
        })?;
        st.tree.insert(
            path.clone(),
            FakeNode::File {
                contents: Zeroizing::new(contents.to_vec()),
                mode: attrs.mode,
                uid: 0,
                gid: 0,
                xattrs: BTreeMap::new(),
            },
        );
        if let Some(label) = attrs.selinux_label {
            let op = Op::SetXattr {
                path: path.clone(),
                name: super::SELINUX_XATTR.to_owned(),
                value: label.as_bytes().to_vec(),
            };
            if let Err(e) = st.perform(op) {
                st.discard(path);
                return Err(e);
            }
            if let Some(xattrs) = st.tree.get_mut(&path).and_then(FakeNode::xattrs_mut) {
                xattrs.insert(super::SELINUX_XATTR.to_owned(), label.as_bytes().to_vec());
            }
        }
        if let Some(owner) = attrs.owner {
            let op = Op::Chown {
                path: path.clone(),
                uid: owner.uid,
                gid: owner.gid,
            };
            if let Err(e) = st.perform(op) {
                st.discard(path);
                return Err(e);
            }
            if let Some(FakeNode::File { uid, gid, .. }) = st.tree.get_mut(&path) {
                *uid = owner.uid;
                *gid = owner.gid;
            }
        }
        Ok(name)
    }

    fn file_matches(
        &self,
        dir: &DirHandle,
        name: &str,
        contents: &[u8],
    ) -> Result<bool, HostError> {
        validate_component(name)?;
        let path = dir.path().join(name);
        let st = self.lock();
        st.require_dir(dir.path())?;
        match st.tree.get(&path) {
            None => Ok(false),
            Some(FakeNode::File { contents: c, .. }) => Ok(c.as_slice() == contents),
            Some(_) => Err(HostError::NotARegularFile { path }),
        }
    }

    fn rename(&self, dir: &DirHandle, from: &str, to: &str) -> Result<(), HostError> {
        validate_component(from)?;
        validate_component(to)?;
        let mut st = self.lock();
        st.require_dir(dir.path())?;
        let from_path = dir.path().join(from);
        let to_path = dir.path().join(to);
        if !st.tree.contains_key(&from_path) {
            return Err(not_found("renaming", &from_path));
        }
        if let Some(FakeNode::Dir { .. }) = st.tree.get(&to_path) {
            return Err(HostError::io(
                "renaming to",
                to_path,
                io::Error::from(io::ErrorKind::IsADirectory),
            ));
        }
        st.perform(Op::Rename {
            dir: dir.path().to_path_buf(),
            from: from.to_owned(),
            to: to.to_owned(),
        })?;
        if let Some(node) = st.tree.remove(&from_path) {
            st.tree.insert(to_path, node);
        }
        Ok(())
    }

    fn unlink(&self, dir: &DirHandle, name: &str) -> Result<bool, HostError> {
        validate_component(name)?;
        let path = dir.path().join(name);
        let mut st = self.lock();
        match st.tree.get(&path) {
            None => Ok(false),
            Some(FakeNode::Dir { .. }) => Err(HostError::io(
                "removing",
                path,
                io::Error::from(io::ErrorKind::IsADirectory),
            )),
            Some(_) => {
                st.perform(Op::Unlink { path: path.clone() })?;
                st.tree.remove(&path);
                Ok(true)
            }
        }
    }

    fn fsync_dir(&self, dir: &DirHandle) -> Result<(), HostError> {
        let mut st = self.lock();
        st.require_dir(dir.path())?;
        st.perform(Op::FsyncDir {
            path: dir.path().to_path_buf(),
        })
    }

    fn remove_all(&self, parent: &DirHandle, name: &str) -> Result<(), HostError> {
        validate_component(name)?;
        let path = parent.path().join(name);
        let mut st = self.lock();
        if !st.tree.contains_key(&path) {
            return Ok(());
        }
        st.perform(Op::RemoveAll { path: path.clone() })?;
        // A symlink has no descendants in the tree: nothing is ever created through one.
        st.tree.retain(|p, _| !p.starts_with(&path));
        Ok(())
    }

    fn remove_empty_dir(&self, parent: &DirHandle, name: &str) -> Result<bool, HostError> {
        validate_component(name)?;
        let path = parent.path().join(name);
        let mut st = self.lock();
        match st.tree.get(&path) {
            None => return Ok(false),
            Some(FakeNode::Dir { .. }) => {}
            Some(_) => return Err(HostError::NotADirectory { path }),
        }
        if st.children(&path).next().is_some() {
            return Ok(false);
        }
        st.perform(Op::RemoveDir { path: path.clone() })?;
        st.tree.remove(&path);
        Ok(true)
    }

    fn set_xattr(
        &self,
        dir: &DirHandle,
        name: Option<&str>,
        attr: &str,
        value: &[u8],
    ) -> Result<(), HostError> {
        let path = match name {
            Some(name) => {
                validate_component(name)?;
                dir.path().join(name)
            }
            None => dir.path().to_path_buf(),
        };
        let mut st = self.lock();
        match st.tree.get(&path) {
            None => return Err(not_found("setting xattr on", &path)),
            Some(FakeNode::Symlink { .. }) => return Err(HostError::NotARegularFile { path }),
            Some(_) => {}
        }
        st.perform(Op::SetXattr {
            path: path.clone(),
            name: attr.to_owned(),
            value: value.to_vec(),
        })?;
        if let Some(xattrs) = st.tree.get_mut(&path).and_then(FakeNode::xattrs_mut) {
            xattrs.insert(attr.to_owned(), value.to_vec());
        }
        Ok(())
    }

    fn open_pidfd(&self, pid: u32) -> Result<Pidfd, HostError> {
        if pid == 0 || i32::try_from(pid).is_err() {
            return Err(HostError::InvalidPid { pid });
        }
        let mut st = self.lock();
        let Some(proc_) = st.processes.get(&pid) else {
            return Err(HostError::NoSuchProcess { pid });
        };
        let rx = proc_.process.exited.subscribe();
        st.perform(Op::OpenPidfd { pid })?;
        Ok(Pidfd {
            pid,
            inner: PidfdInner::Fake(rx),
        })
    }

    fn process_owner(&self, pid: u32) -> Result<Owner, HostError> {
        self.lock()
            .processes
            .get(&pid)
            .map(|p| p.owner)
            .ok_or(HostError::NoSuchProcess { pid })
    }

    fn process_cgroup(&self, pid: u32) -> Result<String, HostError> {
        self.lock()
            .processes
            .get(&pid)
            .map(|p| p.cgroup.clone())
            .ok_or(HostError::NoSuchProcess { pid })
    }
}

/// Real files with fake processes: the daemon's file handling proven on a real file system
/// while PIDs, cgroups and process exits stay scriptable (used by the daemon's integration
/// tests and benchmarks, where no real container processes exist).
#[derive(Debug, Default)]
pub struct SplitHost {
    pub files: super::RealHost,
    pub procs: RecordingHost,
}

impl HostOps for SplitHost {
    fn open_root(&self, root: &Path) -> Result<DirHandle, HostError> {
        self.files.open_root(root)
    }
    fn ensure_dir(
        &self,
        parent: &DirHandle,
        name: &str,
        mode: u32,
    ) -> Result<DirHandle, HostError> {
        self.files.ensure_dir(parent, name, mode)
    }
    fn open_dir(&self, parent: &DirHandle, name: &str) -> Result<Option<DirHandle>, HostError> {
        self.files.open_dir(parent, name)
    }
    fn list(&self, dir: &DirHandle) -> Result<Vec<String>, HostError> {
        self.files.list(dir)
    }
    fn create_temp(
        &self,
        dir: &DirHandle,
        contents: &[u8],
        attrs: FileAttrs<'_>,
    ) -> Result<String, HostError> {
        self.files.create_temp(dir, contents, attrs)
    }
    fn file_matches(
        &self,
        dir: &DirHandle,
        name: &str,
        contents: &[u8],
    ) -> Result<bool, HostError> {
        self.files.file_matches(dir, name, contents)
    }
    fn rename(&self, dir: &DirHandle, from: &str, to: &str) -> Result<(), HostError> {
        self.files.rename(dir, from, to)
    }
    fn unlink(&self, dir: &DirHandle, name: &str) -> Result<bool, HostError> {
        self.files.unlink(dir, name)
    }
    fn fsync_dir(&self, dir: &DirHandle) -> Result<(), HostError> {
        self.files.fsync_dir(dir)
    }
    fn remove_all(&self, parent: &DirHandle, name: &str) -> Result<(), HostError> {
        self.files.remove_all(parent, name)
    }
    fn remove_empty_dir(&self, parent: &DirHandle, name: &str) -> Result<bool, HostError> {
        self.files.remove_empty_dir(parent, name)
    }
    fn set_xattr(
        &self,
        dir: &DirHandle,
        name: Option<&str>,
        attr: &str,
        value: &[u8],
    ) -> Result<(), HostError> {
        self.files.set_xattr(dir, name, attr, value)
    }
    fn open_pidfd(&self, pid: u32) -> Result<Pidfd, HostError> {
        self.procs.open_pidfd(pid)
    }
    fn process_cgroup(&self, pid: u32) -> Result<String, HostError> {
        self.procs.process_cgroup(pid)
    }
    fn process_owner(&self, pid: u32) -> Result<Owner, HostError> {
        self.procs.process_owner(pid)
    }
}

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

// === helpers ===

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Skips a test that needs root, saying so, when the test run is not root.
macro_rules! skip_if_not_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (chown to another uid)");
            return;
        }
    };
}

/// A unique directory under the system temp dir, removed on drop.
struct TempRoot {
    base: PathBuf,
}

impl TempRoot {
    fn new() -> Self {
        let name: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(12)
            .collect();
        let base = std::env::temp_dir().join(format!("nri-host-test-{name}"));
        std::fs::create_dir(&base).unwrap();
        Self { base }
    }

    /// The artifact root inside the temp dir (not created).
    fn root(&self) -> PathBuf {
        self.base.join("artifacts")
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

const ROOT: &str = "/run/nri-identity-injector";
const POD: &str = "0b6a2d4e-7f3c-4c2e-9a51-2f7a8d9e1c33";
const CTR: &str = "4f1e0c7a9b2d";

fn root_path() -> PathBuf {
    PathBuf::from(ROOT)
}

fn ctr_path() -> PathBuf {
    root_path().join(POD).join(CTR)
}

// === validation ===

#[test]
fn components_are_validated() {
    for good in ["a", "pod-uid_1.2", "...", ".hidden", &"x".repeat(255)] {
        assert!(validate_component(good).is_ok(), "{good:?}");
    }
    for (bad, reason) in [
        ("", "empty"),
        (".", "is '.' or '..'"),
        ("..", "is '.' or '..'"),
        ("a/b", "contains '/'"),
        ("/", "contains '/'"),
        ("a\0b", "contains NUL"),
    ] {
        match validate_component(bad) {
            Err(HostError::InvalidComponent { reason: r, .. }) => assert_eq!(r, reason, "{bad:?}"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    assert!(validate_component(&"x".repeat(256)).is_err());
}

#[test]
fn roots_are_validated() {
    for bad in ["relative/root", "/", "/run/../etc", "/run/x/.."] {
        assert!(
            matches!(
                split_root(Path::new(bad)),
                Err(HostError::InvalidRoot { .. })
            ),
            "{bad:?}"
        );
    }
    let (parent, name) = split_root(Path::new("/run/nri")).unwrap();
    assert_eq!((parent, name), (Path::new("/run"), "nri"));
}

#[test]
fn file_attrs_are_validated() {
    let host = RecordingHost::new();
    let dir = host.create_container_dir(&root_path(), POD, CTR).unwrap();
    for attrs in [
        FileAttrs::mode(0o4644),
        FileAttrs {
            owner: Some(Owner::from((u32::MAX, 0))),
            ..FileAttrs::mode(0o600)
        },
    ] {
        assert!(matches!(
            host.create_temp(&dir, b"x", attrs),
            Err(HostError::InvalidFileAttrs { .. })
        ));
    }
}

// === RecordingHost ===

#[test]
fn fake_creates_the_layout_with_modes() {
    let host = RecordingHost::new();
    let dir = host.create_container_dir(&root_path(), POD, CTR).unwrap();
    assert_eq!(dir.path(), ctr_path());
    assert!(dir.fd().is_none());
    assert_eq!(
        host.take_ops(),
        vec![
            Op::MkdirAt {
                path: root_path(),
                mode: 0o700
            },
            Op::MkdirAt {
                path: root_path().join(POD),
                mode: 0o700
            },
            Op::MkdirAt {
                path: ctr_path(),
                mode: 0o755
            },
        ]
    );
    // Idempotent: a second container call opens what exists.
    host.create_container_dir(&root_path(), POD, CTR).unwrap();
    assert_eq!(host.take_ops(), vec![]);
    assert_eq!(host.node(ctr_path()).unwrap().owner(), Some((0, 0)));
}

#[test]
fn fake_refuses_symlinks_and_foreign_dirs() {
    let host = RecordingHost::new();
    host.plant_dir(root_path(), 0o700, 0);
    host.plant_symlink(root_path().join(POD), "/etc");
    let err = host
        .create_container_dir(&root_path(), POD, CTR)
        .unwrap_err();
    assert!(matches!(err, HostError::NotADirectory { ref path } if *path == root_path().join(POD)));
    assert!(host.ops().is_empty());

    let host = RecordingHost::new();
    host.plant_dir(root_path(), 0o700, 0);
    host.plant_dir(root_path().join(POD), 0o700, 1000);
    let err = host
        .create_container_dir(&root_path(), POD, CTR)
        .unwrap_err();
    assert!(matches!(err, HostError::ForeignOwner { uid: 1000, .. }));

    let host = RecordingHost::new();
    host.plant_symlink(root_path(), "/tmp");
    assert!(matches!(
        host.open_root(&root_path()),
        Err(HostError::NotADirectory { .. })
    ));

    let host = RecordingHost::new();
    assert!(matches!(
        host.create_container_dir(&root_path(), "..", CTR),
        Err(HostError::InvalidComponent { .. })
    ));
    assert!(host.ops().is_empty());
}

#[test]
fn fake_corrects_modes_of_existing_dirs() {
    let host = RecordingHost::new();
    host.plant_dir(root_path(), 0o777, 0);
    host.open_root(&root_path()).unwrap();
    assert_eq!(
        host.ops(),
        vec![Op::Chmod {
            path: root_path(),
            mode: 0o700
        }]
    );
    assert_eq!(host.node(root_path()).unwrap().mode(), Some(0o700));
}

#[test]
fn fake_atomic_write_records_every_step() {
    let host = RecordingHost::new();
    let dir = host.create_container_dir(&root_path(), POD, CTR).unwrap();
    host.take_ops();
    let attrs = FileAttrs {
        mode: 0o640,
        owner: Some(Owner {
            uid: 1001,
            gid: 2002,
        }),
        selinux_label: Some("system_u:object_r:container_file_t:s0"),
    };
    host.write_file_atomic(&dir, "f.pem", b"hello", attrs)
        .unwrap();
    let tmp = ctr_path().join(".tmp-fake000001");
    assert_eq!(
        host.take_ops(),
        vec![
            Op::WriteFile {
                path: tmp.clone(),
                len: 5,
                mode: 0o640
            },
            Op::SetXattr {
                path: tmp.clone(),
                name: SELINUX_XATTR.into(),
                value: b"system_u:object_r:container_file_t:s0".to_vec()
            },
            Op::Chown {
                path: tmp,
                uid: 1001,
                gid: 2002
            },
            Op::Rename {
                dir: ctr_path(),
                from: ".tmp-fake000001".into(),
                to: "f.pem".into()
            },
            Op::FsyncDir { path: ctr_path() },
        ]
    );
    let node = host.node(ctr_path().join("f.pem")).unwrap();
    assert_eq!(node.contents(), Some(&b"hello"[..]));
    assert_eq!(node.mode(), Some(0o640));
    assert_eq!(node.owner(), Some((1001, 2002)));
    assert!(node.xattr(SELINUX_XATTR).is_some());
    assert_eq!(host.names(ctr_path()), vec!["f.pem"]);
}

#[test]
fn fake_failures_leave_no_temp_file() {
    let host = RecordingHost::new();
    let dir = host.create_container_dir(&root_path(), POD, CTR).unwrap();
    host.write_file_atomic(&dir, "f", b"old", FileAttrs::mode(0o644))
        .unwrap();

    for (what, fails) in [
        (
            "chown",
            (|op: &Op| matches!(op, Op::Chown { .. })) as fn(&Op) -> bool,
        ),
        ("rename", |op: &Op| matches!(op, Op::Rename { .. })),
        ("write", |op: &Op| matches!(op, Op::WriteFile { .. })),
    ] {
        host.clear_failures();
        host.fail_when(fails);
        let attrs = FileAttrs {
            owner: Some(Owner { uid: 1, gid: 1 }),
            ..FileAttrs::mode(0o644)
        };
        let err = host
            .write_file_atomic(&dir, "f", b"new", attrs)
            .unwrap_err();
        assert!(matches!(err, HostError::Injected { .. }), "{what}: {err}");
        assert_eq!(host.names(ctr_path()), vec!["f"], "{what}");
        assert_eq!(
            host.contents(ctr_path().join("f")).unwrap(),
            b"old",
            "{what}"
        );
    }
}

#[test]
fn fake_rename_replaces_a_symlink() {
    let host = RecordingHost::new();
    let dir = host.create_container_dir(&root_path(), POD, CTR).unwrap();
    host.plant_symlink(ctr_path().join("svid.pem"), "/etc/shadow");
    host.write_file_atomic(&dir, "svid.pem", b"cert", FileAttrs::mode(0o644))
        .unwrap();
    assert_eq!(host.contents(ctr_path().join("svid.pem")).unwrap(), b"cert");
}

#[test]
fn fake_removes_container_then_empty_pod() {
    let host = RecordingHost::new();
    let a = host.create_container_dir(&root_path(), POD, "a").unwrap();
    host.create_container_dir(&root_path(), POD, "b").unwrap();
    host.write_file_atomic(&a, "f", b"x", FileAttrs::mode(0o644))
        .unwrap();
    host.take_ops();

    host.remove_container_dir(&root_path(), POD, "a").unwrap();
    assert_eq!(
        host.take_ops(),
        vec![Op::RemoveAll {
            path: root_path().join(POD).join("a")
        }]
    );
    assert!(host.node(root_path().join(POD).join("a/f")).is_none());
    host.remove_container_dir(&root_path(), POD, "b").unwrap();
    assert_eq!(
        host.take_ops(),
        vec![
            Op::RemoveAll {
                path: root_path().join(POD).join("b")
            },
            Op::RemoveDir {
                path: root_path().join(POD)
            },
        ]
    );
    // Gone already: nothing to do, no error.
    host.remove_container_dir(&root_path(), POD, "b").unwrap();
    assert_eq!(host.take_ops(), vec![]);
}

#[tokio::test]
async fn fake_pidfd_follows_the_process_not_the_pid() {
    let host = RecordingHost::new();
    let first = host.add_process(42, "0::/kubepods/pod1/ctr-a\n");
    let pidfd = host.open_pidfd(42).unwrap();
    assert_eq!(pidfd.pid(), 42);
    assert!(pidfd.fd().is_none());
    assert!(pidfd.is_alive().unwrap());
    assert!(host.process_cgroup(42).unwrap().contains("ctr-a"));

    first.exit();
    tokio::time::timeout(Duration::from_secs(1), pidfd.exited())
        .await
        .unwrap()
        .unwrap();
    assert!(!pidfd.is_alive().unwrap());

    // PID reuse: a new process under the same PID does not revive the old pidfd.
    host.add_process(42, "0::/other\n");
    assert!(!pidfd.is_alive().unwrap());
    assert!(host.open_pidfd(42).unwrap().is_alive().unwrap());

    host.exit_process(42);
    assert!(matches!(
        host.open_pidfd(42),
        Err(HostError::NoSuchProcess { pid: 42 })
    ));
    assert!(matches!(
        host.open_pidfd(0),
        Err(HostError::InvalidPid { pid: 0 })
    ));
    assert_eq!(
        host.ops(),
        vec![Op::OpenPidfd { pid: 42 }, Op::OpenPidfd { pid: 42 }]
    );
}

// === RealHost ===

#[test]
fn real_creates_the_layout_with_modes_and_owner() {
    let tmp = TempRoot::new();
    let host = RealHost::new();
    let dir = host.create_container_dir(&tmp.root(), POD, CTR).unwrap();
    assert_eq!(dir.path(), tmp.root().join(POD).join(CTR));
    assert!(dir.fd().is_some());
    let euid = rustix::process::geteuid().as_raw();
    for (path, mode) in [
        (tmp.root(), 0o700),
        (tmp.root().join(POD), 0o700),
        (tmp.root().join(POD).join(CTR), 0o755),
    ] {
        assert_eq!(mode_of(&path), mode, "{}", path.display());
        assert_eq!(std::fs::metadata(&path).unwrap().uid(), euid);
    }

    // A wrong mode on an existing directory is corrected, not trusted.
    std::fs::set_permissions(tmp.root().join(POD), std::fs::Permissions::from_mode(0o777)).unwrap();
    host.create_container_dir(&tmp.root(), POD, CTR).unwrap();
    assert_eq!(mode_of(&tmp.root().join(POD)), 0o700);
}

#[test]
fn real_refuses_a_symlinked_pod_dir() {
    let tmp = TempRoot::new();
    let host = RealHost::new();
    host.open_root(&tmp.root()).unwrap();
    let elsewhere = tmp.base.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    symlink(&elsewhere, tmp.root().join(POD)).unwrap();

    let err = host
        .create_container_dir(&tmp.root(), POD, CTR)
        .unwrap_err();
    assert!(
        matches!(err, HostError::NotADirectory { ref path } if *path == tmp.root().join(POD)),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);

    // Removal does not follow it either.
    assert!(matches!(
        host.remove_container_dir(&tmp.root(), POD, CTR),
        Err(HostError::NotADirectory { .. })
    ));
    assert!(elsewhere.is_dir());
}

#[test]
fn real_refuses_a_symlinked_root_and_a_file_as_dir() {
    let tmp = TempRoot::new();
    let host = RealHost::new();
    symlink(&tmp.base, tmp.root()).unwrap();
    assert!(matches!(
        host.open_root(&tmp.root()),
        Err(HostError::NotADirectory { .. })
    ));

    let tmp = TempRoot::new();
    host.open_root(&tmp.root()).unwrap();
    std::fs::write(tmp.root().join(POD), b"").unwrap();
    assert!(matches!(
        host.create_container_dir(&tmp.root(), POD, CTR),
        Err(HostError::NotADirectory { .. })
    ));
}

#[test]
fn real_refuses_a_symlinked_container_dir() {
    let tmp = TempRoot::new();
    let host = RealHost::new();
    host.create_container_dir(&tmp.root(), POD, "other")
        .unwrap();
    let elsewhere = tmp.base.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    symlink(&elsewhere, tmp.root().join(POD).join(CTR)).unwrap();
    let err = host
        .create_container_dir(&tmp.root(), POD, CTR)
        .unwrap_err();
    assert!(matches!(err, HostError::NotADirectory { .. }), "{err}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

#[test]
fn real_hard_link_in_place_of_a_file_is_replaced_not_written_through() {
    skip_if_not_root!();
    let tmp = TempRoot::new();
    let host = RealHost::new();
    let dir = host.create_container_dir(&tmp.root(), POD, CTR).unwrap();
    // A file elsewhere on the same file system, hard-linked under the key's name.
    let victim = tmp.base.join("victim");
    std::fs::write(&victim, b"victim").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::hard_link(&victim, dir.path().join("svid_key.pem")).unwrap();

    let attrs = FileAttrs {
        owner: Some(Owner {
            uid: 1001,
            gid: 1001,
        }),
        ..FileAttrs::mode(0o600)
    };
    host.write_file_atomic(&dir, "svid_key.pem", b"key", attrs)
        .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("svid_key.pem")).unwrap(),
        b"key"
    );
    let victim_meta = std::fs::metadata(&victim).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
    assert_eq!(victim_meta.permissions().mode() & 0o777, 0o640);
    assert_eq!((victim_meta.uid(), victim_meta.nlink()), (0, 1));
}

#[test]
fn real_root_ancestors_others_can_write_are_refused() {
    skip_if_not_root!();
    let tmp = TempRoot::new();
    std::fs::set_permissions(&tmp.base, std::fs::Permissions::from_mode(0o755)).unwrap();
    RealHost::check_root_ancestors(&tmp.base.join("a").join("artifacts")).unwrap();

    // A directory others can write, anywhere above the root.
    let open = tmp.base.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = RealHost::check_root_ancestors(&open.join("x").join("artifacts")).unwrap_err();
    assert!(
        matches!(err, HostError::UnsafeAncestor { ref path, .. } if *path == open),
        "{err}"
    );
    // Sticky, as /tmp is: others cannot replace what they do not own.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    RealHost::check_root_ancestors(&open.join("artifacts")).unwrap();

    // Owned by another user.
    let theirs = tmp.base.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(1001), Some(1001)).unwrap();
    assert!(matches!(
        RealHost::check_root_ancestors(&theirs.join("artifacts")),
        Err(HostError::UnsafeAncestor { .. })
    ));

    // A symlink above the root is followed, so where it leads is checked too.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let link = tmp.base.join("link");
    symlink(&open, &link).unwrap();
    let err = RealHost::check_root_ancestors(&link.join("artifacts")).unwrap_err();
    assert!(
        matches!(err, HostError::UnsafeAncestor { ref path, .. } if *path == link),
        "{err}"
    );
}

#[test]
fn real_atomic_write_applies_exact_mode() {
    let tmp = TempRoot::new();
    let host = RealHost::new();
    let dir = host.create_container_dir(&tmp.root(), POD, CTR).unwrap();
    // 0666 would be cut to 0644 by the usual umask if fchmod did not follow the create.
    host.write_file_atomic(&dir, "f", b"one", FileAttrs::mode(0o666))
        .unwrap();
    let path = dir.path().join("f");
    assert_eq!(std::fs::read(&path).unwrap(), b"one");
    assert_eq!(mode_of(&path), 0o666);
    host.write_file_atomic(&dir, "f", b"two", FileAttrs::mode(0o600))
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"two");
    assert_eq!(mode_of(&path), 0o600);
    assert_eq!(host.list(&dir).unwrap(), vec!["f"]);
}

#[test]
fn real_atomic_write_chowns() {
    skip_if_not_root!();
    let tmp = TempRoot::new();
    let host = RealHost::new();
    let dir = host.create_container_dir(&tmp.root(), POD, CTR).unwrap();
    let attrs = FileAttrs {
        owner: Some(Owner {
            uid: 1001,
            gid: 1002,
        }),
        ..FileAttrs::mode(0o600)
    };
    host.write_file_atomic(&dir, "key.pem", b"secret", attrs)
        .unwrap();
    let meta = std::fs::metadata(dir.path().join("key.pem")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1001, 1002));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
}

#[test]
fn real_file_matches_compares_contents_and_refuses_what_is_not_a_regular_file() {
    let tmp = TempRoot::new();
    let host = RealHost::new();
    let root = host.open_root(&tmp.root()).unwrap();
    // Over one compare block, differing only in the last byte.
    let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    host.write_file_atomic(&root, "f", &big, FileAttrs::mode(0o600))
        .unwrap();
    assert!(host.file_matches(&root, "f", &big).unwrap());
    let mut other = big.clone();
    *other.last_mut().unwrap() ^= 1;
    assert!(!host.file_matches(&root, "f", &other).unwrap());
    assert!(
        !host
            .file_matches(&root, "f", &big[..big.len() - 1])
            .unwrap()
    );
    assert!(!host.file_matches(&root, "missing", b"").unwrap());
    let secret = tmp.base.join("secret");
    std::fs::write(&secret, "s").unwrap();
    symlink(&secret, tmp.root().join("link")).unwrap();
    assert!(matches!(
        host.file_matches(&root, "link", b"s"),
        Err(HostError::NotARegularFile { .. })
    ));
    host.ensure_dir(&root, "d", 0o700).unwrap();
    assert!(matches!(
        host.file_matches(&root, "d", b""),
        Err(HostError::NotARegularFile { .. })
    ));
}

#[test]
fn real_rename_replaces_a_symlink_without_following_it() {
    let tmp = TempRoot::new();
    let host = RealHost::new();
    let dir = host.create_container_dir(&tmp.root(), POD, CTR).unwrap();
    let victim = tmp.base.join("victim");
    std::fs::write(&victim, b"victim").unwrap();
    symlink(&victim, dir.path().join("svid.pem")).unwrap();

    host.write_file_atomic(&dir, "svid.pem", b"cert", FileAttrs::mode(0o644))
        .unwrap();
    let meta = std::fs::symlink_metadata(dir.path().join("svid.pem")).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(std::fs::read(dir.path().join("svid.pem")).unwrap(), b"cert");
    assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
}

#[test]
fn real_failed_rename_leaves_no_temp_file() {
    let tmp = TempRoot::new();
    let host = RealHost::new();
    let dir = host.create_container_dir(&tmp.root(), POD, CTR).unwrap();
    std::fs::create_dir(dir.path().join("taken")).unwrap();
    std::fs::write(dir.path().join("taken/inner"), b"x").unwrap();
    let err = host
        .write_file_atomic(&dir, "taken", b"data", FileAttrs::mode(0o644))
        .unwrap_err();
    assert!(matches!(err, HostError::Io { .. }), "{err}");
    assert_eq!(host.list(&dir).unwrap(), vec!["taken"]);
}

#[test]
fn real_remove_does_not_follow_symlinks() {
    let tmp = TempRoot::new();
    let host = RealHost::new();
    let a = host.create_container_dir(&tmp.root(), POD, "a").unwrap();
    host.create_container_dir(&tmp.root(), POD, "b").unwrap();
    let outside = tmp.base.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"keep").unwrap();
    host.write_file_atomic(&a, "f", b"x", FileAttrs::mode(0o600))
        .unwrap();
    symlink(&outside, a.path().join("link-to-dir")).unwrap();
    symlink(outside.join("keep"), a.path().join("link-to-file")).unwrap();
    std::fs::create_dir_all(a.path().join("sub/deeper")).unwrap();
    std::fs::write(a.path().join("sub/deeper/g"), b"y").unwrap();
    symlink(&outside, a.path().join("sub/link")).unwrap();

    host.remove_container_dir(&tmp.root(), POD, "a").unwrap();
    assert!(!a.path().exists());
    assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
    // The pod still has "b".
    assert!(tmp.root().join(POD).is_dir());
    host.remove_container_dir(&tmp.root(), POD, "b").unwrap();
    assert!(!tmp.root().join(POD).exists());
    assert!(tmp.root().is_dir());
    // Idempotent.
    host.remove_container_dir(&tmp.root(), POD, "b").unwrap();
}

#[test]
fn real_remove_all_unlinks_a_symlink_in_place_of_the_dir() {
    let tmp = TempRoot::new();
    let host = RealHost::new();
    let root = host.open_root(&tmp.root()).unwrap();
    let pod = host.ensure_dir(&root, POD, PRIVATE_DIR_MODE).unwrap();
    let outside = tmp.base.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"keep").unwrap();
    symlink(&outside, pod.path().join(CTR)).unwrap();
    host.remove_all(&pod, CTR).unwrap();
    assert!(std::fs::symlink_metadata(pod.path().join(CTR)).is_err());
    assert!(outside.join("keep").exists());
    assert!(!host.remove_empty_dir(&root, "missing").unwrap());
}

#[test]
fn real_set_xattr_on_dir_and_file() {
    let tmp = TempRoot::new();
    let host = RealHost::new();
    let dir = host.create_container_dir(&tmp.root(), POD, CTR).unwrap();
    host.write_file_atomic(&dir, "f", b"x", FileAttrs::mode(0o644))
        .unwrap();
    // `user.*` stands in for `security.selinux`, which needs SELinux to be accepted.
    match host.set_xattr(&dir, None, "user.nri-test", b"v") {
        Err(e) if e.io_kind() == Some(std::io::ErrorKind::Unsupported) => {
            eprintln!(
                "skipped: {} does not support user xattrs",
                tmp.base.display()
            );
            return;
        }
        other => other.unwrap(),
    }
    host.set_xattr(&dir, Some("f"), "user.nri-test", b"v")
        .unwrap();
    let mut buf = [0u8; 8];
    let n = rustix::fs::getxattr(dir.path().join("f"), "user.nri-test", &mut buf).unwrap();
    assert_eq!(&buf[..n], b"v");

    symlink("/etc/hostname", dir.path().join("link")).unwrap();
    assert!(matches!(
        host.set_xattr(&dir, Some("link"), "user.nri-test", b"v"),
        Err(HostError::NotARegularFile { .. })
    ));
}

#[test]
fn real_reads_a_runtime_file_but_no_symlink_special_file_or_oversized_file() {
    let tmp = TempRoot::new();
    let host = RealHost::new();
    let spec = tmp.base.join("config.json");
    std::fs::write(&spec, b"{}").unwrap();
    assert_eq!(host.read_runtime_file(&spec, 2).unwrap(), b"{}");
    assert!(matches!(
        host.read_runtime_file(&spec, 1),
        Err(HostError::UnreadableFile { limit: 1, .. })
    ));
    let link = tmp.base.join("link.json");
    symlink(&spec, &link).unwrap();
    assert!(matches!(
        host.read_runtime_file(&link, 64),
        Err(HostError::UnreadableFile { .. })
    ));
    assert!(matches!(
        host.read_runtime_file(&tmp.base, 64),
        Err(HostError::UnreadableFile { .. })
    ));
    let missing = host
        .read_runtime_file(&tmp.base.join("missing"), 64)
        .unwrap_err();
    assert_eq!(missing.io_kind(), Some(std::io::ErrorKind::NotFound));
    assert!(missing.to_string().contains("missing"), "{missing}");
}

#[test]
fn fake_reads_planted_runtime_files_and_records_it() {
    let host = RecordingHost::new();
    host.plant_file("/state/sb/config.json", b"{}", 0o600, 0);
    assert_eq!(
        host.read_runtime_file(Path::new("/state/sb/config.json"), 8)
            .unwrap(),
        b"{}"
    );
    assert_eq!(
        host.ops(),
        vec![Op::ReadRuntimeFile {
            path: "/state/sb/config.json".into()
        }]
    );
    assert!(
        host.read_runtime_file(Path::new("/state/other"), 8)
            .is_err()
    );
    assert!(matches!(
        host.read_runtime_file(Path::new("/state/sb/config.json"), 1),
        Err(HostError::UnreadableFile { .. })
    ));
}

#[tokio::test]
async fn real_pidfd_reports_exit_of_a_child() {
    let host = RealHost::new();
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pidfd = host.open_pidfd(child.id()).unwrap();
    assert!(pidfd.fd().is_some());
    assert!(pidfd.is_alive().unwrap());
    let cgroup = host.process_cgroup(child.id()).unwrap();
    assert!(cgroup.contains(':'), "{cgroup:?}");

    // Not exited yet: the future stays pending.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), pidfd.exited())
            .await
            .is_err()
    );
    child.kill().unwrap();
    // Two waiters at once share the one registration (the maintenance task and a JWT refresh
    // can both be waiting).
    let (a, b) = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::join!(pidfd.exited(), pidfd.exited())
    })
    .await
    .unwrap();
    a.unwrap();
    b.unwrap();
    // Exited, not yet reaped: still reported, and again on a second call.
    assert!(!pidfd.is_alive().unwrap());
    pidfd.exited().await.unwrap();
    child.wait().unwrap();
    assert!(!pidfd.is_alive().unwrap());

    assert!(matches!(
        host.open_pidfd(0),
        Err(HostError::InvalidPid { pid: 0 })
    ));
    assert!(matches!(
        host.open_pidfd(u32::MAX),
        Err(HostError::InvalidPid { .. })
    ));
}

#[test]
fn real_process_cgroup_of_self() {
    let host = RealHost::new();
    let text = host.process_cgroup(std::process::id()).unwrap();
    assert!(!text.is_empty());
    assert!(matches!(
        host.process_cgroup(0),
        Err(HostError::InvalidPid { pid: 0 })
    ));
}

#[test]
fn handles_from_the_fake_are_refused_by_the_real_host() {
    let fake = RecordingHost::new();
    let dir = fake.create_container_dir(&root_path(), POD, CTR).unwrap();
    assert!(matches!(
        RealHost::new().list(&dir),
        Err(HostError::ForeignHandle { .. })
    ));
}

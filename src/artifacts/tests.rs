use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink};
use std::sync::atomic::{AtomicUsize, Ordering};

use x509_parser::pem::Pem;

use super::*;
use crate::annotation::{Policy, parse};
use crate::host::{Op, RealHost, RecordingHost};

// === helpers ===

const ROOT: &str = "/run/nri-identity-injector";
const POD: &str = "0b6a2d4e-7f3c-4c2e-9a51-2f7a8d9e1c33";
const CTR: &str = "4f1e0c7a9b2d";
const LABEL: &str = "system_u:object_r:container_file_t:s0";

fn ctr_path() -> PathBuf {
    Path::new(ROOT).join(POD).join(CTR)
}

fn request(yaml: &str) -> IdentityRequest {
    parse(yaml, &Policy::new("/run/spire/admin.sock")).unwrap()
}

fn spiffe_helper() -> IdentityRequest {
    request("cert_dir: /var/certs\n")
}

fn self_signed(san: &str) -> rcgen::CertifiedKey<rcgen::KeyPair> {
    rcgen::generate_simple_self_signed(vec![san.to_owned()]).unwrap()
}

/// Real certificates and a real PKCS#8 key whose public half is in the leaf.
fn material(federated: &[&str]) -> Material {
    let leaf = self_signed("workload.example.org");
    let intermediate = self_signed("intermediate.example.org");
    let root = self_signed("root.example.org");
    Material {
        trust_domain: TrustDomain::parse("example.org").unwrap(),
        chain: vec![leaf.cert.der().to_vec(), intermediate.cert.der().to_vec()],
        key: Zeroizing::new(leaf.signing_key.serialize_der()),
        own_bundle: vec![root.cert.der().to_vec()],
        federated: federated
            .iter()
            .map(|td| {
                let ca = self_signed(&format!("ca.{td}"));
                (
                    TrustDomain::parse(td).unwrap(),
                    vec![ca.cert.der().to_vec()],
                )
            })
            .collect(),
    }
}

/// `(label, der)` of every PEM block.
fn blocks(pem: &[u8]) -> Vec<(String, Vec<u8>)> {
    Pem::iter_from_buffer(pem)
        .map(|p| {
            let p = p.unwrap();
            (p.label, p.contents)
        })
        .collect()
}

fn certs(ders: &[Vec<u8>]) -> Vec<(String, Vec<u8>)> {
    ders.iter()
        .map(|d| ("CERTIFICATE".to_owned(), d.clone()))
        .collect()
}

fn fake_writer() -> (Arc<RecordingHost>, ArtifactWriter) {
    let host = Arc::new(RecordingHost::new());
    let writer = ArtifactWriter::new(host.clone(), ROOT);
    (host, writer)
}

fn names_of(files: &RenderedFiles) -> Vec<&str> {
    files.files().iter().map(RenderedFile::name).collect()
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

struct TempRoot {
    base: PathBuf,
}

impl TempRoot {
    fn new() -> Self {
        let name: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(12)
            .collect();
        let base = std::env::temp_dir().join(format!("nri-artifacts-test-{name}"));
        std::fs::create_dir(&base).unwrap();
        Self { base }
    }

    fn root(&self) -> PathBuf {
        self.base.join("artifacts")
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

// === rendering ===

#[test]
fn pem_is_rfc7468_shaped() {
    for len in [0, 1, 2, 3, 47, 48, 49, 95, 96, 97, 1000] {
        let der: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
        let pem = pem_blocks("x", &[("CERTIFICATE", &[der.clone()][..])]).unwrap();
        assert_eq!(pem.len(), pem_len("CERTIFICATE", len));
        let text = std::str::from_utf8(&pem).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.first(), Some(&"-----BEGIN CERTIFICATE-----"));
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
        assert!(text.ends_with("-----\n"));
        let body = &lines[1..lines.len() - 1];
        assert!(body.iter().all(|l| l.len() <= 64 && !l.is_empty()));
        assert!(body.iter().rev().skip(1).all(|l| l.len() == 64));
        assert_eq!(body.concat(), STANDARD.encode(&der), "len {len}");
    }
}

#[test]
fn spiffe_helper_layout_with_separate_federation() {
    let m = material(&["other.org", "third.example"]);
    let files = RenderedFiles::for_request(&spiffe_helper(), &m).unwrap();
    assert_eq!(
        names_of(&files),
        vec![
            "svid_key.pem",
            "svid.pem",
            "other.org.x509.pem",
            "third.example.x509.pem",
            "svid_bundle.pem"
        ],
        "the trust bundle last: its arrival means the whole set arrived"
    );
    let key = files.get("svid_key.pem").unwrap();
    assert_eq!(key.mode(), 0o600);
    assert!(key.kind().is_secret());
    assert_eq!(
        blocks(key.contents()),
        vec![("PRIVATE KEY".to_owned(), m.key.to_vec())]
    );
    assert_eq!(
        blocks(files.get("svid.pem").unwrap().contents()),
        certs(&m.chain)
    );
    assert_eq!(
        blocks(files.get("svid_bundle.pem").unwrap().contents()),
        certs(&m.own_bundle)
    );
    let other = files.get("other.org.x509.pem").unwrap();
    assert_eq!(other.mode(), 0o644);
    assert_eq!(
        other.kind(),
        &RenderedKind::FederatedBundle {
            trust_domain: TrustDomain::parse("other.org").unwrap()
        }
    );
    assert_eq!(blocks(other.contents()), certs(&m.federated["other.org"]));
}

#[test]
fn combined_layout_puts_the_key_first() {
    let m = material(&[]);
    let req = request("cert_dir: /x\nlayout: combined\nkey_file_mode: 0640\n");
    let files = RenderedFiles::for_request(&req, &m).unwrap();
    assert_eq!(
        names_of(&files),
        vec!["credential-bundle.pem", "svid_bundle.pem"]
    );
    let creds = files.get("credential-bundle.pem").unwrap();
    assert_eq!(creds.mode(), 0o640);
    assert_eq!(creds.kind(), &RenderedKind::KeyAndChain);
    let mut expected = vec![("PRIVATE KEY".to_owned(), m.key.to_vec())];
    expected.extend(certs(&m.chain));
    assert_eq!(blocks(creds.contents()), expected);
}

#[test]
fn append_mode_puts_federated_certs_in_the_bundle() {
    let m = material(&["b.example", "a.example"]);
    let req = request("cert_dir: /x\nfederated_bundles: append\n");
    let files = RenderedFiles::for_request(&req, &m).unwrap();
    assert_eq!(
        names_of(&files),
        vec!["svid_key.pem", "svid.pem", "svid_bundle.pem"]
    );
    let mut expected = certs(&m.own_bundle);
    expected.extend(certs(&m.federated["a.example"]));
    expected.extend(certs(&m.federated["b.example"]));
    assert_eq!(
        blocks(files.get("svid_bundle.pem").unwrap().contents()),
        expected
    );
}

#[test]
fn bad_material_is_refused() {
    let req = spiffe_helper();
    let mut m = material(&[]);
    m.chain.clear();
    assert!(matches!(
        RenderedFiles::for_request(&req, &m),
        Err(ArtifactError::EmptyChain)
    ));
    let mut m = material(&[]);
    m.key = Zeroizing::new(Vec::new());
    assert!(matches!(
        RenderedFiles::for_request(&req, &m),
        Err(ArtifactError::EmptyKey)
    ));
    let mut m = material(&[]);
    m.own_bundle.clear();
    assert!(matches!(
        RenderedFiles::for_request(&req, &m),
        Err(ArtifactError::EmptyBundle)
    ));
    // Names that are no trust domain never get this far (the agent's are parsed on
    // arrival); these are trust domains that cannot name a file.
    let long = "a".repeat(250);
    for td in [".tmp-x", "..", long.as_str()] {
        let mut m = material(&[]);
        m.federated
            .insert(TrustDomain::parse(td).unwrap(), vec![vec![1]]);
        assert!(
            matches!(
                RenderedFiles::for_request(&req, &m),
                Err(ArtifactError::InvalidTrustDomain { .. })
            ),
            "{td:?}"
        );
    }
    // In append mode the names never reach the file system, so they are not checked.
    let mut m = material(&[]);
    m.federated
        .insert(TrustDomain::parse(".tmp-x").unwrap(), vec![vec![1]]);
    assert!(
        RenderedFiles::for_request(&request("cert_dir: /x\nfederated_bundles: append\n"), &m)
            .is_ok()
    );
}

#[test]
fn key_buffers_are_exact_and_wiped() {
    let m = material(&["other.org"]);
    for req in [spiffe_helper(), request("cert_dir: /x\nlayout: combined\n")] {
        let mut files = RenderedFiles::for_request(&req, &m).unwrap();
        for file in files.files() {
            // Allocated once at the final size: no reallocation left a copy of the key
            // behind in freed memory.
            assert_eq!(
                file.contents.capacity(),
                file.contents.len(),
                "{}",
                file.name()
            );
        }
        let debug = format!("{files:?} {m:?}");
        let key_b64 = STANDARD.encode(&m.key[..30]);
        assert!(!debug.contains(&key_b64[..40]), "{debug}");
        assert!(debug.contains("redacted"));
        files.zeroize();
        assert!(files.files().iter().all(|f| f.contents().is_empty()));
    }
}

// === writing through RecordingHost ===

#[test]
fn write_order_modes_and_owner() {
    let (host, writer) = fake_writer();
    let dir = writer.create_dir(POD, CTR, None).unwrap();
    assert_eq!(dir.path(), ctr_path());
    assert_eq!((dir.pod_uid(), dir.container_id()), (POD, CTR));
    host.take_ops();

    let m = material(&["other.org"]);
    let files = RenderedFiles::for_request(&spiffe_helper(), &m).unwrap();
    let owner = Owner {
        uid: 1001,
        gid: 1001,
    };
    writer.write(&dir, &files, Some(owner)).unwrap();

    let ops = host.take_ops();
    let mut expected = Vec::new();
    let temps: Vec<String> = (1..=4).map(|i| format!(".tmp-fake{i:06}")).collect();
    for (file, temp) in files.files().iter().zip(&temps) {
        expected.push(Op::WriteFile {
            path: ctr_path().join(temp),
            len: file.contents().len(),
            mode: file.mode(),
        });
        expected.push(Op::Chown {
            path: ctr_path().join(temp),
            uid: 1001,
            gid: 1001,
        });
    }
    for (file, temp) in files.files().iter().zip(&temps) {
        expected.push(Op::Rename {
            dir: ctr_path(),
            from: temp.clone(),
            to: file.name().to_owned(),
        });
    }
    expected.push(Op::FsyncDir { path: ctr_path() });
    assert_eq!(ops, expected);

    for (name, mode) in [
        ("svid_key.pem", 0o600),
        ("svid.pem", 0o644),
        ("svid_bundle.pem", 0o644),
        ("other.org.x509.pem", 0o644),
    ] {
        let node = host.node(ctr_path().join(name)).unwrap();
        assert_eq!(node.mode(), Some(mode), "{name}");
        assert_eq!(node.owner(), Some((1001, 1001)), "{name}");
        assert_eq!(node.contents(), files.get(name).map(RenderedFile::contents));
    }
    assert_eq!(
        host.names(ctr_path()),
        vec![
            "other.org.x509.pem",
            "svid.pem",
            "svid_bundle.pem",
            "svid_key.pem"
        ]
    );
}

#[test]
fn no_owner_leaves_files_to_the_daemon() {
    let (host, writer) = fake_writer();
    let dir = writer.create_dir(POD, CTR, None).unwrap();
    writer
        .deliver(&dir, &spiffe_helper(), &material(&[]), None)
        .unwrap();
    assert!(!host.ops().iter().any(|op| matches!(op, Op::Chown { .. })));
    assert_eq!(
        host.node(ctr_path().join("svid_key.pem")).unwrap().owner(),
        Some((0, 0))
    );
}

#[test]
fn stale_federated_bundles_are_removed_in_separate_mode_only() {
    let (host, writer) = fake_writer();
    let dir = writer.create_dir(POD, CTR, None).unwrap();
    let req = spiffe_helper();
    writer
        .deliver(&dir, &req, &material(&["other.org", "third.example"]), None)
        .unwrap();
    host.plant_file(ctr_path().join("unrelated.txt"), b"x", 0o644, 0);
    host.take_ops();

    writer
        .deliver(&dir, &req, &material(&["other.org"]), None)
        .unwrap();
    let ops = host.take_ops();
    let unlink = Op::Unlink {
        path: ctr_path().join("third.example.x509.pem"),
    };
    let at = ops
        .iter()
        .position(|op| *op == unlink)
        .expect("stale file unlinked");
    // After every rename, before the directory sync.
    assert!(
        ops[..at]
            .iter()
            .filter(|op| matches!(op, Op::Rename { .. }))
            .count()
            == 4
    );
    assert_eq!(ops.last(), Some(&Op::FsyncDir { path: ctr_path() }));
    assert_eq!(
        host.names(ctr_path()),
        vec![
            "other.org.x509.pem",
            "svid.pem",
            "svid_bundle.pem",
            "svid_key.pem",
            "unrelated.txt"
        ]
    );

    // Append mode never deletes `*.x509.pem`: such names are the pod's own there.
    let (host, writer) = fake_writer();
    let dir = writer.create_dir(POD, CTR, None).unwrap();
    host.plant_file(ctr_path().join("mine.x509.pem"), b"x", 0o644, 0);
    let append = request("cert_dir: /x\nfederated_bundles: append\n");
    writer
        .deliver(&dir, &append, &material(&["other.org"]), None)
        .unwrap();
    assert!(host.node(ctr_path().join("mine.x509.pem")).is_some());
}

#[test]
fn leftover_temp_files_are_swept() {
    let (host, writer) = fake_writer();
    let dir = writer.create_dir(POD, CTR, None).unwrap();
    host.plant_file(ctr_path().join(".tmp-crashed"), b"half", 0o600, 0);
    writer
        .deliver(&dir, &spiffe_helper(), &material(&[]), None)
        .unwrap();
    assert!(
        !host
            .names(ctr_path())
            .iter()
            .any(|n| n.starts_with(".tmp-"))
    );
}

type OpMatcher = fn(&Op) -> bool;

/// Fails the `n`th (from 1) op matching `what`.
fn fail_nth(host: &RecordingHost, n: usize, what: OpMatcher) {
    let seen = AtomicUsize::new(0);
    host.fail_when(move |op| what(op) && seen.fetch_add(1, Ordering::SeqCst) + 1 == n);
}

fn snapshot(host: &RecordingHost) -> Vec<(String, Vec<u8>)> {
    host.names(ctr_path())
        .into_iter()
        .map(|n| {
            let c = host.contents(ctr_path().join(&n)).unwrap_or_default();
            (n, c)
        })
        .collect()
}

#[test]
fn failure_while_staging_keeps_every_previous_file() {
    let cases: [(&str, OpMatcher); 2] = [
        ("write of the certificate", |op| {
            matches!(op, Op::WriteFile { .. })
        }),
        ("chown of the certificate", |op| {
            matches!(op, Op::Chown { .. })
        }),
    ];
    for (what, matcher) in cases {
        let (host, writer) = fake_writer();
        let dir = writer.create_dir(POD, CTR, None).unwrap();
        let req = spiffe_helper();
        let owner = Some(Owner { uid: 7, gid: 7 });
        writer
            .deliver(&dir, &req, &material(&["other.org"]), owner)
            .unwrap();
        let before = snapshot(&host);
        host.take_ops();

        // The second staged file is the certificate: the key is already staged by then.
        fail_nth(&host, 2, matcher);
        let err = writer
            .deliver(&dir, &req, &material(&["other.org"]), owner)
            .unwrap_err();
        match &err {
            ArtifactError::Stage { name, error, .. } => {
                assert_eq!(name, "svid.pem", "{what}");
                assert!(matches!(error, HostError::Injected { .. }));
            }
            other => panic!("{what}: {other}"),
        }
        assert_eq!(snapshot(&host), before, "{what}");
        // Nothing was committed: no rename happened in the failed write.
        assert!(
            !host
                .take_ops()
                .iter()
                .any(|op| matches!(op, Op::Rename { .. }))
        );
    }
}

#[test]
fn a_full_file_system_fails_closed_leaves_no_partial_file_and_heals() {
    let (host, writer) = fake_writer();
    let dir = writer.create_dir(POD, CTR, None).unwrap();
    let req = spiffe_helper();
    writer.deliver(&dir, &req, &material(&[]), None).unwrap();
    let before = snapshot(&host);

    // The key fits, the certificate does not: the file system filled up mid-delivery.
    let seen = AtomicUsize::new(0);
    host.fail_with(28, move |op| {
        matches!(op, Op::WriteFile { .. }) && seen.fetch_add(1, Ordering::SeqCst) >= 1
    });
    let err = writer
        .deliver(&dir, &req, &material(&[]), None)
        .unwrap_err();
    assert!(err.is_no_space(), "{err:?}");
    let text = crate::engine::Report(&err).to_string();
    assert!(
        text.contains("staging svid.pem")
            && text.contains("previous files are untouched")
            && text.contains("No space left on device"),
        "{text}"
    );
    assert_eq!(snapshot(&host), before, "no partial or temporary file");

    // Space returns: the next write goes through.
    host.clear_failures();
    let fresh = material(&[]);
    writer.deliver(&dir, &req, &fresh, None).unwrap();
    let files = RenderedFiles::for_request(&req, &fresh).unwrap();
    for file in files.files() {
        assert_eq!(
            host.contents(ctr_path().join(file.name())).unwrap(),
            file.contents()
        );
    }
    assert!(
        !host
            .names(ctr_path())
            .iter()
            .any(|n| n.starts_with(".tmp-"))
    );
}

#[test]
fn failure_while_committing_reports_progress_and_the_next_write_repairs() {
    let (host, writer) = fake_writer();
    let dir = writer.create_dir(POD, CTR, None).unwrap();
    let req = spiffe_helper();
    let old = material(&[]);
    writer.deliver(&dir, &req, &old, None).unwrap();
    let new = material(&[]);
    let new_files = RenderedFiles::for_request(&req, &new).unwrap();

    host.fail_when(|op| matches!(op, Op::Rename { to, .. } if to == "svid.pem"));
    let err = writer.write(&dir, &new_files, None).unwrap_err();
    assert!(
        matches!(&err, ArtifactError::Commit { name, committed: 1, .. } if name == "svid.pem"),
        "{err}"
    );
    // No temp file is left; the key was already replaced (documented), the rest is old.
    assert_eq!(
        host.names(ctr_path()),
        vec!["svid.pem", "svid_bundle.pem", "svid_key.pem"]
    );
    assert_eq!(
        host.contents(ctr_path().join("svid_key.pem")).unwrap(),
        new_files.get("svid_key.pem").unwrap().contents()
    );
    let old_files = RenderedFiles::for_request(&req, &old).unwrap();
    assert_eq!(
        host.contents(ctr_path().join("svid.pem")).unwrap(),
        old_files.get("svid.pem").unwrap().contents()
    );

    host.clear_failures();
    writer.write(&dir, &new_files, None).unwrap();
    for file in new_files.files() {
        assert_eq!(
            host.contents(ctr_path().join(file.name())).unwrap(),
            file.contents()
        );
    }
}

#[test]
fn selinux_label_goes_on_the_dir_and_on_each_temp_file_before_the_rename() {
    let host = Arc::new(RecordingHost::new());
    let writer = ArtifactWriter::new(host.clone(), ROOT);
    let dir = writer.create_dir(POD, CTR, Some(LABEL)).unwrap();
    assert_eq!(
        host.node(ctr_path()).unwrap().xattr(SELINUX_XATTR),
        Some(LABEL.as_bytes())
    );
    host.take_ops();
    writer
        .deliver(&dir, &spiffe_helper(), &material(&[]), None)
        .unwrap();
    let ops = host.take_ops();
    let first_rename = ops
        .iter()
        .position(|op| matches!(op, Op::Rename { .. }))
        .unwrap();
    let labels = ops[..first_rename]
        .iter()
        .filter(|op| matches!(op, Op::SetXattr { name, value, .. } if name == SELINUX_XATTR && value == LABEL.as_bytes()))
        .count();
    assert_eq!(labels, 3);
    for name in ["svid_key.pem", "svid.pem", "svid_bundle.pem"] {
        assert_eq!(
            host.node(ctr_path().join(name))
                .unwrap()
                .xattr(SELINUX_XATTR),
            Some(LABEL.as_bytes())
        );
    }
}

#[test]
fn a_directory_opened_again_is_labelled_again() {
    let host = Arc::new(RecordingHost::new());
    let writer = ArtifactWriter::new(host.clone(), ROOT);
    writer.create_dir(POD, CTR, Some(LABEL)).unwrap();
    host.take_ops();
    let again = writer.create_dir(POD, CTR, Some(LABEL)).unwrap();
    assert_eq!(again.label(), Some(LABEL));
    assert!(host.take_ops().iter().any(
        |op| matches!(op, Op::SetXattr { path, name, value } if path == &ctr_path() && name == SELINUX_XATTR && value == LABEL.as_bytes())
    ));
}

#[test]
fn emptying_keeps_the_directory_and_removes_every_file() {
    let (host, writer) = fake_writer();
    let dir = writer.create_dir(POD, CTR, None).unwrap();
    writer
        .deliver(&dir, &spiffe_helper(), &material(&[]), None)
        .unwrap();
    host.take_ops();
    writer.empty(&dir).unwrap();
    let ops = host.take_ops();
    assert!(
        !ops.iter().any(|op| matches!(
            op,
            Op::RemoveAll { .. } | Op::RemoveDir { .. } | Op::MkdirAt { .. }
        )),
        "the directory itself was touched: {ops:?}"
    );
    assert_eq!(
        ops.iter()
            .filter(|op| matches!(op, Op::Unlink { .. }))
            .count(),
        3
    );
    assert!(host.node(ctr_path()).is_some());
    assert!(host.node(ctr_path().join("svid.pem")).is_none());
}

#[test]
fn sweep_removes_only_what_the_runtime_no_longer_has() {
    let (host, writer) = fake_writer();
    for (pod, ctr) in [("p1", "c1"), ("p1", "c2"), ("p2", "c3")] {
        writer.create_dir(pod, ctr, None).unwrap();
    }
    let live = LiveContainers {
        pods: ["p1".to_owned()].into(),
        containers: [("p1".to_owned(), "c1".to_owned())].into(),
    };
    let mut removed = writer.sweep(&live).unwrap();
    removed.sort();
    assert_eq!(
        removed,
        vec![
            ("p1".to_owned(), Some("c2".to_owned())),
            ("p2".to_owned(), None)
        ]
    );
    assert!(host.node(Path::new(ROOT).join("p1/c1")).is_some());
    assert!(host.node(Path::new(ROOT).join("p1/c2")).is_none());
    assert!(host.node(Path::new(ROOT).join("p2")).is_none());
}

#[test]
fn sweep_removes_a_live_pods_directory_it_emptied_and_keeps_one_with_live_containers() {
    let (host, writer) = fake_writer();
    for (pod, ctr) in [("p1", "c1"), ("p2", "c2"), ("p2", "c3")] {
        writer.create_dir(pod, ctr, None).unwrap();
    }
    // Both pods still exist; p1's only container and one of p2's are gone.
    let live = LiveContainers {
        pods: ["p1".to_owned(), "p2".to_owned()].into(),
        containers: [("p2".to_owned(), "c3".to_owned())].into(),
    };
    writer.sweep(&live).unwrap();
    assert!(host.node(Path::new(ROOT).join("p1")).is_none());
    assert!(host.node(Path::new(ROOT).join("p2/c2")).is_none());
    assert!(host.node(Path::new(ROOT).join("p2/c3")).is_some());
    // A container created in p1 later gets its directory as usual.
    writer.create_dir("p1", "c4", None).unwrap();
    assert!(host.node(Path::new(ROOT).join("p1/c4")).is_some());
}

fn guard_path() -> PathBuf {
    Path::new(ROOT).join(GUARD_DIR).join(GUARD_FILE)
}

#[test]
fn the_guard_is_installed_once_executable_labelled_and_replaced_when_it_differs() {
    let (host, writer) = fake_writer();
    assert_eq!(
        writer.install_guard(b"binary v1", Some(LABEL)).unwrap(),
        guard_path()
    );
    let node = host.node(guard_path()).unwrap();
    assert_eq!(node.contents(), Some(&b"binary v1"[..]));
    assert_eq!(node.mode(), Some(0o755));
    assert_eq!(node.xattr(SELINUX_XATTR), Some(LABEL.as_bytes()));
    assert_eq!(
        host.node(Path::new(ROOT).join(GUARD_DIR)).unwrap().mode(),
        Some(0o700)
    );

    // The same binary again (a daemon restart): nothing is rewritten.
    host.take_ops();
    writer.install_guard(b"binary v1", None).unwrap();
    assert!(
        !host
            .take_ops()
            .iter()
            .any(|op| matches!(op, Op::WriteFile { .. } | Op::Rename { .. })),
        "an identical guard stays in place"
    );
    // A new version (or a longer one that starts the same) replaces it by rename.
    for next in [&b"binary v2"[..], b"binary v1 and more"] {
        writer.install_guard(next, None).unwrap();
        assert_eq!(host.contents(guard_path()).as_deref(), Some(next));
        assert!(
            host.take_ops().iter().any(|op| matches!(
                op,
                Op::Rename { to, .. } if to == GUARD_FILE
            )),
            "replaced atomically"
        );
    }
    // Leftovers of an interrupted install go.
    host.plant_file(
        Path::new(ROOT).join(GUARD_DIR).join(".tmp-left"),
        b"x",
        0o600,
        0,
    );
    writer.install_guard(b"binary v2", None).unwrap();
    assert_eq!(host.names(Path::new(ROOT).join(GUARD_DIR)), [GUARD_FILE]);
}

#[test]
fn a_symlink_in_place_of_the_guard_is_refused() {
    let (host, writer) = fake_writer();
    writer.install_guard(b"g", None).unwrap();
    host.plant_symlink(guard_path(), "/usr/bin/evil");
    assert!(matches!(
        writer.install_guard(b"g", None),
        Err(ArtifactError::Guard {
            error: HostError::NotARegularFile { .. },
            ..
        })
    ));
}

#[test]
fn the_writers_own_names_are_never_a_pods_and_never_swept() {
    let (host, writer) = fake_writer();
    writer.install_guard(b"guard", None).unwrap();
    let err = writer.create_dir(GUARD_DIR, CTR, None).unwrap_err();
    assert!(err.to_string().contains(".guard"), "{err}");
    assert!(err.to_string().contains("keeps for its own files"), "{err}");
    assert!(
        std::error::Error::source(&err).is_none(),
        "the cause is printed, not also exposed"
    );
    writer.remove_pod(GUARD_DIR).unwrap();
    writer.remove_container(GUARD_DIR, GUARD_FILE).unwrap();
    assert!(host.node(guard_path()).is_some());
    writer.create_dir(POD, CTR, None).unwrap();
    let removed = writer.sweep(&LiveContainers::default()).unwrap();
    assert_eq!(removed, vec![(POD.to_owned(), None)]);
    assert_eq!(host.contents(guard_path()).as_deref(), Some(&b"guard"[..]));
}

#[test]
fn the_guard_is_installed_on_a_real_file_system() {
    let dir = std::env::temp_dir().join(format!(
        "nii-guard-install-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let root = dir.join("artifacts");
    let writer = ArtifactWriter::new(Arc::new(RealHost::new()), &root);
    let path = writer.install_guard(b"#!/bin/true\n", None).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
    let inode = meta.ino();
    writer.install_guard(b"#!/bin/true\n", None).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode, "kept");
    writer.install_guard(b"#!/bin/false\n", None).unwrap();
    assert_ne!(std::fs::metadata(&path).unwrap().ino(), inode, "replaced");
    assert_eq!(std::fs::read(&path).unwrap(), b"#!/bin/false\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn remove_takes_the_container_dir_and_the_empty_pod_dir() {
    let (host, writer) = fake_writer();
    let dir = writer.create_dir(POD, CTR, None).unwrap();
    writer
        .deliver(&dir, &spiffe_helper(), &material(&[]), None)
        .unwrap();
    host.take_ops();
    writer.remove(&dir).unwrap();
    assert_eq!(
        host.take_ops(),
        vec![
            Op::RemoveAll { path: ctr_path() },
            Op::RemoveDir {
                path: Path::new(ROOT).join(POD)
            },
        ]
    );
    writer.remove_container(POD, CTR).unwrap();
    assert!(matches!(
        writer.create_dir(POD, "a/b", None),
        Err(ArtifactError::CreateDir { .. })
    ));
}

// === writing through RealHost ===

#[test]
fn real_files_land_with_modes_and_owner() {
    let tmp = TempRoot::new();
    let writer = ArtifactWriter::new(Arc::new(RealHost::new()), tmp.root());
    let dir = writer.create_dir(POD, CTR, None).unwrap();
    let owner = if is_root() {
        Some(Owner {
            uid: 1001,
            gid: 1001,
        })
    } else {
        eprintln!("not root: files stay owned by the test user; chown not checked");
        None
    };
    let m = material(&["other.org"]);
    let req = spiffe_helper();
    writer.deliver(&dir, &req, &m, owner).unwrap();

    let expected_uid = owner.map_or_else(|| rustix::process::geteuid().as_raw(), |o| o.uid);
    let files = RenderedFiles::for_request(&req, &m).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "other.org.x509.pem",
            "svid.pem",
            "svid_bundle.pem",
            "svid_key.pem"
        ]
    );
    for file in files.files() {
        let path = dir.path().join(file.name());
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            file.mode(),
            "{}",
            file.name()
        );
        assert_eq!(meta.uid(), expected_uid, "{}", file.name());
        // Different key material each time `material` runs, so compare with `files`.
        assert_eq!(std::fs::read(&path).unwrap(), file.contents());
    }
    assert_eq!(
        blocks(&std::fs::read(dir.path().join("svid_key.pem")).unwrap()),
        vec![("PRIVATE KEY".to_owned(), m.key.to_vec())]
    );
    assert_eq!(
        std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o7777,
        0o755
    );

    // De-federation deletes the file.
    writer.deliver(&dir, &req, &material(&[]), owner).unwrap();
    assert!(!dir.path().join("other.org.x509.pem").exists());

    writer.remove(&dir).unwrap();
    assert!(!tmp.root().join(POD).exists());
}

#[test]
fn real_symlinked_pod_dir_is_refused() {
    let tmp = TempRoot::new();
    let writer = ArtifactWriter::new(Arc::new(RealHost::new()), tmp.root());
    std::fs::create_dir(tmp.root()).unwrap();
    let elsewhere = tmp.base.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    symlink(&elsewhere, tmp.root().join(POD)).unwrap();
    let err = writer.create_dir(POD, CTR, None).unwrap_err();
    assert!(
        matches!(
            &err,
            ArtifactError::CreateDir {
                error: HostError::NotADirectory { .. },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

#[test]
fn real_symlinked_file_name_is_replaced_not_followed() {
    let tmp = TempRoot::new();
    let writer = ArtifactWriter::new(Arc::new(RealHost::new()), tmp.root());
    let dir = writer.create_dir(POD, CTR, None).unwrap();
    let victim = tmp.base.join("victim");
    std::fs::write(&victim, b"victim").unwrap();
    symlink(&victim, dir.path().join("svid.pem")).unwrap();
    symlink(&victim, dir.path().join("svid_key.pem")).unwrap();
    writer
        .deliver(&dir, &spiffe_helper(), &material(&[]), None)
        .unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
    for name in ["svid.pem", "svid_key.pem"] {
        let meta = std::fs::symlink_metadata(dir.path().join(name)).unwrap();
        assert!(meta.file_type().is_file(), "{name}");
    }
}

#[test]
fn real_failed_commit_leaves_no_temp_files() {
    let tmp = TempRoot::new();
    let writer = ArtifactWriter::new(Arc::new(RealHost::new()), tmp.root());
    let dir = writer.create_dir(POD, CTR, None).unwrap();
    // A non-empty directory where the certificate goes makes its rename fail.
    std::fs::create_dir(dir.path().join("svid.pem")).unwrap();
    std::fs::write(dir.path().join("svid.pem/x"), b"x").unwrap();
    let err = writer
        .deliver(&dir, &spiffe_helper(), &material(&[]), None)
        .unwrap_err();
    assert!(
        matches!(&err, ArtifactError::Commit { name, committed: 1, .. } if name == "svid.pem"),
        "{err}"
    );
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["svid.pem", "svid_key.pem"]);
}

#[test]
fn real_rotations_leave_exactly_the_file_set() {
    let tmp = TempRoot::new();
    let writer = ArtifactWriter::new(Arc::new(RealHost::new()), tmp.root());
    let dir = writer.create_dir(POD, CTR, None).unwrap();
    let req = request("cert_dir: /x\nlayout: combined\n");
    let m = material(&[]);
    for _ in 0..50 {
        writer.deliver(&dir, &req, &m, None).unwrap();
    }
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["credential-bundle.pem", "svid_bundle.pem"]);
}

#[test]
fn spiffe_layout_writes_one_bundle_per_trust_domain_and_the_credentials_last() {
    let req = request("layout: spiffe\n");
    let m = material(&["other.org"]);
    let files = RenderedFiles::for_request(&req, &m).unwrap();
    assert_eq!(
        names_of(&files),
        [
            "other.org.x509.pem",
            "example.org.x509.pem",
            "credential-bundle.private-key.pem"
        ]
    );
    let own = files.get("example.org.x509.pem").unwrap();
    assert_eq!(own.kind(), &RenderedKind::TrustBundle);
    assert_eq!(blocks(own.contents()), certs(&m.own_bundle), "never merged");
    let creds = files.get("credential-bundle.private-key.pem").unwrap();
    let got = blocks(creds.contents());
    assert_eq!(got[0], ("PRIVATE KEY".to_owned(), m.key.to_vec()));
    assert_eq!(got[1..], certs(&m.chain));
    assert_eq!(creds.mode(), 0o600);

    // De-federation deletes the bundle file; the own trust domain's stays.
    let (host, writer) = fake_writer();
    let dir = writer.create_dir(POD, CTR, None).unwrap();
    writer.deliver(&dir, &req, &m, None).unwrap();
    writer.deliver(&dir, &req, &material(&[]), None).unwrap();
    assert_eq!(
        host.names(ctr_path()),
        ["credential-bundle.private-key.pem", "example.org.x509.pem"]
    );
}

#[test]
fn jwt_files_are_written_atomically_and_leave_the_x509_files_alone() {
    let (host, writer) = fake_writer();
    let dir = writer.create_dir(POD, CTR, None).unwrap();
    let req = request("cert_dir: /c\njwt_audience: [a]\n");
    writer
        .deliver(&dir, &req, &material(&["other.org"]), None)
        .unwrap();
    let jwt = req.jwt.as_ref().unwrap();
    host.take_ops();
    let files = RenderedFiles::jwt(
        Some((&jwt.token, "aGVh.cGF5.c2ln")),
        Some((&jwt.bundle, br#"{"keys":[]}"#)),
    )
    .unwrap();
    assert!(files.files()[0].kind().is_secret());
    writer
        .deliver_jwt(&dir, &files, Some(Owner { uid: 7, gid: 7 }))
        .unwrap();
    let ops = host.take_ops();
    assert!(
        ops.iter()
            .any(|op| matches!(op, Op::Rename { to, .. } if to == "jwt_svid.token")),
        "{ops:?}"
    );
    assert_eq!(
        host.names(ctr_path()),
        [
            "jwt_bundle.json",
            "jwt_svid.token",
            "other.org.x509.pem",
            "svid.pem",
            "svid_bundle.pem",
            "svid_key.pem"
        ]
    );
    let token = host.node(ctr_path().join("jwt_svid.token")).unwrap();
    assert_eq!((token.mode(), token.owner()), (Some(0o600), Some((7, 7))));
    assert_eq!(
        host.contents(ctr_path().join("jwt_svid.token")).unwrap(),
        b"aGVh.cGF5.c2ln"
    );

    writer.remove_file(&dir, "jwt_svid.token").unwrap();
    writer.remove_file(&dir, "jwt_svid.token").unwrap();
    assert!(host.node(ctr_path().join("jwt_svid.token")).is_none());
}

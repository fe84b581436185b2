use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use clap::Parser;
use nri_identity_backends::{ContainerInfo, PodInfo};

use super::*;
use crate::annotation::{Policy, parse};
use crate::spire::X509Svid;
use crate::spire::fake::TestCa;

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "nii-guard-{}-{tag}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn svid(ca: &TestCa, path: &str) -> X509Svid {
    ca.mint(path, Duration::from_secs(3600)).unwrap()
}

/// Writes the spiffe-helper files of `cert`'s chain with `key`'s private key.
fn write_files(dir: &Path, cert: &X509Svid, key: &X509Svid, ca: &TestCa) {
    let chain: String = cert
        .cert_chain
        .iter()
        .map(|c| pem("CERTIFICATE", c))
        .collect();
    std::fs::write(dir.join("svid.pem"), chain).unwrap();
    std::fs::write(
        dir.join("svid_key.pem"),
        pem("PRIVATE KEY", &key.private_key),
    )
    .unwrap();
    std::fs::write(
        dir.join("svid_bundle.pem"),
        pem("CERTIFICATE", ca.cert_der()),
    )
    .unwrap();
}

fn spec(dir: &Path) -> GuardSpec {
    GuardSpec {
        cert_dir: dir.to_owned(),
        cert: "svid.pem".into(),
        key: "svid_key.pem".into(),
        files: vec!["svid_bundle.pem".into()],
        spiffe_id: None,
        timeout_ms: 200,
        pod: Some("prod/web".into()),
        container: Some("c0".into()),
        termination_log: None,
    }
}

#[test]
fn matching_files_are_accepted_with_the_expected_spiffe_id() {
    let ca = TestCa::new("example.org").unwrap();
    let dir = temp_dir("ok");
    let s = svid(&ca, "/web");
    write_files(&dir, &s, &s, &ca);
    let spec = GuardSpec {
        spiffe_id: Some("spiffe://example.org/web".into()),
        ..spec(&dir)
    };
    let accepted = check(&spec).unwrap();
    assert_eq!(
        accepted.key,
        KeyMatch::Matches,
        "EC keys carry their public half"
    );
    assert_eq!(accepted.uris, ["spiffe://example.org/web"]);
    assert!(run(&spec));
}

#[test]
fn missing_files_are_named() {
    let ca = TestCa::new("example.org").unwrap();
    let dir = temp_dir("missing");
    assert_eq!(
        check(&spec(&dir)),
        Err(NotReady::Missing(vec![
            "svid.pem".into(),
            "svid_key.pem".into(),
            "svid_bundle.pem".into()
        ]))
    );
    let s = svid(&ca, "/web");
    write_files(&dir, &s, &s, &ca);
    std::fs::remove_file(dir.join("svid_bundle.pem")).unwrap();
    assert_eq!(
        check(&spec(&dir)),
        Err(NotReady::Missing(vec!["svid_bundle.pem".into()]))
    );
}

#[test]
fn a_key_of_another_certificate_is_not_accepted() {
    let ca = TestCa::new("example.org").unwrap();
    let dir = temp_dir("mismatch");
    write_files(&dir, &svid(&ca, "/web"), &svid(&ca, "/web"), &ca);
    let err = check(&spec(&dir)).unwrap_err();
    assert_eq!(
        err,
        NotReady::KeyMismatch {
            key: "svid_key.pem".into(),
            cert: "svid.pem".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "the key in svid_key.pem does not belong to the certificate in svid.pem"
    );
}

#[test]
fn a_certificate_for_another_spiffe_id_is_not_accepted() {
    let ca = TestCa::new("example.org").unwrap();
    let dir = temp_dir("wrongid");
    let s = svid(&ca, "/other");
    write_files(&dir, &s, &s, &ca);
    let spec = GuardSpec {
        spiffe_id: Some("spiffe://example.org/web".into()),
        ..spec(&dir)
    };
    let err = check(&spec).unwrap_err();
    assert!(matches!(err, NotReady::WrongSpiffeId { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "the certificate in svid.pem is for spiffe://example.org/other, not spiffe://example.org/web"
    );
}

#[test]
fn the_combined_layout_holds_key_and_chain_in_one_file() {
    let ca = TestCa::new("example.org").unwrap();
    let dir = temp_dir("combined");
    let s = svid(&ca, "/web");
    let mut combined = pem("PRIVATE KEY", &s.private_key);
    combined.push_str(&pem("CERTIFICATE", &s.cert_chain[0]));
    std::fs::write(dir.join("credential-bundle.pem"), combined).unwrap();
    std::fs::write(
        dir.join("svid_bundle.pem"),
        pem("CERTIFICATE", ca.cert_der()),
    )
    .unwrap();
    let spec = GuardSpec {
        cert: "credential-bundle.pem".into(),
        key: "credential-bundle.pem".into(),
        ..spec(&dir)
    };
    assert_eq!(check(&spec).unwrap().key, KeyMatch::Matches);
}

fn write_fixture(dir: &Path, cert: &str, key: &str) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/guard/testdata");
    std::fs::copy(data.join(cert), dir.join("svid.pem")).unwrap();
    std::fs::copy(data.join(key), dir.join("svid_key.pem")).unwrap();
    std::fs::copy(data.join(cert), dir.join("svid_bundle.pem")).unwrap();
}

#[test]
fn rsa_keys_are_compared_by_modulus_and_exponent() {
    let dir = temp_dir("rsa");
    write_fixture(&dir, "rsa_cert.pem", "rsa_key.pem");
    let accepted = check(&spec(&dir)).unwrap();
    assert_eq!(accepted.key, KeyMatch::Matches);
    assert_eq!(accepted.uris, ["spiffe://example.org/rsa"]);
    write_fixture(&dir, "rsa_cert.pem", "rsa_other_key.pem");
    assert!(matches!(
        check(&spec(&dir)),
        Err(NotReady::KeyMismatch { .. })
    ));
    // An EC key with an RSA certificate: different algorithms never match.
    let ca = TestCa::new("example.org").unwrap();
    std::fs::write(
        dir.join("svid_key.pem"),
        pem("PRIVATE KEY", &svid(&ca, "/x").private_key),
    )
    .unwrap();
    assert!(matches!(
        check(&spec(&dir)),
        Err(NotReady::KeyMismatch { .. })
    ));
}

#[test]
fn a_key_that_cannot_be_compared_without_arithmetic_is_accepted_when_present() {
    // PKCS#8 v1 Ed25519 keys carry no public key; SPIRE never issues them for X509-SVIDs.
    let dir = temp_dir("ed25519");
    write_fixture(&dir, "ed_cert.pem", "ed_key.pem");
    assert_eq!(check(&spec(&dir)).unwrap().key, KeyMatch::Unknown);
}

#[test]
fn garbage_is_not_accepted_and_never_panics() {
    let ca = TestCa::new("example.org").unwrap();
    let dir = temp_dir("garbage");
    let s = svid(&ca, "/web");
    write_files(&dir, &s, &s, &ca);
    std::fs::write(dir.join("svid.pem"), "not a certificate").unwrap();
    assert!(matches!(
        check(&spec(&dir)),
        Err(NotReady::NoPemBlock {
            label: "CERTIFICATE",
            ..
        })
    ));
    std::fs::write(
        dir.join("svid.pem"),
        "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(matches!(
        check(&spec(&dir)),
        Err(NotReady::BadBase64 { .. })
    ));
    // Every truncation and single-byte corruption of the leaf and of the key.
    let leaf = &s.cert_chain[0];
    let key: &[u8] = &s.private_key;
    let mut rng = fastrand::Rng::with_seed(11);
    for (name, label, der) in [
        ("svid.pem", "CERTIFICATE", leaf.as_slice()),
        ("svid_key.pem", "PRIVATE KEY", key),
    ] {
        for _ in 0..300 {
            let mut bad = der.to_vec();
            if rng.bool() {
                bad.truncate(rng.usize(0..bad.len()));
            } else {
                let i = rng.usize(0..bad.len());
                bad[i] = rng.u8(..);
            }
            std::fs::write(dir.join(name), pem(label, &bad)).unwrap();
            let _ = check(&spec(&dir));
        }
        write_files(&dir, &s, &s, &ca);
    }
    std::fs::write(dir.join("svid_key.pem"), vec![b'x'; 2 << 20]).unwrap();
    assert!(matches!(check(&spec(&dir)), Err(NotReady::TooLarge { .. })));
}

#[test]
fn the_guard_waits_for_files_that_arrive_and_accepts_them() {
    let ca = TestCa::new("example.org").unwrap();
    let dir = temp_dir("arrive");
    let s = svid(&ca, "/web");
    let staging = temp_dir("staging");
    write_files(&staging, &s, &s, &ca);
    let (from, to) = (staging.clone(), dir.clone());
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        // As the daemon does: each file appears whole, by rename; key first.
        for name in ["svid_key.pem", "svid.pem", "svid_bundle.pem"] {
            std::fs::rename(from.join(name), to.join(name)).unwrap();
        }
    });
    let spec = GuardSpec {
        timeout_ms: 5000,
        ..spec(&dir)
    };
    let started = Instant::now();
    assert!(wait(&spec).is_ok());
    let waited = started.elapsed();
    writer.join().unwrap();
    assert!(waited >= Duration::from_millis(150), "{waited:?}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
}

#[test]
fn a_timeout_names_the_pod_the_container_the_directory_and_what_is_missing() {
    let dir = temp_dir("timeout");
    let log = dir.join("termination-log");
    std::fs::write(&log, "").unwrap();
    let logged = GuardSpec {
        termination_log: Some(log.clone()),
        ..spec(&dir)
    };
    let started = Instant::now();
    let failure = wait(&logged).unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(200));
    let message = failure.to_string();
    for part in [
        "pod prod/web container c0",
        &dir.display().to_string(),
        "missing svid.pem, svid_key.pem, svid_bundle.pem",
        "not started",
    ] {
        assert!(message.contains(part), "{part} in {message}");
    }
    assert!(!run(&logged));
    let written = std::fs::read_to_string(&log).unwrap();
    assert!(written.contains("missing svid.pem"), "{written}");
    // The guard never creates the file.
    let absent = dir.join("no-such-log");
    assert!(!run(&GuardSpec {
        termination_log: Some(absent.clone()),
        ..spec(&dir)
    }));
    assert!(!absent.exists());
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    spec: GuardSpec,
}

#[test]
fn the_hook_runs_the_guard_subcommand_with_arguments_it_parses_back() {
    let spec = GuardSpec {
        spiffe_id: Some("spiffe://example.org/web".into()),
        pod: Some("prod/-web".into()),
        termination_log: Some("/dev/termination-log".into()),
        files: vec!["b.pem".into(), "td.x509.pem".into()],
        timeout_ms: 60_000,
        ..spec(Path::new("/var/certs"))
    };
    let hook = spec.hook();
    assert_eq!(hook.path, Path::new(CONTAINER_PATH));
    assert_eq!(hook.args[..2], [CONTAINER_PATH, SUBCOMMAND]);
    assert_eq!(hook.timeout_s, 65, "slightly above the guard's own timeout");
    assert!(!hook.env.is_empty(), "the workload's environment stays out");
    let mut argv = vec![CONTAINER_PATH.to_owned()];
    argv.extend(hook.args[2..].iter().cloned());
    assert_eq!(Cli::try_parse_from(argv).unwrap().spec, spec);
    let minimal = GuardSpec {
        spiffe_id: None,
        pod: None,
        container: None,
        termination_log: None,
        ..spec
    };
    let mut argv = vec!["guard".to_owned()];
    argv.extend(minimal.args());
    assert_eq!(Cli::try_parse_from(argv).unwrap().spec, minimal);
}

#[test]
fn the_guard_of_a_container_follows_its_annotation() {
    let policy = Policy::new("/run/spire/admin.sock");
    let pod = PodInfo {
        namespace: "prod".into(),
        name: "web".into(),
        ..Default::default()
    };
    let c = ContainerInfo {
        name: "c0".into(),
        annotations: BTreeMap::from([(
            crate::k8s::TERMINATION_MESSAGE_PATH_ANNOTATION.to_owned(),
            "/dev/termination-log".to_owned(),
        )]),
        ..Default::default()
    };
    let helper = parse(
        "cert_dir: /var/certs\nspiffe_id: spiffe://example.org/web\n",
        &policy,
    )
    .unwrap();
    let g = GuardSpec::for_container(&helper, &pod, &c, Duration::from_secs(30));
    assert_eq!(
        (g.cert.as_str(), g.key.as_str(), g.files.as_slice()),
        (
            "svid.pem",
            "svid_key.pem",
            &["svid_bundle.pem".to_owned()][..]
        )
    );
    assert_eq!(g.spiffe_id.as_deref(), Some("spiffe://example.org/web"));
    assert_eq!(g.pod.as_deref(), Some("prod/web"));
    assert_eq!(
        g.termination_log.as_deref(),
        Some(Path::new("/dev/termination-log"))
    );
    assert_eq!(g.timeout_ms, 30_000);
    let combined = parse("cert_dir: /id\nlayout: combined\n", &policy).unwrap();
    let g = GuardSpec::for_container(&combined, &pod, &ContainerInfo::default(), Duration::ZERO);
    assert_eq!(g.cert, "credential-bundle.pem");
    assert_eq!(g.key, "credential-bundle.pem");
    assert_eq!(g.termination_log, None);
}

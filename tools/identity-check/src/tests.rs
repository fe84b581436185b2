use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;

const TD: &str = "spiffe://example.org";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// PEM of one DER item, in 64-character lines.
fn pem(label: &str, der: &[u8]) -> Vec<u8> {
    let body = encode_base64(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).unwrap());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s.into_bytes()
}

fn encode_base64(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A CA that signs SVIDs; an intermediate's certificate travels in the SVID's chain.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    cert: Vec<u8>,
    chain: Vec<Vec<u8>>,
}

fn ca_params(name: &str) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, name);
    params
}

impl Ca {
    fn root(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = ca_params(name);
        let cert = params.self_signed(&key).unwrap().der().to_vec();
        Ca {
            issuer: rcgen::Issuer::new(params, key),
            cert,
            chain: vec![],
        }
    }

    fn intermediate(&self, name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = ca_params(name);
        let cert = params.signed_by(&key, &self.issuer).unwrap().der().to_vec();
        Ca {
            issuer: rcgen::Issuer::new(params, key),
            cert: cert.clone(),
            chain: vec![cert],
        }
    }

    /// An SVID valid from `from` to `to` seconds around now: (key PEM, chain PEM).
    fn svid(&self, path: &str, from: i64, to: i64) -> (Vec<u8>, Vec<u8>) {
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            format!("{TD}{path}").try_into().unwrap(),
        )];
        params.not_before = epoch + Duration::from_secs((now() + from) as u64);
        params.not_after = epoch + Duration::from_secs((now() + to) as u64);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = params.signed_by(&key, &self.issuer).unwrap().der().to_vec();
        let mut chain = pem("CERTIFICATE", &leaf);
        for c in &self.chain {
            chain.extend(pem("CERTIFICATE", c));
        }
        (pem("PRIVATE KEY", &key.serialize_der()), chain)
    }

    fn bundle(&self) -> Vec<u8> {
        pem("CERTIFICATE", &self.cert)
    }
}

fn separate() -> Layout {
    Layout::spiffe_helper()
}

fn expect(id: &str) -> Expect {
    Expect {
        spiffe_id: Some(format!("{TD}{id}")),
        clock_skew: Duration::from_secs(30),
    }
}

fn snapshot(key: &[u8], chain: &[u8], bundle: &[u8]) -> Snapshot {
    Snapshot::from_parts(key.to_vec(), chain.to_vec(), bundle.to_vec())
}

/// Checks the parts as the spiffe-helper layout, expecting `/web` now.
fn check_web(key: &[u8], chain: &[u8], bundle: &[u8]) -> Result<Identity, CheckError> {
    check(
        &snapshot(key, chain, bundle),
        &separate(),
        &expect("/web"),
        now(),
    )
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "nii-identity-check-{}-{tag}-{}",
        std::process::id(),
        now()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_good_identity_in_the_spiffe_helper_files_passes_and_is_named() {
    let ca = Ca::root("td");
    let (key, chain) = ca.svid("/web", -60, 3600);
    let dir = temp_dir("separate");
    std::fs::write(dir.join("svid.pem"), &chain).unwrap();
    std::fs::write(dir.join("svid_key.pem"), &key).unwrap();
    std::fs::write(dir.join("svid_bundle.pem"), ca.bundle()).unwrap();
    let snap = Snapshot::read(&dir, &separate()).unwrap();
    let id = check(&snap, &separate(), &expect("/web"), now()).unwrap();
    assert_eq!(id.spiffe_id, "spiffe://example.org/web");
    assert_eq!((id.chain_len, id.bundle_len), (1, 1));
    assert!((3590..=3600).contains(&id.expires_in), "{}", id.expires_in);
    assert!(!id.serial.is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_combined_layout_reads_key_and_chain_from_one_file() {
    let ca = Ca::root("td");
    let (key, chain) = ca.svid("/web", -60, 3600);
    let dir = temp_dir("combined");
    let mut both = key;
    both.extend(chain);
    std::fs::write(dir.join("credential-bundle.pem"), &both).unwrap();
    std::fs::write(dir.join("svid_bundle.pem"), ca.bundle()).unwrap();
    let layout = Layout::combined();
    let snap = Snapshot::read(&dir, &layout).unwrap();
    check(&snap, &layout, &expect("/web"), now()).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_key_of_another_certificate_is_a_mismatch() {
    let ca = Ca::root("td");
    let (_, chain) = ca.svid("/web", -60, 3600);
    let (other_key, _) = ca.svid("/web", -60, 3600);
    let e = check_web(&other_key, &chain, &ca.bundle()).unwrap_err();
    assert!(e.is_mismatch(), "{e}");
}

#[test]
fn another_spiffe_id_is_refused() {
    let ca = Ca::root("td");
    let (key, chain) = ca.svid("/db", -60, 3600);
    let e = check_web(&key, &chain, &ca.bundle()).unwrap_err();
    assert_eq!(
        e,
        CheckError::WrongSpiffeId {
            expected: "spiffe://example.org/web".into(),
            got: "spiffe://example.org/db".into()
        }
    );
}

#[test]
fn validity_is_checked_with_skew_for_a_clock_that_lags() {
    let ca = Ca::root("td");
    let (key, chain) = ca.svid("/web", -3600, -10);
    let e = check_web(&key, &chain, &ca.bundle()).unwrap_err();
    assert!(matches!(e, CheckError::Expired { .. }), "{e}");

    // Issued 20 s "in the future": this clock lags; within the skew it passes.
    let (key, chain) = ca.svid("/web", 20, 3600);
    let snap = snapshot(&key, &chain, &ca.bundle());
    check(&snap, &separate(), &expect("/web"), now()).unwrap();
    let strict = Expect {
        clock_skew: Duration::ZERO,
        ..expect("/web")
    };
    let e = check(&snap, &separate(), &strict, now()).unwrap_err();
    assert!(matches!(e, CheckError::NotYetValid { .. }), "{e}");
}

#[test]
fn the_chain_must_reach_the_bundle_through_its_intermediates() {
    let root = Ca::root("root");
    let mid = root.intermediate("mid");
    let (key, chain) = mid.svid("/web", -60, 3600);
    let id = check_web(&key, &chain, &root.bundle()).unwrap();
    assert_eq!(id.chain_len, 2);

    // Without the intermediate in the chain file, nothing links the leaf to the root.
    let leaf_only = {
        let marker = b"-----END CERTIFICATE-----\n";
        let end = chain
            .windows(marker.len())
            .position(|w| w == marker)
            .unwrap()
            + marker.len();
        chain[..end].to_vec()
    };
    let e = check_web(&key, &leaf_only, &root.bundle()).unwrap_err();
    assert!(matches!(e, CheckError::Chain { .. }), "{e}");

    // A bundle of another trust domain's CA does not verify it either.
    let other = Ca::root("root");
    let e = check_web(&key, &chain, &other.bundle()).unwrap_err();
    assert!(matches!(e, CheckError::Chain { .. }), "{e}");
}

#[test]
fn missing_files_and_blocks_are_named() {
    let dir = temp_dir("missing");
    let e = Snapshot::read(&dir, &separate()).unwrap_err();
    assert!(e.to_string().contains("svid_key.pem"), "{e}");
    let ca = Ca::root("td");
    let (_, chain) = ca.svid("/web", -60, 3600);
    let e = check_web(b"", &chain, &ca.bundle()).unwrap_err();
    assert_eq!(
        e,
        CheckError::KeyCount {
            file: "svid_key.pem".into(),
            found: 0
        }
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn identity(serial: &str) -> Identity {
    Identity {
        spiffe_id: format!("{TD}/web"),
        serial: serial.into(),
        not_after: 1_000_060,
        expires_in: 60,
        chain_len: 1,
        bundle_len: 1,
    }
}

fn mismatch() -> CheckError {
    CheckError::Mismatch {
        key: "k".into(),
        cert: "c".into(),
    }
}

#[test]
fn a_torn_read_of_the_combined_file_breaks_the_watch() {
    let mut w = Watch::new(&Layout::combined(), Duration::from_secs(3));
    assert_eq!(w.observe(Ok(identity("01")), 0).len(), 1);
    let lines = w.observe(Err(mismatch()), 10);
    assert!(lines[0].starts_with("TORN"), "{lines:?}");
    w.observe(Ok(identity("01")), 20);
    assert!(!w.ok());
    assert!(w.summary().starts_with("summary FAIL"), "{}", w.summary());
}

#[test]
fn separate_files_may_mismatch_briefly_and_must_converge() {
    let mut w = Watch::new(&separate(), Duration::from_millis(500));
    w.observe(Ok(identity("01")), 0);
    assert!(w.observe(Err(mismatch()), 100).is_empty());
    assert!(w.observe(Err(mismatch()), 110).is_empty());
    let lines = w.observe(Ok(identity("02")), 130);
    assert_eq!(lines[0], "converged after 30 ms (2 mismatched reads)");
    assert!(lines[1].starts_with("seen spiffe_id=spiffe://example.org/web serial=02"));
    assert!(w.ok());
    assert_eq!(
        w.summary(),
        "summary ok reads=4 serials=2 torn=2 max_converge_ms=30 errors=0"
    );

    // A mismatch that outlives the bound is reported once and fails the watch.
    w.observe(Err(mismatch()), 1000);
    assert_eq!(w.observe(Err(mismatch()), 1600).len(), 1);
    assert!(w.observe(Err(mismatch()), 1700).is_empty());
    assert!(!w.ok());
}

#[test]
fn other_failures_fail_the_watch_and_print_once_while_they_last() {
    let mut w = Watch::new(&separate(), Duration::from_secs(3));
    let e = CheckError::Expired { ago: 1 };
    assert_eq!(w.observe(Err(e.clone()), 0).len(), 1);
    assert!(w.observe(Err(e), 10).is_empty());
    w.observe(Ok(identity("01")), 20);
    assert!(!w.ok());
}

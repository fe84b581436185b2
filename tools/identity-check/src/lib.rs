//! A delivered SPIFFE identity as the workload sees it: the files of one identity directory
//! (the spiffe-helper layout or `layout: combined`) read and checked the way a careful
//! workload would — one SPIFFE ID in the leaf, the expected one, valid now, the private key
//! the leaf's, the chain signed up to a certificate of the trust bundle.
//!
//! [`Watch`] turns repeated checks into the invariants the daemon promises about rotations:
//! with the combined layout one read always yields a matching key and certificate; with
//! separate files a reader can catch the two renames apart, and a mismatch must resolve.
//!
//! Kept small and free of the daemon's code on purpose: it is built static and copied into
//! containers and VM guests, and it checks the daemon's output without sharing its parsing.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair, RsaKeyPair,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::pem::Pem;
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

/// The daemon's default file names (the spiffe-helper names, and the combined layout's).
pub const DEFAULT_CERT: &str = "svid.pem";
pub const DEFAULT_KEY: &str = "svid_key.pem";
pub const DEFAULT_BUNDLE: &str = "svid_bundle.pem";
pub const DEFAULT_CREDENTIALS: &str = "credential-bundle.pem";

/// Which files hold the identity, by the annotation's `layout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Key, certificate chain and bundle in three files, replaced one after the other.
    Separate {
        cert: String,
        key: String,
        bundle: String,
    },
    /// The key then the chain in one file, replaced by one rename; the bundle apart.
    Combined { credentials: String, bundle: String },
}

impl Layout {
    /// The spiffe-helper file names, the daemon's defaults.
    pub fn spiffe_helper() -> Layout {
        Layout::Separate {
            cert: DEFAULT_CERT.into(),
            key: DEFAULT_KEY.into(),
            bundle: DEFAULT_BUNDLE.into(),
        }
    }

    /// The combined layout's default names.
    pub fn combined() -> Layout {
        Layout::Combined {
            credentials: DEFAULT_CREDENTIALS.into(),
            bundle: DEFAULT_BUNDLE.into(),
        }
    }

    pub fn is_combined(&self) -> bool {
        matches!(self, Layout::Combined { .. })
    }

    fn key_file(&self) -> &str {
        match self {
            Layout::Separate { key, .. } => key,
            Layout::Combined { credentials, .. } => credentials,
        }
    }

    fn cert_file(&self) -> &str {
        match self {
            Layout::Separate { cert, .. } => cert,
            Layout::Combined { credentials, .. } => credentials,
        }
    }

    fn bundle_file(&self) -> &str {
        match self {
            Layout::Separate { bundle, .. } | Layout::Combined { bundle, .. } => bundle,
        }
    }
}

/// One read of the directory: the PEM text behind the key, the chain and the bundle.
#[derive(Clone, PartialEq, Eq)]
pub struct Snapshot {
    key: Vec<u8>,
    chain: Vec<u8>,
    bundle: Vec<u8>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("key", &"<redacted>")
            .field("chain_bytes", &self.chain.len())
            .field("bundle_bytes", &self.bundle.len())
            .finish()
    }
}

impl Snapshot {
    /// Reads the files of `layout` in `dir`: the key before the certificate (the daemon
    /// renames them in that order), each file once.
    pub fn read(dir: &Path, layout: &Layout) -> Result<Snapshot, CheckError> {
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| CheckError::Read {
                file: name.to_owned(),
                reason: e.to_string(),
            })
        };
        let (key, chain) = match layout {
            Layout::Separate { cert, key, .. } => {
                let k = read(key)?;
                (k, read(cert)?)
            }
            Layout::Combined { credentials, .. } => {
                let both = read(credentials)?;
                (both.clone(), both)
            }
        };
        Ok(Snapshot {
            key,
            chain,
            bundle: read(layout.bundle_file())?,
        })
    }

    /// A snapshot from file contents already in memory.
    pub fn from_parts(key: Vec<u8>, chain: Vec<u8>, bundle: Vec<u8>) -> Snapshot {
        Snapshot { key, chain, bundle }
    }
}

/// What the identity must be.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// The SPIFFE ID the leaf must carry; any single one when `None`.
    pub spiffe_id: Option<String>,
    /// How far this clock may lag the issuer's when checking `notBefore` (a VM guest's clock
    /// is set from the host's at boot and can fall behind).
    pub clock_skew: Duration,
}

/// A checked identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub spiffe_id: String,
    /// The leaf's serial number, hex.
    pub serial: String,
    /// When the leaf expires (seconds since the epoch), and how long until then.
    pub not_after: i64,
    pub expires_in: i64,
    /// Certificates in the chain file (leaf first) and in the bundle.
    pub chain_len: usize,
    pub bundle_len: usize,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe_id={} serial={} not_after={} expires_in={}s chain={} bundle={}",
            self.spiffe_id,
            self.serial,
            self.not_after,
            self.expires_in,
            self.chain_len,
            self.bundle_len
        )
    }
}

/// Why a directory does not hold a good identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckError {
    Read {
        file: String,
        reason: String,
    },
    Pem {
        file: String,
        reason: String,
    },
    NoCertificate {
        file: String,
    },
    /// Not exactly one `PRIVATE KEY` block.
    KeyCount {
        file: String,
        found: usize,
    },
    Certificate {
        file: String,
        reason: String,
    },
    Key {
        file: String,
        reason: String,
    },
    UnsupportedKey {
        algorithm: String,
    },
    /// The private key is not the leaf certificate's: a torn read with separate files.
    Mismatch {
        key: String,
        cert: String,
    },
    SpiffeIdCount {
        found: usize,
    },
    WrongSpiffeId {
        expected: String,
        got: String,
    },
    LeafIsCa,
    NotYetValid {
        starts_in: i64,
    },
    Expired {
        ago: i64,
    },
    NoBundle {
        file: String,
    },
    Chain {
        reason: String,
    },
}

impl CheckError {
    /// Whether this is the key/certificate mismatch a torn read produces.
    pub fn is_mismatch(&self) -> bool {
        matches!(self, CheckError::Mismatch { .. })
    }
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckError::Read { file, reason } => write!(f, "cannot read {file}: {reason}"),
            CheckError::Pem { file, reason } => write!(f, "{file} is not PEM: {reason}"),
            CheckError::NoCertificate { file } => write!(f, "{file} holds no CERTIFICATE"),
            CheckError::KeyCount { file, found } => {
                write!(f, "{file} holds {found} PRIVATE KEY blocks, expected one")
            }
            CheckError::Certificate { file, reason } => {
                write!(f, "unreadable certificate in {file}: {reason}")
            }
            CheckError::Key { file, reason } => write!(f, "unreadable key in {file}: {reason}"),
            CheckError::UnsupportedKey { algorithm } => {
                write!(f, "unsupported public key algorithm {algorithm}")
            }
            CheckError::Mismatch { key, cert } => {
                write!(
                    f,
                    "the key in {key} is not the leaf certificate's in {cert}"
                )
            }
            CheckError::SpiffeIdCount { found } => {
                write!(f, "the leaf carries {found} spiffe:// URIs, expected one")
            }
            CheckError::WrongSpiffeId { expected, got } => {
                write!(f, "SPIFFE ID {got}, expected {expected}")
            }
            CheckError::LeafIsCa => write!(f, "the leaf is a CA certificate"),
            CheckError::NotYetValid { starts_in } => {
                write!(f, "the leaf is valid only in {starts_in} s")
            }
            CheckError::Expired { ago } => write!(f, "the leaf expired {ago} s ago"),
            CheckError::NoBundle { file } => write!(f, "{file} holds no CA certificate"),
            CheckError::Chain { reason } => write!(f, "the chain does not verify: {reason}"),
        }
    }
}

impl std::error::Error for CheckError {}

/// DER contents of the `label` blocks in `pem`.
fn blocks(file: &str, pem: &[u8], label: &str) -> Result<Vec<Vec<u8>>, CheckError> {
    let mut out = Vec::new();
    for block in Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| CheckError::Pem {
            file: file.to_owned(),
            reason: e.to_string(),
        })?;
        if block.label == label {
            out.push(block.contents);
        }
    }
    Ok(out)
}

fn parse<'a>(file: &str, der: &'a [u8]) -> Result<X509Certificate<'a>, CheckError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(CheckError::Certificate {
            file: file.to_owned(),
            reason: "trailing bytes".into(),
        }),
        Err(e) => Err(CheckError::Certificate {
            file: file.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// Checks one snapshot against `expect` at `now` (seconds since the epoch).
pub fn check(
    snapshot: &Snapshot,
    layout: &Layout,
    expect: &Expect,
    now: i64,
) -> Result<Identity, CheckError> {
    let (cert_file, key_file, bundle_file) =
        (layout.cert_file(), layout.key_file(), layout.bundle_file());
    let chain = blocks(cert_file, &snapshot.chain, "CERTIFICATE")?;
    if chain.is_empty() {
        return Err(CheckError::NoCertificate {
            file: cert_file.to_owned(),
        });
    }
    let keys = blocks(key_file, &snapshot.key, "PRIVATE KEY")?;
    let [key] = keys.as_slice() else {
        return Err(CheckError::KeyCount {
            file: key_file.to_owned(),
            found: keys.len(),
        });
    };
    let certs = chain
        .iter()
        .map(|der| parse(cert_file, der))
        .collect::<Result<Vec<_>, _>>()?;
    let (leaf, intermediates) = certs.split_first().ok_or(CheckError::NoCertificate {
        file: cert_file.to_owned(),
    })?;
    if !key_matches(leaf.public_key(), key, key_file)? {
        return Err(CheckError::Mismatch {
            key: key_file.to_owned(),
            cert: cert_file.to_owned(),
        });
    }

    let ids = spiffe_ids(leaf, cert_file)?;
    let [spiffe_id] = ids.as_slice() else {
        return Err(CheckError::SpiffeIdCount { found: ids.len() });
    };
    if let Some(expected) = &expect.spiffe_id
        && expected != spiffe_id
    {
        return Err(CheckError::WrongSpiffeId {
            expected: expected.clone(),
            got: spiffe_id.clone(),
        });
    }
    if leaf.is_ca() {
        return Err(CheckError::LeafIsCa);
    }
    let skew = i64::try_from(expect.clock_skew.as_secs()).unwrap_or(i64::MAX);
    let validity = leaf.validity();
    let starts = validity.not_before.timestamp();
    if starts > now.saturating_add(skew) {
        return Err(CheckError::NotYetValid {
            starts_in: starts - now,
        });
    }
    let expires = validity.not_after.timestamp();
    if expires <= now {
        return Err(CheckError::Expired { ago: now - expires });
    }

    let bundle_der = blocks(bundle_file, &snapshot.bundle, "CERTIFICATE")?;
    if bundle_der.is_empty() {
        return Err(CheckError::NoBundle {
            file: bundle_file.to_owned(),
        });
    }
    let anchors = bundle_der
        .iter()
        .map(|der| parse(bundle_file, der))
        .collect::<Result<Vec<_>, _>>()?;
    verify_chain(leaf, intermediates, &anchors, now, skew)?;

    Ok(Identity {
        spiffe_id: spiffe_id.clone(),
        serial: leaf
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        not_after: expires,
        expires_in: expires - now,
        chain_len: chain.len(),
        bundle_len: anchors.len(),
    })
}

fn spiffe_ids(leaf: &X509Certificate<'_>, file: &str) -> Result<Vec<String>, CheckError> {
    let san = leaf
        .subject_alternative_name()
        .map_err(|e| CheckError::Certificate {
            file: file.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                        Some((*uri).to_owned())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Whether the PKCS#8 key `pkcs8` is the private half of `spki`.
fn key_matches(
    spki: &SubjectPublicKeyInfo<'_>,
    pkcs8: &[u8],
    file: &str,
) -> Result<bool, CheckError> {
    let rejected = |e: ring::error::KeyRejected| CheckError::Key {
        file: file.to_owned(),
        reason: e.to_string(),
    };
    let algorithm = &spki.algorithm.algorithm;
    let public: Vec<u8> = if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        let signing = match curve {
            Some(c) if c == OID_EC_P256 => &ECDSA_P256_SHA256_ASN1_SIGNING,
            Some(c) if c == OID_NIST_EC_P384 => &ECDSA_P384_SHA384_ASN1_SIGNING,
            other => {
                return Err(CheckError::UnsupportedKey {
                    algorithm: format!("EC curve {other:?}"),
                });
            }
        };
        EcdsaKeyPair::from_pkcs8(signing, pkcs8, &SystemRandom::new())
            .map_err(rejected)?
            .public_key()
            .as_ref()
            .to_vec()
    } else if *algorithm == OID_PKCS1_RSAENCRYPTION {
        RsaKeyPair::from_pkcs8(pkcs8)
            .map_err(rejected)?
            .public()
            .as_ref()
            .to_vec()
    } else if *algorithm == OID_SIG_ED25519 {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(rejected)?
            .public_key()
            .as_ref()
            .to_vec()
    } else {
        return Err(CheckError::UnsupportedKey {
            algorithm: algorithm.to_id_string(),
        });
    };
    Ok(public.as_slice() == spki.subject_public_key.data.as_ref())
}

/// Walks from the leaf through the chain's intermediates to a bundle certificate, each link
/// a verified signature by the next certificate's key.
fn verify_chain(
    leaf: &X509Certificate<'_>,
    intermediates: &[X509Certificate<'_>],
    anchors: &[X509Certificate<'_>],
    now: i64,
    skew: i64,
) -> Result<(), CheckError> {
    let signed_by = |cert: &X509Certificate<'_>, by: &X509Certificate<'_>| {
        cert.issuer().as_raw() == by.subject().as_raw()
            && cert.verify_signature(Some(by.public_key())).is_ok()
    };
    let valid = |c: &X509Certificate<'_>| {
        let v = c.validity();
        v.not_before.timestamp() <= now.saturating_add(skew) && now < v.not_after.timestamp()
    };
    let mut current = leaf;
    for _ in 0..=intermediates.len() {
        if let Some(anchor) = anchors.iter().find(|a| signed_by(current, a)) {
            if !valid(anchor) {
                return Err(CheckError::Chain {
                    reason: format!("the bundle's CA {} is not valid now", anchor.subject()),
                });
            }
            return Ok(());
        }
        let next = intermediates
            .iter()
            .find(|c| signed_by(current, c))
            .ok_or_else(|| CheckError::Chain {
                reason: format!(
                    "no certificate of the chain or the bundle signed {}",
                    current.subject()
                ),
            })?;
        if !next.is_ca() || !valid(next) {
            return Err(CheckError::Chain {
                reason: format!("intermediate {} is not a valid CA", next.subject()),
            });
        }
        current = next;
    }
    Err(CheckError::Chain {
        reason: "the chain loops".into(),
    })
}

/// Repeated checks of one directory while it is rotated, and the invariants they prove.
#[derive(Debug)]
pub struct Watch {
    combined: bool,
    converge: Duration,
    reads: u64,
    serials: u64,
    /// Reads whose key was not the certificate's.
    torn: u64,
    /// Failures other than a key/certificate mismatch, and mismatches that did not resolve.
    errors: u64,
    last_serial: Option<String>,
    last_error: Option<CheckError>,
    /// Since when (milliseconds on the caller's clock), and for how many reads, key and
    /// certificate have differed.
    torn_since: Option<(u64, u64)>,
    stuck_reported: bool,
    max_converge_ms: u64,
}

impl Watch {
    /// `converge`: how long separate files may show a mismatched pair.
    pub fn new(layout: &Layout, converge: Duration) -> Watch {
        Watch {
            combined: layout.is_combined(),
            converge,
            reads: 0,
            serials: 0,
            torn: 0,
            errors: 0,
            last_serial: None,
            last_error: None,
            torn_since: None,
            stuck_reported: false,
            max_converge_ms: 0,
        }
    }

    /// Takes the result of one read at `at_ms` (any monotonic millisecond clock) and returns
    /// the lines worth printing.
    pub fn observe(&mut self, result: Result<Identity, CheckError>, at_ms: u64) -> Vec<String> {
        self.reads += 1;
        let mut lines = Vec::new();
        match result {
            Ok(identity) => {
                self.last_error = None;
                if let Some((since, reads)) = self.torn_since.take() {
                    let took = at_ms.saturating_sub(since);
                    self.max_converge_ms = self.max_converge_ms.max(took);
                    lines.push(format!(
                        "converged after {took} ms ({reads} mismatched reads)"
                    ));
                }
                if self.last_serial.as_deref() != Some(identity.serial.as_str()) {
                    self.serials += 1;
                    self.last_serial = Some(identity.serial.clone());
                    lines.push(format!(
                        "seen {identity} reads={} torn={}",
                        self.reads, self.torn
                    ));
                }
            }
            Err(e) if e.is_mismatch() => {
                self.torn += 1;
                if self.combined {
                    // One file, one rename: this must never happen.
                    self.errors += 1;
                    lines.push(format!("TORN {e}"));
                } else {
                    let (since, reads) = self.torn_since.get_or_insert((at_ms, 0));
                    *reads += 1;
                    let waited = at_ms.saturating_sub(*since);
                    if waited > self.converge.as_millis() as u64 && !self.stuck_reported {
                        self.stuck_reported = true;
                        self.errors += 1;
                        lines.push(format!("FAIL {e}, still after {waited} ms"));
                    }
                }
            }
            Err(e) => {
                self.errors += 1;
                if self.last_error.as_ref() != Some(&e) {
                    lines.push(format!("FAIL {e}"));
                    self.last_error = Some(e);
                }
            }
        }
        lines
    }

    /// Whether every invariant held so far.
    pub fn ok(&self) -> bool {
        self.errors == 0 && self.serials > 0
    }

    /// The closing line.
    pub fn summary(&self) -> String {
        format!(
            "summary {} reads={} serials={} torn={} max_converge_ms={} errors={}",
            if self.ok() { "ok" } else { "FAIL" },
            self.reads,
            self.serials,
            self.torn,
            self.max_converge_ms,
            self.errors
        )
    }
}

#[cfg(test)]
mod tests;

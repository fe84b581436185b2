//! The start guard: a check the container runtime itself runs before a container's workload,
//! so that an annotated container never runs without its identity even when the daemon is
//! not there to fail its start (it died between CreateContainer and StartContainer, or the
//! runtime ignores StartContainer errors).
//!
//! It is the daemon's own static binary, run as the `guard` subcommand by an OCI
//! `startContainer` hook that CreateContainer adds next to the identity mount. The runtime
//! runs such a hook in the container's namespaces, as the container's user, after the start
//! call and just before executing the workload; if it fails, the container's init exits
//! without ever executing the workload. The binary is made visible in the container by a
//! read-only bind mount of a copy the daemon keeps under its artifact root
//! ([`crate::artifacts::ArtifactWriter::install_guard`]), at [`CONTAINER_PATH`], so it needs
//! nothing from the image: it works in `FROM scratch` images and on read-only root file
//! systems.
//!
//! The guard waits, within its own timeout, until every file the annotation names is present
//! in `cert_dir` (files appear by `rename`, so a present file is a complete one, and the trust
//! bundle comes last, after any federated bundles of the same delivery), the key
//! belongs to the leaf certificate and, where the annotation names a `spiffe_id`, the leaf
//! carries it. It reads DER structure only ([`x509`]); it checks no signature. It starts no
//! async runtime and loads no configuration: it runs on every start.

use crate::der::x509;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use nri_identity_backends::{ContainerInfo, HookSpec, PodInfo};
use zeroize::Zeroizing;

use crate::annotation::{FileSet, IdentityRequest};
use crate::der::DerError;

pub use crate::der::x509::KeyMatch;

/// Where the guard binary appears in every guarded container: in the root directory, under a
/// name no image uses.
pub const CONTAINER_PATH: &str = "/.nri-identity-injector-guard";
/// The subcommand the hook runs.
pub const SUBCOMMAND: &str = "guard";
/// The runtime kills a hook that outlives its OCI `timeout`; the guard gives up this much
/// earlier, so that its own message, not the runtime's, says why the container did not start.
pub const HOOK_TIMEOUT_MARGIN: Duration = Duration::from_secs(5);
/// How often the guard looks again while files are missing.
const POLL: Duration = Duration::from_millis(20);
/// No identity file comes near this; a bigger one is not ours.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// What the guard waits for: its command line, as the hook passes it.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct GuardSpec {
    /// The directory the files appear in, inside the container.
    #[arg(long)]
    pub cert_dir: PathBuf,
    /// The file whose first CERTIFICATE block is the leaf.
    #[arg(long)]
    pub cert: String,
    /// The file holding the PRIVATE KEY block (the same file as --cert in the combined
    /// layout).
    #[arg(long)]
    pub key: String,
    /// Further files that must be present (the trust bundle).
    #[arg(long = "file")]
    pub files: Vec<String>,
    /// The SPIFFE ID the leaf must carry.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// How long to wait for the files before failing the container's start.
    #[arg(long)]
    pub timeout_ms: u64,
    /// `namespace/name` of the pod, for messages.
    #[arg(long)]
    pub pod: Option<String>,
    /// The container's name, for messages.
    #[arg(long)]
    pub container: Option<String>,
    /// A file (Kubernetes' termination message file) that also receives the failure message.
    #[arg(long)]
    pub termination_log: Option<PathBuf>,
}

impl GuardSpec {
    /// The guard for `request` of container `c` in `pod`, waiting up to `timeout`.
    pub fn for_container(
        request: &IdentityRequest,
        pod: &PodInfo,
        c: &ContainerInfo,
        timeout: Duration,
    ) -> GuardSpec {
        let (cert, key, bundle) = match &request.files {
            FileSet::SpiffeHelper { svid, key, bundle } => (svid, key, bundle),
            FileSet::Combined {
                credentials,
                bundle,
            } => (credentials, credentials, bundle),
            // Written after the trust bundles, so its arrival means the whole set arrived.
            FileSet::Spiffe { credentials, .. } => (credentials, credentials, credentials),
        };
        GuardSpec {
            cert_dir: request.cert_dir.clone(),
            cert: cert.name.clone(),
            key: key.name.clone(),
            files: vec![bundle.name.clone()],
            spiffe_id: request.spiffe_id.as_ref().map(|id| id.as_str().to_owned()),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            pod: Some(format!("{}/{}", pod.namespace, pod.name)),
            container: Some(c.name.clone()),
            termination_log: crate::k8s::termination_message_path(c).map(PathBuf::from),
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The arguments after the subcommand, as [`GuardSpec`] parses them.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--cert-dir".to_owned(),
            self.cert_dir.to_string_lossy().into_owned(),
            "--cert".to_owned(),
            self.cert.clone(),
            "--key".to_owned(),
            self.key.clone(),
        ];
        for file in &self.files {
            args.extend(["--file".to_owned(), file.clone()]);
        }
        let optional = [
            ("--spiffe-id", self.spiffe_id.clone()),
            ("--pod", self.pod.clone()),
            ("--container", self.container.clone()),
            (
                "--termination-log",
                self.termination_log
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
            ),
        ];
        for (flag, value) in optional {
            if let Some(value) = value {
                // `--flag=value`: a value starting with '-' stays a value.
                args.push(format!("{flag}={value}"));
            }
        }
        args.push(format!("--timeout-ms={}", self.timeout_ms));
        args
    }

    /// The OCI `startContainer` hook that runs this guard from [`CONTAINER_PATH`].
    pub fn hook(&self) -> HookSpec {
        let mut args = vec![CONTAINER_PATH.to_owned(), SUBCOMMAND.to_owned()];
        args.extend(self.args());
        let timeout = self.timeout() + HOOK_TIMEOUT_MARGIN;
        HookSpec {
            path: PathBuf::from(CONTAINER_PATH),
            args,
            // Hooks without an environment get the workload's (runc): the guard needs none,
            // and a fixed one keeps the workload's settings out of it.
            env: vec!["NRI_IDENTITY_GUARD=1".to_owned()],
            timeout_s: u32::try_from(timeout.as_secs().max(1)).unwrap_or(u32::MAX),
        }
    }

    /// Who the guard is for, as messages name it.
    fn subject(&self) -> String {
        match (&self.pod, &self.container) {
            (Some(p), Some(c)) => format!("pod {p} container {c}: "),
            (Some(p), None) => format!("pod {p}: "),
            (None, Some(c)) => format!("container {c}: "),
            (None, None) => String::new(),
        }
    }
}

/// Why the files are not (yet) what the container needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("missing {}", .0.join(", "))]
    Missing(Vec<String>),
    #[error("cannot read {file}: {error}")]
    Unreadable { file: String, error: String },
    #[error("{file} is over {MAX_FILE_BYTES} bytes")]
    TooLarge { file: String },
    #[error("{file} holds no PEM {label} block")]
    NoPemBlock { file: String, label: &'static str },
    #[error("{file}: a PEM {label} block is not valid base64")]
    BadBase64 { file: String, label: &'static str },
    #[error("{file}: {what} is not valid DER: {error}")]
    BadDer {
        file: String,
        what: &'static str,
        error: DerError,
    },
    #[error("the key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { key: String, cert: String },
    #[error("the certificate in {file} is for {}, not {expected}", if found.is_empty() { "no SPIFFE ID".to_owned() } else { found.join(", ") })]
    WrongSpiffeId {
        file: String,
        expected: String,
        found: Vec<String>,
    },
}

/// The guard gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardFailure {
    /// Pod and container, as far as known, ending in `": "`.
    pub subject: String,
    pub cert_dir: PathBuf,
    pub waited: Duration,
    pub reason: NotReady,
}

impl fmt::Display for GuardFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "nri-identity-injector guard: {}the SPIFFE identity in {} was not ready after {:.1}s, so the workload was not started: {} (the nri-identity-injector daemon on this node delivers it: is it running, and does its log name this container?)",
            self.subject,
            self.cert_dir.display(),
            self.waited.as_secs_f64(),
            self.reason
        )
    }
}

impl std::error::Error for GuardFailure {}

/// What the files hold, once accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The leaf's URI SANs.
    pub uris: Vec<String>,
    /// Whether the key could be compared with the certificate.
    pub key: KeyMatch,
}

/// Checks the files once.
pub fn check(spec: &GuardSpec) -> Result<Accepted, NotReady> {
    let mut names = vec![spec.cert.as_str(), spec.key.as_str()];
    names.extend(spec.files.iter().map(String::as_str));
    names.dedup();
    let missing: Vec<String> = names
        .iter()
        .filter(|n| !spec.cert_dir.join(n).exists())
        .map(|n| (*n).to_owned())
        .collect();
    if !missing.is_empty() {
        return Err(NotReady::Missing(missing));
    }
    let cert_pem = read(&spec.cert_dir, &spec.cert)?;
    let key_pem = if spec.key == spec.cert {
        cert_pem.clone()
    } else {
        read(&spec.cert_dir, &spec.key)?
    };
    judge(spec, &cert_pem, &key_pem)
}

/// Whether the contents of the certificate and key files are what `spec` waits for.
fn judge(spec: &GuardSpec, cert_pem: &[u8], key_pem: &[u8]) -> Result<Accepted, NotReady> {
    let leaf_der = first_block(cert_pem, "CERTIFICATE", &spec.cert)?;
    let key_der = first_block(key_pem, "PRIVATE KEY", &spec.key)?;
    let leaf = x509::leaf(&leaf_der).map_err(bad_der(&spec.cert, "the leaf certificate"))?;
    let key = x509::key_matches(&key_der, &leaf).map_err(bad_der(&spec.key, "the private key"))?;
    if key == KeyMatch::Differs {
        return Err(NotReady::KeyMismatch {
            key: spec.key.clone(),
            cert: spec.cert.clone(),
        });
    }
    let uris: Vec<String> = leaf
        .uris
        .iter()
        .map(|u| String::from_utf8_lossy(u).into_owned())
        .collect();
    if let Some(expected) = &spec.spiffe_id
        && !uris.iter().any(|u| u == expected)
    {
        return Err(NotReady::WrongSpiffeId {
            file: spec.cert.clone(),
            expected: expected.clone(),
            found: uris,
        });
    }
    Ok(Accepted { uris, key })
}

/// Checks the files until they are accepted or the timeout passes.
pub fn wait(spec: &GuardSpec) -> Result<Accepted, Box<GuardFailure>> {
    let started = Instant::now();
    let deadline = started + spec.timeout();
    loop {
        match check(spec) {
            Ok(accepted) => return Ok(accepted),
            Err(reason) if Instant::now() >= deadline => {
                return Err(Box::new(GuardFailure {
                    subject: spec.subject(),
                    cert_dir: spec.cert_dir.clone(),
                    waited: started.elapsed(),
                    reason,
                }));
            }
            Err(_) => {
                std::thread::sleep(POLL.min(deadline.saturating_duration_since(Instant::now())))
            }
        }
    }
}

/// The `guard` subcommand: waits, and on failure says why on standard error (the runtime puts
/// a failed hook's output into the container's log) and in the termination message file, if
/// there is one. Returns whether the workload may run.
pub fn run(spec: &GuardSpec) -> bool {
    match wait(spec) {
        Ok(_) => true,
        Err(failure) => {
            let message = failure.to_string();
            eprintln!("{message}");
            if let Some(path) = &spec.termination_log {
                write_termination_message(path, &message);
            }
            false
        }
    }
}

/// Best effort: the file is the kubelet's, created before the container starts; the guard
/// never creates one.
fn write_termination_message(path: &Path, message: &str) {
    let file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path);
    if let Ok(mut file) = file {
        let _ = file.write_all(message.as_bytes());
    }
}

fn bad_der<'a>(file: &'a str, what: &'static str) -> impl FnOnce(DerError) -> NotReady + 'a {
    move |error| NotReady::BadDer {
        file: file.to_owned(),
        what,
        error,
    }
}

fn read(dir: &Path, name: &str) -> Result<Zeroizing<Vec<u8>>, NotReady> {
    let unreadable = |error: std::io::Error| NotReady::Unreadable {
        file: name.to_owned(),
        error: error.to_string(),
    };
    let file = File::open(dir.join(name)).map_err(unreadable)?;
    let mut contents = Zeroizing::new(Vec::new());
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut contents)
        .map_err(unreadable)?;
    if contents.len() as u64 > MAX_FILE_BYTES {
        return Err(NotReady::TooLarge {
            file: name.to_owned(),
        });
    }
    Ok(contents)
}

/// The first PEM block labelled `label`, decoded.
fn first_block(
    pem: &[u8],
    label: &'static str,
    file: &str,
) -> Result<Zeroizing<Vec<u8>>, NotReady> {
    let none = || NotReady::NoPemBlock {
        file: file.to_owned(),
        label,
    };
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = find(pem, begin.as_bytes()).ok_or_else(none)? + begin.len();
    let len = find(&pem[start..], end.as_bytes()).ok_or_else(none)?;
    let body: Zeroizing<Vec<u8>> = Zeroizing::new(
        pem[start..start + len]
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect(),
    );
    STANDARD
        .decode(&*body)
        .map(Zeroizing::new)
        .map_err(|_| NotReady::BadBase64 {
            file: file.to_owned(),
            label,
        })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Entry points for the fuzz targets in the repository's `fuzz/` crate (feature `fuzzing`).
/// Not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use super::{Accepted, GuardSpec, NotReady};

    /// What the guard concludes from these file contents (`key_pem` `None`: the combined
    /// layout, key and certificate in one file), as [`super::check`] does once the files are
    /// present and read.
    pub fn judge(
        cert_pem: &[u8],
        key_pem: Option<&[u8]>,
        spiffe_id: Option<&str>,
    ) -> Result<Accepted, NotReady> {
        let spec = GuardSpec {
            cert_dir: "/".into(),
            cert: "svid.pem".to_owned(),
            key: if key_pem.is_some() {
                "svid_key.pem"
            } else {
                "svid.pem"
            }
            .to_owned(),
            files: Vec::new(),
            spiffe_id: spiffe_id.map(str::to_owned),
            timeout_ms: 0,
            pod: None,
            container: None,
            termination_log: None,
        };
        super::judge(&spec, cert_pem, key_pem.unwrap_or(cert_pem))
    }
}

#[cfg(test)]
mod tests;

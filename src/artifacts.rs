//! Turns identity material into the files a workload reads, and writes them through
//! [`HostOps`].
//!
//! # Files
//!
//! The names and modes come from the pod's annotation ([`FileSet`], already validated there):
//!
//! | content | PEM blocks |
//! |---|---|
//! | SVID chain | `CERTIFICATE`, leaf first |
//! | private key | one `PRIVATE KEY` (PKCS#8) |
//! | combined credentials | the `PRIVATE KEY` first, then the chain (KEP-4317, draft SPIFFE delivery) |
//! | trust bundle | `CERTIFICATE`s of the SVID's trust domain, plus every federated domain's with [`FederatedBundles::Append`] |
//! | `<trust-domain>.x509.pem` | one per federated trust domain with [`FederatedBundles::Separate`], bundle mode |
//!
//! With [`FederatedBundles::Separate`], a `*.x509.pem` file of a trust domain that is no
//! longer federated is deleted (de-federation by deletion, as in the draft standard). The
//! annotation module reserves that suffix in this mode, so no file the pod named can match.
//!
//! # How a write happens
//!
//! [`ArtifactWriter::write`] first **stages** every file: a temp file per output, created
//! `O_EXCL`, given its final mode, owner and (optionally) SELinux label, written and
//! `fsync`ed, in the order key, certificates, federated bundles, trust bundle (so the trust
//! bundle's arrival means the whole set arrived). Only when all are staged does it
//! **commit**: `renameat` of each over its final name in the same order, then removal of
//! stale federated bundles, then `fsync` of the directory. Consequences:
//!
//! * a reader never sees a half-written file, only the old one or the new one;
//! * if staging fails (disk full, an injected failure, …) every temp file is removed and
//!   **all** previous files are untouched;
//! * if a rename fails (practically only when something else took the name, e.g. a
//!   directory), the remaining temp files are removed, earlier renames stay, and the error
//!   says how many files were committed; the next write repairs the set;
//! * the directory itself is never replaced, only files in it, because runtimes like Kata
//!   share the directory by inode.
//!
//! Writes into one directory must be serialized by the caller (one delivery task per
//! container): the writer sweeps leftover `.tmp-*` files from an interrupted earlier write,
//! which would include a concurrent writer's.
//!
//! # Key and certificate consistency for readers
//!
//! The key is renamed into place before the certificate that needs it, but two renames are
//! two moments, and each file is always complete while the pairing can be off:
//!
//! * a reader that opens the certificate, then the key, can get the old certificate with the
//!   new key when both renames fall between its two opens;
//! * a reader that opens the key, then the certificate, can get the old key with the new
//!   certificate the same way;
//! * with two rotations in quick succession, either order can mix generations.
//!
//! The window is the few microseconds between two `renameat` calls. Workloads avoid it by
//! either
//!
//! * using the **combined** layout ([`FileSet::Combined`]): key and chain are in one file,
//!   replaced by one rename, so one `open` always yields a matching pair; or
//! * reading both files, checking that the leaf certificate's public key matches the private
//!   key, and reading both again if not (a mismatch resolves as soon as the writer has done
//!   its back-to-back renames).
//!
//! # The writer's own files
//!
//! Names under the root that start with `.` are the writer's, never a pod's (pod UIDs and
//! sandbox IDs never start with one, and [`ArtifactWriter::create_dir`] refuses them):
//! [`GUARD_DIR`] holds the start guard's binary ([`ArtifactWriter::install_guard`]), which
//! guarded containers bind-mount. [`ArtifactWriter::sweep`] leaves these names alone.
//!
//! # Secrets
//!
//! The PEM of the private key is rendered straight into a [`Zeroizing`] buffer allocated at
//! its exact final size (so no reallocation leaves a copy behind) and base64-encoded in place
//! without stack buffers. [`RenderedFiles`] wipes every buffer when dropped;
//! [`ArtifactWriter::deliver`] renders, writes and drops in one call.

#![forbid(unsafe_code)]

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use zeroize::{Zeroize, Zeroizing};

use crate::annotation::{
    FEDERATED_BUNDLE_SUFFIX, FederatedBundles, FileContent, FileSet, IdentityRequest,
    MAX_FILE_NAME_BYTES, OutputFile,
};
use crate::host::{
    DirHandle, FileAttrs, HostError, HostOps, Owner, PRIVATE_DIR_MODE, SELINUX_XATTR, TEMP_PREFIX,
    validate_component,
};
use crate::spiffe::TrustDomain;

/// The directory under the root holding the start guard's binary.
pub const GUARD_DIR: &str = ".guard";
/// The start guard's binary in [`GUARD_DIR`].
pub const GUARD_FILE: &str = "nri-identity-injector";
/// Containers execute the guard as their own user.
const GUARD_MODE: u32 = 0o755;

/// Whether `name` directly under the root is the writer's own, not a pod's.
fn is_reserved(name: &str) -> bool {
    name.starts_with('.')
}

const CERTIFICATE_LABEL: &str = "CERTIFICATE";
const PRIVATE_KEY_LABEL: &str = "PRIVATE KEY";
/// A PEM label and the DER items rendered under it.
type PemBlocks<'a> = (&'a str, &'a [Vec<u8>]);

/// 48 input bytes make one 64-character base64 line, the PEM convention (RFC 7468).
const PEM_LINE_INPUT: usize = 48;

/// X.509 identity material for one workload, as the identity source delivers it.
pub struct Material {
    /// The SVID's trust domain (names its bundle file in the `spiffe` layout).
    pub trust_domain: TrustDomain,
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The leaf's private key, PKCS#8 DER.
    pub key: Zeroizing<Vec<u8>>,
    /// DER CA certificates of the SVID's own trust domain.
    pub own_bundle: Vec<Vec<u8>>,
    /// DER CA certificates per federated trust domain.
    pub federated: BTreeMap<TrustDomain, Vec<Vec<u8>>>,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("chain_certs", &self.chain.len())
            .field("key", &"<redacted>")
            .field("own_bundle_certs", &self.own_bundle.len())
            .field("federated", &self.federated.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Why material could not be rendered or written.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("the private key is empty")]
    EmptyKey,
    #[error("the trust bundle of the svid's trust domain is empty")]
    EmptyBundle,
    #[error(
        "federated trust domain {name:?} cannot name a file (it starts with '.' or is too long)"
    )]
    InvalidTrustDomain { name: String },
    #[error("output file name {name:?} is not a single path component: {error}")]
    InvalidFileName { name: String, error: HostError },
    #[error("output file name {name:?} is used twice")]
    DuplicateFileName { name: String },
    #[error("{name} is a JWT file, not part of the X.509 files")]
    NotX509 { name: String },
    #[error("removing {name} in {dir}: {error}")]
    RemoveFile {
        dir: PathBuf,
        name: String,
        error: HostError,
    },
    #[error("pem encoding of {name} overflowed its buffer")]
    PemEncoding { name: String },
    #[error("creating the artifact directory for pod {pod_uid} container {container_id}: {error}")]
    CreateDir {
        pod_uid: String,
        container_id: String,
        error: HostError,
    },
    #[error("labelling the artifact directory {dir}: {error}")]
    LabelDir { dir: PathBuf, error: HostError },
    #[error("listing {dir}: {error}")]
    List { dir: PathBuf, error: HostError },
    #[error("removing leftover temporary file {name} in {dir}: {error}")]
    Sweep {
        dir: PathBuf,
        name: String,
        error: HostError,
    },
    #[error("staging {name} in {dir} (previous files are untouched): {error}")]
    Stage {
        dir: PathBuf,
        name: String,
        error: HostError,
    },
    #[error("replacing {name} in {dir} after {committed} file(s) were replaced: {error}")]
    Commit {
        dir: PathBuf,
        name: String,
        committed: usize,
        error: HostError,
    },
    #[error("removing stale federated bundle {name} in {dir}: {error}")]
    RemoveStale {
        dir: PathBuf,
        name: String,
        error: HostError,
    },
    #[error("syncing {dir}: {error}")]
    Sync { dir: PathBuf, error: HostError },
    #[error("removing the artifact directory for pod {pod_uid} container {container_id}: {error}")]
    Remove {
        pod_uid: String,
        container_id: String,
        error: HostError,
    },
    #[error("emptying {dir}: {error}")]
    Empty {
        dir: PathBuf,
        name: String,
        error: HostError,
    },
    #[error("removing the artifact directory of pod {pod_uid}: {error}")]
    RemovePod { pod_uid: String, error: HostError },
    #[error("opening the artifact root {root}: {error}")]
    Root { root: PathBuf, error: HostError },
    #[error("installing the start guard at {path}: {error}")]
    Guard { path: PathBuf, error: HostError },
}

impl ArtifactError {
    /// Whether the file system holding the artifact root is full (or out of inodes): the
    /// write failed closed, the previous files are whole, and it heals when space returns.
    pub fn is_no_space(&self) -> bool {
        let error = match self {
            Self::CreateDir { error, .. }
            | Self::LabelDir { error, .. }
            | Self::Stage { error, .. }
            | Self::Commit { error, .. }
            | Self::Sync { error, .. } => error,
            _ => return false,
        };
        error.io_kind() == Some(std::io::ErrorKind::StorageFull)
    }
}

// === rendering ===

/// What a rendered file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderedKind {
    PrivateKey,
    KeyAndChain,
    SvidChain,
    TrustBundle,
    FederatedBundle { trust_domain: TrustDomain },
    JwtSvid,
    JwtBundle,
}

impl RenderedKind {
    /// Whether the file holds the private key (or a bearer token).
    pub fn is_secret(&self) -> bool {
        matches!(self, Self::PrivateKey | Self::KeyAndChain | Self::JwtSvid)
    }
}

/// One file ready to be written.
pub struct RenderedFile {
    name: String,
    mode: u32,
    kind: RenderedKind,
    contents: Zeroizing<Vec<u8>>,
}

impl RenderedFile {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn mode(&self) -> u32 {
        self.mode
    }

    pub fn kind(&self) -> &RenderedKind {
        &self.kind
    }

    pub fn contents(&self) -> &[u8] {
        &self.contents
    }
}

impl fmt::Debug for RenderedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RenderedFile")
            .field("name", &self.name)
            .field("mode", &format_args!("{:04o}", self.mode))
            .field("kind", &self.kind)
            .field("len", &self.contents.len())
            .finish()
    }
}

/// The files of one delivery, in write order (key, certificates, federated bundles, the trust
/// bundle).
/// Every buffer is wiped on drop.
#[derive(Debug)]
pub struct RenderedFiles {
    files: Vec<RenderedFile>,
    federated: FederatedBundles,
    /// Whether these are the X.509 files, whose write also removes the bundle files of trust
    /// domains no longer federated. The JWT files are written on their own schedule and leave
    /// the X.509 files alone.
    x509: bool,
}

impl RenderedFiles {
    /// Renders `material` into the files `request` asks for.
    pub fn for_request(
        request: &IdentityRequest,
        material: &Material,
    ) -> Result<Self, ArtifactError> {
        Self::render(&request.files, request.federated_bundles, material)
    }

    /// Renders `material` into `files`, placing federated bundles as `federated` says.
    pub fn render(
        files: &FileSet,
        federated: FederatedBundles,
        material: &Material,
    ) -> Result<Self, ArtifactError> {
        if material.chain.is_empty() {
            return Err(ArtifactError::EmptyChain);
        }
        if material.key.is_empty() {
            return Err(ArtifactError::EmptyKey);
        }
        if material.own_bundle.is_empty() {
            return Err(ArtifactError::EmptyBundle);
        }
        let mut out = Vec::new();
        for file in files.files() {
            out.push(render_output(file, federated, material)?);
        }
        if federated == FederatedBundles::Separate {
            let mode = match files {
                FileSet::SpiffeHelper { bundle, .. } | FileSet::Combined { bundle, .. } => {
                    bundle.mode.bits()
                }
                FileSet::Spiffe { bundle_mode, .. } => bundle_mode.bits(),
            };
            for (trust_domain, certs) in &material.federated {
                let name = federated_file_name(trust_domain)?;
                let contents = pem_blocks(&name, &[(CERTIFICATE_LABEL, certs.as_slice())])?;
                out.push(RenderedFile {
                    name,
                    mode,
                    kind: RenderedKind::FederatedBundle {
                        trust_domain: trust_domain.clone(),
                    },
                    contents,
                });
            }
        }
        if let FileSet::Spiffe { bundle_mode, .. } = files {
            // The own trust domain's bundle is one more `<trust-domain>.x509.pem`, never
            // merged with another; the credentials go last instead (the start guard waits for
            // them), so a reader that sees new credentials finds the bundles that verify them.
            let name = federated_file_name(&material.trust_domain)?;
            let contents = pem_blocks(
                &name,
                &[(CERTIFICATE_LABEL, material.own_bundle.as_slice())],
            )?;
            out.push(RenderedFile {
                name,
                mode: bundle_mode.bits(),
                kind: RenderedKind::TrustBundle,
                contents,
            });
            if let Some(i) = out.iter().position(|f| f.kind == RenderedKind::KeyAndChain) {
                let credentials = out.remove(i);
                out.push(credentials);
            }
        } else if let Some(i) = out.iter().position(|f| f.kind == RenderedKind::TrustBundle) {
            // The trust bundle goes last: whoever sees it (the start guard waits for it) sees
            // every file of this delivery, federated bundles included.
            let bundle = out.remove(i);
            out.push(bundle);
        }
        let mut seen = BTreeSet::new();
        for file in &out {
            check_file_name(&file.name)?;
            if !seen.insert(file.name.as_str()) {
                return Err(ArtifactError::DuplicateFileName {
                    name: file.name.clone(),
                });
            }
        }
        Ok(Self {
            files: out,
            federated,
            x509: true,
        })
    }

    /// The JWT files: the token (one line, no newline) and the JWKS document, each only when
    /// given. Names were validated with the request; checked again here.
    pub fn jwt(
        token: Option<(&OutputFile, &str)>,
        jwks: Option<(&OutputFile, &[u8])>,
    ) -> Result<Self, ArtifactError> {
        let mut files = Vec::new();
        if let Some((file, token)) = token {
            check_file_name(&file.name)?;
            files.push(RenderedFile {
                name: file.name.clone(),
                mode: file.mode.bits(),
                kind: RenderedKind::JwtSvid,
                contents: Zeroizing::new(token.as_bytes().to_vec()),
            });
        }
        if let Some((file, jwks)) = jwks {
            check_file_name(&file.name)?;
            files.push(RenderedFile {
                name: file.name.clone(),
                mode: file.mode.bits(),
                kind: RenderedKind::JwtBundle,
                contents: Zeroizing::new(jwks.to_vec()),
            });
        }
        Ok(Self {
            files,
            federated: FederatedBundles::Separate,
            x509: false,
        })
    }

    /// The files, in write order.
    pub fn files(&self) -> &[RenderedFile] {
        &self.files
    }

    /// The file named `name`.
    pub fn get(&self, name: &str) -> Option<&RenderedFile> {
        self.files.iter().find(|f| f.name == name)
    }

    /// How federated bundles were placed.
    pub fn federated_bundles(&self) -> FederatedBundles {
        self.federated
    }
}

impl Zeroize for RenderedFiles {
    /// Wipes every buffer (the files stay, empty).
    fn zeroize(&mut self) {
        for file in &mut self.files {
            file.contents.zeroize();
        }
    }
}

fn render_output(
    file: &OutputFile,
    federated: FederatedBundles,
    material: &Material,
) -> Result<RenderedFile, ArtifactError> {
    let key = std::slice::from_ref(&*material.key);
    let (kind, blocks): (RenderedKind, Vec<PemBlocks<'_>>) = match file.content {
        FileContent::PrivateKey => (RenderedKind::PrivateKey, vec![(PRIVATE_KEY_LABEL, key)]),
        FileContent::KeyAndChain => (
            RenderedKind::KeyAndChain,
            vec![
                (PRIVATE_KEY_LABEL, key),
                (CERTIFICATE_LABEL, material.chain.as_slice()),
            ],
        ),
        FileContent::SvidChain => (
            RenderedKind::SvidChain,
            vec![(CERTIFICATE_LABEL, material.chain.as_slice())],
        ),
        FileContent::TrustBundle => {
            let mut blocks = vec![(CERTIFICATE_LABEL, material.own_bundle.as_slice())];
            if federated == FederatedBundles::Append {
                for certs in material.federated.values() {
                    blocks.push((CERTIFICATE_LABEL, certs.as_slice()));
                }
            }
            (RenderedKind::TrustBundle, blocks)
        }
        // Never part of a layout's X.509 files (see `RenderedFiles::jwt`).
        FileContent::JwtSvid | FileContent::JwtBundle => {
            return Err(ArtifactError::NotX509 {
                name: file.name.clone(),
            });
        }
    };
    Ok(RenderedFile {
        name: file.name.clone(),
        mode: file.mode.bits(),
        contents: pem_blocks(&file.name, &blocks)?,
        kind,
    })
}

/// `<trust-domain>.x509.pem`. The type guarantees a plain name (no `/`); the file system
/// adds its own limits: a leading `.` is our temp prefix and must never name a bundle, and the
/// whole name must fit `NAME_MAX`.
fn federated_file_name(trust_domain: &TrustDomain) -> Result<String, ArtifactError> {
    let name = trust_domain.name();
    if name.starts_with('.') || name.len() + FEDERATED_BUNDLE_SUFFIX.len() > MAX_FILE_NAME_BYTES {
        return Err(ArtifactError::InvalidTrustDomain {
            name: name.to_owned(),
        });
    }
    Ok(format!("{name}{FEDERATED_BUNDLE_SUFFIX}"))
}

/// The annotation module validated the names; this is the writer's own guard that nothing
/// lands outside the directory.
fn check_file_name(name: &str) -> Result<(), ArtifactError> {
    validate_component(name).map_err(|error| ArtifactError::InvalidFileName {
        name: name.to_owned(),
        error,
    })
}

/// Length of one PEM block: header, base64 in 64-character lines each ending in `\n`, footer.
fn pem_len(label: &str, der_len: usize) -> usize {
    let b64 = der_len.div_ceil(3) * 4;
    let lines = b64.div_ceil(64);
    let header = "-----BEGIN ".len() + label.len() + "-----\n".len();
    let footer = "-----END ".len() + label.len() + "-----\n".len();
    header + b64 + lines + footer
}

/// Renders the DER items of `blocks` as consecutive PEM blocks into one buffer of exactly the
/// final size.
fn pem_blocks(
    name: &str,
    blocks: &[(&str, &[Vec<u8>])],
) -> Result<Zeroizing<Vec<u8>>, ArtifactError> {
    let total = blocks
        .iter()
        .flat_map(|(label, ders)| ders.iter().map(|der| pem_len(label, der.len())))
        .sum();
    let mut out = Zeroizing::new(Vec::with_capacity(total));
    for (label, ders) in blocks {
        for der in *ders {
            push_pem(&mut out, label, der).ok_or_else(|| ArtifactError::PemEncoding {
                name: name.to_owned(),
            })?;
        }
    }
    // The buffer never grew past `total` (growing would have left a copy of the old
    // allocation behind); the tests check that `pem_len` is exact.
    Ok(out)
}

/// Appends one PEM block, base64-encoding straight into `out` (no intermediate buffer that
/// would hold key material). `None` only if the encoder disagrees with our line arithmetic.
fn push_pem(out: &mut Vec<u8>, label: &str, der: &[u8]) -> Option<()> {
    out.extend_from_slice(b"-----BEGIN ");
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(b"-----\n");
    for chunk in der.chunks(PEM_LINE_INPUT) {
        let start = out.len();
        let encoded = chunk.len().div_ceil(3) * 4;
        out.resize(start + encoded, 0);
        let written = STANDARD.encode_slice(chunk, out.get_mut(start..)?).ok()?;
        if written != encoded {
            return None;
        }
        out.push(b'\n');
    }
    out.extend_from_slice(b"-----END ");
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(b"-----\n");
    Some(())
}

// === impl ArtifactWriter ===

/// `<root>/<pod-uid>/<container-id>/`, opened; the bind-mount source for the container.
/// Every file written into it gets the directory's SELinux label, if it has one.
#[derive(Debug, Clone)]
pub struct ArtifactDir {
    handle: DirHandle,
    pod_uid: String,
    container_id: String,
    label: Option<Arc<str>>,
}

impl ArtifactDir {
    /// Host path of the directory (the bind-mount source).
    pub fn path(&self) -> &Path {
        self.handle.path()
    }

    pub fn handle(&self) -> &DirHandle {
        &self.handle
    }

    pub fn pod_uid(&self) -> &str {
        &self.pod_uid
    }

    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    /// The SELinux context of the directory and its files, if any.
    pub fn label(&self) -> Option<&str> {
        self.label.as_deref()
    }
}

/// What the runtime still has, for [`ArtifactWriter::sweep`].
#[derive(Debug, Clone, Default)]
pub struct LiveContainers {
    /// Directory names (pod UIDs or sandbox IDs) of the pods that exist.
    pub pods: HashSet<String>,
    /// `(pod directory, container ID)` of the containers that exist.
    pub containers: HashSet<(String, String)>,
}

/// Owns the per-container directories under one root from creation to removal: creates and
/// labels them, writes identity files into them, empties them in place and removes them.
#[derive(Debug, Clone)]
pub struct ArtifactWriter {
    host: Arc<dyn HostOps>,
    root: PathBuf,
}

impl ArtifactWriter {
    /// A writer for directories under `root` (e.g. `/run/nri-identity-injector`).
    pub fn new(host: Arc<dyn HostOps>, root: impl Into<PathBuf>) -> Self {
        Self {
            host,
            root: root.into(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn host(&self) -> &Arc<dyn HostOps> {
        &self.host
    }

    /// Opens `<root>/<pod_uid>/<container_id>/`, creating it as needed (see
    /// [`HostOps::create_container_dir`]), and labels it with `label` (an SELinux context;
    /// runtimes never relabel NRI-added mounts, so on SELinux hosts the directory and files
    /// must carry a label containers may read). The label is set again on every call, so a
    /// directory re-created after a restart is never left unlabelled.
    pub fn create_dir(
        &self,
        pod_uid: &str,
        container_id: &str,
        label: Option<&str>,
    ) -> Result<ArtifactDir, ArtifactError> {
        if is_reserved(pod_uid) {
            return Err(ArtifactError::CreateDir {
                pod_uid: pod_uid.to_owned(),
                container_id: container_id.to_owned(),
                error: HostError::InvalidComponent {
                    component: pod_uid.to_owned(),
                    reason: "starts with '.', which the daemon keeps for its own files",
                },
            });
        }
        let handle = self
            .host
            .create_container_dir(&self.root, pod_uid, container_id)
            .map_err(|error| ArtifactError::CreateDir {
                pod_uid: pod_uid.to_owned(),
                container_id: container_id.to_owned(),
                error,
            })?;
        if let Some(label) = label {
            self.host
                .set_xattr(&handle, None, SELINUX_XATTR, label.as_bytes())
                .map_err(|error| ArtifactError::LabelDir {
                    dir: handle.path().to_path_buf(),
                    error,
                })?;
        }
        Ok(ArtifactDir {
            handle,
            pod_uid: pod_uid.to_owned(),
            container_id: container_id.to_owned(),
            label: label.map(Arc::from),
        })
    }

    /// Writes `files` into `dir`, staged then committed (see the module documentation), each
    /// owned by `owner` when given, then syncs the directory. With
    /// [`FederatedBundles::Separate`], removes `*.x509.pem` files not in `files`.
    pub fn write(
        &self,
        dir: &ArtifactDir,
        files: &RenderedFiles,
        owner: Option<Owner>,
    ) -> Result<(), ArtifactError> {
        let handle = &dir.handle;
        let dir_path = || handle.path().to_path_buf();
        let mut current = BTreeSet::new();
        for file in &files.files {
            check_file_name(&file.name)?;
            current.insert(file.name.as_str());
        }

        let existing = self.list(handle)?;
        for name in existing
            .iter()
            .filter(|n| n.starts_with(TEMP_PREFIX) && !current.contains(n.as_str()))
        {
            self.host
                .unlink(handle, name)
                .map_err(|error| ArtifactError::Sweep {
                    dir: dir_path(),
                    name: name.clone(),
                    error,
                })?;
        }

        let mut staged: Vec<(String, &RenderedFile)> = Vec::with_capacity(files.files.len());
        for file in &files.files {
            let attrs = FileAttrs {
                mode: file.mode,
                owner,
                selinux_label: dir.label(),
            };
            match self.host.create_temp(handle, &file.contents, attrs) {
                Ok(temp) => staged.push((temp, file)),
                Err(error) => {
                    self.discard(handle, &staged);
                    return Err(ArtifactError::Stage {
                        dir: dir_path(),
                        name: file.name.clone(),
                        error,
                    });
                }
            }
        }

        for (committed, (temp, file)) in staged.iter().enumerate() {
            if let Err(error) = self.host.rename(handle, temp, &file.name) {
                self.discard(handle, staged.get(committed..).unwrap_or_default());
                // Make the renames that did happen durable; the rename error is the news.
                let _ = self.host.fsync_dir(handle);
                return Err(ArtifactError::Commit {
                    dir: dir_path(),
                    name: file.name.clone(),
                    committed,
                    error,
                });
            }
        }

        if files.x509 && files.federated == FederatedBundles::Separate {
            let stale = self.list(handle)?.into_iter().filter(|n| {
                n.ends_with(FEDERATED_BUNDLE_SUFFIX)
                    && !n.starts_with(TEMP_PREFIX)
                    && !current.contains(n.as_str())
            });
            for name in stale {
                self.host
                    .unlink(handle, &name)
                    .map_err(|error| ArtifactError::RemoveStale {
                        dir: dir_path(),
                        name: name.clone(),
                        error,
                    })?;
            }
        }

        self.host
            .fsync_dir(handle)
            .map_err(|error| ArtifactError::Sync {
                dir: dir_path(),
                error,
            })
    }

    /// Renders `material` for `request`, writes it, and wipes the rendered buffers.
    pub fn deliver(
        &self,
        dir: &ArtifactDir,
        request: &IdentityRequest,
        material: &Material,
        owner: Option<Owner>,
    ) -> Result<(), ArtifactError> {
        let files = RenderedFiles::for_request(request, material)?;
        self.write(dir, &files, owner)
        // `files` drops here, zeroizing every buffer.
    }

    /// Writes the JWT files of `request` (the token, the JWKS, or both) into `dir`, staged and
    /// committed like the X.509 files.
    pub fn deliver_jwt(
        &self,
        dir: &ArtifactDir,
        files: &RenderedFiles,
        owner: Option<Owner>,
    ) -> Result<(), ArtifactError> {
        self.write(dir, files, owner)
    }

    /// Removes one file from `dir` (an expired JWT-SVID), then syncs the directory. A file
    /// that is already gone is not an error.
    pub fn remove_file(&self, dir: &ArtifactDir, name: &str) -> Result<(), ArtifactError> {
        check_file_name(name)?;
        let handle = &dir.handle;
        if self.list(handle)?.iter().any(|n| n == name) {
            self.host
                .unlink(handle, name)
                .map_err(|error| ArtifactError::RemoveFile {
                    dir: handle.path().to_path_buf(),
                    name: name.to_owned(),
                    error,
                })?;
        }
        self.host
            .fsync_dir(handle)
            .map_err(|error| ArtifactError::Sync {
                dir: handle.path().to_path_buf(),
                error,
            })
    }

    /// Removes `dir` with its contents, and the pod directory if it is left empty.
    pub fn remove(&self, dir: &ArtifactDir) -> Result<(), ArtifactError> {
        self.remove_container(&dir.pod_uid, &dir.container_id)
    }

    /// Removes `<root>/<pod_uid>/<container_id>/` (see [`HostOps::remove_container_dir`]),
    /// e.g. after a restart, when no [`ArtifactDir`] is at hand. Missing is not an error;
    /// names that are not single path components name nothing here and are ignored.
    pub fn remove_container(&self, pod_uid: &str, container_id: &str) -> Result<(), ArtifactError> {
        if validate_component(pod_uid).is_err()
            || validate_component(container_id).is_err()
            || is_reserved(pod_uid)
        {
            return Ok(());
        }
        self.host
            .remove_container_dir(&self.root, pod_uid, container_id)
            .map_err(|error| ArtifactError::Remove {
                pod_uid: pod_uid.to_owned(),
                container_id: container_id.to_owned(),
                error,
            })
    }

    /// Removes every file in `dir`, keeping the directory itself: it is the mount source of
    /// a container that exists, and a VM guest's share pins its inode, so it is never
    /// replaced.
    pub fn empty(&self, dir: &ArtifactDir) -> Result<(), ArtifactError> {
        let handle = &dir.handle;
        for name in self.list(handle)? {
            self.host
                .unlink(handle, &name)
                .map_err(|error| ArtifactError::Empty {
                    dir: handle.path().to_path_buf(),
                    name: name.clone(),
                    error,
                })?;
        }
        self.host
            .fsync_dir(handle)
            .map_err(|error| ArtifactError::Sync {
                dir: handle.path().to_path_buf(),
                error,
            })
    }

    /// Removes `<root>/<pod_uid>/` with whatever is left in it. Missing is not an error;
    /// an invalid name names nothing here and is ignored.
    pub fn remove_pod(&self, pod_uid: &str) -> Result<(), ArtifactError> {
        if validate_component(pod_uid).is_err() || is_reserved(pod_uid) {
            return Ok(());
        }
        let remove_pod = |error| ArtifactError::RemovePod {
            pod_uid: pod_uid.to_owned(),
            error,
        };
        let root = self.host.open_root(&self.root).map_err(remove_pod)?;
        self.host.remove_all(&root, pod_uid).map_err(remove_pod)
    }

    /// Removes the directories of pods and containers that are not `live`, after the daemon
    /// (re)connected to the runtime. Returns what was removed: `(pod, None)` for a whole
    /// pod, `(pod, Some(container))` for one container. Best effort per directory.
    pub fn sweep(
        &self,
        live: &LiveContainers,
    ) -> Result<Vec<(String, Option<String>)>, ArtifactError> {
        let root = self
            .host
            .open_root(&self.root)
            .map_err(|error| ArtifactError::Root {
                root: self.root.clone(),
                error,
            })?;
        let mut removed = Vec::new();
        for pod in self.list(&root)? {
            if is_reserved(&pod) {
                continue;
            }
            if !live.pods.contains(&pod) {
                if self.host.remove_all(&root, &pod).is_ok() {
                    removed.push((pod, None));
                }
                continue;
            }
            let Ok(Some(pod_dir)) = self.host.open_dir(&root, &pod) else {
                continue;
            };
            let mut emptied = false;
            for id in self.list(&pod_dir)? {
                if !live.containers.contains(&(pod.clone(), id.clone()))
                    && self.host.remove_all(&pod_dir, &id).is_ok()
                {
                    emptied = true;
                    removed.push((pod.clone(), Some(id)));
                }
            }
            // The pod's last container went while the daemon was away, so no RemoveContainer
            // took the pod's directory with it; and a runtime that restarted since the pod was
            // created may never send its RemovePodSandbox (containerd forgets which pods
            // plugins know of). A later CreateContainer makes the directory again.
            if emptied {
                let _ = self.host.remove_empty_dir(&root, &pod);
            }
        }
        Ok(removed)
    }

    /// Installs `executable` as `<root>/.guard/nri-identity-injector` (mode 0755, labelled
    /// `label`), replacing a different one atomically and leaving an identical one as it is:
    /// running containers keep the copy they mounted, so a needless replacement would only
    /// pin one more inode. Returns the host path containers bind-mount.
    pub fn install_guard(
        &self,
        executable: &[u8],
        label: Option<&str>,
    ) -> Result<PathBuf, ArtifactError> {
        let path = self.root.join(GUARD_DIR).join(GUARD_FILE);
        let failed = |error| ArtifactError::Guard {
            path: path.clone(),
            error,
        };
        let root = self.host.open_root(&self.root).map_err(failed)?;
        let dir = self
            .host
            .ensure_dir(&root, GUARD_DIR, PRIVATE_DIR_MODE)
            .map_err(failed)?;
        // Left by an install that was interrupted.
        for name in self.list(&dir)? {
            if name.starts_with(TEMP_PREFIX) {
                self.host.unlink(&dir, &name).map_err(failed)?;
            }
        }
        if self
            .host
            .file_matches(&dir, GUARD_FILE, executable)
            .map_err(failed)?
        {
            if let Some(label) = label {
                self.host
                    .set_xattr(&dir, Some(GUARD_FILE), SELINUX_XATTR, label.as_bytes())
                    .map_err(failed)?;
            }
            return Ok(path);
        }
        let attrs = FileAttrs {
            mode: GUARD_MODE,
            owner: None,
            selinux_label: label,
        };
        self.host
            .write_file_atomic(&dir, GUARD_FILE, executable, attrs)
            .map_err(failed)?;
        Ok(path)
    }

    fn list(&self, handle: &DirHandle) -> Result<Vec<String>, ArtifactError> {
        self.host.list(handle).map_err(|error| ArtifactError::List {
            dir: handle.path().to_path_buf(),
            error,
        })
    }

    /// Removes staged temp files after a failure. Best effort: the failure that got us here is
    /// the error to report, and the next write sweeps whatever is left.
    fn discard(&self, handle: &DirHandle, staged: &[(String, &RenderedFile)]) {
        for (temp, _) in staged {
            let _ = self.host.unlink(handle, temp);
        }
    }
}

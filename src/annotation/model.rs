//! What an annotation asks for once validated, and what the daemon allows.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Attestation, SpiffeId};

// === policy ===

/// What the daemon allows a pod to ask for. Built once from the daemon's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    default_agent_address: PathBuf,
    allowed_agent_addresses: Vec<PathBuf>,
}

impl Policy {
    /// A policy whose only allowed agent socket is `default_agent_address`: by default a pod
    /// must never be able to point the daemon at some other socket on the host.
    pub fn new(default_agent_address: impl Into<PathBuf>) -> Self {
        let default_agent_address = default_agent_address.into();
        Self {
            allowed_agent_addresses: vec![default_agent_address.clone()],
            default_agent_address,
        }
    }

    /// Also allows pods to name `address` (compared exactly, after a `unix://` prefix is
    /// stripped from the annotation).
    pub fn allow_agent_address(mut self, address: impl Into<PathBuf>) -> Self {
        let address = address.into();
        if !self.allowed_agent_addresses.contains(&address) {
            self.allowed_agent_addresses.push(address);
        }
        self
    }

    /// The socket used when an annotation names none.
    pub fn default_agent_address(&self) -> &Path {
        &self.default_agent_address
    }

    /// The sockets an annotation may name, the default first.
    pub fn allowed_agent_addresses(&self) -> &[PathBuf] {
        &self.allowed_agent_addresses
    }

    pub(super) fn allows(&self, address: &Path) -> bool {
        self.allowed_agent_addresses.iter().any(|a| a == address)
    }
}

// === enums of the annotation ===

/// What the daemon does when it cannot deliver the identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Refuse to start the container.
    #[default]
    Fail,
    /// Start the container without its identity files and keep trying.
    Continue,
}

/// Which files are written into `cert_dir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// spiffe-helper's three files: chain, key, bundle.
    #[default]
    SpiffeHelper,
    /// One file with the PKCS#8 key first then the chain (KEP-4317 `credentialBundlePath`),
    /// plus the bundle file.
    Combined,
    /// The draft SPIFFE file-system delivery layout: the combined key-and-chain file under the
    /// draft's fixed name, and one `<trust-domain>.x509.pem` per trust domain (the SVID's own
    /// included), never merged; the directory defaults to the draft's well-known folder.
    Spiffe,
}

/// Where bundles of federated trust domains go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FederatedBundles {
    /// One `<trust-domain>`[`FEDERATED_BUNDLE_SUFFIX`](super::FEDERATED_BUNDLE_SUFFIX) file per
    /// federated trust domain.
    #[default]
    Separate,
    /// Appended to the bundle file, as spiffe-helper's `include_federated_domains` does.
    Append,
}

impl OnFailure {
    /// The annotation spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fail => "fail",
            Self::Continue => "continue",
        }
    }
}

impl Layout {
    /// The annotation spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SpiffeHelper => "spiffe-helper",
            Self::Combined => "combined",
            Self::Spiffe => "spiffe",
        }
    }
}

impl FederatedBundles {
    /// The annotation spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Separate => "separate",
            Self::Append => "append",
        }
    }
}

macro_rules! display_as_str {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(OnFailure, Layout, FederatedBundles);

// === validated output ===

/// Permission bits of a delivered file, validated to fit in `0o777`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileMode(pub(super) u32);

impl FileMode {
    /// The bits, for `chmod`/`open`.
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl fmt::Display for FileMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

/// What a delivered file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileContent {
    /// PEM `CERTIFICATE` blocks, leaf first.
    SvidChain,
    /// One PEM `PRIVATE KEY` block (PKCS#8).
    PrivateKey,
    /// The PKCS#8 key block first, then the chain, leaf first.
    KeyAndChain,
    /// PEM certificates of the SVID's trust domain (and of federated ones when
    /// [`FederatedBundles::Append`]).
    TrustBundle,
    /// A compact JWT-SVID.
    JwtSvid,
    /// A JWKS document.
    JwtBundle,
}

/// One file the daemon writes into `cert_dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    /// A single path component, validated.
    pub name: String,
    pub mode: FileMode,
    pub content: FileContent,
}

/// The files of a layout, with names and modes resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSet {
    SpiffeHelper {
        svid: OutputFile,
        key: OutputFile,
        bundle: OutputFile,
    },
    Combined {
        credentials: OutputFile,
        bundle: OutputFile,
    },
    /// Trust bundles are named by their trust domain, so only their mode is fixed here.
    Spiffe {
        credentials: OutputFile,
        bundle_mode: FileMode,
    },
}

impl FileSet {
    /// The layout these files follow.
    pub fn layout(&self) -> Layout {
        match self {
            Self::SpiffeHelper { .. } => Layout::SpiffeHelper,
            Self::Combined { .. } => Layout::Combined,
            Self::Spiffe { .. } => Layout::Spiffe,
        }
    }

    /// The files in the order they should be written: the key before the certificates that
    /// need it, so a reader never pairs a new chain with an old key.
    pub fn files(&self) -> Vec<&OutputFile> {
        match self {
            Self::SpiffeHelper { svid, key, bundle } => vec![key, svid, bundle],
            Self::Combined {
                credentials,
                bundle,
            } => vec![credentials, bundle],
            Self::Spiffe { credentials, .. } => vec![credentials],
        }
    }
}

/// Everything the daemon needs to deliver one container's identity, defaults resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRequest {
    /// Host path of the SPIRE agent's admin socket, allowed by the [`Policy`].
    pub agent_address: PathBuf,
    /// Whether `agent_address` is the daemon's default rather than named by the annotation.
    pub agent_address_is_default: bool,
    /// Directory inside the container where the files appear.
    pub cert_dir: PathBuf,
    pub files: FileSet,
    pub hint: Option<String>,
    /// The ID the delivered SVID must have; any ID the agent gives when `None`.
    pub spiffe_id: Option<SpiffeId>,
    pub on_failure: OnFailure,
    pub federated_bundles: FederatedBundles,
    /// `None` leaves the choice to the daemon's configuration.
    pub attestation: Option<Attestation>,
    /// The pod accepts that in a VM sandbox without a shared file system its files are
    /// copied in once and never rotated.
    pub copy_once: bool,
    /// A JWT-SVID file (and the JWT bundle file) besides the X.509 files, when asked for.
    pub jwt: Option<JwtRequest>,
}

/// One JWT-SVID for one audience set, kept fresh in its own file, with the JWKS of the
/// SVID's trust domain next to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtRequest {
    /// The `aud` claim: non-empty, distinct, bounded strings.
    pub audience: Vec<String>,
    /// The compact token, one line without a newline; the key's mode (it is a bearer
    /// credential).
    pub token: OutputFile,
    /// The JWKS document of the SVID's trust domain; the bundle mode.
    pub bundle: OutputFile,
}

impl IdentityRequest {
    /// The mode of bundle files, also used for per-trust-domain federated bundles.
    pub fn bundle_mode(&self) -> FileMode {
        match &self.files {
            FileSet::SpiffeHelper { bundle, .. } | FileSet::Combined { bundle, .. } => bundle.mode,
            FileSet::Spiffe { bundle_mode, .. } => *bundle_mode,
        }
    }
}

//! Parser and validator for the identity annotations on a pod.
//!
//! Anyone who can create a pod controls these values, so this module treats them as hostile
//! input. The daemon runs as root on the host, and everything it later does on behalf of a
//! container (which agent socket it dials, which directory it mounts, which files it writes and
//! with what modes) is decided here. Hence the rules:
//!
//! * the size of a value is checked before any parsing ([`MAX_VALUE_BYTES`]);
//! * the YAML is first scanned as a stream of events under a tight [`serde_saphyr::Budget`] (a
//!   valid value is one mapping of at most 15 short scalars), so alias bombs, deep nesting and
//!   huge node counts are refused before anything is built;
//! * deserialization is strict: unknown keys, repeated keys, wrong types, unknown enum values,
//!   custom tags and merge keys (`<<`) are errors, never ignored;
//! * every path and file name is checked syntactically (no file system access here), and the
//!   agent socket must be one the daemon's [`Policy`] allows.
//!
//! serde-saphyr is the YAML library because `serde_yaml` is deprecated and unmaintained, and
//! serde-saphyr's parser is panic-free and enforces resource budgets while streaming, without
//! building an intermediate DOM.
//!
//! # Annotation format
//!
//! Keys: [`CONTAINER_KEY_PREFIX`]`<container-name>` for one container, [`POD_KEY`] for all the
//! containers of a pod; the container key wins. The value is a YAML mapping, or a list holding
//! exactly one mapping:
//!
//! ```yaml
//! - spire_agent_address: /run/spire/admin/admin.sock
//!   cert_dir: /var/certs
//!   svid_file_name: svid.pem
//!   svid_key_file_name: svid_key.pem
//!   svid_bundle_file_name: svid_bundle.pem
//! ```
//!
//! | field | default | rule |
//! |---|---|---|
//! | `spire_agent_address` | the daemon's agent socket | absolute path or `unix://` URL, in the [`Policy`] allowlist |
//! | `cert_dir` | required | absolute, normalised, not `/`, not at or under `/proc`, `/sys`, `/dev` or the start guard's `/.nri-identity-injector-guard` |
//! | `layout` | `spiffe-helper` | `spiffe-helper` (three files) or `combined` (key + chain in one file) |
//! | `svid_file_name` | `svid.pem` | spiffe-helper layout only |
//! | `svid_key_file_name` | `svid_key.pem` | spiffe-helper layout only |
//! | `credential_bundle_file_name` | `credential-bundle.pem` | combined layout only |
//! | `svid_bundle_file_name` | `svid_bundle.pem` | both layouts |
//! | `cert_file_mode` | `0644` | spiffe-helper layout only |
//! | `key_file_mode` | `0600` | the key file, or the combined file (it holds the key) |
//! | `bundle_file_mode` | `0644` | the bundle file |
//! | `hint` | none | picks one SVID when the agent returns several |
//! | `spiffe_id` | none | the SPIFFE ID the SVID must carry |
//! | `on_failure` | `fail` | `fail` or `continue` |
//! | `federated_bundles` | `separate` | `separate` (`<trust-domain>.x509.pem` each) or `append` |
//! | `attestation` | the daemon's choice | `pid` or `selectors` |
//!
//! A field that the chosen layout does not use is refused rather than ignored, so that a
//! workload never silently gets files other than the ones its author named. A field given as
//! YAML null (`key:` or `key: ~`) counts as absent.
//!
//! File modes are always read as octal, like chmod(1), whether quoted or not: `0640`, `640`,
//! `"0640"` and `0o640` all mean rw-r-----. YAML's own integer typing is deliberately not used,
//! because `0640` is octal in YAML 1.1 but decimal in YAML 1.2. A mode may only hold permission
//! bits (no setuid, setgid or sticky), must let the owner read, and must not let group or others
//! write: the daemon rewrites these files on rotation, and a file others can write could be
//! swapped under the workload. The private key (`key_file_mode`) must additionally give others
//! no access at all; group read stays allowed because workloads commonly read their key through
//! a supplementary group.

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

pub use nri_identity_backends::Attestation;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_saphyr::budget::{BudgetBreach, EnforcingPolicy};
use serde_saphyr::granit_parser::ErrorKind;
use serde_saphyr::{Budget, DuplicateKeyPolicy, MergeKeyPolicy, Options};

/// Prefix of the per-container key; the container name follows it.
pub const CONTAINER_KEY_PREFIX: &str = "identity.noderesource.dev/container.";
/// Key that applies to every container of the pod without a key of its own.
pub const POD_KEY: &str = "identity.noderesource.dev/pod";

/// Largest accepted annotation value. A valid value is well under 1 KiB; 16 KiB leaves room for
/// comments while keeping the parse cheap (Kubernetes allows 256 KiB for all annotations).
pub const MAX_VALUE_BYTES: usize = 16 * 1024;
/// `NAME_MAX` on Linux.
pub const MAX_FILE_NAME_BYTES: usize = 255;
/// `PATH_MAX` on Linux, less the terminating NUL.
pub const MAX_PATH_BYTES: usize = 4095;
/// SPIRE hints are short labels; the cap only bounds what we keep and log.
pub const MAX_HINT_BYTES: usize = 1024;
/// The SPIFFE ID specification caps IDs at 2048 bytes.
pub const MAX_SPIFFE_ID_BYTES: usize = 2048;
/// The SPIFFE ID specification caps trust domain names at 255 bytes.
pub const MAX_TRUST_DOMAIN_BYTES: usize = 255;

/// Default name of the certificate chain file (spiffe-helper's name).
pub const DEFAULT_SVID_FILE_NAME: &str = "svid.pem";
/// Default name of the private key file (spiffe-helper's name).
pub const DEFAULT_SVID_KEY_FILE_NAME: &str = "svid_key.pem";
/// Default name of the trust bundle file (spiffe-helper's name).
pub const DEFAULT_SVID_BUNDLE_FILE_NAME: &str = "svid_bundle.pem";
/// Default name of the combined key and chain file (the KEP-4317 style name).
pub const DEFAULT_CREDENTIAL_BUNDLE_FILE_NAME: &str = "credential-bundle.pem";
/// Default mode of certificate files (spiffe-helper's default).
pub const DEFAULT_CERT_FILE_MODE: FileMode = FileMode(0o644);
/// Default mode of files holding the private key (spiffe-helper's default).
pub const DEFAULT_KEY_FILE_MODE: FileMode = FileMode(0o600);
/// Default mode of the trust bundle file (spiffe-helper's default).
pub const DEFAULT_BUNDLE_FILE_MODE: FileMode = FileMode(0o644);
/// Suffix of per-trust-domain bundle files with [`FederatedBundles::Separate`], as agreed in the
/// draft SPIFFE filesystem delivery standard. Names ending in it are reserved in that mode.
pub const FEDERATED_BUNDLE_SUFFIX: &str = ".x509.pem";

// YAML budget. A valid value has 2 levels (list, mapping) and at most 32 nodes; the limits
// leave room for a wrong-typed value (so it is reported as a type error) and for a few anchors
// used for deduplication, but nothing that can amplify work.
const YAML_MAX_DEPTH: usize = 8;
const YAML_MAX_NODES: usize = 256;
const YAML_MAX_EVENTS: usize = 1024;
const YAML_MAX_ANCHORS: usize = 8;
const YAML_MAX_ALIASES: usize = 8;
const YAML_MAX_ALIAS_REPLAYED_EVENTS: usize = 64;
const YAML_MAX_ALIAS_REPLAY_DEPTH: usize = 2;
// Longest message text from the YAML library we are willing to echo back into an error.
const MAX_ECHOED_MESSAGE_CHARS: usize = 200;
// Longest unknown key we echo back.
const MAX_ECHOED_KEY_CHARS: usize = 64;

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

    fn allows(&self, address: &Path) -> bool {
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
}

/// Where bundles of federated trust domains go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FederatedBundles {
    /// One `<trust-domain>`[`FEDERATED_BUNDLE_SUFFIX`] file per federated trust domain.
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
display_as_str!(OnFailure, Layout, FederatedBundles, Field);

// === validated output ===

/// Permission bits of a delivered file, validated to fit in `0o777`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileMode(u32);

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
}

impl FileSet {
    /// The layout these files follow.
    pub fn layout(&self) -> Layout {
        match self {
            Self::SpiffeHelper { .. } => Layout::SpiffeHelper,
            Self::Combined { .. } => Layout::Combined,
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
        }
    }
}

/// A validated SPIFFE ID of a workload: `spiffe://<trust-domain>/<path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    id: String,
    // Byte offset of the `/` that starts the path.
    path_start: usize,
}

const SPIFFE_SCHEME: &str = "spiffe://";

impl SpiffeId {
    /// Parses a workload ID. The scheme and trust domain must be lowercase (the specification
    /// makes them case-insensitive but requires implementations to emit lowercase, so anything
    /// else is a typo or an attempt to confuse a comparison) and the path must be non-empty.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.len() > MAX_SPIFFE_ID_BYTES {
            return Err(SpiffeIdError::TooLong {
                max: MAX_SPIFFE_ID_BYTES,
            });
        }
        let rest = s
            .strip_prefix(SPIFFE_SCHEME)
            .ok_or(SpiffeIdError::MissingScheme)?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if trust_domain.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        if trust_domain.len() > MAX_TRUST_DOMAIN_BYTES {
            return Err(SpiffeIdError::TrustDomainTooLong {
                max: MAX_TRUST_DOMAIN_BYTES,
            });
        }
        if !trust_domain.bytes().all(is_trust_domain_byte) {
            return Err(SpiffeIdError::TrustDomainCharacter);
        }
        if path.is_empty() {
            return Err(SpiffeIdError::MissingPath);
        }
        // `path` starts with '/', so the first item of the split is the empty prefix.
        for segment in path.split('/').skip(1) {
            if segment.is_empty() {
                return Err(SpiffeIdError::EmptySegment);
            }
            if segment == "." || segment == ".." {
                return Err(SpiffeIdError::DotSegment);
            }
            if !segment.bytes().all(is_path_segment_byte) {
                return Err(SpiffeIdError::PathCharacter);
            }
        }
        Ok(Self {
            id: s.to_owned(),
            path_start: SPIFFE_SCHEME.len() + trust_domain.len(),
        })
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain name, without scheme.
    pub fn trust_domain(&self) -> &str {
        self.id
            .get(SPIFFE_SCHEME.len()..self.path_start)
            .unwrap_or_default()
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        self.id.get(self.path_start..).unwrap_or_default()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

fn is_trust_domain_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

fn is_path_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

/// Why a string is not a valid workload SPIFFE ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("is over {max} bytes")]
    TooLong { max: usize },
    #[error("does not start with spiffe://")]
    MissingScheme,
    #[error("has an empty trust domain")]
    EmptyTrustDomain,
    #[error("has a trust domain over {max} bytes")]
    TrustDomainTooLong { max: usize },
    #[error("has a trust domain with characters other than a-z, 0-9, '.', '-', '_'")]
    TrustDomainCharacter,
    #[error("has no path")]
    MissingPath,
    #[error("has an empty path segment")]
    EmptySegment,
    #[error("has a '.' or '..' path segment")]
    DotSegment,
    #[error("has a path with characters other than A-Z, a-z, 0-9, '.', '-', '_'")]
    PathCharacter,
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
}

impl IdentityRequest {
    /// A human description of what would be delivered where, for the offline `check` command.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let source = if self.agent_address_is_default {
            "daemon default"
        } else {
            "from annotation"
        };
        push_line(
            &mut out,
            "agent socket",
            format_args!("{} ({source})", self.agent_address.display()),
        );
        let attestation = match self.attestation {
            Some(a) => a.as_str(),
            None => "daemon default",
        };
        push_line(&mut out, "attestation", format_args!("{attestation}"));
        match &self.spiffe_id {
            Some(id) => push_line(&mut out, "spiffe id", format_args!("must be {id}")),
            None => push_line(&mut out, "spiffe id", format_args!("any")),
        }
        match &self.hint {
            Some(hint) => push_line(&mut out, "hint", format_args!("{hint:?}")),
            None => push_line(&mut out, "hint", format_args!("none (first SVID)")),
        }
        push_line(
            &mut out,
            "directory",
            format_args!(
                "{} (layout {})",
                self.cert_dir.display(),
                self.files.layout()
            ),
        );
        for file in self.files.files() {
            let what = match file.content {
                FileContent::SvidChain => "X.509-SVID certificate chain, leaf first",
                FileContent::PrivateKey => "private key, PKCS#8",
                FileContent::KeyAndChain => "private key (PKCS#8) then certificate chain",
                FileContent::TrustBundle => match self.federated_bundles {
                    FederatedBundles::Separate => "trust bundle of the SVID's trust domain",
                    FederatedBundles::Append => {
                        "trust bundle of the SVID's trust domain, federated bundles appended"
                    }
                },
            };
            push_line(
                &mut out,
                "  file",
                format_args!(
                    "{} mode {} ({what})",
                    self.cert_dir.join(&file.name).display(),
                    file.mode
                ),
            );
        }
        if self.federated_bundles == FederatedBundles::Separate {
            push_line(
                &mut out,
                "  file",
                format_args!(
                    "{} mode {} (one per federated trust domain)",
                    self.cert_dir
                        .join(format!("<trust-domain>{FEDERATED_BUNDLE_SUFFIX}"))
                        .display(),
                    self.bundle_mode()
                ),
            );
        }
        let on_failure = match self.on_failure {
            OnFailure::Fail => "fail (the container does not start without its identity)",
            OnFailure::Continue => "continue (the container starts; delivery keeps retrying)",
        };
        push_line(&mut out, "on failure", format_args!("{on_failure}"));
        if self.copy_once {
            push_line(
                &mut out,
                "copy once",
                format_args!(
                    "accepted (in a VM without a shared file system, files are never rotated)"
                ),
            );
        }
        out
    }

    /// The mode of bundle files, also used for per-trust-domain federated bundles.
    pub fn bundle_mode(&self) -> FileMode {
        match &self.files {
            FileSet::SpiffeHelper { bundle, .. } | FileSet::Combined { bundle, .. } => bundle.mode,
        }
    }
}

fn push_line(out: &mut String, label: &str, value: fmt::Arguments<'_>) {
    use fmt::Write as _;
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{label:<13} {value}");
}

// === errors ===

/// A field of the annotation value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    SpireAgentAddress,
    CertDir,
    SvidFileName,
    SvidKeyFileName,
    SvidBundleFileName,
    CredentialBundleFileName,
    Hint,
    SpiffeId,
    CertFileMode,
    KeyFileMode,
    BundleFileMode,
    OnFailure,
    Layout,
    FederatedBundles,
    Attestation,
    CopyOnce,
}

impl Field {
    /// Every field, in documentation order.
    pub const ALL: [Field; 16] = [
        Self::SpireAgentAddress,
        Self::CertDir,
        Self::SvidFileName,
        Self::SvidKeyFileName,
        Self::SvidBundleFileName,
        Self::CredentialBundleFileName,
        Self::Hint,
        Self::SpiffeId,
        Self::CertFileMode,
        Self::KeyFileMode,
        Self::BundleFileMode,
        Self::OnFailure,
        Self::Layout,
        Self::FederatedBundles,
        Self::Attestation,
        Self::CopyOnce,
    ];

    /// The YAML key.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SpireAgentAddress => "spire_agent_address",
            Self::CertDir => "cert_dir",
            Self::SvidFileName => "svid_file_name",
            Self::SvidKeyFileName => "svid_key_file_name",
            Self::SvidBundleFileName => "svid_bundle_file_name",
            Self::CredentialBundleFileName => "credential_bundle_file_name",
            Self::Hint => "hint",
            Self::SpiffeId => "spiffe_id",
            Self::CertFileMode => "cert_file_mode",
            Self::KeyFileMode => "key_file_mode",
            Self::BundleFileMode => "bundle_file_mode",
            Self::OnFailure => "on_failure",
            Self::Layout => "layout",
            Self::FederatedBundles => "federated_bundles",
            Self::Attestation => "attestation",
            Self::CopyOnce => "copy_once",
        }
    }

    fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == key)
    }

    // What a value of the wrong type should have been, for the error message.
    fn expected(self) -> &'static str {
        match self {
            Self::SpireAgentAddress => "a string holding an absolute path or unix:// url",
            Self::CertDir => "a string holding an absolute path",
            Self::SvidFileName
            | Self::SvidKeyFileName
            | Self::SvidBundleFileName
            | Self::CredentialBundleFileName => "a string holding a file name",
            Self::Hint => "a string",
            Self::SpiffeId => "a string holding a spiffe id",
            Self::CertFileMode | Self::KeyFileMode | Self::BundleFileMode => {
                "an octal file mode such as \"0640\""
            }
            Self::OnFailure => "`fail` or `continue`",
            Self::Layout => "`spiffe-helper` or `combined`",
            Self::FederatedBundles => "`separate` or `append`",
            Self::Attestation => "`pid` or `selectors`",
            Self::CopyOnce => "`true` or `false`",
        }
    }
}

/// A YAML resource limit an annotation value exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YamlLimit {
    Depth,
    Nodes,
    Events,
    Anchors,
    Aliases,
    AliasExpansion,
    Documents,
    MergeKeys,
    ScalarBytes,
    Other,
}

impl fmt::Display for YamlLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Depth => "nesting depth",
            Self::Nodes => "node count",
            Self::Events => "event count",
            Self::Anchors => "anchor count",
            Self::Aliases => "alias count",
            Self::AliasExpansion => "alias expansion",
            Self::Documents => "single document",
            Self::MergeKeys => "no merge keys (<<)",
            Self::ScalarBytes => "scalar size",
            Self::Other => "parser budget",
        })
    }
}

/// What is wrong with one field's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldProblem {
    #[error("is required")]
    Missing,
    #[error("is given more than once")]
    Repeated,
    #[error("must be {expected}")]
    WrongType { expected: &'static str },
    #[error("is not used by layout {layout}")]
    NotUsedByLayout { layout: Layout },
    #[error("must not be empty")]
    Empty,
    #[error("must not contain a nul byte")]
    ContainsNul,
    #[error("must not contain control characters")]
    ContainsControl,
    #[error("is {len} bytes, over the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("must be an absolute path")]
    NotAbsolute,
    #[error("must be a normalised path (no empty, '.' or '..' components, no trailing '/')")]
    NotNormalised,
    #[error("has a path component over {max} bytes")]
    ComponentTooLong { max: usize },
    #[error("must not be the root directory")]
    RootDirectory,
    #[error("must not be at or under {dir}")]
    ReservedDirectory { dir: &'static str },
    #[error("must be an absolute path or a unix:// url")]
    UnsupportedScheme,
    #[error("is not an agent socket this daemon allows")]
    AgentNotAllowed,
    #[error("must be a file name, not a path (contains '/')")]
    ContainsSlash,
    #[error("must not be '.' or '..'")]
    DotName,
    #[error("must not end in {suffix}, which is reserved for federated bundles")]
    ReservedSuffix { suffix: &'static str },
    #[error("names the same file as {other}")]
    DuplicateFileName { other: Field },
    #[error("must be an octal file mode such as \"0640\"")]
    InvalidMode,
    #[error("must not set setuid, setgid or sticky bits")]
    SpecialModeBits,
    #[error("must let the owner read the file")]
    OwnerCannotRead,
    #[error("must not let group or others write the file")]
    GroupOrWorldWritable,
    #[error("must not give others any access to the private key")]
    KeyAccessibleByOthers,
    #[error("is not a valid spiffe id (spiffe://<trust-domain>/<path>): it {0}")]
    InvalidSpiffeId(SpiffeIdError),
    #[error("uses an unsupported yaml tag")]
    UnsupportedTag,
}

/// Why an annotation value was refused. Displays without the pod context; see
/// [`InvalidAnnotation`] for the full message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    #[error("value is {size} bytes, over the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("value is empty")]
    Empty,
    #[error("value exceeds the yaml {limit} limit")]
    TooComplex { limit: YamlLimit },
    #[error("value is not valid yaml: {message}")]
    Syntax { message: String },
    #[error("value must be a mapping or a list of exactly one mapping")]
    NotAMapping,
    #[error("value is an empty list; exactly one entry is required")]
    EmptyList,
    #[error("value is a list of more than one entry; exactly one is allowed")]
    TooManyEntries,
    #[error("value has a key that is not a string")]
    InvalidKey,
    /// `key` is escaped and truncated, so it is safe to log.
    #[error("field {key}: is not a known field")]
    UnknownField { key: String },
    #[error("field {field}: {problem}")]
    Field { field: Field, problem: FieldProblem },
}

impl AnnotationError {
    fn field(field: Field, problem: FieldProblem) -> Self {
        Self::Field { field, problem }
    }
}

/// An [`AnnotationError`] with the pod, container and annotation it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
// The inner error is part of the message on purpose and so not exposed as `source()`, which
// would print it twice in an error chain.
#[error("pod {namespace}/{pod} container {container}: annotation {key}: {error}")]
pub struct InvalidAnnotation {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub key: String,
    pub error: AnnotationError,
}

/// The pod a container belongs to, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

// === lookup and parse ===

/// The annotation key for one container.
pub fn container_key(container_name: &str) -> String {
    format!("{CONTAINER_KEY_PREFIX}{container_name}")
}

/// Finds the annotation that applies to `container_name`: its own key, else the pod key.
/// Returns the key and the value. Accepts any map iterated by reference, such as
/// `&BTreeMap<String, String>` or `&HashMap<String, String>`.
pub fn lookup<'a, I, K, V>(annotations: I, container_name: &str) -> Option<(&'a str, &'a str)>
where
    I: IntoIterator<Item = (&'a K, &'a V)>,
    K: AsRef<str> + ?Sized + 'a,
    V: AsRef<str> + ?Sized + 'a,
{
    let mut pod = None;
    for (key, value) in annotations {
        let key = key.as_ref();
        if key
            .strip_prefix(CONTAINER_KEY_PREFIX)
            .is_some_and(|name| name == container_name)
        {
            return Some((key, value.as_ref()));
        }
        if key == POD_KEY {
            pod = Some((key, value.as_ref()));
        }
    }
    pod
}

/// Looks up and parses the annotation for one container. `Ok(None)` means the container has
/// no identity annotation.
pub fn request_for_container<'a, I, K, V>(
    annotations: I,
    pod: PodRef<'_>,
    container_name: &str,
    policy: &Policy,
) -> Result<Option<IdentityRequest>, Box<InvalidAnnotation>>
where
    I: IntoIterator<Item = (&'a K, &'a V)>,
    K: AsRef<str> + ?Sized + 'a,
    V: AsRef<str> + ?Sized + 'a,
{
    let Some((key, value)) = lookup(annotations, container_name) else {
        return Ok(None);
    };
    parse(value, policy).map(Some).map_err(|error| {
        // Boxed: four strings and the error make a large `Err`, and this path is cold.
        Box::new(InvalidAnnotation {
            namespace: pod.namespace.to_owned(),
            pod: pod.name.to_owned(),
            container: container_name.to_owned(),
            key: key.to_owned(),
            error,
        })
    })
}

/// Parses and validates one annotation value.
pub fn parse(value: &str, policy: &Policy) -> Result<IdentityRequest, AnnotationError> {
    // Before anything else, so an oversized value costs nothing but its length.
    if value.len() > MAX_VALUE_BYTES {
        return Err(AnnotationError::TooLarge {
            size: value.len(),
            max: MAX_VALUE_BYTES,
        });
    }
    if value.trim().is_empty() {
        return Err(AnnotationError::Empty);
    }
    precheck_budget(value)?;
    let raw = deserialize(value)?;
    validate(raw, policy)
}

fn budget() -> Budget {
    let mut b = Budget::default();
    b.max_depth = YAML_MAX_DEPTH;
    // The scanner reads a whole flow collection ahead of the events the budget counts (it may
    // be a key), so deep flow nesting trips this limit first; see `precheck_budget`.
    b.flow_nesting_limit = YAML_MAX_DEPTH;
    b.max_nodes = YAML_MAX_NODES;
    b.max_events = YAML_MAX_EVENTS;
    b.max_anchors = YAML_MAX_ANCHORS;
    b.max_aliases = YAML_MAX_ALIASES;
    b.max_documents = 1;
    b.max_merge_keys = 0;
    b.max_total_scalar_bytes = MAX_VALUE_BYTES;
    b.max_recorded_anchor_events = YAML_MAX_EVENTS;
    b.max_recorded_anchor_bytes = MAX_VALUE_BYTES;
    b.max_inclusion_depth = 0;
    b
}

fn options() -> Options {
    let mut o = Options::default();
    o.budget = Some(budget());
    o.alias_limits.max_total_replayed_events = YAML_MAX_ALIAS_REPLAYED_EVENTS;
    o.alias_limits.max_replay_stack_depth = YAML_MAX_ALIAS_REPLAY_DEPTH;
    o.alias_limits.max_alias_expansions_per_anchor = YAML_MAX_ALIASES;
    // Our visitor sees repeated keys and reports them against the field.
    o.duplicate_keys = DuplicateKeyPolicy::PassThrough;
    o.merge_keys = MergeKeyPolicy::Error;
    o.reject_unsupported_tags = true;
    o.reject_tagged_field_names = true;
    // Snippets would copy parts of the hostile input into our error messages.
    o.with_snippet = false;
    o
}

// The deserializer enforces the same budget while streaming, but only as far as it reads: a
// type error early in the value would stop it before a bomb later on is seen. Scanning the
// whole value first makes the refusal of hostile YAML not depend on where it sits.
fn precheck_budget(value: &str) -> Result<(), AnnotationError> {
    let report =
        serde_saphyr::budget::check_yaml_budget(value, budget(), EnforcingPolicy::AllContent)
            .map_err(|e| match e.kind() {
                ErrorKind::RecursionLimitExceeded => AnnotationError::TooComplex {
                    limit: YamlLimit::Depth,
                },
                _ => AnnotationError::Syntax {
                    message: sanitize(&e.to_string(), MAX_ECHOED_MESSAGE_CHARS),
                },
            })?;
    if let Some(breach) = &report.breached {
        return Err(AnnotationError::TooComplex {
            limit: limit_of(breach),
        });
    }
    if report.nodes == 0 {
        // Only comments or document markers.
        return Err(AnnotationError::Empty);
    }
    Ok(())
}

fn limit_of(breach: &BudgetBreach) -> YamlLimit {
    match breach {
        BudgetBreach::Depth { .. } => YamlLimit::Depth,
        BudgetBreach::Nodes { .. } => YamlLimit::Nodes,
        BudgetBreach::Events { .. } => YamlLimit::Events,
        BudgetBreach::Anchors { .. } => YamlLimit::Anchors,
        BudgetBreach::Aliases { .. } | BudgetBreach::AliasAnchorRatio { .. } => YamlLimit::Aliases,
        BudgetBreach::RecordedAnchorEvents { .. } | BudgetBreach::RecordedAnchorBytes { .. } => {
            YamlLimit::AliasExpansion
        }
        BudgetBreach::Documents { .. } => YamlLimit::Documents,
        BudgetBreach::MergeKeys { .. } => YamlLimit::MergeKeys,
        BudgetBreach::ScalarBytes { .. } => YamlLimit::ScalarBytes,
        _ => YamlLimit::Other,
    }
}

/// Escapes control characters and truncates, so text derived from the input is safe to log.
fn sanitize(s: &str, max_chars: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max_chars {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

// === deserialization ===

/// The value as written, types checked but nothing else.
#[derive(Debug, Default)]
struct RawSpec {
    spire_agent_address: Option<String>,
    cert_dir: Option<String>,
    svid_file_name: Option<String>,
    svid_key_file_name: Option<String>,
    svid_bundle_file_name: Option<String>,
    credential_bundle_file_name: Option<String>,
    hint: Option<String>,
    spiffe_id: Option<String>,
    cert_file_mode: Option<String>,
    key_file_mode: Option<String>,
    bundle_file_mode: Option<String>,
    on_failure: Option<OnFailure>,
    layout: Option<Layout>,
    federated_bundles: Option<FederatedBundles>,
    attestation: Option<Attestation>,
    copy_once: Option<bool>,
}

/// Where the deserializer was when it failed. serde errors carry no field path, and the
/// visitors can only return the library's error type, so they record here what went wrong
/// and the caller turns it into an [`AnnotationError`].
#[derive(Debug, Default)]
struct Tracker {
    field: Option<Field>,
    reading_key: bool,
    problem: Option<AnnotationError>,
}

impl Tracker {
    fn fail<E: de::Error>(&mut self, problem: AnnotationError) -> E {
        let e = E::custom(&problem);
        self.problem = Some(problem);
        e
    }
}

fn deserialize(value: &str) -> Result<RawSpec, AnnotationError> {
    let mut tracker = Tracker::default();
    let result = serde_saphyr::with_deserializer_from_str_with_options(value, options(), |de| {
        DocumentSeed {
            tracker: &mut tracker,
        }
        .deserialize(de)
    });
    result.map_err(|e| classify(&e, tracker))
}

fn classify(error: &serde_saphyr::Error, tracker: Tracker) -> AnnotationError {
    use serde_saphyr::Error as E;
    if let Some(problem) = tracker.problem {
        return problem;
    }
    let error = unwrap_error(error);
    match error {
        E::Budget { breach, .. } => AnnotationError::TooComplex {
            limit: limit_of(breach),
        },
        E::AliasReplayCounterOverflow { .. }
        | E::AliasReplayLimitExceeded { .. }
        | E::AliasExpansionLimitExceeded { .. }
        | E::AliasReplayStackDepthExceeded { .. } => AnnotationError::TooComplex {
            limit: YamlLimit::AliasExpansion,
        },
        E::MergeKeyNotAllowed { .. } => AnnotationError::TooComplex {
            limit: YamlLimit::MergeKeys,
        },
        E::MultipleDocuments { .. } => AnnotationError::TooComplex {
            limit: YamlLimit::Documents,
        },
        E::UnsupportedTag { .. } | E::TaggedStructFieldName { .. } => match tracker.field {
            Some(field) => AnnotationError::field(field, FieldProblem::UnsupportedTag),
            None => AnnotationError::Syntax {
                message: "unsupported yaml tag".to_owned(),
            },
        },
        _ if tracker.reading_key => AnnotationError::InvalidKey,
        _ => match tracker.field {
            Some(field) => AnnotationError::field(
                field,
                FieldProblem::WrongType {
                    expected: field.expected(),
                },
            ),
            None => match error {
                E::SerdeInvalidType { .. }
                | E::SerdeInvalidValue { .. }
                | E::Unexpected { .. }
                | E::NullIntoString { .. }
                | E::InvalidScalar { .. }
                | E::Eof { .. } => AnnotationError::NotAMapping,
                other => AnnotationError::Syntax {
                    message: sanitize(&other.to_string(), MAX_ECHOED_MESSAGE_CHARS),
                },
            },
        },
    }
}

fn unwrap_error(error: &serde_saphyr::Error) -> &serde_saphyr::Error {
    match error.without_snippet() {
        serde_saphyr::Error::AliasError { error, .. } => unwrap_error(error),
        other => other,
    }
}

/// The whole value: a mapping, or a list of exactly one mapping.
struct DocumentSeed<'t> {
    tracker: &'t mut Tracker,
}

impl<'de> DeserializeSeed<'de> for DocumentSeed<'_> {
    type Value = RawSpec;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<RawSpec, D::Error> {
        d.deserialize_any(DocumentVisitor {
            tracker: self.tracker,
        })
    }
}

struct DocumentVisitor<'t> {
    tracker: &'t mut Tracker,
}

impl<'de> Visitor<'de> for DocumentVisitor<'_> {
    type Value = RawSpec;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping or a list of one mapping")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawSpec, A::Error> {
        let Some(raw) = seq.next_element_seed(SpecSeed {
            tracker: &mut *self.tracker,
        })?
        else {
            return Err(self.tracker.fail(AnnotationError::EmptyList));
        };
        if seq.next_element::<IgnoredAny>()?.is_some() {
            return Err(self.tracker.fail(AnnotationError::TooManyEntries));
        }
        Ok(raw)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawSpec, A::Error> {
        SpecVisitor {
            tracker: self.tracker,
        }
        .visit_map(map)
    }
}

struct SpecSeed<'t> {
    tracker: &'t mut Tracker,
}

impl<'de> DeserializeSeed<'de> for SpecSeed<'_> {
    type Value = RawSpec;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<RawSpec, D::Error> {
        d.deserialize_map(SpecVisitor {
            tracker: self.tracker,
        })
    }
}

struct SpecVisitor<'t> {
    tracker: &'t mut Tracker,
}

impl<'de> Visitor<'de> for SpecVisitor<'_> {
    type Value = RawSpec;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawSpec, A::Error> {
        let t = self.tracker;
        let mut raw = RawSpec::default();
        let mut seen = BTreeSet::new();
        loop {
            t.reading_key = true;
            let key: Option<String> = map.next_key()?;
            t.reading_key = false;
            let Some(key) = key else { break };
            let Some(field) = Field::from_key(&key) else {
                return Err(t.fail(AnnotationError::UnknownField {
                    key: sanitize(&key, MAX_ECHOED_KEY_CHARS),
                }));
            };
            if !seen.insert(field) {
                return Err(t.fail(AnnotationError::field(field, FieldProblem::Repeated)));
            }
            t.field = Some(field);
            match field {
                Field::SpireAgentAddress => raw.spire_agent_address = map.next_value()?,
                Field::CertDir => raw.cert_dir = map.next_value()?,
                Field::SvidFileName => raw.svid_file_name = map.next_value()?,
                Field::SvidKeyFileName => raw.svid_key_file_name = map.next_value()?,
                Field::SvidBundleFileName => raw.svid_bundle_file_name = map.next_value()?,
                Field::CredentialBundleFileName => {
                    raw.credential_bundle_file_name = map.next_value()?;
                }
                Field::Hint => raw.hint = map.next_value()?,
                Field::SpiffeId => raw.spiffe_id = map.next_value()?,
                Field::CertFileMode => raw.cert_file_mode = map.next_value()?,
                Field::KeyFileMode => raw.key_file_mode = map.next_value()?,
                Field::BundleFileMode => raw.bundle_file_mode = map.next_value()?,
                Field::OnFailure => raw.on_failure = map.next_value()?,
                Field::Layout => raw.layout = map.next_value()?,
                Field::FederatedBundles => raw.federated_bundles = map.next_value()?,
                Field::Attestation => raw.attestation = map.next_value()?,
                Field::CopyOnce => raw.copy_once = map.next_value()?,
            }
            t.field = None;
        }
        Ok(raw)
    }
}

// === validation ===

fn validate(raw: RawSpec, policy: &Policy) -> Result<IdentityRequest, AnnotationError> {
    let (agent_address, agent_address_is_default) = match raw.spire_agent_address.as_deref() {
        Some(address) => (agent_address(address, policy)?, false),
        None => (policy.default_agent_address().to_path_buf(), true),
    };

    let cert_dir = raw.cert_dir.as_deref().ok_or(AnnotationError::field(
        Field::CertDir,
        FieldProblem::Missing,
    ))?;
    let cert_dir =
        cert_directory(cert_dir).map_err(|p| AnnotationError::field(Field::CertDir, p))?;

    let layout = raw.layout.unwrap_or_default();
    let federated_bundles = raw.federated_bundles.unwrap_or_default();
    let unused: &[(Field, bool)] = match layout {
        Layout::SpiffeHelper => &[(
            Field::CredentialBundleFileName,
            raw.credential_bundle_file_name.is_some(),
        )],
        Layout::Combined => &[
            (Field::SvidFileName, raw.svid_file_name.is_some()),
            (Field::SvidKeyFileName, raw.svid_key_file_name.is_some()),
            (Field::CertFileMode, raw.cert_file_mode.is_some()),
        ],
    };
    if let Some((field, _)) = unused.iter().find(|(_, given)| *given) {
        return Err(AnnotationError::field(
            *field,
            FieldProblem::NotUsedByLayout { layout },
        ));
    }

    let file = |spec: FileSpec<'_>| output_file(spec, federated_bundles);
    let bundle = FileSpec {
        name_field: Field::SvidBundleFileName,
        name: &raw.svid_bundle_file_name,
        default_name: DEFAULT_SVID_BUNDLE_FILE_NAME,
        mode_field: Field::BundleFileMode,
        mode: &raw.bundle_file_mode,
        default_mode: DEFAULT_BUNDLE_FILE_MODE,
        content: FileContent::TrustBundle,
    };
    // Files in field order, so a duplicate name is reported on the later field.
    let files = match layout {
        Layout::SpiffeHelper => {
            let svid = file(FileSpec {
                name_field: Field::SvidFileName,
                name: &raw.svid_file_name,
                default_name: DEFAULT_SVID_FILE_NAME,
                mode_field: Field::CertFileMode,
                mode: &raw.cert_file_mode,
                default_mode: DEFAULT_CERT_FILE_MODE,
                content: FileContent::SvidChain,
            })?;
            let key = file(FileSpec {
                name_field: Field::SvidKeyFileName,
                name: &raw.svid_key_file_name,
                default_name: DEFAULT_SVID_KEY_FILE_NAME,
                mode_field: Field::KeyFileMode,
                mode: &raw.key_file_mode,
                default_mode: DEFAULT_KEY_FILE_MODE,
                content: FileContent::PrivateKey,
            })?;
            let bundle = file(bundle)?;
            reject_duplicates(&[&svid, &key, &bundle])?;
            FileSet::SpiffeHelper {
                svid: svid.1,
                key: key.1,
                bundle: bundle.1,
            }
        }
        Layout::Combined => {
            let bundle = file(bundle)?;
            let credentials = file(FileSpec {
                name_field: Field::CredentialBundleFileName,
                name: &raw.credential_bundle_file_name,
                default_name: DEFAULT_CREDENTIAL_BUNDLE_FILE_NAME,
                // The combined file holds the key, so it gets the key's mode and rules.
                mode_field: Field::KeyFileMode,
                mode: &raw.key_file_mode,
                default_mode: DEFAULT_KEY_FILE_MODE,
                content: FileContent::KeyAndChain,
            })?;
            reject_duplicates(&[&bundle, &credentials])?;
            FileSet::Combined {
                credentials: credentials.1,
                bundle: bundle.1,
            }
        }
    };

    let hint = raw
        .hint
        .map(|h| {
            hint_text(&h)
                .map(|()| h)
                .map_err(|p| AnnotationError::field(Field::Hint, p))
        })
        .transpose()?;
    let spiffe_id = raw
        .spiffe_id
        .as_deref()
        .map(|id| {
            SpiffeId::parse(id).map_err(|e| {
                AnnotationError::field(Field::SpiffeId, FieldProblem::InvalidSpiffeId(e))
            })
        })
        .transpose()?;

    Ok(IdentityRequest {
        agent_address,
        agent_address_is_default,
        cert_dir,
        files,
        hint,
        spiffe_id,
        on_failure: raw.on_failure.unwrap_or_default(),
        federated_bundles,
        attestation: raw.attestation,
        copy_once: raw.copy_once.unwrap_or(false),
    })
}

/// One file of a layout: the fields that name it and set its mode, and their defaults.
struct FileSpec<'r> {
    name_field: Field,
    name: &'r Option<String>,
    default_name: &'static str,
    mode_field: Field,
    mode: &'r Option<String>,
    default_mode: FileMode,
    content: FileContent,
}

fn output_file(
    spec: FileSpec<'_>,
    federated: FederatedBundles,
) -> Result<(Field, OutputFile), AnnotationError> {
    let name = spec.name.as_deref().unwrap_or(spec.default_name);
    file_name(name, federated).map_err(|p| AnnotationError::field(spec.name_field, p))?;
    let holds_key = matches!(
        spec.content,
        FileContent::PrivateKey | FileContent::KeyAndChain
    );
    let mode = match spec.mode {
        Some(text) => {
            file_mode(text, holds_key).map_err(|p| AnnotationError::field(spec.mode_field, p))?
        }
        None => spec.default_mode,
    };
    let file = OutputFile {
        name: name.to_owned(),
        mode,
        content: spec.content,
    };
    Ok((spec.name_field, file))
}

fn reject_duplicates(files: &[&(Field, OutputFile)]) -> Result<(), AnnotationError> {
    for (i, (field, file)) in files.iter().enumerate() {
        if let Some((earlier, _)) = files.iter().take(i).find(|(_, f)| f.name == file.name) {
            return Err(AnnotationError::field(
                *field,
                FieldProblem::DuplicateFileName { other: *earlier },
            ));
        }
    }
    Ok(())
}

fn agent_address(address: &str, policy: &Policy) -> Result<PathBuf, AnnotationError> {
    let problem = |p| AnnotationError::field(Field::SpireAgentAddress, p);
    // `unix://` URLs are what SPIFFE_ENDPOINT_SOCKET and SPIRE's own flags use, so operators
    // will paste them; the allowlist holds plain paths, so the prefix is stripped first.
    let path = match address.strip_prefix("unix://") {
        Some(path) => path,
        None if address.contains("://") => return Err(problem(FieldProblem::UnsupportedScheme)),
        None => address,
    };
    absolute_path(path).map_err(problem)?;
    let path = PathBuf::from(path);
    if !policy.allows(&path) {
        return Err(problem(FieldProblem::AgentNotAllowed));
    }
    Ok(path)
}

// Runtime-managed mounts: mounting over them could mask the runtime's own masked or read-only
// paths, and nothing legitimate lives there; and where the start guard is mounted.
const RESERVED_DIRS: [&str; 4] = ["/proc", "/sys", "/dev", crate::guard::CONTAINER_PATH];

fn cert_directory(dir: &str) -> Result<PathBuf, FieldProblem> {
    absolute_path(dir)?;
    if dir == "/" {
        return Err(FieldProblem::RootDirectory);
    }
    if let Some(reserved) = RESERVED_DIRS.iter().find(|r| {
        dir.strip_prefix(**r)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }) {
        return Err(FieldProblem::ReservedDirectory { dir: reserved });
    }
    Ok(PathBuf::from(dir))
}

/// An absolute path with no `.`, `..` or empty components and no trailing `/`: what the
/// daemon joins to other paths must mean exactly what it says.
fn absolute_path(path: &str) -> Result<(), FieldProblem> {
    text(path, MAX_PATH_BYTES)?;
    let Some(rest) = path.strip_prefix('/') else {
        return Err(FieldProblem::NotAbsolute);
    };
    if rest.is_empty() {
        return Ok(());
    }
    for component in rest.split('/') {
        if component.is_empty() || component == "." || component == ".." {
            return Err(FieldProblem::NotNormalised);
        }
        if component.len() > MAX_FILE_NAME_BYTES {
            return Err(FieldProblem::ComponentTooLong {
                max: MAX_FILE_NAME_BYTES,
            });
        }
    }
    Ok(())
}

fn file_name(name: &str, federated: FederatedBundles) -> Result<(), FieldProblem> {
    text(name, MAX_FILE_NAME_BYTES)?;
    if name.contains('/') {
        return Err(FieldProblem::ContainsSlash);
    }
    if name == "." || name == ".." {
        return Err(FieldProblem::DotName);
    }
    if federated == FederatedBundles::Separate && name.ends_with(FEDERATED_BUNDLE_SUFFIX) {
        return Err(FieldProblem::ReservedSuffix {
            suffix: FEDERATED_BUNDLE_SUFFIX,
        });
    }
    Ok(())
}

fn hint_text(hint: &str) -> Result<(), FieldProblem> {
    text(hint, MAX_HINT_BYTES)
}

// Common to every string we keep: non-empty, bounded, and free of bytes that truncate C
// strings or forge lines in logs.
fn text(s: &str, max: usize) -> Result<(), FieldProblem> {
    if s.is_empty() {
        return Err(FieldProblem::Empty);
    }
    if s.contains('\0') {
        return Err(FieldProblem::ContainsNul);
    }
    if s.chars().any(char::is_control) {
        return Err(FieldProblem::ContainsControl);
    }
    if s.len() > max {
        return Err(FieldProblem::TooLong { len: s.len(), max });
    }
    Ok(())
}

fn file_mode(text: &str, key: bool) -> Result<FileMode, FieldProblem> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    // Six digits at most keeps the value far from overflow while still accepting `000640`.
    if digits.is_empty() || digits.len() > 6 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err(FieldProblem::InvalidMode);
    }
    let bits = u32::from_str_radix(digits, 8).map_err(|_| FieldProblem::InvalidMode)?;
    if bits > 0o7777 {
        return Err(FieldProblem::InvalidMode);
    }
    if bits & 0o7000 != 0 {
        return Err(FieldProblem::SpecialModeBits);
    }
    if bits & 0o400 == 0 {
        return Err(FieldProblem::OwnerCannotRead);
    }
    if bits & 0o022 != 0 {
        return Err(FieldProblem::GroupOrWorldWritable);
    }
    if key && bits & 0o007 != 0 {
        return Err(FieldProblem::KeyAccessibleByOthers);
    }
    Ok(FileMode(bits))
}

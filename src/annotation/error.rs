//! Why an annotation value is refused, naming the field and the problem.

use std::fmt;

use super::{Layout, SpiffeIdError};

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
    JwtAudience,
    JwtSvidFileName,
    JwtBundleFileName,
}

impl Field {
    /// Every field, in documentation order.
    pub const ALL: [Field; 19] = [
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
        Self::JwtAudience,
        Self::JwtSvidFileName,
        Self::JwtBundleFileName,
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
            Self::JwtAudience => "jwt_audience",
            Self::JwtSvidFileName => "jwt_svid_file_name",
            Self::JwtBundleFileName => "jwt_bundle_file_name",
        }
    }

    pub(super) fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == key)
    }

    // What a value of the wrong type should have been, for the error message.
    pub(super) fn expected(self) -> &'static str {
        match self {
            Self::SpireAgentAddress => "a string holding an absolute path or unix:// url",
            Self::CertDir => "a string holding an absolute path",
            Self::SvidFileName
            | Self::SvidKeyFileName
            | Self::SvidBundleFileName
            | Self::CredentialBundleFileName
            | Self::JwtSvidFileName
            | Self::JwtBundleFileName => "a string holding a file name",
            Self::JwtAudience => "a list of audience strings",
            Self::Hint => "a string",
            Self::SpiffeId => "a string holding a spiffe id",
            Self::CertFileMode | Self::KeyFileMode | Self::BundleFileMode => {
                "an octal file mode such as \"0640\""
            }
            Self::OnFailure => "`fail` or `continue`",
            Self::Layout => "`spiffe-helper`, `combined` or `spiffe`",
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
    #[error("lists more than {max} audiences")]
    TooManyAudiences { max: usize },
    #[error("lists the audience {audience:?} twice")]
    DuplicateAudience { audience: String },
    #[error("has audience {index}, which {problem}")]
    InvalidAudience {
        index: usize,
        problem: Box<FieldProblem>,
    },
    #[error("needs jwt_audience")]
    NeedsJwtAudience,
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
    pub(super) fn field(field: Field, problem: FieldProblem) -> Self {
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

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The pod a container belongs to, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

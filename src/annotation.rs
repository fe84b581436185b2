//! Parser and validator for the identity annotations on a pod.
//!
//! Anyone who can create a pod controls these values, so this module treats them as hostile
//! input. The daemon runs as root on the host, and everything it later does on behalf of a
//! container (which agent socket it dials, which directory it mounts, which files it writes and
//! with what modes) is decided here. Hence the rules:
//!
//! * the size of a value is checked before any parsing ([`MAX_VALUE_BYTES`]);
//! * the YAML is first scanned as a stream of events under a tight [`serde_saphyr::Budget`] (a
//!   valid value is one mapping of at most 19 short scalars and one short list), so alias bombs, deep nesting and
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
//! | `cert_dir` | required (`layout: spiffe`: the draft's folder) | absolute, normalised, not `/`, not at or under `/proc`, `/sys`, `/dev` or the start guard's `/.nri-identity-injector-guard` |
//! | `layout` | `spiffe-helper` | `spiffe-helper` (three files), `combined` (key + chain in one file) or `spiffe` (the draft SPIFFE file-system delivery layout) |
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
//! | `jwt_audience` | none (no JWT) | a list of 1 to [`MAX_JWT_AUDIENCES`] distinct audiences, each at most [`MAX_JWT_AUDIENCE_BYTES`] bytes of printable text |
//! | `jwt_svid_file_name` | `jwt_svid.token` | with `jwt_audience` only; mode `key_file_mode` |
//! | `jwt_bundle_file_name` | `jwt_bundle.json` | with `jwt_audience` only; mode `bundle_file_mode` |
//!
//! With `layout: spiffe`, `cert_dir` defaults to [`DEFAULT_SPIFFE_CREDENTIAL_FOLDER`], the
//! file names are the draft standard's (so no `*_file_name` of the X.509 files may be given)
//! and federated bundles are always separate files.
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
//!
//! Inside: `model` (a validated request and the daemon's policy), `yaml` (reading the value
//! under its budgets), `validate` (the rules above), `error` (what is refused and why) and
//! `summary` (the `check` command's description); this file holds the limits, the defaults
//! and the entry points.

mod error;
mod model;
mod summary;
#[cfg(test)]
mod tests;
mod validate;
mod yaml;

pub use nri_identity_backends::Attestation;

pub use self::error::{AnnotationError, Field, FieldProblem, InvalidAnnotation, PodRef, YamlLimit};
pub use self::model::{
    FederatedBundles, FileContent, FileMode, FileSet, IdentityRequest, JwtRequest, Layout,
    OnFailure, OutputFile, Policy,
};
pub use crate::spiffe::{MAX_SPIFFE_ID_BYTES, MAX_TRUST_DOMAIN_BYTES, SpiffeId, SpiffeIdError};

// === limits and defaults ===

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
/// Default name of the JWT-SVID file (spiffe-helper's name).
pub const DEFAULT_JWT_SVID_FILE_NAME: &str = "jwt_svid.token";
/// Default name of the JWT bundle (JWKS) file.
pub const DEFAULT_JWT_BUNDLE_FILE_NAME: &str = "jwt_bundle.json";
/// Most audiences one JWT-SVID may be asked for.
pub const MAX_JWT_AUDIENCES: usize = 8;
/// Longest accepted audience (SPIRE sets no limit; this bounds the token and the logs).
pub const MAX_JWT_AUDIENCE_BYTES: usize = 256;
/// The `spiffe` layout's directory when the annotation names none: the draft SPIFFE
/// file-system delivery standard's first well-known credential folder.
pub const DEFAULT_SPIFFE_CREDENTIAL_FOLDER: &str = "/run/secrets/workload-spiffe-credentials";
/// The `spiffe` layout's combined key-and-chain file, as the draft names it.
pub const SPIFFE_CREDENTIAL_BUNDLE_FILE_NAME: &str = "credential-bundle.private-key.pem";
/// Suffix of per-trust-domain bundle files with [`FederatedBundles::Separate`], as agreed in the
/// draft SPIFFE filesystem delivery standard. Names ending in it are reserved in that mode.
pub const FEDERATED_BUNDLE_SUFFIX: &str = ".x509.pem";

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
    let value = yaml::without_blank_last_line(value);
    yaml::precheck_budget(value)?;
    let raw = yaml::deserialize(value)?;
    validate::validate(raw, policy)
}

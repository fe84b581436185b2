//! Turning the fields as written into an [`IdentityRequest`]: defaults, layouts, and the rules
//! for paths, file names, modes and the agent socket.

use std::path::PathBuf;

use super::yaml::RawSpec;
use super::{
    AnnotationError, DEFAULT_BUNDLE_FILE_MODE, DEFAULT_CERT_FILE_MODE,
    DEFAULT_CREDENTIAL_BUNDLE_FILE_NAME, DEFAULT_JWT_BUNDLE_FILE_NAME, DEFAULT_JWT_SVID_FILE_NAME,
    DEFAULT_KEY_FILE_MODE, DEFAULT_SPIFFE_CREDENTIAL_FOLDER, DEFAULT_SVID_BUNDLE_FILE_NAME,
    DEFAULT_SVID_FILE_NAME, DEFAULT_SVID_KEY_FILE_NAME, FEDERATED_BUNDLE_SUFFIX, FederatedBundles,
    Field, FieldProblem, FileContent, FileMode, FileSet, IdentityRequest, JwtRequest, Layout,
    MAX_FILE_NAME_BYTES, MAX_HINT_BYTES, MAX_JWT_AUDIENCE_BYTES, MAX_JWT_AUDIENCES, MAX_PATH_BYTES,
    OutputFile, Policy, SPIFFE_CREDENTIAL_BUNDLE_FILE_NAME, SpiffeId,
};

pub(super) fn validate(raw: RawSpec, policy: &Policy) -> Result<IdentityRequest, AnnotationError> {
    let (agent_address, agent_address_is_default) = match raw.spire_agent_address.as_deref() {
        Some(address) => (agent_address(address, policy)?, false),
        None => (policy.default_agent_address().to_path_buf(), true),
    };

    let layout = raw.layout.unwrap_or_default();
    let cert_dir = match (raw.cert_dir.as_deref(), layout) {
        (Some(dir), _) => dir,
        (None, Layout::Spiffe) => DEFAULT_SPIFFE_CREDENTIAL_FOLDER,
        (None, _) => {
            return Err(AnnotationError::field(
                Field::CertDir,
                FieldProblem::Missing,
            ));
        }
    };
    let cert_dir =
        cert_directory(cert_dir).map_err(|p| AnnotationError::field(Field::CertDir, p))?;

    let federated_bundles = match layout {
        Layout::Spiffe => FederatedBundles::Separate,
        _ => raw.federated_bundles.unwrap_or_default(),
    };
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
        // The draft fixes every name, and never merges trust bundles.
        Layout::Spiffe => &[
            (Field::SvidFileName, raw.svid_file_name.is_some()),
            (Field::SvidKeyFileName, raw.svid_key_file_name.is_some()),
            (
                Field::SvidBundleFileName,
                raw.svid_bundle_file_name.is_some(),
            ),
            (
                Field::CredentialBundleFileName,
                raw.credential_bundle_file_name.is_some(),
            ),
            (Field::CertFileMode, raw.cert_file_mode.is_some()),
            (
                Field::FederatedBundles,
                raw.federated_bundles == Some(FederatedBundles::Append),
            ),
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
        Layout::Spiffe => {
            let credentials = file(FileSpec {
                name_field: Field::CredentialBundleFileName,
                name: &None,
                default_name: SPIFFE_CREDENTIAL_BUNDLE_FILE_NAME,
                mode_field: Field::KeyFileMode,
                mode: &raw.key_file_mode,
                default_mode: DEFAULT_KEY_FILE_MODE,
                content: FileContent::KeyAndChain,
            })?;
            let bundle_mode = match &raw.bundle_file_mode {
                Some(text) => file_mode(text, false)
                    .map_err(|p| AnnotationError::field(Field::BundleFileMode, p))?,
                None => DEFAULT_BUNDLE_FILE_MODE,
            };
            FileSet::Spiffe {
                credentials: credentials.1,
                bundle_mode,
            }
        }
    };
    let jwt = jwt_request(&raw, &files, federated_bundles)?;

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
        jwt,
    })
}

/// The JWT-SVID files, when `jwt_audience` asks for them. Their names must not clash with the
/// X.509 files (nor, in `separate` and `spiffe` modes, look like a trust bundle).
fn jwt_request(
    raw: &RawSpec,
    files: &FileSet,
    federated: FederatedBundles,
) -> Result<Option<JwtRequest>, AnnotationError> {
    let Some(audience) = &raw.jwt_audience else {
        for (field, given) in [
            (Field::JwtSvidFileName, raw.jwt_svid_file_name.is_some()),
            (Field::JwtBundleFileName, raw.jwt_bundle_file_name.is_some()),
        ] {
            if given {
                return Err(AnnotationError::field(
                    field,
                    FieldProblem::NeedsJwtAudience,
                ));
            }
        }
        return Ok(None);
    };
    let problem = |p| AnnotationError::field(Field::JwtAudience, p);
    if audience.is_empty() {
        return Err(problem(FieldProblem::Empty));
    }
    if audience.len() > MAX_JWT_AUDIENCES {
        return Err(problem(FieldProblem::TooManyAudiences {
            max: MAX_JWT_AUDIENCES,
        }));
    }
    for (index, a) in audience.iter().enumerate() {
        text(a, MAX_JWT_AUDIENCE_BYTES).map_err(|p| {
            problem(FieldProblem::InvalidAudience {
                index,
                problem: Box::new(p),
            })
        })?;
        if audience[..index].contains(a) {
            return Err(problem(FieldProblem::DuplicateAudience {
                audience: a.clone(),
            }));
        }
    }
    // Trust bundles of the spiffe layout are `*.x509.pem` whatever `federated_bundles` says.
    let federated = match files {
        FileSet::Spiffe { .. } => FederatedBundles::Separate,
        _ => federated,
    };
    let token = output_file(
        FileSpec {
            name_field: Field::JwtSvidFileName,
            name: &raw.jwt_svid_file_name,
            default_name: DEFAULT_JWT_SVID_FILE_NAME,
            mode_field: Field::KeyFileMode,
            mode: &raw.key_file_mode,
            default_mode: DEFAULT_KEY_FILE_MODE,
            content: FileContent::JwtSvid,
        },
        federated,
    )?;
    let bundle = output_file(
        FileSpec {
            name_field: Field::JwtBundleFileName,
            name: &raw.jwt_bundle_file_name,
            default_name: DEFAULT_JWT_BUNDLE_FILE_NAME,
            mode_field: Field::BundleFileMode,
            mode: &raw.bundle_file_mode,
            default_mode: DEFAULT_BUNDLE_FILE_MODE,
            content: FileContent::JwtBundle,
        },
        federated,
    )?;
    let x509: Vec<(Field, OutputFile)> = match files {
        FileSet::SpiffeHelper { svid, key, bundle } => vec![
            (Field::SvidFileName, svid.clone()),
            (Field::SvidKeyFileName, key.clone()),
            (Field::SvidBundleFileName, bundle.clone()),
        ],
        FileSet::Combined {
            credentials,
            bundle,
        } => vec![
            (Field::CredentialBundleFileName, credentials.clone()),
            (Field::SvidBundleFileName, bundle.clone()),
        ],
        FileSet::Spiffe { credentials, .. } => {
            vec![(Field::CredentialBundleFileName, credentials.clone())]
        }
    };
    let mut all: Vec<&(Field, OutputFile)> = x509.iter().collect();
    all.push(&token);
    all.push(&bundle);
    reject_duplicates(&all)?;
    Ok(Some(JwtRequest {
        audience: audience.clone(),
        token: token.1,
        bundle: bundle.1,
    }))
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
        FileContent::PrivateKey | FileContent::KeyAndChain | FileContent::JwtSvid
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

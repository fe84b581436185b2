use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::*;

const ADMIN: &str = "/run/spire/admin/admin.sock";
const OTHER: &str = "/run/spire/other/admin.sock";

fn policy() -> Policy {
    Policy::new(ADMIN).allow_agent_address(OTHER)
}

fn ok(value: &str) -> IdentityRequest {
    match parse(value, &policy()) {
        Ok(r) => r,
        Err(e) => panic!("{value:?} refused: {e}"),
    }
}

fn field(field: Field, problem: FieldProblem) -> AnnotationError {
    AnnotationError::Field { field, problem }
}

fn file(name: &str, mode: u32, content: FileContent) -> OutputFile {
    OutputFile {
        name: name.to_owned(),
        mode: FileMode(mode),
        content,
    }
}

fn billion_laughs() -> String {
    let mut s = String::from("cert_dir: /x\nhint: &a0 [lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let prev = i - 1;
        s.push_str(&format!(
            "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
        ));
    }
    s
}

#[test]
fn hostile_values_are_refused_with_typed_errors() {
    use FieldProblem as P;
    let long_name = "a".repeat(256);
    let cases: Vec<(&str, String, AnnotationError)> = vec![
        (
            "root dir",
            "cert_dir: /".into(),
            field(Field::CertDir, P::RootDirectory),
        ),
        (
            "proc",
            "cert_dir: /proc/self".into(),
            field(Field::CertDir, P::ReservedDirectory { dir: "/proc" }),
        ),
        (
            "proc itself",
            "cert_dir: /proc".into(),
            field(Field::CertDir, P::ReservedDirectory { dir: "/proc" }),
        ),
        (
            "sys",
            "cert_dir: /sys/fs/cgroup".into(),
            field(Field::CertDir, P::ReservedDirectory { dir: "/sys" }),
        ),
        (
            "dev",
            "cert_dir: /dev/shm".into(),
            field(Field::CertDir, P::ReservedDirectory { dir: "/dev" }),
        ),
        (
            "start guard",
            "cert_dir: /.nri-identity-injector-guard".into(),
            field(
                Field::CertDir,
                P::ReservedDirectory {
                    dir: crate::guard::CONTAINER_PATH,
                },
            ),
        ),
        (
            "relative dir",
            "cert_dir: relative".into(),
            field(Field::CertDir, P::NotAbsolute),
        ),
        (
            "integer dir",
            "cert_dir: 123".into(),
            field(Field::CertDir, P::NotAbsolute),
        ),
        (
            "dotdot dir",
            "cert_dir: /a/../b".into(),
            field(Field::CertDir, P::NotNormalised),
        ),
        (
            "dot dir",
            "cert_dir: /a/./b".into(),
            field(Field::CertDir, P::NotNormalised),
        ),
        (
            "double slash",
            "cert_dir: /a//b".into(),
            field(Field::CertDir, P::NotNormalised),
        ),
        (
            "trailing slash",
            "cert_dir: /a/b/".into(),
            field(Field::CertDir, P::NotNormalised),
        ),
        (
            "nul in dir",
            "cert_dir: \"/a\\0b\"".into(),
            field(Field::CertDir, P::ContainsNul),
        ),
        (
            "newline in dir",
            "cert_dir: \"/a\\nb\"".into(),
            field(Field::CertDir, P::ContainsControl),
        ),
        (
            "dir component too long",
            format!("cert_dir: /{long_name}"),
            field(Field::CertDir, P::ComponentTooLong { max: 255 }),
        ),
        (
            "list as dir",
            "cert_dir: [/a]".into(),
            field(
                Field::CertDir,
                P::WrongType {
                    expected: Field::CertDir.expected(),
                },
            ),
        ),
        (
            "mapping as dir",
            "cert_dir: {a: b}".into(),
            field(
                Field::CertDir,
                P::WrongType {
                    expected: Field::CertDir.expected(),
                },
            ),
        ),
        (
            "missing dir",
            "hint: x".into(),
            field(Field::CertDir, P::Missing),
        ),
        (
            "null dir",
            "cert_dir: ~".into(),
            field(Field::CertDir, P::Missing),
        ),
        (
            "repeated key",
            "cert_dir: /a\ncert_dir: /b".into(),
            field(Field::CertDir, P::Repeated),
        ),
        (
            "dotdot slash name",
            "cert_dir: /c\nsvid_file_name: ../x".into(),
            field(Field::SvidFileName, P::ContainsSlash),
        ),
        (
            "path as name",
            "cert_dir: /c\nsvid_file_name: a/b".into(),
            field(Field::SvidFileName, P::ContainsSlash),
        ),
        (
            "dotdot name",
            "cert_dir: /c\nsvid_key_file_name: '..'".into(),
            field(Field::SvidKeyFileName, P::DotName),
        ),
        (
            "dot name",
            "cert_dir: /c\nsvid_bundle_file_name: '.'".into(),
            field(Field::SvidBundleFileName, P::DotName),
        ),
        (
            "nul name",
            "cert_dir: /c\nsvid_file_name: \"a\\0\"".into(),
            field(Field::SvidFileName, P::ContainsNul),
        ),
        (
            "empty name",
            "cert_dir: /c\nsvid_file_name: ''".into(),
            field(Field::SvidFileName, P::Empty),
        ),
        (
            "256-byte name",
            format!("cert_dir: /c\nsvid_file_name: {long_name}"),
            field(Field::SvidFileName, P::TooLong { len: 256, max: 255 }),
        ),
        (
            "duplicate names",
            "cert_dir: /c\nsvid_key_file_name: svid.pem".into(),
            field(
                Field::SvidKeyFileName,
                P::DuplicateFileName {
                    other: Field::SvidFileName,
                },
            ),
        ),
        (
            "duplicate names in combined layout",
            "cert_dir: /c\nlayout: combined\ncredential_bundle_file_name: svid_bundle.pem".into(),
            field(
                Field::CredentialBundleFileName,
                P::DuplicateFileName {
                    other: Field::SvidBundleFileName,
                },
            ),
        ),
        (
            "federated suffix reserved",
            "cert_dir: /c\nsvid_bundle_file_name: example.org.x509.pem".into(),
            field(
                Field::SvidBundleFileName,
                P::ReservedSuffix {
                    suffix: FEDERATED_BUNDLE_SUFFIX,
                },
            ),
        ),
        (
            "name unused by combined layout",
            "cert_dir: /c\nlayout: combined\nsvid_key_file_name: k.pem".into(),
            field(
                Field::SvidKeyFileName,
                P::NotUsedByLayout {
                    layout: Layout::Combined,
                },
            ),
        ),
        (
            "name unused by spiffe-helper layout",
            "cert_dir: /c\ncredential_bundle_file_name: c.pem".into(),
            field(
                Field::CredentialBundleFileName,
                P::NotUsedByLayout {
                    layout: Layout::SpiffeHelper,
                },
            ),
        ),
        (
            "unknown key",
            "cert_dir: /c\nmount_path: /x".into(),
            AnnotationError::UnknownField {
                key: "mount_path".into(),
            },
        ),
        (
            "unknown key with control characters",
            "cert_dir: /c\n\"a\\x1b[31m\": 1".into(),
            AnnotationError::UnknownField {
                key: "a\\u{1b}[31m".into(),
            },
        ),
        (
            "two list entries",
            "- cert_dir: /a\n- cert_dir: /b".into(),
            AnnotationError::TooManyEntries,
        ),
        ("empty list", "[]".into(), AnnotationError::EmptyList),
        ("scalar value", "hello".into(), AnnotationError::NotAMapping),
        (
            "list of scalar",
            "- hello".into(),
            AnnotationError::NotAMapping,
        ),
        ("empty value", "".into(), AnnotationError::Empty),
        ("blank value", "  \n\t\n".into(), AnnotationError::Empty),
        (
            "comment only",
            "# nothing here\n".into(),
            AnnotationError::Empty,
        ),
        (
            "17 KiB value",
            format!("cert_dir: /c\n#{}", "x".repeat(17 * 1024)),
            AnnotationError::TooLarge {
                size: 17 * 1024 + 14,
                max: MAX_VALUE_BYTES,
            },
        ),
        (
            "billion laughs",
            billion_laughs(),
            AnnotationError::TooComplex {
                limit: YamlLimit::Aliases,
            },
        ),
        (
            "alias flood",
            format!("cert_dir: &d /c\nhint: [{}]", vec!["*d"; 20].join(", ")),
            AnnotationError::TooComplex {
                limit: YamlLimit::Aliases,
            },
        ),
        (
            "deep nesting",
            format!("cert_dir: /c\nhint: {}{}", "[".repeat(100), "]".repeat(100)),
            AnnotationError::TooComplex {
                limit: YamlLimit::Depth,
            },
        ),
        (
            "deep block nesting",
            (0..40).map(|i| format!("{}- \n", "  ".repeat(i))).collect(),
            AnnotationError::TooComplex {
                limit: YamlLimit::Depth,
            },
        ),
        (
            "many nodes",
            format!("hint: [{}]", vec!["x"; 400].join(",")),
            AnnotationError::TooComplex {
                limit: YamlLimit::Nodes,
            },
        ),
        (
            "merge key",
            "base: &b {cert_dir: /c}\n<<: *b".into(),
            AnnotationError::TooComplex {
                limit: YamlLimit::MergeKeys,
            },
        ),
        (
            "two documents",
            "cert_dir: /a\n---\ncert_dir: /b".into(),
            AnnotationError::TooComplex {
                limit: YamlLimit::Documents,
            },
        ),
        (
            "custom tag",
            "cert_dir: !evil /c".into(),
            field(Field::CertDir, P::UnsupportedTag),
        ),
        (
            "non-string key",
            "? [a]\n: b".into(),
            AnnotationError::InvalidKey,
        ),
        (
            "agent outside allowlist",
            "cert_dir: /c\nspire_agent_address: /var/run/docker.sock".into(),
            field(Field::SpireAgentAddress, P::AgentNotAllowed),
        ),
        (
            "agent outside allowlist by unix url",
            "cert_dir: /c\nspire_agent_address: unix:///run/containerd/containerd.sock".into(),
            field(Field::SpireAgentAddress, P::AgentNotAllowed),
        ),
        (
            "agent allowlisted path spelled with dotdot",
            "cert_dir: /c\nspire_agent_address: /run/spire/x/../admin/admin.sock".into(),
            field(Field::SpireAgentAddress, P::NotNormalised),
        ),
        (
            "relative agent",
            "cert_dir: /c\nspire_agent_address: admin.sock".into(),
            field(Field::SpireAgentAddress, P::NotAbsolute),
        ),
        (
            "tcp agent",
            "cert_dir: /c\nspire_agent_address: tcp://10.0.0.1:8081".into(),
            field(Field::SpireAgentAddress, P::UnsupportedScheme),
        ),
        (
            "world-writable key mode",
            "cert_dir: /c\nkey_file_mode: \"0777\"".into(),
            field(Field::KeyFileMode, P::GroupOrWorldWritable),
        ),
        (
            "world-readable key mode",
            "cert_dir: /c\nkey_file_mode: \"0644\"".into(),
            field(Field::KeyFileMode, P::KeyAccessibleByOthers),
        ),
        (
            "setuid mode",
            "cert_dir: /c\ncert_file_mode: \"4644\"".into(),
            field(Field::CertFileMode, P::SpecialModeBits),
        ),
        (
            "sticky mode",
            "cert_dir: /c\nbundle_file_mode: 01644".into(),
            field(Field::BundleFileMode, P::SpecialModeBits),
        ),
        (
            "mode beyond 0o7777",
            "cert_dir: /c\ncert_file_mode: 17777".into(),
            field(Field::CertFileMode, P::InvalidMode),
        ),
        (
            "non-octal mode",
            "cert_dir: /c\ncert_file_mode: \"0999\"".into(),
            field(Field::CertFileMode, P::InvalidMode),
        ),
        (
            "symbolic mode",
            "cert_dir: /c\ncert_file_mode: rw-r--r--".into(),
            field(Field::CertFileMode, P::InvalidMode),
        ),
        (
            "negative mode",
            "cert_dir: /c\ncert_file_mode: -1".into(),
            field(Field::CertFileMode, P::InvalidMode),
        ),
        (
            "unreadable mode",
            "cert_dir: /c\ncert_file_mode: \"0044\"".into(),
            field(Field::CertFileMode, P::OwnerCannotRead),
        ),
        (
            "group-writable bundle",
            "cert_dir: /c\nbundle_file_mode: \"0664\"".into(),
            field(Field::BundleFileMode, P::GroupOrWorldWritable),
        ),
        (
            "mode as list",
            "cert_dir: /c\nkey_file_mode: [6, 0, 0]".into(),
            field(
                Field::KeyFileMode,
                P::WrongType {
                    expected: Field::KeyFileMode.expected(),
                },
            ),
        ),
        (
            "spiffe id without scheme",
            "cert_dir: /c\nspiffe_id: https://example.org/web".into(),
            field(
                Field::SpiffeId,
                P::InvalidSpiffeId(SpiffeIdError::MissingScheme),
            ),
        ),
        (
            "spiffe id uppercase trust domain",
            "cert_dir: /c\nspiffe_id: spiffe://Example.org/web".into(),
            field(
                Field::SpiffeId,
                P::InvalidSpiffeId(SpiffeIdError::TrustDomainCharacter),
            ),
        ),
        (
            "spiffe id dotdot",
            "cert_dir: /c\nspiffe_id: spiffe://example.org/a/../b".into(),
            field(
                Field::SpiffeId,
                P::InvalidSpiffeId(SpiffeIdError::DotSegment),
            ),
        ),
        (
            "spiffe id trailing slash",
            "cert_dir: /c\nspiffe_id: spiffe://example.org/a/".into(),
            field(
                Field::SpiffeId,
                P::InvalidSpiffeId(SpiffeIdError::EmptySegment),
            ),
        ),
        (
            "spiffe id without path",
            "cert_dir: /c\nspiffe_id: spiffe://example.org".into(),
            field(
                Field::SpiffeId,
                P::InvalidSpiffeId(SpiffeIdError::MissingPath),
            ),
        ),
        (
            "spiffe id with query",
            "cert_dir: /c\nspiffe_id: spiffe://example.org/a?b=c".into(),
            field(
                Field::SpiffeId,
                P::InvalidSpiffeId(SpiffeIdError::PathCharacter),
            ),
        ),
        (
            "spiffe id with port",
            "cert_dir: /c\nspiffe_id: spiffe://example.org:443/a".into(),
            field(
                Field::SpiffeId,
                P::InvalidSpiffeId(SpiffeIdError::TrustDomainCharacter),
            ),
        ),
        (
            "hint with newline",
            "cert_dir: /c\nhint: \"a\\nlevel=error msg=forged\"".into(),
            field(Field::Hint, P::ContainsControl),
        ),
        (
            "empty hint",
            "cert_dir: /c\nhint: ''".into(),
            field(Field::Hint, P::Empty),
        ),
        (
            "unknown on_failure",
            "cert_dir: /c\non_failure: ignore".into(),
            field(
                Field::OnFailure,
                P::WrongType {
                    expected: Field::OnFailure.expected(),
                },
            ),
        ),
        (
            "string-compared enum case",
            "cert_dir: /c\nlayout: Combined".into(),
            field(
                Field::Layout,
                P::WrongType {
                    expected: Field::Layout.expected(),
                },
            ),
        ),
        (
            "unknown attestation",
            "cert_dir: /c\nattestation: trust-me".into(),
            field(
                Field::Attestation,
                P::WrongType {
                    expected: Field::Attestation.expected(),
                },
            ),
        ),
        (
            "federated as mapping",
            "cert_dir: /c\nfederated_bundles: {append: true}".into(),
            field(
                Field::FederatedBundles,
                P::WrongType {
                    expected: Field::FederatedBundles.expected(),
                },
            ),
        ),
    ];
    assert!(cases.len() >= 20);
    let policy = policy();
    for (name, value, expected) in cases {
        match parse(&value, &policy) {
            Ok(r) => panic!("case {name:?} was accepted: {r:?}"),
            Err(e) => {
                assert_eq!(e, expected, "case {name:?}");
                let message = e.to_string();
                assert!(
                    message.starts_with(|c: char| c.is_lowercase()),
                    "case {name:?}: {message}"
                );
                assert!(
                    !message.chars().any(char::is_control),
                    "case {name:?}: {message:?}"
                );
            }
        }
    }
}

#[test]
fn prescan_refuses_bombs_the_deserializer_would_stop_short_of() {
    // Streaming deserialization stops at the first type error, before the bomb is expanded;
    // without the pre-scan the refusal of hostile YAML would depend on where it sits.
    assert_eq!(
        yaml::deserialize(&billion_laughs()).map(|_| ()),
        Err(field(
            Field::Hint,
            FieldProblem::WrongType {
                expected: Field::Hint.expected()
            }
        ))
    );
    assert_eq!(
        parse(&billion_laughs(), &policy()),
        Err(AnnotationError::TooComplex {
            limit: YamlLimit::Aliases
        })
    );
}

#[test]
fn syntax_errors_are_reported_without_echoing_control_characters() {
    for value in ["cert_dir: [", "cert_dir: \"/a", "a: b: c", "\u{1b}[31m: {"] {
        match parse(value, &policy()) {
            Err(AnnotationError::Syntax { message }) => {
                assert!(!message.chars().any(char::is_control), "{message:?}");
            }
            other => panic!("{value:?}: {other:?}"),
        }
    }
}

#[test]
fn design_proposal_example() {
    let r = ok("- spire_agent_address: /run/spire/admin/admin.sock
  cert_dir: /var/certs
  svid_file_name: svid.pem
  svid_key_file_name: svid_key.pem
  svid_bundle_file_name: svid_bundle.pem
");
    assert_eq!(
        r,
        IdentityRequest {
            agent_address: PathBuf::from(ADMIN),
            agent_address_is_default: false,
            cert_dir: PathBuf::from("/var/certs"),
            files: FileSet::SpiffeHelper {
                svid: file("svid.pem", 0o644, FileContent::SvidChain),
                key: file("svid_key.pem", 0o600, FileContent::PrivateKey),
                bundle: file("svid_bundle.pem", 0o644, FileContent::TrustBundle),
            },
            hint: None,
            spiffe_id: None,
            on_failure: OnFailure::Fail,
            federated_bundles: FederatedBundles::Separate,
            copy_once: false,
            attestation: None,
            jwt: None,
        }
    );
}

#[test]
fn defaults_are_applied() {
    let r = ok("cert_dir: /var/run/secrets/spiffe");
    assert_eq!(r.agent_address, PathBuf::from(ADMIN));
    assert!(r.agent_address_is_default);
    assert_eq!(r.cert_dir, PathBuf::from("/var/run/secrets/spiffe"));
    assert_eq!(
        r.files,
        FileSet::SpiffeHelper {
            svid: file(DEFAULT_SVID_FILE_NAME, 0o644, FileContent::SvidChain),
            key: file(DEFAULT_SVID_KEY_FILE_NAME, 0o600, FileContent::PrivateKey),
            bundle: file(
                DEFAULT_SVID_BUNDLE_FILE_NAME,
                0o644,
                FileContent::TrustBundle
            ),
        }
    );
    assert_eq!(r.on_failure, OnFailure::Fail);
    assert_eq!(r.federated_bundles, FederatedBundles::Separate);
    assert_eq!(r.attestation, None);
    assert_eq!(r.hint, None);
    assert_eq!(r.spiffe_id, None);
}

#[test]
fn list_and_mapping_forms_are_equivalent() {
    let list = ok("- cert_dir: /certs\n  hint: db");
    let mapping = ok("cert_dir: /certs\nhint: db");
    let flow = ok("{cert_dir: /certs, hint: db}");
    let flow_list = ok("[{cert_dir: /certs, hint: db}]");
    assert_eq!(list, mapping);
    assert_eq!(list, flow);
    assert_eq!(list, flow_list);
    assert_eq!(list.hint.as_deref(), Some("db"));
}

#[test]
fn every_field_set() {
    let r = ok("
spire_agent_address: unix:///run/spire/other/admin.sock
cert_dir: /run/secrets/workload-spiffe-credentials
layout: combined
credential_bundle_file_name: credential-bundle.private-key.pem
svid_bundle_file_name: bundle.pem
key_file_mode: 0440
bundle_file_mode: 0o444
hint: internal
spiffe_id: spiffe://example.org/ns/default/sa/web
on_failure: continue
federated_bundles: append
attestation: selectors
");
    assert_eq!(r.agent_address, PathBuf::from(OTHER));
    assert!(!r.agent_address_is_default);
    assert_eq!(r.files.layout(), Layout::Combined);
    assert_eq!(
        r.files,
        FileSet::Combined {
            credentials: file(
                "credential-bundle.private-key.pem",
                0o440,
                FileContent::KeyAndChain
            ),
            bundle: file("bundle.pem", 0o444, FileContent::TrustBundle),
        }
    );
    assert_eq!(r.hint.as_deref(), Some("internal"));
    let id = r.spiffe_id.as_ref().map(SpiffeId::as_str);
    assert_eq!(id, Some("spiffe://example.org/ns/default/sa/web"));
    assert_eq!(r.on_failure, OnFailure::Continue);
    assert_eq!(r.federated_bundles, FederatedBundles::Append);
    assert_eq!(r.attestation, Some(Attestation::Selectors));
    // With `append` the federated suffix is not reserved.
    ok("cert_dir: /c\nfederated_bundles: append\nsvid_bundle_file_name: all.x509.pem");
}

#[test]
fn modes_are_octal_in_every_spelling() {
    for spelling in ["0640", "640", "\"0640\"", "'640'", "0o640", "000640"] {
        let r = ok(&format!("cert_dir: /c\ncert_file_mode: {spelling}"));
        let FileSet::SpiffeHelper { svid, .. } = r.files else {
            panic!("layout changed");
        };
        assert_eq!(svid.mode.bits(), 0o640, "{spelling}");
        assert_eq!(svid.mode.to_string(), "0640");
    }
    let r = ok("cert_dir: /c\nkey_file_mode: 400");
    let FileSet::SpiffeHelper { key, .. } = r.files else {
        panic!("layout changed");
    };
    assert_eq!(key.mode.bits(), 0o400);
}

#[test]
fn null_fields_count_as_absent() {
    let r = ok("cert_dir: /c\nhint:\nspire_agent_address: ~\nlayout: null");
    assert_eq!(r, ok("cert_dir: /c"));
}

#[test]
fn small_anchors_are_allowed() {
    let r = ok("cert_dir: &d /c\nhint: *d");
    assert_eq!(r.hint.as_deref(), Some("/c"));
}

#[test]
fn policy_allows_only_its_sockets() {
    let strict = Policy::new(ADMIN);
    assert_eq!(strict.allowed_agent_addresses(), [PathBuf::from(ADMIN)]);
    assert_eq!(
        parse(
            &format!("cert_dir: /c\nspire_agent_address: {OTHER}"),
            &strict
        ),
        Err(field(
            Field::SpireAgentAddress,
            FieldProblem::AgentNotAllowed
        ))
    );
    let r = parse(
        &format!("cert_dir: /c\nspire_agent_address: unix://{ADMIN}"),
        &strict,
    );
    assert_eq!(r.map(|r| r.agent_address), Ok(PathBuf::from(ADMIN)));
    let twice = Policy::new(ADMIN).allow_agent_address(ADMIN);
    assert_eq!(twice.allowed_agent_addresses().len(), 1);
    assert_eq!(twice.default_agent_address(), Path::new(ADMIN));
}

#[test]
fn container_key_wins_over_pod_key() {
    let mut annotations = BTreeMap::new();
    annotations.insert(POD_KEY.to_owned(), "cert_dir: /pod".to_owned());
    annotations.insert(container_key("c0"), "cert_dir: /c0".to_owned());
    annotations.insert("unrelated".to_owned(), "x".to_owned());
    assert_eq!(
        lookup(&annotations, "c0"),
        Some(("identity.noderesource.dev/container.c0", "cert_dir: /c0"))
    );
    assert_eq!(
        lookup(&annotations, "c1"),
        Some((POD_KEY, "cert_dir: /pod"))
    );
    // A name that only shares a prefix must not match.
    assert_eq!(lookup(&annotations, "c"), Some((POD_KEY, "cert_dir: /pod")));

    let mut only_container: HashMap<String, String> = HashMap::new();
    only_container.insert(container_key("c0"), "cert_dir: /c0".to_owned());
    assert_eq!(
        lookup(&only_container, "c0").map(|(_, v)| v),
        Some("cert_dir: /c0")
    );
    assert_eq!(lookup(&only_container, "c1"), None);
    assert_eq!(lookup(&BTreeMap::<String, String>::new(), "c0"), None);
}

#[test]
fn request_for_container_resolves_and_adds_context() {
    let pod = PodRef {
        namespace: "default",
        name: "web",
    };
    let mut annotations = BTreeMap::new();
    annotations.insert(POD_KEY.to_owned(), "cert_dir: /pod".to_owned());
    annotations.insert(container_key("c0"), "cert_dir: relative".to_owned());

    let err = request_for_container(&annotations, pod, "c0", &policy()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pod default/web container c0: annotation identity.noderesource.dev/container.c0: \
         field cert_dir: must be an absolute path"
    );
    assert_eq!(err.error, field(Field::CertDir, FieldProblem::NotAbsolute));
    assert!(std::error::Error::source(&err).is_none());

    let other = request_for_container(&annotations, pod, "c1", &policy()).unwrap();
    assert_eq!(other.map(|r| r.cert_dir), Some(PathBuf::from("/pod")));

    let none = request_for_container(&BTreeMap::<String, String>::new(), pod, "c0", &policy());
    assert_eq!(none, Ok(None));
}

#[test]
fn summary_says_what_goes_where() {
    let r = ok("cert_dir: /var/certs\nspiffe_id: spiffe://example.org/web\nhint: db");
    let s = r.summary();
    for expected in [
        "/run/spire/admin/admin.sock (daemon default)",
        "must be spiffe://example.org/web",
        "\"db\"",
        "/var/certs (layout spiffe-helper)",
        "/var/certs/svid.pem mode 0644",
        "/var/certs/svid_key.pem mode 0600",
        "/var/certs/svid_bundle.pem mode 0644",
        "/var/certs/<trust-domain>.x509.pem mode 0644",
        "on failure",
    ] {
        assert!(s.contains(expected), "missing {expected:?} in:\n{s}");
    }
    let combined = ok("cert_dir: /c\nlayout: combined\nfederated_bundles: append").summary();
    assert!(
        combined.contains("/c/credential-bundle.pem mode 0600"),
        "{combined}"
    );
    assert!(
        combined.contains("federated bundles appended"),
        "{combined}"
    );
    assert!(!combined.contains("<trust-domain>"), "{combined}");
}

#[test]
fn key_is_written_before_certificates() {
    let r = ok("cert_dir: /c");
    let order: Vec<FileContent> = r.files.files().iter().map(|f| f.content).collect();
    assert_eq!(
        order,
        [
            FileContent::PrivateKey,
            FileContent::SvidChain,
            FileContent::TrustBundle
        ]
    );
}

#[test]
fn spiffe_id_parts() {
    let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web");
    let id = id.unwrap();
    assert_eq!(id.trust_domain(), "example.org");
    assert_eq!(id.path(), "/ns/default/sa/web");
    assert_eq!(id.to_string(), "spiffe://example.org/ns/default/sa/web");
    assert_eq!(
        SpiffeId::parse(&format!("spiffe://{}/a", "a".repeat(256))),
        Err(SpiffeIdError::TrustDomainTooLong { max: 255 })
    );
    assert_eq!(
        SpiffeId::parse(&format!("spiffe://x/{}", "a".repeat(2048))),
        Err(SpiffeIdError::TooLong { max: 2048 })
    );
    assert_eq!(
        SpiffeId::parse("spiffe:///a"),
        Err(SpiffeIdError::EmptyTrustDomain)
    );
}

#[test]
fn error_messages_name_the_field_and_problem() {
    let e = parse("cert_dir: /c\nkey_file_mode: \"0777\"", &policy()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "field key_file_mode: must not let group or others write the file"
    );
    let e = parse("cert_dir: /c\non_failure: maybe", &policy()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "field on_failure: must be `fail` or `continue`"
    );
    let e = parse("cert_dir: /c\nbogus: 1", &policy()).unwrap_err();
    assert_eq!(e.to_string(), "field bogus: is not a known field");
}

// A tiny deterministic generator, so the garbage test needs no new dependency and any failure
// reproduces.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next()).unwrap_or(0) % n
    }
}

#[test]
fn random_garbage_never_panics() {
    const TOKENS: &[&str] = &[
        "- ",
        ": ",
        "\n",
        "  ",
        "cert_dir",
        "/c",
        "/proc",
        "..",
        "svid_file_name",
        "key_file_mode",
        "0777",
        "spiffe://a/b",
        "&a ",
        "*a",
        "[",
        "]",
        "{",
        "}",
        ",",
        "'",
        "\"",
        "\\0",
        "!!str ",
        "!x ",
        "~",
        "#",
        "---",
        "...",
        "<<",
        "? ",
        "|",
        ">",
        "layout",
        "combined",
        "hint",
        "spire_agent_address",
        "unix://",
        "\t",
        "\u{feff}",
        "é",
        "0o7",
        "%YAML 1.2\n",
    ];
    const VALUES: &[&str] = &[
        "/c",
        "/var/certs",
        "/",
        "/proc/1",
        "x",
        "a/b",
        "..",
        "svid.pem",
        "k.pem",
        "0600",
        "0644",
        "0777",
        "4755",
        "0o440",
        "combined",
        "spiffe-helper",
        "fail",
        "continue",
        "append",
        "separate",
        "pid",
        "selectors",
        "spiffe://example.org/w",
        "spiffe://x",
        ADMIN,
        OTHER,
        "unix:///run/spire/admin/admin.sock",
        "~",
        "[a]",
        "{a: b}",
        "''",
        "\"\\0\"",
        "&a x",
        "*a",
        "b.x509.pem",
        "credential-bundle.pem",
        "svid_bundle.pem",
        "123",
    ];
    let policy = policy();
    let mut rng = Lcg(0x5eed);
    let mut accepted = 0;
    let rounds = 6000;
    for round in 0..rounds {
        let value: String = match round % 3 {
            0 => {
                let len = rng.below(64);
                let bytes: Vec<u8> = (0..len).map(|_| (rng.next() & 0xff) as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            1 => {
                let len = rng.below(24);
                (0..len).map(|_| TOKENS[rng.below(TOKENS.len())]).collect()
            }
            _ => {
                // Mostly well-formed mappings, so that values reach the validator.
                let mut v = String::from("cert_dir: /c\n");
                for _ in 0..rng.below(5) {
                    let key = Field::ALL[rng.below(Field::ALL.len())].as_str();
                    let value = VALUES[rng.below(VALUES.len())];
                    v.push_str(&format!("{key}: {value}\n"));
                }
                v
            }
        };
        match parse(&value, &policy) {
            Ok(r) => {
                accepted += 1;
                assert!(!r.summary().is_empty());
            }
            Err(e) => {
                let message = e.to_string();
                assert!(
                    !message.chars().any(char::is_control),
                    "{value:?}: {message:?}"
                );
            }
        }
    }
    assert!(
        accepted > 0,
        "no random value reached a successful validation"
    );
}

fn refused(value: &str) -> AnnotationError {
    match parse(value, &policy()) {
        Ok(r) => panic!("{value:?} accepted: {r:?}"),
        Err(e) => e,
    }
}

#[test]
fn jwt_audience_asks_for_a_token_and_a_jwks_file_with_defaults() {
    let r = ok("cert_dir: /var/certs\njwt_audience: [api, db]\nkey_file_mode: '0640'\n");
    let jwt = r.jwt.expect("a JWT request");
    assert_eq!(jwt.audience, ["api", "db"]);
    assert_eq!(
        jwt.token,
        file(DEFAULT_JWT_SVID_FILE_NAME, 0o640, FileContent::JwtSvid)
    );
    assert_eq!(
        jwt.bundle,
        file(DEFAULT_JWT_BUNDLE_FILE_NAME, 0o644, FileContent::JwtBundle)
    );
    let r = ok(
        "cert_dir: /c\njwt_audience: [a]\njwt_svid_file_name: t.jwt\njwt_bundle_file_name: k.json\n",
    );
    let jwt = r.jwt.unwrap();
    assert_eq!(
        (jwt.token.name.as_str(), jwt.bundle.name.as_str()),
        ("t.jwt", "k.json")
    );
    assert!(ok("cert_dir: /c\n").jwt.is_none());
}

#[test]
fn hostile_jwt_audiences_are_refused_naming_the_field() {
    use FieldProblem as P;
    let nine = format!(
        "[{}]",
        (0..9)
            .map(|i| format!("a{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let long = "x".repeat(MAX_JWT_AUDIENCE_BYTES + 1);
    let cases: Vec<(String, AnnotationError)> = vec![
        (
            "jwt_audience: []".into(),
            field(Field::JwtAudience, P::Empty),
        ),
        (
            format!("jwt_audience: {nine}"),
            field(
                Field::JwtAudience,
                P::TooManyAudiences {
                    max: MAX_JWT_AUDIENCES,
                },
            ),
        ),
        (
            "jwt_audience: [a, a]".into(),
            field(
                Field::JwtAudience,
                P::DuplicateAudience {
                    audience: "a".into(),
                },
            ),
        ),
        (
            "jwt_audience: ['']".into(),
            field(
                Field::JwtAudience,
                P::InvalidAudience {
                    index: 0,
                    problem: Box::new(P::Empty),
                },
            ),
        ),
        (
            "jwt_audience: [ok, \"a\\nforged: log\"]".into(),
            field(
                Field::JwtAudience,
                P::InvalidAudience {
                    index: 1,
                    problem: Box::new(P::ContainsControl),
                },
            ),
        ),
        (
            format!("jwt_audience: [{long}]"),
            field(
                Field::JwtAudience,
                P::InvalidAudience {
                    index: 0,
                    problem: Box::new(P::TooLong {
                        len: long.len(),
                        max: MAX_JWT_AUDIENCE_BYTES,
                    }),
                },
            ),
        ),
        (
            "jwt_audience: api".into(),
            field(
                Field::JwtAudience,
                P::WrongType {
                    expected: "a list of audience strings",
                },
            ),
        ),
        (
            "jwt_audience: [[nested]]".into(),
            field(
                Field::JwtAudience,
                P::WrongType {
                    expected: "a list of audience strings",
                },
            ),
        ),
        (
            "jwt_svid_file_name: t".into(),
            field(Field::JwtSvidFileName, P::NeedsJwtAudience),
        ),
        (
            "jwt_audience: [a]\njwt_svid_file_name: ../t".into(),
            field(Field::JwtSvidFileName, P::ContainsSlash),
        ),
        (
            "jwt_audience: [a]\njwt_svid_file_name: svid.pem".into(),
            field(
                Field::JwtSvidFileName,
                P::DuplicateFileName {
                    other: Field::SvidFileName,
                },
            ),
        ),
        (
            "jwt_audience: [a]\njwt_bundle_file_name: jwt_svid.token".into(),
            field(
                Field::JwtBundleFileName,
                P::DuplicateFileName {
                    other: Field::JwtSvidFileName,
                },
            ),
        ),
        (
            "jwt_audience: [a]\njwt_bundle_file_name: other.org.x509.pem".into(),
            field(
                Field::JwtBundleFileName,
                P::ReservedSuffix {
                    suffix: FEDERATED_BUNDLE_SUFFIX,
                },
            ),
        ),
    ];
    for (value, want) in cases {
        let got = refused(&format!("cert_dir: /c\n{value}\n"));
        assert_eq!(got, want, "{value}");
    }
}

#[test]
fn a_refused_audience_names_pod_container_and_field() {
    let annotations = BTreeMap::from([(
        POD_KEY.to_owned(),
        "cert_dir: /c\njwt_audience: [a, a]\n".to_owned(),
    )]);
    let pod = PodRef {
        namespace: "ns",
        name: "web",
    };
    let err = request_for_container(&annotations, pod, "app", &policy()).unwrap_err();
    let message = err.to_string();
    for part in ["pod ns/web", "container app", "jwt_audience", "\"a\" twice"] {
        assert!(message.contains(part), "{message}");
    }
}

#[test]
fn the_spiffe_layout_defaults_to_the_drafts_folder_and_fixed_names() {
    let r = ok("layout: spiffe\n");
    assert_eq!(r.cert_dir, Path::new(DEFAULT_SPIFFE_CREDENTIAL_FOLDER));
    assert_eq!(r.federated_bundles, FederatedBundles::Separate);
    assert_eq!(
        r.files,
        FileSet::Spiffe {
            credentials: file(
                SPIFFE_CREDENTIAL_BUNDLE_FILE_NAME,
                0o600,
                FileContent::KeyAndChain
            ),
            bundle_mode: DEFAULT_BUNDLE_FILE_MODE,
        }
    );
    let r = ok("layout: spiffe\ncert_dir: /creds\nbundle_file_mode: '0640'\n");
    assert_eq!(r.cert_dir, Path::new("/creds"));
    assert_eq!(r.bundle_mode(), FileMode(0o640));
    assert!(
        ok("layout: spiffe\nfederated_bundles: separate\n")
            .jwt
            .is_none()
    );
    for key in [
        "svid_file_name: a",
        "svid_key_file_name: a",
        "svid_bundle_file_name: a",
        "credential_bundle_file_name: a",
        "cert_file_mode: '0644'",
        "federated_bundles: append",
    ] {
        let err = refused(&format!("layout: spiffe\n{key}\n"));
        assert!(
            matches!(
                err,
                AnnotationError::Field {
                    problem: FieldProblem::NotUsedByLayout {
                        layout: Layout::Spiffe
                    },
                    ..
                }
            ),
            "{key}: {err}"
        );
    }
    // The other layouts still need a directory.
    assert_eq!(
        refused("layout: combined\n"),
        field(Field::CertDir, FieldProblem::Missing)
    );
}

#[test]
fn a_blank_last_line_without_a_line_break_changes_nothing() {
    use FieldProblem as P;
    // fuzz/seeds/annotation_structured/blank-last-line-after-keep-chomped-scalar, found by that
    // fuzz target: one value as a mapping and as a one-entry list. The list's
    // trailing indentation made serde-saphyr read the empty keep-chomped scalar as "\n".
    let mapping = parse("!!str spire_agent_address: >+\n", &policy());
    let list = parse("- !!str spire_agent_address: >+\n  ", &policy());
    assert_eq!(mapping, Err(field(Field::SpireAgentAddress, P::Empty)));
    assert_eq!(list, mapping);
    assert_eq!(parse("spire_agent_address: >+\n\t \t", &policy()), mapping);
    // A line break before the blanks is kept: that line is part of the value.
    assert_eq!(
        parse("spire_agent_address: >+\n  \n", &policy()),
        Err(field(Field::SpireAgentAddress, P::ContainsControl))
    );
    assert_eq!(ok("cert_dir: /certs\n   "), ok("cert_dir: /certs"));
    assert_eq!(
        ok("- cert_dir: /certs\n  hint: db\n  "),
        ok("- cert_dir: /certs\n  hint: db")
    );
}

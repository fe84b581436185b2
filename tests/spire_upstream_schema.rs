//! Our hand-written schema subsets must agree with upstream on every message, field, enum
//! value and method we define: same numbers, types, cardinality and streaming. A wrong field
//! number would otherwise decode silently as "absent".
//!
//! - `proto/spire/` (the Delegated Identity API) against spiffe/spire-api-sdk at the
//!   pseudo-version SPIRE v1.13.3 pins in its go.mod (`SPIRE_API_SDK_DIR` overrides);
//! - `proto/spiffe/broker.proto` (the SPIFFE Broker API) against go-spiffe's copy of
//!   `brokerapi.proto` at the version SPIRE v1.15.3 pins (`GO_SPIFFE_DIR` overrides).
//!
//! Fetched at test time with `go mod download` (read from the module cache, never committed).

use std::path::{Path, PathBuf};
use std::process::Command;

use protox::prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};

/// Keep in step with the SPIRE version the end-to-end tests run (v1.13.3's go.mod).
const SDK_MODULE: &str = "github.com/spiffe/spire-api-sdk";
const SDK_VERSION: &str = "v1.2.5-0.20250109200630-101d5e7de758";
const PACKAGES: &[&str] = &["spire.api.types", "spire.api.agent.delegatedidentity.v1"];
const UPSTREAM_ENTRY: &str = "spire/api/agent/delegatedidentity/v1/delegatedidentity.proto";

/// Keep in step with the SPIRE version `make e2e-broker` runs (v1.15.3's go.mod).
const GO_SPIFFE_MODULE: &str = "github.com/spiffe/go-spiffe/v2";
const GO_SPIFFE_VERSION: &str = "v2.8.1";
const BROKER_DIR: &str = "exp/proto/spiffe/broker";

/// A Go module's directory in the module cache, downloaded if needed; `env` names a variable
/// that points at a checkout instead.
fn go_module_dir(module: &str, version: &str, env: &str) -> PathBuf {
    if let Ok(dir) = std::env::var(env) {
        return PathBuf::from(dir);
    }
    let output = Command::new("go")
        .args(["mod", "download", "-json", &format!("{module}@{version}")])
        .env("GOFLAGS", "-mod=mod")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap_or_else(|e| panic!("`go` is needed to read upstream {module} (or set {env}): {e}"));
    let json = String::from_utf8_lossy(&output.stdout);
    let dir = json
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("\"Dir\": \"")
                .map(|d| d.trim_end_matches("\",").to_owned())
        })
        .unwrap_or_else(|| {
            panic!(
                "go mod download gave no Dir: {json} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    PathBuf::from(dir)
}

fn pool(files: &[&str], include: &Path) -> DescriptorPool {
    let fds = protox::compile(files, [include])
        .unwrap_or_else(|e| panic!("compiling {files:?} under {}: {e:?}", include.display()));
    DescriptorPool::from_file_descriptor_set(fds).unwrap()
}

fn kind_name(kind: &Kind) -> String {
    match kind {
        Kind::Message(m) if m.is_map_entry() => format!(
            "map<{}, {}>",
            kind_name(&m.map_entry_key_field().kind()),
            kind_name(&m.map_entry_value_field().kind())
        ),
        Kind::Message(m) => format!("message {}", m.full_name()),
        Kind::Enum(e) => format!("enum {}", e.full_name()),
        other => format!("{other:?}"),
    }
}

fn cardinality(field: &FieldDescriptor) -> &'static str {
    if field.is_map() {
        "map"
    } else if field.is_list() {
        "repeated"
    } else {
        "singular"
    }
}

fn compare_message(ours: &MessageDescriptor, theirs: &MessageDescriptor, errors: &mut Vec<String>) {
    for field in ours.fields() {
        let name = format!("{}.{}", ours.full_name(), field.name());
        let Some(up) = theirs.get_field_by_name(field.name()) else {
            errors.push(format!("{name}: no such field upstream"));
            continue;
        };
        if up.number() != field.number() {
            errors.push(format!(
                "{name}: number {} here, {} upstream",
                field.number(),
                up.number()
            ));
        }
        if kind_name(&up.kind()) != kind_name(&field.kind()) {
            errors.push(format!(
                "{name}: type {} here, {} upstream",
                kind_name(&field.kind()),
                kind_name(&up.kind())
            ));
        }
        if cardinality(&up) != cardinality(&field) {
            errors.push(format!(
                "{name}: {} here, {} upstream",
                cardinality(&field),
                cardinality(&up)
            ));
        }
    }
}

/// Compares every message, enum and service of `ours` (all in `packages`) with the same names
/// in `theirs`; returns the differences and how many fields, values and methods agreed.
fn compare(
    ours: &DescriptorPool,
    theirs: &DescriptorPool,
    packages: &[&str],
) -> (Vec<String>, usize) {
    let mut errors = Vec::new();
    let mut checked = 0;
    for file in ours.files() {
        if !packages.contains(&file.package_name()) {
            errors.push(format!(
                "{} declares unexpected package {}",
                file.name(),
                file.package_name()
            ));
        }
    }
    for message in ours.all_messages() {
        // Map entry types are synthetic; their parent field is compared instead.
        if message.is_map_entry() {
            continue;
        }
        match theirs.get_message_by_name(message.full_name()) {
            Some(up) => {
                compare_message(&message, &up, &mut errors);
                checked += message.fields().len();
            }
            None => errors.push(format!(
                "message {} does not exist upstream",
                message.full_name()
            )),
        }
    }
    for en in ours.all_enums() {
        let Some(up) = theirs.get_enum_by_name(en.full_name()) else {
            errors.push(format!("enum {} does not exist upstream", en.full_name()));
            continue;
        };
        for v in en.values() {
            match up.get_value_by_name(v.name()) {
                Some(u) if u.number() == v.number() => checked += 1,
                Some(u) => errors.push(format!(
                    "{}: {} here, {} upstream",
                    v.full_name(),
                    v.number(),
                    u.number()
                )),
                None => errors.push(format!("{}: no such value upstream", v.full_name())),
            }
        }
    }
    for service in ours.services() {
        let Some(up) = theirs.get_service_by_name(service.full_name()) else {
            errors.push(format!(
                "service {} does not exist upstream",
                service.full_name()
            ));
            continue;
        };
        for m in service.methods() {
            let Some(u) = up.methods().find(|u| u.name() == m.name()) else {
                errors.push(format!("{}: no such method upstream", m.full_name()));
                continue;
            };
            if u.input().full_name() != m.input().full_name()
                || u.output().full_name() != m.output().full_name()
            {
                errors.push(format!(
                    "{}: request or reply type differs upstream",
                    m.full_name()
                ));
            } else if (u.is_client_streaming(), u.is_server_streaming())
                != (m.is_client_streaming(), m.is_server_streaming())
            {
                errors.push(format!("{}: streaming differs upstream", m.full_name()));
            } else {
                checked += 1;
            }
        }
    }
    (errors, checked)
}

#[test]
fn our_spire_schema_subset_matches_upstream() {
    let ours_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/spire");
    let ours = pool(&["delegatedidentity.proto", "types.proto"], &ours_root);
    let upstream_root = go_module_dir(SDK_MODULE, SDK_VERSION, "SPIRE_API_SDK_DIR").join("proto");
    let theirs = pool(&[UPSTREAM_ENTRY], &upstream_root);
    let (errors, checked) = compare(&ours, &theirs, PACKAGES);
    assert!(
        errors.is_empty(),
        "schema drift against {} ({SDK_VERSION}):\n{}",
        upstream_root.display(),
        errors.join("\n")
    );
    // 15 fields in 8 messages and 2 methods; fewer means something was not compared.
    assert!(checked >= 17, "only {checked} items compared");
    eprintln!(
        "compared {checked} fields, enum values and methods with {}",
        upstream_root.display()
    );
}

#[test]
fn our_broker_api_subset_matches_upstream() {
    let ours_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/spiffe");
    let ours = pool(&["broker.proto"], &ours_root);
    let upstream_root =
        go_module_dir(GO_SPIFFE_MODULE, GO_SPIFFE_VERSION, "GO_SPIFFE_DIR").join(BROKER_DIR);
    let theirs = pool(&["api.proto"], &upstream_root);
    // `google.protobuf.Any` comes in with the import; upstream imports it too.
    let (errors, checked) = compare(&ours, &theirs, &["spiffe.broker", "google.protobuf"]);
    assert!(
        errors.is_empty(),
        "schema drift against {} ({GO_SPIFFE_VERSION}):\n{}",
        upstream_root.display(),
        errors.join("\n")
    );
    // 28 fields in 15 messages and 4 methods; fewer means something was not compared.
    assert!(checked >= 32, "only {checked} items compared");
    eprintln!(
        "compared {checked} fields and methods with {}",
        upstream_root.display()
    );
}

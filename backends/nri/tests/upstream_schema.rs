//! Every message, field, enum value and method of our schema subset (`proto/nri.proto`) must
//! exist upstream with the same number and type: upstream's numbers are not sequential, so a
//! wrong one would otherwise slip through and silently drop data on the wire.
//!
//! Upstream `pkg/api/api.proto` is read at test time from the Go module cache, at the NRI tag
//! the conformance harness pins (downloaded with `go mod download` if missing). It is read,
//! never committed. Set `NRI_UPSTREAM_API_PROTO` to point at a copy elsewhere.

use std::path::{Path, PathBuf};
use std::process::Command;

use prost_types_compat::*;

/// Keep in step with tests/conformance/v012/go.mod.
const NRI_TAG: &str = "v0.12.2";
const PACKAGE: &str = "nri.pkg.api.v1alpha1";

mod prost_types_compat {
    pub use protox::prost_reflect::{DescriptorPool, Kind, MessageDescriptor};
}

fn upstream_proto() -> PathBuf {
    if let Ok(p) = std::env::var("NRI_UPSTREAM_API_PROTO") {
        return PathBuf::from(p);
    }
    let output = Command::new("go")
        .args([
            "mod",
            "download",
            "-json",
            &format!("github.com/containerd/nri@{NRI_TAG}"),
        ])
        .env("GOFLAGS", "-mod=mod")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("`go` is needed to read upstream NRI (or set NRI_UPSTREAM_API_PROTO)");
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
    Path::new(&dir).join("pkg/api/api.proto")
}

fn pool(file: &Path) -> DescriptorPool {
    let dir = file.parent().unwrap();
    let name = file.file_name().unwrap();
    let fds = protox::compile([name], [dir])
        .unwrap_or_else(|e| panic!("compiling {}: {e:?}", file.display()));
    DescriptorPool::from_file_descriptor_set(fds).unwrap()
}

fn kind_name(kind: &Kind) -> String {
    match kind {
        Kind::Message(m) => format!("message {}", m.full_name()),
        Kind::Enum(e) => format!("enum {}", e.full_name()),
        other => format!("{other:?}"),
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
        if (up.is_list(), up.is_map()) != (field.is_list(), field.is_map()) {
            errors.push(format!("{name}: cardinality differs from upstream"));
        }
    }
}

#[test]
fn our_schema_subset_matches_upstream_nri() {
    let ours = pool(&Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/nri.proto"));
    let upstream_file = upstream_proto();
    let theirs = pool(&upstream_file);
    let mut errors = Vec::new();
    let mut checked = 0;
    for message in ours.all_messages().filter(|m| m.package_name() == PACKAGE) {
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
    for en in ours.all_enums().filter(|e| e.package_name() == PACKAGE) {
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
            match up.methods().find(|u| u.name() == m.name()) {
                Some(u)
                    if u.input().full_name() == m.input().full_name()
                        && u.output().full_name() == m.output().full_name() =>
                {
                    checked += 1
                }
                Some(_) => errors.push(format!(
                    "{}: request or reply type differs upstream",
                    m.full_name()
                )),
                None => errors.push(format!("{}: no such method upstream", m.full_name())),
            }
        }
    }
    assert!(
        errors.is_empty(),
        "schema drift against {} ({NRI_TAG}):\n{}",
        upstream_file.display(),
        errors.join("\n")
    );
    assert!(checked > 150, "only {checked} items compared");
    eprintln!(
        "compared {checked} fields, enum values and methods with {}",
        upstream_file.display()
    );
}

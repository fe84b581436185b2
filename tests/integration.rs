//! The root crate's integration tests, one module per file of `tests/`, compiled into one test
//! binary: each separate binary would link the daemon, tokio and tonic again, which made
//! linking most of `cargo test`'s time. Cargo's discovery of `tests/*.rs` is off
//! (`autotests = false`), so a new file is a `mod` line here; the last test below fails when
//! one is forgotten.

// The bed (fake NRI runtime, fake SPIRE agent, recording host) needs the test doubles.
mod broker_spire;
#[cfg(feature = "testing")]
mod common;

#[cfg(feature = "testing")]
mod cri_o;
#[cfg(feature = "testing")]
mod daemon_life;
mod deploy_manifests;
#[cfg(feature = "testing")]
mod faults;
#[cfg(feature = "testing")]
mod sandboxes;
#[cfg(feature = "testing")]
mod selectors_mode;
mod spire_upstream_schema;
#[cfg(feature = "testing")]
mod start_guard;
#[cfg(feature = "testing")]
mod threats;

#[test]
fn every_file_of_tests_is_a_module_of_this_binary() {
    let this = include_str!("integration.rs");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut forgotten = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let module = if path.is_dir() {
            if !path.join("mod.rs").exists() {
                continue; // e2e/, conformance/: scripts and Go, not Rust modules
            }
            name
        } else if let Some(stem) = name.strip_suffix(".rs") {
            stem
        } else {
            continue;
        };
        if module != "integration" && !this.contains(&format!("\nmod {module};\n")) {
            forgotten.push(module.to_owned());
        }
    }
    assert!(
        forgotten.is_empty(),
        "tests/ files that no binary compiles (add `mod NAME;` to tests/integration.rs): {forgotten:?}"
    );
}

//! Fails when checked-in generated code no longer matches its schema.

#[test]
fn checked_in_generated_code_matches_the_schemas() {
    let root = xtask::workspace_root();
    let generated = xtask::generate(&root).expect("generation succeeds");
    assert!(!generated.is_empty());
    for (path, body) in generated {
        let on_disk = std::fs::read_to_string(root.join(&path)).unwrap_or_else(|e| {
            panic!(
                "{} is missing ({e}); run `cargo xtask codegen`",
                path.display()
            )
        });
        assert!(
            on_disk == body,
            "{} drifted from its schema; run `cargo xtask codegen` and commit the result",
            path.display()
        );
    }
}

//! `cargo xtask codegen`: regenerate the checked-in protocol code.

use anyhow::{Result, bail};

fn main() -> Result<()> {
    let task = std::env::args().nth(1).unwrap_or_default();
    match task.as_str() {
        "codegen" => {
            let root = xtask::workspace_root();
            for (path, body) in xtask::generate(&root)? {
                let dest = root.join(&path);
                std::fs::create_dir_all(dest.parent().unwrap_or(&root))?;
                std::fs::write(&dest, body)?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        other => bail!("unknown task {other:?}; tasks: codegen"),
    }
}

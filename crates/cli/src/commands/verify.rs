//! `nixb verify [--check-contents]`.

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct VerifyArgs {
    /// Also hash every valid path and compare with the recorded NAR hash
    #[arg(long)]
    pub check_contents: bool,
}

pub fn run(args: VerifyArgs) -> Result<u8> {
    let store = super::open_store()?;
    let dir = store.store_dir().clone();
    let report = store.verify(args.check_contents)?;
    let mut problems = Vec::new();
    for p in &report.missing {
        problems.push(format!(
            "path '{}' is registered as valid but missing",
            dir.print(p)
        ));
    }
    for (p, db, actual) in &report.hash_mismatches {
        problems.push(format!(
            "path '{}' was modified! expected hash '{}', got '{}'",
            dir.print(p),
            db.to_base32_typed(),
            actual.to_base32_typed()
        ));
    }
    for (p, db, actual) in &report.size_mismatches {
        problems.push(format!(
            "path '{}' has NAR size {actual}, but {db} is registered",
            dir.print(p)
        ));
    }
    for (p, r) in &report.broken_references {
        problems.push(format!(
            "path '{}' refers to '{}', which is not valid",
            dir.print(p),
            dir.print(r)
        ));
    }
    for (row, why) in &report.unreadable {
        problems.push(format!("database row '{row}' is unreadable: {why}"));
    }
    for p in &problems {
        eprintln!("error: {p}");
    }
    if problems.is_empty() {
        crate::render::info(&format!(
            "{} valid paths checked, no problems",
            report.checked
        ));
        Ok(0)
    } else {
        eprintln!("error: {} problem(s) found in the store", problems.len());
        Ok(1)
    }
}

//! Where the workspace and its binaries are, and the build and test commands over it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::bootstrap;

/// The workspace root. Read at run time first (`cargo run` sets it): with a target directory
/// shared between checkouts, the binary may have been built from another one.
pub fn root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    let manifest_dir = manifest_dir.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir.parent().map(Path::to_owned).expect("xtask lives in the workspace")
}

/// Directory of the debug binaries (`shoald`, `shoal`), honouring `CARGO_TARGET_DIR`.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target")).join("debug")
}

/// Runs cargo in the workspace with a heading, failing on a non-zero exit.
pub fn cargo(args: &[&str]) -> Result<()> {
    let started = Instant::now();
    eprintln!("== cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root())
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    eprintln!("   done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

pub fn build() -> Result<()> {
    bootstrap::ensure()?;
    cargo(&["build", "--workspace", "--bins"])
}

/// Builds optimised binaries (what benchmarks measure) and returns their directory.
pub fn build_release() -> Result<PathBuf> {
    bootstrap::ensure()?;
    cargo(&["build", "--release", "--workspace", "--bins"])?;
    Ok(bin_dir().parent().context("bin dir is <target>/debug")?.join("release"))
}

/// README's test command: formatting, lints, unit tests, then the end-to-end tests in the lab.
pub fn test() -> Result<()> {
    let started = Instant::now();
    bootstrap::ensure()?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&["build", "--workspace", "--bins"])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    lint_bpf()?;
    // Root-only tests are #[ignore]d so a plain `cargo test` works unprivileged; here we
    // are root and run them all.
    cargo(&["test", "--workspace", "--", "--include-ignored"])?;
    eprintln!("all checks passed in {:.0}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// fmt and clippy for the BPF programs, which build in a nightly workspace of their own.
fn lint_bpf() -> Result<()> {
    let dir = root().join("ebpf/shoal-ebpf");
    let target = bin_dir().parent().expect("bin dir is <target>/debug").join("shoal-ebpf");
    for args in [
        vec!["fmt", "--", "--check"],
        vec!["clippy", "--release", "--target-dir", target.to_str().context("target path")?, "--", "-D", "warnings"],
    ] {
        eprintln!("== (ebpf) cargo +nightly {}", args.join(" "));
        let status = Command::new("rustup")
            .args(["run", "nightly", "cargo"])
            .args(&args)
            .current_dir(&dir)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR")
            .status()
            .context("cannot run rustup")?;
        if !status.success() {
            bail!("(ebpf) cargo {} failed", args.join(" "));
        }
    }
    Ok(())
}

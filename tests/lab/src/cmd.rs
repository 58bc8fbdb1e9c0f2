//! Running the host's networking tools (`ip`, `nsenter`) with errors that say what failed.

use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

/// Runs `argv` and returns its output whatever the exit status.
pub fn run(argv: &[&str]) -> Result<Output> {
    let (program, args) = argv.split_first().context("empty command")?;
    Command::new(program).args(args).output().with_context(|| format!("cannot run {program}"))
}

/// Runs `argv` and fails, with its stderr, unless it exits 0. Returns stdout.
pub fn run_ok(argv: &[&str]) -> Result<String> {
    let out = run(argv)?;
    if !out.status.success() {
        bail!("`{}` failed: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `argv` with `input` on its stdin; fails, with its stderr, unless it exits 0.
pub fn run_with_stdin(argv: &[&str], input: &str) -> Result<String> {
    use std::io::Write;
    let (program, args) = argv.split_first().context("empty command")?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("`{}` failed: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

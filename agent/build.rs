//! Builds the BPF programs in `ebpf/shoal-ebpf` (nightly, build-std, bpf-linker with BTF) and
//! leaves the object in OUT_DIR for `net::bpf` to embed. A change to any BPF source, the shared
//! map types or the BPF build settings rebuilds it.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// Env vars the outer cargo sets that must not leak into the nested nightly BPF build: they
/// name the stable toolchain, clippy's wrapper, or host-target flags.
const OUTER_BUILD_ENV: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_MAKEFLAGS",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let ebpf_root = manifest_dir.join("../ebpf");
    let programs = ebpf_root.join("shoal-ebpf");
    for watched in [
        programs.join("src"),
        programs.join("Cargo.toml"),
        programs.join("Cargo.lock"),
        programs.join(".cargo/config.toml"),
        programs.join("rust-toolchain.toml"),
        ebpf_root.join("common/src"),
        ebpf_root.join("common/Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", watched.display());
    }

    check_toolchain();

    // Beside the outer target dir (not inside its locked profile directory), shared by every
    // profile and by clippy, so the object is built once per change.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .map(|target| target.join("shoal-ebpf"))
        .unwrap_or_else(|| out_dir.join("shoal-ebpf"));
    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", "nightly", "cargo", "build", "--release", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&programs);
    for var in OUTER_BUILD_ENV {
        cargo.env_remove(var);
    }
    let output = cargo.output().unwrap_or_else(|e| fail(&format!("cannot run rustup: {e}")));
    if !output.status.success() {
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            println!("cargo:warning={line}");
        }
        fail("building the BPF programs failed (output above)");
    }
    let object = target_dir.join("bpfel-unknown-none/release/shoal-ebpf");
    std::fs::copy(&object, out_dir.join("shoal-ebpf.o"))
        .unwrap_or_else(|e| fail(&format!("cannot copy {}: {e}", object.display())));
}

/// Fails early, naming the fix, when a piece of the BPF toolchain is missing.
fn check_toolchain() {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output();
    let sysroot = match nightly {
        Ok(out) if out.status.success() => PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        _ => fail("the nightly Rust toolchain is missing"),
    };
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        fail("rust-src is missing from the nightly toolchain");
    }
    if !on_path("bpf-linker") {
        fail("bpf-linker is not installed");
    }
}

fn on_path(binary: &str) -> bool {
    let cargo_bin = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|home| home.join("bin"));
    env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(cargo_bin)
        .any(|dir| dir.join(binary).is_file())
}

fn fail(why: &str) -> ! {
    panic!("\n\nshoal: {why}.\nRun `cargo xtask bootstrap` (idempotent) to set up the BPF toolchain.\n");
}

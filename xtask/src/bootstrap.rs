//! Setting up a fresh machine of our kind, idempotently: Debian packages, the nightly
//! toolchain's rust-src (for `-Z build-std=core`) and bpf-linker built against the nightly
//! toolchain's own libLLVM (no prebuilt binary can be downloaded here).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// Debian packages and why shoal needs them.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip: the lab's namespaces and links"),
    ("util-linux", "nsenter: running shoald inside a lab host"),
    ("nftables", "nft: partitions on the lab switch"),
    ("curl", "tests: raw TLS calls to the cluster port"),
    ("busybox-static", "ping and a one-file rootfs for workloads"),
    ("bpftool", "inspecting programs and maps"),
    ("tcpdump", "captures on the lab underlay"),
    ("libseccomp-dev", "libcontainer's seccomp support"),
    ("pkg-config", "finding libseccomp"),
    ("iperf3", "overlay throughput benchmarks"),
    ("wrk", "HTTP benchmarks"),
];

/// bpf-linker release known to build against LLVM 22 with `--no-default-features`.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Runs `run` only if something is missing (cheap checks first).
pub fn ensure() -> Result<()> {
    let ready = missing_packages()?.is_empty()
        && nightly_sysroot().is_ok_and(|s| has_rust_src(&s))
        && llvm_major().is_ok_and(bpf_linker_matches);
    if ready {
        Ok(())
    } else {
        run()
    }
}

pub fn run() -> Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        eprintln!("bootstrap: Debian packages present");
    } else {
        eprintln!("bootstrap: installing {}", missing.join(" "));
        sh(Command::new("apt-get").args(["update", "-qq"]))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    let sysroot = match nightly_sysroot() {
        Ok(s) => s,
        Err(_) => {
            eprintln!("bootstrap: installing the nightly toolchain");
            sh(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
            nightly_sysroot()?
        }
    };
    if has_rust_src(&sysroot) {
        eprintln!("bootstrap: nightly rust-src present");
    } else {
        eprintln!("bootstrap: adding rust-src to nightly");
        sh(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }

    let major = llvm_major()?;
    if bpf_linker_matches(major) {
        eprintln!("bootstrap: bpf-linker present (LLVM {major})");
    } else {
        install_bpf_linker(&sysroot, major)?;
    }
    Ok(())
}

/// Installs those of `packages` (name, why) that are missing: for what only a benchmark
/// needs, installed when it first runs.
pub fn ensure_packages(packages: &[(&'static str, &str)]) -> Result<()> {
    let missing = missing_of(packages)?;
    if missing.is_empty() {
        return Ok(());
    }
    for (package, why) in packages.iter().filter(|(p, _)| missing.contains(p)) {
        eprintln!("bootstrap: installing {package} ({why})");
    }
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn missing_packages() -> Result<Vec<&'static str>> {
    missing_of(PACKAGES)
}

fn missing_of(packages: &[(&'static str, &str)]) -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for (package, _why) in packages {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", package])
            .output()
            .context("dpkg-query: shoal's lab needs a Debian-based machine")?;
        if !String::from_utf8_lossy(&out.stdout).contains("install ok installed") {
            missing.push(*package);
        }
    }
    Ok(missing)
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .context("cannot run rustup")?;
    if !out.status.success() {
        bail!("no nightly toolchain");
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn has_rust_src(sysroot: &Path) -> bool {
    sysroot.join("lib/rustlib/src/rust/library/core").is_dir()
}

/// The LLVM major version of the nightly rustc: bpf-linker must link the same one.
fn llvm_major() -> Result<u32> {
    let out =
        Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]).env_remove("RUSTUP_TOOLCHAIN").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next()?.parse().ok())
        .context("nightly rustc does not report its LLVM version")
}

/// bpf-linker is installed, runs, and links the LLVM of `major`.
fn bpf_linker_matches(major: u32) -> bool {
    let Some(path) = which("bpf-linker") else {
        return false;
    };
    let Ok(out) = Command::new("ldd").arg(&path).output() else {
        return false;
    };
    let libs = String::from_utf8_lossy(&out.stdout);
    !libs.contains("not found")
        && libs.lines().any(|l| l.contains(&format!("libLLVM.so.{major}.")) || l.contains(&format!("libLLVM-{major}")))
}

fn install_bpf_linker(sysroot: &Path, major: u32) -> Result<()> {
    eprintln!("bootstrap: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major} (about a minute)");
    let lib_dir = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib_dir)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&format!("libLLVM.so.{major}.")) || n.starts_with(&format!("libLLVM-{major}")))
        .with_context(|| format!("no libLLVM {major} in {}", lib_dir.display()))?;
    // llvm-sys wants <prefix>/lib/libLLVM.so; the toolchain ships it under a versioned name.
    let prefix = home()?.join(".cache/shoal/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(lib_dir.join(&libllvm), &link)?;
    sh(Command::new("cargo")
        .args(["install", "bpf-linker", "--force", "--version", BPF_LINKER_VERSION, "--no-default-features"])
        .args(["--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix)
        // Without the rpath the binary cannot find libLLVM at run time.
        .env("RUSTFLAGS", format!("-C link-arg=-Wl,-rpath,{}", lib_dir.display()))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR"))?;
    if !bpf_linker_matches(major) {
        bail!("bpf-linker installed but does not link LLVM {major}");
    }
    Ok(())
}

fn which(binary: &str) -> Option<PathBuf> {
    let cargo_bin = home().ok().map(|h| h.join(".cargo/bin"));
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(cargo_bin)
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
}

fn home() -> Result<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from).context("HOME is not set")
}

fn sh(command: &mut Command) -> Result<()> {
    let status = command.status().with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

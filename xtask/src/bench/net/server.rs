//! A long-running server process inside a lab namespace, ended (by PID) when dropped.

use std::{
    ffi::OsStr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};

pub struct NetnsServer(Child);

impl NetnsServer {
    /// Starts `argv` in `netns` (output discarded) and gives it `settle` to start listening.
    pub fn start<S: AsRef<OsStr>>(netns: &str, argv: &[S], settle: Duration) -> Result<NetnsServer> {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .args(argv)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {:?} in {netns}", argv.first().map(AsRef::as_ref)))?;
        std::thread::sleep(settle);
        Ok(NetnsServer(child))
    }
}

impl Drop for NetnsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

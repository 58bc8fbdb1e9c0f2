//! Real Docker Swarm beside shoal in the control-plane benchmark: three Debian dockerd
//! 20.10 managers (swarmkit) in namespaces on the same lab switch, measured by the same
//! harness. Each dockerd runs in its own network namespace (`nsenter --net`, not `ip netns
//! exec`, which remounts /sys and hides the cgroup mounts; see shared/TOOLCHAIN.md) with its
//! data and exec roots under a scratch directory, and everything it made is removed on drop.

use std::{
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use shoal_lab::{ApiClient, Lab};

use super::control::Managers;

/// Where the daemons keep their state (removed on drop).
const SCRATCH: &str = "/var/tmp/shoal-bench-swarmkit";
/// dockerd's own names for its managers, and their lab addresses.
const MANAGERS: [(&str, Ipv4Addr); 3] = [
    ("dmgr1", Ipv4Addr::new(10, 77, 5, 1)),
    ("dmgr2", Ipv4Addr::new(10, 77, 5, 2)),
    ("dmgr3", Ipv4Addr::new(10, 77, 5, 3)),
];

struct Daemon {
    name: &'static str,
    addr: Ipv4Addr,
    netns: String,
    dir: PathBuf,
    pid: Option<u32>,
}

impl Daemon {
    fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    fn start(&mut self) -> Result<()> {
        std::fs::create_dir_all(self.dir.join("data"))?;
        let log = std::fs::File::create(self.dir.join("dockerd.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("dockerd")
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting dockerd (the docker.io package)")?;
        self.pid = Some(child.id());
        let api = ApiClient::new(&self.socket());
        let started = Instant::now();
        while !api.get("/_ping").is_ok_and(|r| r.status == 200) {
            if started.elapsed() > Duration::from_secs(60) {
                bail!("dockerd in {} did not answer within 60 s (see {}/dockerd.log)", self.netns, self.dir.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Ends the daemon and what it started (its containerd), by process group.
    fn end(&mut self, signal: Signal) {
        let Some(pid) = self.pid.take() else { return };
        let _ = kill(Pid::from_raw(-(pid as i32)), signal);
        let gone = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() && gone.elapsed() < Duration::from_secs(20) {
            // Reap it if it is our child.
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
    }
}

/// Three dockerd managers as one swarm.
pub struct DockerSwarm {
    daemons: Vec<Daemon>,
}

impl DockerSwarm {
    pub fn up(lab: &Lab) -> Result<Self> {
        let _ = std::fs::remove_dir_all(SCRATCH);
        let mut daemons = Vec::new();
        for (name, addr) in MANAGERS {
            let netns = lab.add_client(name, addr)?;
            daemons.push(Daemon { name, addr, netns, dir: PathBuf::from(SCRATCH).join(name), pid: None });
        }
        let mut swarm = DockerSwarm { daemons };
        for d in &mut swarm.daemons {
            d.start()?;
        }
        let first = swarm.api(MANAGERS[0].0);
        let init = serde_json::json!({"ListenAddr": "0.0.0.0:2377", "AdvertiseAddr": MANAGERS[0].1.to_string()});
        let response = first.post_json("/swarm/init", &init)?;
        if response.status != 200 {
            bail!("dockerd swarm init: {}", response.text());
        }
        let swarm_info: serde_json::Value = first.get("/swarm")?.json()?;
        let token = swarm_info["JoinTokens"]["Manager"].as_str().context("no manager token")?.to_owned();
        for (name, addr) in &MANAGERS[1..] {
            let join = serde_json::json!({
                "ListenAddr": "0.0.0.0:2377",
                "AdvertiseAddr": addr.to_string(),
                "RemoteAddrs": [format!("{}:2377", MANAGERS[0].1)],
                "JoinToken": token,
            });
            let response = swarm.api(name).post_json("/swarm/join", &join)?;
            if response.status != 200 {
                bail!("dockerd swarm join on {name}: {}", response.text());
            }
        }
        Ok(swarm)
    }

    fn daemon(&mut self, name: &str) -> Result<&mut Daemon> {
        self.daemons.iter_mut().find(|d| d.name == name).with_context(|| format!("no dockerd {name}"))
    }
}

impl Managers for DockerSwarm {
    fn names(&self) -> Vec<String> {
        self.daemons.iter().map(|d| d.name.to_owned()).collect()
    }

    fn api(&self, name: &str) -> ApiClient {
        let d = self.daemons.iter().find(|d| d.name == name).expect("a known dockerd");
        ApiClient::new(&d.socket())
    }

    fn leader(&self) -> Result<String> {
        for d in self.daemons.iter().filter(|d| d.pid.is_some()) {
            let Ok(nodes) = self.api(d.name).get("/nodes").and_then(|r| r.json::<serde_json::Value>()) else {
                continue;
            };
            for node in nodes.as_array().into_iter().flatten() {
                if node["ManagerStatus"]["Leader"].as_bool() == Some(true) {
                    let addr = node["ManagerStatus"]["Addr"].as_str().unwrap_or_default();
                    if let Some(l) = self.daemons.iter().find(|d| addr.starts_with(&format!("{}:", d.addr))) {
                        return Ok(l.name.to_owned());
                    }
                }
            }
        }
        bail!("no dockerd manager knows a leader")
    }

    fn kill(&mut self, name: &str) -> Result<()> {
        self.daemon(name)?.end(Signal::SIGKILL);
        Ok(())
    }

    fn stop(&mut self, name: &str) -> Result<()> {
        self.daemon(name)?.end(Signal::SIGTERM);
        Ok(())
    }

    fn start(&mut self, name: &str) -> Result<()> {
        self.daemon(name)?.start()
    }
}

impl Drop for DockerSwarm {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            d.end(Signal::SIGTERM);
        }
        // dockerd mounts network namespaces and overlay state under its roots.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("grep -o ' {SCRATCH}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l"))
            .status();
        let _ = std::fs::remove_dir_all(SCRATCH);
    }
}

//! `shoald`'s life: parse the configuration, bring up the network role and the API, serve
//! until SIGTERM or SIGINT, then detach from the kernel in order.

use std::{
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
};

use clap::Parser;
use serde::Serialize;
use tokio::{
    net::UnixListener,
    signal::unix::{signal, SignalKind},
    sync::Mutex,
};
use tracing::{error, info, warn};

use shoal_manager::{Swarm, SwarmConfig};

use crate::{
    api::{self, system::DaemonInfo, Node},
    net::{journal::Journal, Dataplane, NetConfig, NetError, VXLAN_PORT},
};

/// The shoal node daemon.
#[derive(Debug, Clone, Parser)]
#[command(name = "shoald", version)]
pub struct Config {
    /// Name of this node (defaults to the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// This node's address on the underlay network, used for VXLAN.
    #[arg(long)]
    pub advertise_addr: Ipv4Addr,
    /// Directory for the node's state.
    #[arg(long, default_value = "/var/lib/shoal")]
    pub data_root: PathBuf,
    /// Unix socket of the API.
    #[arg(long, default_value = "/run/shoal/shoal.sock")]
    pub socket: PathBuf,
    /// bpffs directory under which this node pins its maps (in `<bpf-root>/<node-name>`).
    #[arg(long, default_value = "/sys/fs/bpf/shoal")]
    pub bpf_root: PathBuf,
    /// UDP port of the VXLAN data path outside a swarm (in one, the swarm's `DataPathPort`).
    #[arg(long, default_value_t = VXLAN_PORT)]
    pub vxlan_port: u16,
    /// The workloads' cgroup (v2): socket-level balancing attaches there.
    #[arg(long)]
    pub workload_cgroup: Option<PathBuf>,
    /// Direct server return for the routing mesh: a backend on another node answers this
    /// node's published-port clients itself, from this node's address (fewer hops, the
    /// replies skip this node). Needs an underlay that lets a node send from another's
    /// address (not most clouds' anti-spoofing) and every node on a version that knows it.
    #[arg(long)]
    pub mesh_dsr: bool,
    /// Send and receive VXLAN through the kernel's VXLAN device, as the stack does, instead
    /// of building and taking it apart in the BPF programs. For nodes whose traffic to other
    /// nodes needs the stack's path: IPsec policies on the node addresses, netfilter rules
    /// on VXLAN, routing policy by port or mark. Slower.
    #[arg(long)]
    pub vxlan_by_device: bool,
    /// Port of the embedded DNS server on the advertise address.
    #[arg(long, default_value_t = 53)]
    pub dns_port: u16,
    /// Resolver for names that are not the swarm's (default: the first nameserver in
    /// /etc/resolv.conf).
    #[arg(long)]
    pub dns_upstream: Option<std::net::SocketAddr>,
    /// Detach the BPF programs when exiting. Without it they stay attached (pinned), so a
    /// restart of shoald does not interrupt traffic; `lab down` or a later run with this flag
    /// removes them.
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Also serve the API over TCP with mutual TLS on this address (dockerd's
    /// `-H tcp://...` with `--tlsverify`); needs the three `--tls*` files.
    #[arg(long, requires_all = ["tlscacert", "tlscert", "tlskey"])]
    pub tls_listen: Option<std::net::SocketAddr>,
    /// CA that client certificates must chain to.
    #[arg(long)]
    pub tlscacert: Option<PathBuf>,
    /// The daemon's TLS certificate.
    #[arg(long)]
    pub tlscert: Option<PathBuf>,
    /// The daemon's TLS key.
    #[arg(long)]
    pub tlskey: Option<PathBuf>,
}

impl Config {
    fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "localhost".into())
        })
    }
}

/// Why `shoald` could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the data plane: {0}")]
    Net(#[from] NetError),
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("serving the API: {0}")]
    Serve(#[source] std::io::Error),
    #[error("API TLS: {0}")]
    Tls(String),
}

pub async fn run(config: Config) -> Result<(), DaemonError> {
    let node_name = config.node_name();
    info!(node = %node_name, addr = %config.advertise_addr, "shoald starting");
    std::fs::create_dir_all(&config.data_root).map_err(io("creating", &config.data_root))?;
    // Signals first: a SIGTERM during start-up must still end in an orderly shutdown.
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;

    // DNS for workloads on the node's address; their gateway's port 53 leads here.
    let dns_addr = std::net::SocketAddrV4::new(config.advertise_addr, config.dns_port);
    let dns_socket =
        tokio::net::UdpSocket::bind(dns_addr).await.map_err(io("binding DNS on", Path::new(&dns_addr.to_string())))?;
    let names = Arc::new(std::sync::RwLock::new(crate::dns::Names::default()));
    let upstream = config.dns_upstream.or_else(crate::dns::system_upstream);
    let dns_task = tokio::spawn(crate::dns::serve(dns_socket, names.clone(), upstream));

    // The swarm first: a member's overlays use the swarm's VXLAN port, so the device is made
    // on it from the start rather than moved after a restart.
    let daemon = DaemonInfo::read(&node_name, &config.data_root);
    let swarm = Swarm::start(SwarmConfig {
        data_root: config.data_root.clone(),
        description: daemon.description(),
        default_advertise_addr: Some(config.advertise_addr.into()),
    })
    .await;
    let mut data_path_port = swarm.data_path_port();
    let vxlan_port = data_path_port.borrow_and_update().unwrap_or(config.vxlan_port);
    let net = NetConfig {
        node_addr: config.advertise_addr,
        pin_dir: config.bpf_root.join(&node_name),
        vxlan_port,
        dns: Some(dns_addr),
        mesh_dsr: config.mesh_dsr,
        vxlan_by_device: config.vxlan_by_device,
    };
    let mut dataplane = match start_dataplane(net, names, config.workload_cgroup.as_deref()).await {
        Ok(dataplane) => dataplane,
        Err(e) => {
            swarm.shutdown().await;
            return Err(e);
        }
    };
    if let Err(e) = restore_dataplane(&mut dataplane, &config.data_root.join("dataplane.json")).await {
        swarm.shutdown().await;
        return Err(e);
    }
    let node = Arc::new(Node { dataplane: Mutex::new(dataplane), swarm: swarm.clone(), daemon });
    let port_task = tokio::spawn(follow_data_path_port(data_path_port, config.vxlan_port, node.clone()));

    let tcp = match config.tls_listen {
        Some(addr) => Some((
            tokio::net::TcpListener::bind(addr).await.map_err(io("binding", Path::new(&addr.to_string())))?,
            tls_files(&config)?,
        )),
        None => None,
    };
    let listener = bind(&config.socket)?;
    info!(socket = %config.socket.display(), "API listening");
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: shutting down"),
            _ = sigint.recv() => info!("SIGINT: shutting down"),
        }
    };
    let served = api::serve(listener, tcp, node.clone(), shutdown).await;
    if let Err(e) = &served {
        error!(error = %e, "API server failed");
    }
    let _ = std::fs::remove_file(&config.socket);
    dns_task.abort();
    port_task.abort();
    swarm.shutdown().await;
    if config.detach_on_exit {
        node.dataplane.lock().await.detach_all();
    } else {
        node.dataplane.lock().await.release();
    }
    info!("shoald stopped");
    served.map_err(DaemonError::Serve)
}

/// Brings the kernel to the last acknowledged state (`Dataplane::restore`). A saved state
/// that does not read (damaged, or a newer version's) is set aside for a look and the node
/// starts empty; one that cannot be read at all (an I/O error) stops the start, rather than
/// losing what was acknowledged.
async fn restore_dataplane(dataplane: &mut Dataplane, file: &Path) -> Result<(), DaemonError> {
    let (journal, saved) = match Journal::open(file) {
        Ok(opened) => opened,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            warn!(error = %e, file = %file.display(), "setting aside a saved state that does not read");
            move_aside(file)?;
            move_aside(&file.with_extension("journal"))?;
            Journal::open(file).map_err(io("opening", file))?
        }
        Err(e) => return Err(io("reading", file)(e)),
    };
    dataplane.restore(journal, saved).await;
    Ok(())
}

/// Renames `path` to `<path>.unreadable`, if it is there.
fn move_aside(path: &Path) -> Result<(), DaemonError> {
    let aside = PathBuf::from(format!("{}.unreadable", path.display()));
    match std::fs::rename(path, &aside) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("moving aside", path)(e)),
        _ => Ok(()),
    }
}

async fn start_dataplane(
    net: NetConfig,
    names: Arc<std::sync::RwLock<crate::dns::Names>>,
    workload_cgroup: Option<&Path>,
) -> Result<Dataplane, DaemonError> {
    let mut dataplane = Dataplane::start(net, names).await?;
    if let Some(cgroup) = workload_cgroup {
        dataplane.attach_cgroup(cgroup)?;
    }
    Ok(dataplane)
}

/// Keeps the VXLAN device on the swarm's data path port (`--vxlan-port` outside a swarm).
async fn follow_data_path_port(mut port: tokio::sync::watch::Receiver<Option<u16>>, default: u16, node: Arc<Node>) {
    while port.changed().await.is_ok() {
        let wanted = port.borrow_and_update().unwrap_or(default);
        if let Err(e) = node.dataplane.lock().await.set_vxlan_port(wanted).await {
            error!(error = %e, port = wanted, "could not move the overlay to the swarm's data path port");
        }
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DaemonError + 'a {
    move |source| DaemonError::Io { what, path: path.to_owned(), source }
}

/// The rustls configuration of the TCP API from `--tlscacert/--tlscert/--tlskey`.
fn tls_files(config: &Config) -> Result<Arc<rustls::ServerConfig>, DaemonError> {
    let read = |path: &Option<PathBuf>| -> Result<String, DaemonError> {
        let path = path
            .as_ref()
            .ok_or_else(|| DaemonError::Tls("--tls-listen needs --tlscacert, --tlscert and --tlskey".into()))?;
        std::fs::read_to_string(path).map_err(io("reading", path))
    };
    shoal_ca::tls::api_server_config(&read(&config.tlscacert)?, &read(&config.tlscert)?, &read(&config.tlskey)?)
        .map_err(|e| DaemonError::Tls(e.to_string()))
}

fn bind(socket: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    }
    // A socket file left by a daemon that was killed refuses new binds.
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("removing stale", socket)(e)),
        _ => {}
    }
    UnixListener::bind(socket).map_err(io("binding", socket))
}

/// Writes `value` to `path` atomically and durably: temp file, fsync, rename, fsync dir.
pub fn save_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(value)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

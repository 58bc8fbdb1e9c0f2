//! The node's network: keeps the kernel's overlay forwarding state equal to the desired state.
//!
//! `Dataplane` owns the loaded BPF programs and the node's VXLAN device, and applies a
//! `DataplaneSpec` in three steps: validate it, plan the map contents (`overlay::plan`, pure),
//! then write the difference into the maps and attach or detach the workload programs.

pub mod bpf;
mod error;
pub mod host;
pub mod lb;
pub mod link;
pub mod overlay;

use std::{net::Ipv4Addr, path::PathBuf};

use shoal_api::dataplane::{Counter, DataplaneSpec, Protocol, ReservedPort, DEFAULT_OVERLAY_MTU};
use shoal_common::overlay::NodeConfig;
use tracing::{error, info, instrument, warn};

pub use error::NetError;

use crate::net::{bpf::Datapath, link::Links, overlay::Plan};

/// Name of the node's `vxlan external` device.
pub const VXLAN_DEVICE: &str = "shoal_vxlan";
/// IANA's VXLAN port, as Docker's overlay driver uses, unless the swarm chose another.
pub const VXLAN_PORT: u16 = shoal_api::swarm::DEFAULT_DATA_PATH_PORT;
/// The swarm's cluster port (managers listen there; no node may publish it).
const CLUSTER_PORT: u16 = 2377;

/// Where the node's network state lives.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// This node's underlay address: endpoints whose `node_addr` equals it are local.
    pub node_addr: Ipv4Addr,
    /// Directory for this node's pinned maps (`/sys/fs/bpf/shoal/<node>`).
    pub pin_dir: PathBuf,
    /// UDP port of the VXLAN data path.
    pub vxlan_port: u16,
    /// Where this node's DNS server listens (queries to gateways are sent there).
    pub dns: Option<std::net::SocketAddrV4>,
}

pub struct Dataplane {
    config: NetConfig,
    /// What the programs know of this node (`NODE_CONFIG`).
    node: NodeConfig,
    links: Links,
    datapath: Datapath,
    /// What the kernel holds now: the last state applied in full.
    spec: DataplaneSpec,
    plan: Plan,
    /// What the DNS server answers, from the applied spec.
    names: std::sync::Arc<std::sync::RwLock<crate::dns::Names>>,
    reserved_local_ports: host::ReservedLocalPorts,
}

impl Dataplane {
    /// Loads the programs, creates (or adopts) the VXLAN device and attaches to it. The
    /// pinned maps keep whatever an earlier run left until the first `replace`.
    pub async fn start(
        config: NetConfig,
        names: std::sync::Arc<std::sync::RwLock<crate::dns::Names>>,
    ) -> Result<Self, NetError> {
        let links = Links::connect()?;
        let datapath = Datapath::load(&config.pin_dir)?;
        let underlay = links.holding(config.node_addr).await?;
        let node = NodeConfig {
            vxlan_ifindex: 0,
            underlay_ifindex: underlay.as_ref().map_or(0, |(index, _)| *index),
            underlay_addr: u32::from_ne_bytes(config.node_addr.octets()),
            data_path_port: config.vxlan_port.to_be(),
            _pad: 0,
        };
        // Until the first plan replaces them, the maps' entries keep their IDs to themselves.
        let (tables, backends) = datapath.lb_ids()?;
        let mut plan = Plan::default();
        plan.lb.ids = lb::Ids::held(tables, backends);
        let mut dataplane = Dataplane {
            config,
            node,
            links,
            datapath,
            spec: DataplaneSpec::default(),
            plan,
            names,
            reserved_local_ports: host::ReservedLocalPorts::default(),
        };
        dataplane.bring_up_overlay(dataplane.config.vxlan_port).await?;
        match &underlay {
            Some((index, name)) => {
                dataplane.datapath.attach_underlay(name, *index)?;
                info!(device = %name, ifindex = index, addr = %dataplane.config.node_addr, "routing mesh ready");
            }
            None => {
                warn!(addr = %dataplane.config.node_addr, "no interface holds the node address: published ports will not answer")
            }
        }
        Ok(dataplane)
    }

    /// Moves the overlay to UDP `port` (the swarm's `DataPathPort`): the VXLAN device is made
    /// again on that port and the programs follow it. Every node of a swarm uses one port.
    pub async fn set_vxlan_port(&mut self, port: u16) -> Result<(), NetError> {
        if port == self.config.vxlan_port {
            return Ok(());
        }
        let data_path = ReservedPort { port, protocol: Protocol::Udp, what: "the data path (VXLAN) port asked for" };
        self.spec.check_reserved(&[data_path])?;
        if let Err(e) = self.bring_up_overlay(port).await {
            // The old device may be gone already: the overlay goes back to the port it had
            // rather than staying without one.
            if let Err(again) = self.bring_up_overlay(self.config.vxlan_port).await {
                error!(error = %again, port = self.config.vxlan_port, "could not bring the overlay back either");
            }
            return Err(e);
        }
        self.config.vxlan_port = port;
        Ok(())
    }

    /// Creates (or adopts) the VXLAN device on `port` and points the programs at it.
    async fn bring_up_overlay(&mut self, port: u16) -> Result<(), NetError> {
        let vxlan = self.links.ensure_vxlan(VXLAN_DEVICE, port, DEFAULT_OVERLAY_MTU).await?;
        self.node.vxlan_ifindex = vxlan;
        self.node.data_path_port = port.to_be();
        self.datapath.configure(self.node)?;
        self.datapath.attach_overlay(VXLAN_DEVICE, vxlan)?;
        info!(device = VXLAN_DEVICE, ifindex = vxlan, port, "overlay device ready");
        Ok(())
    }

    /// Makes the kernel match `spec`, then calls `persist` with it; answers Ok only when
    /// both succeeded. Input errors are found before anything changes. If the kernel
    /// update or `persist` fails, the previous state is put back, so the kernel, `spec()`
    /// and what `persist` saved never disagree.
    #[instrument(skip_all, fields(networks = spec.networks.len(), endpoints = spec.endpoints.len()))]
    pub async fn replace(
        &mut self,
        spec: DataplaneSpec,
        persist: impl FnOnce(&DataplaneSpec) -> std::io::Result<()>,
    ) -> Result<(), NetError> {
        spec.validate()?;
        let plan = self.plan(&spec).await?;
        if let Err(e) = self.datapath.apply(&plan) {
            self.restore();
            return Err(e);
        }
        if let Err(e) = self.apply_host(&plan).await {
            self.restore();
            return Err(e);
        }
        if let Err(e) = persist(&spec) {
            self.restore();
            return Err(NetError::Persist(e));
        }
        info!(interfaces = plan.interfaces.len(), "dataplane converged");
        *self.names.write().unwrap_or_else(|p| p.into_inner()) = crate::dns::Names::from_spec(&spec);
        self.spec = spec;
        self.plan = plan;
        Ok(())
    }

    /// Checks what new input must satisfy beyond `validate` (`DataplaneSpec::check_new`).
    pub fn check_new(&self, spec: &DataplaneSpec) -> Result<(), NetError> {
        Ok(spec.check_new(&self.reserved_ports())?)
    }

    /// A saved state as it may be restored: without published ports this node uses itself
    /// (an older version accepted them, or a port setting changed since), each said.
    pub fn restorable(&self, spec: DataplaneSpec) -> DataplaneSpec {
        let (spec, removed) = spec.without_reserved(&self.reserved_ports());
        for port in removed {
            warn!(port, "not restoring a published port this node uses itself");
        }
        spec
    }

    /// The ports this node uses on its own address: never published.
    fn reserved_ports(&self) -> Vec<ReservedPort> {
        let mut reserved = vec![
            ReservedPort { port: self.config.vxlan_port, protocol: Protocol::Udp, what: "the data path (VXLAN) port" },
            ReservedPort { port: CLUSTER_PORT, protocol: Protocol::Tcp, what: "the swarm's cluster port" },
        ];
        if let Some(dns) = self.config.dns {
            for protocol in [Protocol::Udp, Protocol::Tcp] {
                reserved.push(ReservedPort { port: dns.port(), protocol, what: "the embedded DNS server's port" });
            }
        }
        reserved
    }

    pub fn attach_cgroup(&mut self, cgroup: &std::path::Path) -> Result<(), NetError> {
        self.datapath.attach_cgroup(cgroup)
    }

    pub fn spec(&self) -> &DataplaneSpec {
        &self.spec
    }

    pub fn counters(&self) -> Result<Vec<Counter>, NetError> {
        self.datapath.counters()
    }

    /// Detaches every program (a clean exit). Pinned maps stay.
    pub fn detach_all(&mut self) {
        self.datapath.detach_all();
        if let Err(e) = host::remove_masquerade() {
            tracing::warn!(error = %e, "removing the masquerade rules failed");
        }
    }

    /// Leaves the programs attached (a restart): traffic goes on without the agent.
    pub fn release(&mut self) {
        self.datapath.release();
    }

    async fn plan(&self, spec: &DataplaneSpec) -> Result<Plan, NetError> {
        let mut local = overlay::LocalLinks::default();
        for name in overlay::local_interfaces(spec, self.config.node_addr) {
            let link = self.links.veth(name).await?.ok_or_else(|| NetError::InterfaceNotFound(name.to_owned()))?;
            local.insert(name.to_owned(), link);
        }
        overlay::plan(spec, self.config.node_addr, &local, &self.plan.lb.ids)
    }

    /// The host's side of the way out: forwarding, masquerade, routes back to workloads.
    async fn apply_host(&mut self, plan: &Plan) -> Result<(), NetError> {
        // Ingress replies need it too: the FIB lookup that sends them out refuses otherwise.
        if !plan.masquerade.is_empty() || !plan.lb.ingress.is_empty() {
            host::enable_forwarding()?;
        }
        host::sync_nat(&plan.masquerade, &plan.gateways, self.config.dns)?;
        // Best effort: a node whose /proc/sys is read-only still serves its ports.
        if let Err(e) = self.reserved_local_ports.sync(&plan.lb.published_ports()) {
            warn!(error = %e, "could not keep the published ports out of the ephemeral range");
        }
        self.links.sync_host_routes(&plan.host_routes).await
    }

    /// Puts the last fully applied plan back after a failed update.
    fn restore(&mut self) {
        if let Err(e) = self.datapath.apply(&self.plan) {
            error!(error = %e, "could not restore the previous dataplane state");
            // The maps may hold IDs of the failed plan: none is given out until a plan has
            // replaced them.
            match self.datapath.lb_ids() {
                Ok((tables, backends)) => self.plan.lb.ids.hold(tables, backends),
                Err(e) => error!(error = %e, "could not read the IDs the maps hold"),
            }
        }
    }
}

//! The node's network: keeps the kernel's overlay forwarding state equal to the desired state.
//!
//! `Dataplane` owns the loaded BPF programs and the node's VXLAN device, and applies a
//! `DataplaneSpec` in three steps: validate it, plan the map contents (`overlay::plan`, pure),
//! then write the difference into the maps and attach or detach the workload programs.

pub mod bpf;
mod error;
pub mod link;
pub mod overlay;

use std::{net::Ipv4Addr, path::PathBuf};

use shoal_api::dataplane::{Counter, DataplaneSpec, DEFAULT_OVERLAY_MTU};
use tracing::info;

pub use error::NetError;

use crate::net::{bpf::Datapath, link::Links};

/// Name of the node's `vxlan external` device.
pub const VXLAN_DEVICE: &str = "shoal_vxlan";
/// IANA's VXLAN port, as Docker's overlay driver uses.
pub const VXLAN_PORT: u16 = 4789;

/// Where the node's network state lives.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// This node's underlay address: endpoints whose `node_addr` equals it are local.
    pub node_addr: Ipv4Addr,
    /// Directory for this node's pinned maps (`/sys/fs/bpf/shoal/<node>`).
    pub pin_dir: PathBuf,
    /// UDP port of the VXLAN data path.
    pub vxlan_port: u16,
}

pub struct Dataplane {
    config: NetConfig,
    links: Links,
    datapath: Datapath,
    spec: DataplaneSpec,
}

impl Dataplane {
    /// Loads the programs, creates (or adopts) the VXLAN device and attaches to it.
    pub async fn start(config: NetConfig) -> Result<Self, NetError> {
        let links = Links::connect()?;
        let mut datapath = Datapath::load(&config.pin_dir)?;
        let vxlan = links
            .ensure_vxlan(VXLAN_DEVICE, config.vxlan_port, DEFAULT_OVERLAY_MTU)
            .await?;
        datapath.attach_overlay(VXLAN_DEVICE, vxlan)?;
        info!(
            device = VXLAN_DEVICE,
            ifindex = vxlan,
            port = config.vxlan_port,
            "overlay device ready"
        );
        Ok(Dataplane {
            config,
            links,
            datapath,
            spec: DataplaneSpec::default(),
        })
    }

    /// Makes the kernel match `spec`. On error nothing was changed unless the error is a
    /// kernel failure part-way through (`NetError::is_bad_input` is false then).
    pub async fn apply(&mut self, spec: DataplaneSpec) -> Result<(), NetError> {
        spec.validate()?;
        let mut local = overlay::LocalLinks::default();
        for name in overlay::local_interfaces(&spec, self.config.node_addr) {
            let link = self
                .links
                .by_name(name)
                .await?
                .ok_or_else(|| NetError::InterfaceNotFound(name.to_owned()))?;
            local.insert(name.to_owned(), link);
        }
        let plan = overlay::plan(&spec, self.config.node_addr, &local)?;
        self.datapath.apply(&plan)?;
        info!(
            networks = spec.networks.len(),
            endpoints = plan.endpoints.len(),
            interfaces = plan.interfaces.len(),
            "dataplane converged"
        );
        self.spec = spec;
        Ok(())
    }

    pub fn spec(&self) -> &DataplaneSpec {
        &self.spec
    }

    pub fn counters(&self) -> Result<Vec<Counter>, NetError> {
        self.datapath.counters()
    }

    /// Detaches every program. Pinned maps stay, so a restarted agent finds its state.
    pub fn shutdown(mut self) {
        self.detach_all();
    }

    pub fn detach_all(&mut self) {
        self.datapath.detach_all();
    }
}

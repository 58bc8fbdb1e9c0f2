//! The node's network: keeps the kernel's overlay forwarding state equal to the desired state.
//!
//! `Dataplane` owns the loaded BPF programs and the node's VXLAN device, and takes the
//! desired state as changes (`apply_batch`), one object at a time: the change is checked
//! against the state (`Desired`), the entries of the objects it touches are planned
//! (`overlay`, `lb`, pure), and only the difference they make is written (`mirror`, `bpf`),
//! make-before-break, with no map read. A whole state (`replace`) is applied as the changes
//! from the current one. What is applied is journaled (`journal`) before it is acknowledged;
//! at start the saved state is resynced into the pinned maps (`restore`).

pub mod bpf;
mod error;
pub mod host;
pub mod journal;
pub mod lb;
pub mod link;
pub mod mirror;
pub mod overlay;
mod restore;

use std::{net::Ipv4Addr, path::PathBuf};

use shoal_api::dataplane::{
    Change, ChangeBatch, ChangeReport, ChangeResult, Counter, DataplaneSpec, Desired, Protocol, ReservedPort, Rules,
    DEFAULT_OVERLAY_MTU,
};
use shoal_common::overlay::{NodeConfig, NODE_MESH_DSR, NODE_VXLAN_BY_DEVICE};
use tracing::{error, info, instrument, warn};

pub use error::NetError;

use crate::net::{
    bpf::Datapath,
    journal::{Journal, Snapshot},
    link::Links,
    mirror::{Delta, Entries, Mirror, Owner},
    overlay::LocalLinks,
};

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
    /// Direct server return for the clients of this node's published ports.
    pub mesh_dsr: bool,
    /// VXLAN through the kernel's device rather than the programs (`NODE_VXLAN_BY_DEVICE`).
    pub vxlan_by_device: bool,
}

/// Turns forwarding on for `plan`: a failure fails the change where the plan needs it, and is
/// only a warning where VXLAN alone wants it (it then goes through the device).
fn enable_forwarding(plan: &mirror::Plan) -> Result<(), NetError> {
    match host::enable_forwarding() {
        Err(e) if !plan.needs_forwarding() => {
            warn!(error = %e, "could not turn forwarding on: VXLAN goes through the VXLAN device");
            Ok(())
        }
        result => result,
    }
}

pub struct Dataplane {
    config: NetConfig,
    /// What the programs know of this node (`NODE_CONFIG`).
    node: NodeConfig,
    links: Links,
    datapath: Datapath,
    /// What the kernel holds now, as objects.
    desired: Desired,
    /// What the kernel holds now, as map entries by object.
    mirror: Mirror,
    /// The last batch applied (the source's numbering).
    sequence: u64,
    /// Objects of the saved state the last start could not restore.
    left_out: Vec<String>,
    /// Where what is applied is saved; none until `restore`.
    journal: Option<Journal>,
    /// What the DNS server answers, from the applied state.
    names: std::sync::Arc<std::sync::RwLock<crate::dns::Names>>,
    reserved_local_ports: host::ReservedLocalPorts,
    /// Published ports came or went since they were last reserved.
    published_ports_changed: bool,
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
            flags: if config.mesh_dsr { NODE_MESH_DSR } else { 0 }
                | if config.vxlan_by_device { NODE_VXLAN_BY_DEVICE } else { 0 },
        };
        // Until a sync replaces them, the maps' entries keep their IDs to themselves.
        let held = datapath.lb_ids()?;
        let mut mirror = Mirror::default();
        mirror.ids.hold_kernel(&held);
        let rules = Rules::strict(reserved_ports(&config));
        let mut dataplane = Dataplane {
            config,
            node,
            links,
            datapath,
            desired: Desired::new(rules),
            mirror,
            sequence: 0,
            left_out: Vec::new(),
            journal: None,
            names,
            reserved_local_ports: host::ReservedLocalPorts::default(),
            published_ports_changed: false,
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
        self.desired.to_spec().check_reserved(&[data_path])?;
        if let Err(e) = self.bring_up_overlay(port).await {
            // The old device may be gone already: the overlay goes back to the port it had
            // rather than staying without one.
            if let Err(again) = self.bring_up_overlay(self.config.vxlan_port).await {
                error!(error = %again, port = self.config.vxlan_port, "could not bring the overlay back either");
            }
            return Err(e);
        }
        self.config.vxlan_port = port;
        self.desired.set_rules(Rules::strict(reserved_ports(&self.config)));
        Ok(())
    }

    /// Creates (or adopts) the VXLAN device on `port` and points the programs at it.
    async fn bring_up_overlay(&mut self, port: u16) -> Result<(), NetError> {
        let vxlan = self.links.ensure_vxlan(VXLAN_DEVICE, port, DEFAULT_OVERLAY_MTU).await?;
        self.node.vxlan_ifindex = vxlan;
        self.node.data_path_port = port.to_be();
        self.datapath.configure(self.node)?;
        self.datapath.attach_overlay(VXLAN_DEVICE, vxlan)?;
        // Best effort: without it, overlay traffic only costs more.
        if let Err(e) = host::untrack_data_path(port, self.config.node_addr) {
            warn!(error = %e, port, "could not keep the data path out of connection tracking");
        }
        info!(device = VXLAN_DEVICE, ifindex = vxlan, port, "overlay device ready");
        Ok(())
    }

    /// Applies a batch of changes in order, each on its own: a refused one changes nothing
    /// and is reported, the others apply. Answers once the applied changes are in the
    /// kernel and journaled on disk (or not at all: a failed save takes them back out).
    #[instrument(skip_all, fields(changes = batch.changes.len()))]
    pub async fn apply_batch(&mut self, batch: ChangeBatch) -> Result<ChangeReport, NetError> {
        let report = self.apply_batch_changes(batch).await;
        self.reserve_published_ports();
        report
    }

    async fn apply_batch_changes(&mut self, batch: ChangeBatch) -> Result<ChangeReport, NetError> {
        let sequence = match batch.sequence {
            Some(sequence) => sequence,
            None => self.sequence.checked_add(1).ok_or(NetError::SequenceExhausted)?,
        };
        if sequence <= self.sequence {
            return Err(NetError::StaleSequence { given: sequence, applied: self.sequence });
        }
        if self.journal.as_ref().is_some_and(Journal::wants_snapshot) {
            let snapshot = Snapshot { sequence: self.sequence, spec: self.desired.to_spec() };
            self.save(&snapshot).map_err(NetError::Persist)?;
        }
        let mut results = Vec::with_capacity(batch.changes.len());
        let mut applied = Vec::new();
        let mut undo = Vec::new();
        for change in batch.changes {
            match self.apply_one(&change).await {
                Ok(inverse) => {
                    results.push(ChangeResult::APPLIED);
                    if let Some(inverse) = inverse {
                        undo.push(inverse);
                        applied.push(change);
                    }
                }
                Err(e) => {
                    warn!(error = %e, ?change, "change refused");
                    results.push(ChangeResult { status: e.status(), message: Some(e.to_string()) });
                }
            }
        }
        let record = ChangeBatch { sequence: Some(sequence), changes: applied };
        if let Some(journal) = &mut self.journal {
            if let Err(e) = journal.append(&record) {
                self.undo(undo).await;
                return Err(NetError::Persist(e));
            }
        }
        self.sequence = sequence;
        Ok(ChangeReport { sequence, results })
    }

    /// Makes the kernel match `spec`, applied as the changes from the current state, then
    /// saves it with `sequence` (the current one when absent); answers Ok only when both
    /// succeeded. Input errors are found before anything changes; if the kernel or the save
    /// fails, the changes are taken back, so the kernel, `spec()` and the disk never disagree.
    #[instrument(skip_all, fields(networks = spec.networks.len(), endpoints = spec.endpoints.len(), services = spec.services.len()))]
    pub async fn replace(&mut self, spec: DataplaneSpec, sequence: Option<u64>) -> Result<(), NetError> {
        let replaced = self.replace_state(spec, sequence).await;
        self.reserve_published_ports();
        replaced
    }

    async fn replace_state(&mut self, spec: DataplaneSpec, sequence: Option<u64>) -> Result<(), NetError> {
        let sequence = sequence.unwrap_or(self.sequence);
        if sequence < self.sequence {
            return Err(NetError::StaleSequence { given: sequence, applied: self.sequence });
        }
        let target = Desired::from_spec(&spec, self.desired.rules().clone())?;
        let (going, coming) = self.desired.changes_to(&target);
        let mut undo = Vec::new();
        let mut result = self.apply_all(going, coming, &mut undo).await;
        if result.is_ok() {
            result = self.repair_local_links().await;
        }
        if result.is_ok() {
            result = self.save(&Snapshot { sequence, spec }).map_err(NetError::Persist);
        }
        if let Err(e) = result {
            self.undo(undo).await;
            return Err(e);
        }
        // The same objects, in the order given.
        self.desired = target;
        self.sequence = sequence;
        self.left_out.clear();
        info!(objects = self.mirror.owners().count(), "dataplane converged");
        Ok(())
    }

    /// Applies what goes, then what comes. What comes may only fit once other changes are in
    /// (two services trading a published port): those wait for a later round; services still
    /// in each other's way at the end are removed and set again.
    async fn apply_all(
        &mut self,
        going: Vec<Change>,
        coming: Vec<Change>,
        undo: &mut Vec<Change>,
    ) -> Result<(), NetError> {
        for change in going {
            undo.extend(self.apply_one(&change).await?);
        }
        let mut pending = coming;
        let mut cleared = false;
        while !pending.is_empty() {
            let mut waiting = Vec::new();
            let mut first_error = None;
            let count = pending.len();
            for change in pending {
                match self.apply_one(&change).await {
                    Ok(inverse) => undo.extend(inverse),
                    Err(NetError::Spec(e)) => {
                        first_error.get_or_insert(e);
                        waiting.push(change);
                    }
                    Err(e) => return Err(e),
                }
            }
            if waiting.len() == count {
                let error = first_error.map(NetError::Spec).unwrap_or(NetError::IdsExhausted);
                if cleared {
                    return Err(error);
                }
                for change in &waiting {
                    if let Change::SetService(svc) = change {
                        if self.desired.service(&svc.network, &svc.name).is_some() {
                            let remove = Change::RemoveService { network: svc.network.clone(), name: svc.name.clone() };
                            undo.extend(self.apply_one(&remove).await?);
                        }
                    }
                }
                cleared = true;
            }
            pending = waiting;
        }
        Ok(())
    }

    /// Re-plans the endpoints on this node whose interface is no longer the one the maps
    /// name (a runtime made the veth again): a whole state repairs them, as it finds them.
    async fn repair_local_links(&mut self) -> Result<(), NetError> {
        let local: Vec<shoal_api::dataplane::Endpoint> =
            self.desired.endpoints().filter(|ep| ep.node_addr == self.config.node_addr).cloned().collect();
        for ep in local {
            let owner = Owner::Endpoint((ep.network.clone(), ep.addr));
            let links = self.local_links(&self.desired, std::slice::from_ref(&owner)).await?;
            let Some(now) = links.values().next().map(|link| (link.index, link.mac)) else {
                // Gone (its workload is being removed): the change that removes it will come.
                warn!(endpoint = %ep.addr, "its interface is gone");
                continue;
            };
            let named =
                self.mirror.entries(&owner).and_then(|e| e.interfaces.first()).map(|(i, entry)| (*i, entry.mac));
            if Some(now) != named {
                let removal = Change::RemoveEndpoint { network: ep.network.clone(), addr: ep.addr };
                let owners = self.owners_of(&Change::AddEndpoint(ep.clone()), &removal);
                warn!(endpoint = %ep.addr, "its interface changed: programming it again");
                self.program(&owners).await?;
            }
        }
        Ok(())
    }

    /// Takes applied changes back, last first, with their inverses.
    async fn undo(&mut self, inverses: Vec<Change>) {
        for inverse in inverses.into_iter().rev() {
            if let Err(e) = self.apply_one(&inverse).await {
                error!(error = %e, change = ?inverse, "could not take a change back");
            }
        }
    }

    /// Applies one change to the state and the kernel, all or nothing; returns its inverse
    /// (`None`: nothing to do).
    async fn apply_one(&mut self, change: &Change) -> Result<Option<Change>, NetError> {
        let Some(inverse) = self.desired.apply(change)? else {
            return Ok(None);
        };
        let owners = self.owners_of(change, &inverse);
        if let Err(e) = self.program(&owners).await {
            if let Err(again) = self.desired.apply(&inverse) {
                error!(error = %again, "could not take a change back out of the state");
            }
            return Err(e);
        }
        Ok(Some(inverse))
    }

    /// The objects whose entries `change` (undone by `inverse`) may change: its own, and for
    /// an endpoint on this node, the services it backs with host-mode ports.
    fn owners_of(&self, change: &Change, inverse: &Change) -> Vec<Owner> {
        let endpoint = match (change, inverse) {
            (Change::AddEndpoint(ep), _) | (_, Change::AddEndpoint(ep)) => Some(ep),
            _ => None,
        };
        if let Some(ep) = endpoint {
            let mut owners = vec![Owner::Endpoint((ep.network.clone(), ep.addr))];
            if ep.node_addr == self.config.node_addr {
                let host_mode = |svc: &&shoal_api::dataplane::ServiceVip| {
                    svc.network == ep.network
                        && svc.published.iter().any(|p| p.publish_mode == shoal_api::dataplane::PublishMode::Host)
                        && (svc.backends.contains(&ep.addr) || svc.draining.contains(&ep.addr))
                };
                owners.extend(
                    self.desired
                        .services()
                        .filter(host_mode)
                        .map(|s| Owner::Service((s.network.clone(), s.name.clone()))),
                );
            }
            return owners;
        }
        vec![match change {
            Change::AddNetwork(net) => Owner::Network(net.name.clone()),
            Change::RemoveNetwork { name } => Owner::Network(name.clone()),
            Change::SetService(svc) => Owner::Service((svc.network.clone(), svc.name.clone())),
            Change::RemoveService { network, name }
            | Change::SetBackends { network, service: name, .. }
            | Change::Publish { network, service: name, .. }
            | Change::Unpublish { network, service: name, .. } => Owner::Service((network.clone(), name.clone())),
            Change::AddNode { addr } | Change::RemoveNode { addr } => Owner::Node(*addr),
            Change::AddEndpoint(ep) => Owner::Endpoint((ep.network.clone(), ep.addr)),
            Change::RemoveEndpoint { network, addr } => Owner::Endpoint((network.clone(), *addr)),
        }]
    }

    /// Plans the entries of `owners` from the state and writes the difference: maps, then the
    /// host. On failure what was written is put back, and the mirror with it.
    async fn program(&mut self, owners: &[Owner]) -> Result<(), NetError> {
        let links = self.local_links(&self.desired, owners).await?;
        let mut delta = Delta::default();
        let mut previous: Vec<(Owner, Option<Entries>)> = Vec::new();
        let mut result = Ok(());
        for owner in owners {
            match overlay::entries(&self.desired, owner, self.config.node_addr, &links, &mut self.mirror) {
                Ok(entries) => previous.push((owner.clone(), self.mirror.replace(owner.clone(), entries, &mut delta))),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let mut written = false;
        if result.is_ok() {
            self.mirror.finish(&mut delta);
            written = true;
            result = match self.datapath.write(&delta) {
                Ok(()) => self.apply_host(&delta).await,
                Err(e) => Err(e),
            };
        }
        if let Err(e) = result {
            let mut back = Delta::default();
            for (owner, old) in previous.into_iter().rev() {
                self.mirror.replace(owner, old, &mut back);
            }
            self.mirror.finish(&mut back);
            if written {
                if let Err(again) = self.datapath.write(&back) {
                    error!(error = %again, "could not put the maps back after a failed change");
                }
                if let Err(again) = self.apply_host(&back).await {
                    error!(error = %again, "could not put the host back after a failed change");
                }
            }
            return Err(e);
        }
        let mut names = self.names.write().unwrap_or_else(|p| p.into_inner());
        for owner in owners {
            match owner {
                Owner::Network(name) => match self.desired.network(name) {
                    Some(net) => names.set_network(net),
                    None => names.remove_network(name),
                },
                Owner::Service((network, name)) => match self.desired.service(network, name) {
                    Some(svc) => names.set_service(svc),
                    None => names.remove_service(network, name),
                },
                Owner::Endpoint(_) | Owner::Node(_) => {}
            }
        }
        Ok(())
    }

    /// The interfaces of `owners`' endpoints on this node in `desired`, as the kernel has
    /// them now.
    async fn local_links(&self, desired: &Desired, owners: &[Owner]) -> Result<LocalLinks, NetError> {
        let mut links = LocalLinks::new();
        for owner in owners {
            let Owner::Endpoint((network, addr)) = owner else { continue };
            let Some(ep) = desired.endpoint(network, *addr) else { continue };
            let Some(name) = ep.interface.as_deref().filter(|_| ep.node_addr == self.config.node_addr) else {
                continue;
            };
            if let Some(link) = self.links.veth(name).await? {
                links.insert(name.to_owned(), link);
            }
        }
        Ok(links)
    }

    fn save(&mut self, snapshot: &Snapshot) -> std::io::Result<()> {
        match &mut self.journal {
            Some(journal) => journal.snapshot(snapshot),
            None => Ok(()),
        }
    }

    /// A saved state as it may be restored: without published ports this node uses itself
    /// (an older version accepted them, or a port setting changed since), each said.
    pub fn restorable(&self, spec: DataplaneSpec) -> DataplaneSpec {
        let (spec, removed) = spec.without_reserved(&reserved_ports(&self.config));
        for port in removed {
            warn!(port, "not restoring a published port this node uses itself");
        }
        spec
    }

    pub fn attach_cgroup(&mut self, cgroup: &std::path::Path) -> Result<(), NetError> {
        self.datapath.attach_cgroup(cgroup)
    }

    pub fn spec(&self) -> DataplaneSpec {
        self.desired.to_spec()
    }

    /// The last batch applied.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    pub fn counters(&self) -> Result<Vec<Counter>, NetError> {
        self.datapath.counters()
    }

    /// Detaches every program (a clean exit). Pinned maps stay.
    pub fn detach_all(&mut self) {
        self.datapath.detach_all();
        if let Err(e) = host::remove_host_rules() {
            tracing::warn!(error = %e, "removing the NAT and notrack rules failed");
        }
    }

    /// Leaves the programs attached (a restart): traffic goes on without the agent.
    pub fn release(&mut self) {
        self.datapath.release();
    }

    /// The host's side of one change: forwarding, the way out's NAT, the published ports'
    /// reservation, routes to local workloads.
    async fn apply_host(&mut self, delta: &Delta) -> Result<(), NetError> {
        let plan = self.mirror.plan();
        // (A service's new backend changes its ports' entries, not which ports there are.)
        let ports_come_or_go = delta.ingress.changes_keys();
        if (delta.touches_nat() || ports_come_or_go || delta.nodes.changes_keys()) && plan.wants_forwarding() {
            enable_forwarding(plan)?;
        }
        if delta.touches_nat() {
            host::sync_nat(&plan.masquerade(), &plan.gateways(), self.config.dns)?;
        }
        // Once per request, not per change: the list is rewritten whole (10,000 services
        // published one by one would cost seconds).
        self.published_ports_changed |= ports_come_or_go;
        for (route, ()) in &delta.host_routes.put {
            self.links.add_host_route(route).await?;
        }
        for route in &delta.host_routes.delete {
            self.links.remove_host_route(route).await?;
        }
        Ok(())
    }

    /// Keeps the published ports out of the ephemeral range if they changed since the last
    /// time (best effort: a node whose /proc/sys is read-only still serves its ports).
    fn reserve_published_ports(&mut self) {
        if std::mem::take(&mut self.published_ports_changed) {
            if let Err(e) = self.reserved_local_ports.sync(&self.mirror.plan().published_ports()) {
                warn!(error = %e, "could not keep the published ports out of the ephemeral range");
            }
        }
    }

    /// The host's side of a whole plan (at start: whatever an earlier run left goes).
    async fn apply_host_whole(&mut self, plan: &mirror::Plan) -> Result<(), NetError> {
        if plan.wants_forwarding() {
            enable_forwarding(plan)?;
        }
        host::sync_nat(&plan.masquerade(), &plan.gateways(), self.config.dns)?;
        if let Err(e) = self.reserved_local_ports.sync(&plan.published_ports()) {
            warn!(error = %e, "could not keep the published ports out of the ephemeral range");
        }
        self.links.sync_host_routes(&plan.host_routes()).await
    }
}

/// The ports this node uses on its own address: never published.
fn reserved_ports(config: &NetConfig) -> Vec<ReservedPort> {
    let mut reserved = vec![
        ReservedPort { port: config.vxlan_port, protocol: Protocol::Udp, what: "the data path (VXLAN) port" },
        ReservedPort { port: CLUSTER_PORT, protocol: Protocol::Tcp, what: "the swarm's cluster port" },
    ];
    if let Some(dns) = config.dns {
        for protocol in [Protocol::Udp, Protocol::Tcp] {
            reserved.push(ReservedPort { port: dns.port(), protocol, what: "the embedded DNS server's port" });
        }
    }
    reserved
}

/// The change that removes `owner` from a state.
fn removal_of(owner: &Owner) -> Change {
    match owner {
        Owner::Network(name) => Change::RemoveNetwork { name: name.clone() },
        Owner::Endpoint((network, addr)) => Change::RemoveEndpoint { network: network.clone(), addr: *addr },
        Owner::Service((network, name)) => Change::RemoveService { network: network.clone(), name: name.clone() },
        Owner::Node(addr) => Change::RemoveNode { addr: *addr },
    }
}

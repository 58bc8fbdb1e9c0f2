//! The BPF side of the network role: loads shoal's programs with their maps pinned under the
//! node's pin directory, attaches them (TCX, kernels >= 6.6), and writes map entries.
//! The only module that touches BPF.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    path::Path,
};

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{tc::SchedClassifierLinkId, SchedClassifier, TcAttachType},
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};
use shoal_api::dataplane::Counter;
use shoal_common::{
    maps,
    overlay::{EndpointEntry, EndpointKey, InterfaceEntry, NodeConfig},
    stats,
};
use tracing::{debug, info, warn};

use crate::net::{overlay::Plan, NetError};

/// The object `build.rs` compiled from `ebpf/shoal-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/shoal-ebpf.o"));

/// TC ingress on the host side of each workload veth.
const FROM_WORKLOAD: &str = "from_workload";
/// TC ingress on the node's VXLAN device.
const FROM_OVERLAY: &str = "from_overlay";

/// Where bpffs is mounted on every Linux host.
const BPFFS: &str = "/sys/fs/bpf";

/// TCX (fd-based TC attachments, no clsact qdisc to manage) arrived in Linux 6.6.
const MIN_KERNEL: (u8, u8) = (6, 6);

pub struct Datapath {
    ebpf: Ebpf,
    /// `from_workload` attachments by ifindex (with the name, for logs).
    workload_links: BTreeMap<u32, (String, SchedClassifierLinkId)>,
    overlay_link: Option<SchedClassifierLinkId>,
}

impl Datapath {
    /// Loads the programs; maps already pinned in `pin_dir` are reused, with their contents.
    pub fn load(pin_dir: &Path) -> Result<Self, NetError> {
        let kernel = KernelVersion::current().map_err(|e| NetError::Kernel(e.to_string()))?;
        if kernel < KernelVersion::new(MIN_KERNEL.0, MIN_KERNEL.1, 0) {
            return Err(NetError::Kernel(format!(
                "kernel {kernel} is too old: shoal needs {}.{} or newer (TCX)",
                MIN_KERNEL.0, MIN_KERNEL.1
            )));
        }
        ensure_bpffs(pin_dir)?;
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(pin_dir).load(OBJECT)?;
        for name in [maps::ENDPOINTS, maps::INTERFACES, maps::NODE_CONFIG, maps::STATS] {
            if ebpf.map(name).is_none() {
                return Err(map_error(name, MapError::InvalidName { name: name.into() }));
            }
        }
        for name in [FROM_WORKLOAD, FROM_OVERLAY] {
            classifier(&mut ebpf, name)?.load().map_err(|source| NetError::Program { program: name, source })?;
        }
        info!(pin_dir = %pin_dir.display(), %kernel, "BPF programs loaded");
        Ok(Datapath { ebpf, workload_links: BTreeMap::new(), overlay_link: None })
    }

    /// Attaches `from_overlay` to the VXLAN device and tells the programs its ifindex.
    pub fn attach_overlay(&mut self, device: &str, ifindex: u32) -> Result<(), NetError> {
        let mut config: Array<&mut MapData, NodeConfig> = self.map_mut(maps::NODE_CONFIG)?;
        config.set(0, NodeConfig { vxlan_ifindex: ifindex }, 0).map_err(|e| map_error(maps::NODE_CONFIG, e))?;
        if let Some(old) = self.overlay_link.take() {
            self.detach(FROM_OVERLAY, old);
        }
        let link = classifier(&mut self.ebpf, FROM_OVERLAY)?
            .attach(device, TcAttachType::Ingress)
            .map_err(|source| NetError::Program { program: FROM_OVERLAY, source })?;
        self.overlay_link = Some(link);
        Ok(())
    }

    /// Writes `plan` into the maps and attaches to exactly the planned interfaces. Entries go
    /// in before attachments so a newly attached interface never sees a half-filled map.
    pub fn apply(&mut self, plan: &Plan) -> Result<(), NetError> {
        let mut endpoints: HashMap<&mut MapData, EndpointKey, EndpointEntry> = self.map_mut(maps::ENDPOINTS)?;
        sync_hash_map(&mut endpoints, maps::ENDPOINTS, &plan.endpoints)?;
        let mut interfaces: HashMap<&mut MapData, u32, InterfaceEntry> = self.map_mut(maps::INTERFACES)?;
        sync_hash_map(&mut interfaces, maps::INTERFACES, &plan.interfaces)?;

        let stale: Vec<u32> =
            self.workload_links.keys().filter(|ifindex| !plan.attach.contains_key(ifindex)).copied().collect();
        for ifindex in stale {
            if let Some((name, link)) = self.workload_links.remove(&ifindex) {
                debug!(interface = %name, ifindex, "detaching from workload interface");
                self.detach(FROM_WORKLOAD, link);
            }
        }
        for (&ifindex, name) in &plan.attach {
            if self.workload_links.contains_key(&ifindex) {
                continue;
            }
            let link = classifier(&mut self.ebpf, FROM_WORKLOAD)?
                .attach(name, TcAttachType::Ingress)
                .map_err(|source| NetError::Program { program: FROM_WORKLOAD, source })?;
            debug!(interface = %name, ifindex, "attached to workload interface");
            self.workload_links.insert(ifindex, (name.clone(), link));
        }
        Ok(())
    }

    /// Every counter in use, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<Counter>, NetError> {
        let map = self
            .ebpf
            .map(maps::STATS)
            .ok_or_else(|| map_error(maps::STATS, MapError::InvalidName { name: maps::STATS.into() }))?;
        let per_cpu: PerCpuArray<&MapData, stats::Counter> =
            PerCpuArray::try_from(map).map_err(|e| map_error(maps::STATS, e))?;
        let mut out = Vec::new();
        for code in 0..stats::MAX {
            let Some(name) = stats::name(code) else {
                continue;
            };
            let values = per_cpu.get(&code, 0).map_err(|e| map_error(maps::STATS, e))?;
            let (packets, bytes) = values.iter().fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
            out.push(Counter { code, name: name.to_owned(), packets, bytes });
        }
        Ok(out)
    }

    /// Detaches every program; the maps stay pinned.
    pub fn detach_all(&mut self) {
        for (_, (name, link)) in std::mem::take(&mut self.workload_links) {
            debug!(interface = %name, "detaching from workload interface");
            self.detach(FROM_WORKLOAD, link);
        }
        if let Some(link) = self.overlay_link.take() {
            self.detach(FROM_OVERLAY, link);
        }
        info!("BPF programs detached");
    }

    fn detach(&mut self, program: &'static str, link: SchedClassifierLinkId) {
        // An interface that disappeared took its attachment with it; nothing left to undo.
        if let Err(e) = classifier(&mut self.ebpf, program)
            .and_then(|p| p.detach(link).map_err(|source| NetError::Program { program, source }))
        {
            warn!(program, error = %e, "detach failed");
        }
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, NetError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map =
            self.ebpf.map_mut(name).ok_or_else(|| map_error(name, MapError::InvalidName { name: name.into() }))?;
        T::try_from(map).map_err(|e| map_error(name, e))
    }
}

fn map_error(map: &'static str, source: MapError) -> NetError {
    NetError::Map { map, source }
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, NetError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(NetError::Program { program: name, source: aya::programs::ProgramError::UnexpectedProgramType })?;
    program.try_into().map_err(|source| NetError::Program { program: name, source })
}

/// Makes the map hold exactly `want`. Stale keys go first, so the map never needs room for
/// old and new together; unchanged entries are not rewritten, so programs reading them see
/// no churn.
fn sync_hash_map<K, V>(
    map: &mut HashMap<&mut MapData, K, V>,
    name: &'static str,
    want: &StdHashMap<K, V>,
) -> Result<(), NetError>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    let present: Vec<K> = map.keys().collect::<Result<_, _>>().map_err(|e| map_error(name, e))?;
    for key in present.iter().filter(|k| !want.contains_key(k)) {
        map.remove(key).map_err(|e| map_error(name, e))?;
    }
    for (key, value) in want {
        if map.get(key, 0).is_ok_and(|current| current == *value) {
            continue;
        }
        map.insert(key, value, 0).map_err(|e| map_error(name, e))?;
    }
    Ok(())
}

/// Mounts bpffs on `/sys/fs/bpf` when the host has not (no systemd here to do it), then
/// creates `pin_dir`, which must end up on bpffs for pinning to work.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), NetError> {
    let is_bpffs = |p: &Path| statfs(p).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
    if !is_bpffs(Path::new(BPFFS)) {
        mount(Some("bpf"), BPFFS, Some("bpf"), MsFlags::empty(), None::<&str>).map_err(NetError::MountBpfFs)?;
        info!(path = BPFFS, "mounted bpffs");
    }
    std::fs::create_dir_all(pin_dir)?;
    if !is_bpffs(pin_dir) {
        return Err(NetError::NotBpfFs(pin_dir.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
#[path = "bpf_privileged.rs"]
mod privileged;

//! Network devices through rtnetlink: finding workload interfaces and the underlay interface,
//! and owning the node's `vxlan external` device. The only module that speaks netlink.

use futures::TryStreamExt;
use rtnetlink::{
    packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo as NlLinkInfo, LinkMessage},
    Handle, LinkVxlan,
};
use tracing::warn;

use std::net::{IpAddr, Ipv4Addr};

use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        neighbour::NeighbourState,
        route::{RouteAddress, RouteAttribute, RouteProtocol, RouteScope},
    },
    RouteMessageBuilder,
};

use crate::net::{host::HostRoute, overlay::LinkInfo, NetError};

/// Routing protocol number of the routes shoal adds (a private value, like bird's or
/// zebra's own), so it can find exactly its own routes again.
const ROUTE_PROTOCOL: u8 = 222;

/// A netlink connection in the agent's network namespace.
pub struct Links {
    handle: Handle,
}

impl Links {
    /// Opens the connection; must run inside the tokio runtime that will drive it.
    pub fn connect() -> Result<Self, NetError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Links { handle })
    }

    /// The veth called `name`, or `None` when there is no interface of that name.
    pub async fn veth(&self, name: &str) -> Result<Option<LinkInfo>, NetError> {
        let Some(msg) = self.message(name).await? else {
            return Ok(None);
        };
        if link_kind(&msg) != Some(&InfoKind::Veth) {
            return Err(NetError::NotVeth(name.to_owned()));
        }
        let mac = msg
            .attributes
            .iter()
            .find_map(|attr| match attr {
                LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                _ => None,
            })
            .ok_or_else(|| NetError::NotVeth(name.to_owned()))?;
        Ok(Some(LinkInfo { index: msg.header.index, mac }))
    }

    /// Makes sure a collect-metadata VXLAN device called `name` exists on `port` and is up;
    /// returns its ifindex. A device left by an earlier run is adopted when it has the right
    /// shape (so a restart does not disturb traffic) and replaced otherwise.
    pub async fn ensure_vxlan(&self, name: &str, port: u16, mtu: u32) -> Result<u32, NetError> {
        if let Some(existing) = self.message(name).await? {
            if is_external_vxlan(&existing, port) {
                self.set_up(existing.header.index).await?;
                return Ok(existing.header.index);
            }
            // Once, on the first start of a version that needs `gbp` (the kernel cannot add
            // it to a device): overlay traffic stops until the programs are attached again.
            warn!(device = name, "replacing a device that is not an external VXLAN with gbp on our port");
            self.handle.link().del(existing.header.index).execute().await?;
        }
        // With the group policy extension: the routing mesh's direct server return carries
        // the published port there (a header without a policy is the plain one).
        let request =
            LinkVxlan::new(name, 0).port(port).collect_metadata(true).learning(false).gbp().mtu(mtu).up().build();
        // `LinkVxlan::new` always sets a VNI; an external device must not carry one.
        let request = strip_vni(request);
        self.handle.link().add(request).execute().await?;
        let created = self.message(name).await?.ok_or_else(|| NetError::InterfaceNotFound(name.to_owned()))?;
        Ok(created.header.index)
    }

    /// Makes the host's routes to local workloads exactly `routes`: a /32 over the workload's
    /// veth and a permanent neighbour entry with its MAC (our routes carry protocol
    /// `ROUTE_PROTOCOL`, so stale ones from any earlier run are found and removed).
    pub async fn sync_host_routes(&self, routes: &[HostRoute]) -> Result<(), NetError> {
        let wanted: std::collections::BTreeSet<(Ipv4Addr, u32)> = routes.iter().map(|r| (r.addr, r.ifindex)).collect();
        let mut existing = self.handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
        let mut stale = Vec::new();
        while let Some(route) = existing.try_next().await? {
            if route.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                continue;
            }
            let dst = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
                _ => None,
            });
            let oif = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if dst.zip(oif).is_none_or(|key| !wanted.contains(&key)) {
                stale.push(route);
            }
        }
        for route in stale {
            self.handle.route().del(route).execute().await?;
        }
        for route in routes {
            self.add_host_route(route).await?;
        }
        Ok(())
    }

    /// Routes replies to one local workload: a /32 over its veth and a permanent neighbour
    /// entry with its MAC.
    pub async fn add_host_route(&self, r: &HostRoute) -> Result<(), NetError> {
        self.handle.route().add(host_route(r)).replace().execute().await?;
        self.handle
            .neighbours()
            .add(r.ifindex, IpAddr::V4(r.addr))
            .link_layer_address(&r.mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await?;
        Ok(())
    }

    /// Removes one workload's route (its neighbour entry goes with it, or with the veth).
    /// Already gone is fine: a veth takes its routes with it.
    pub async fn remove_host_route(&self, r: &HostRoute) -> Result<(), NetError> {
        match self.handle.route().del(host_route(r)).execute().await {
            Err(rtnetlink::Error::NetlinkError(e))
                if e.raw_code().abs() == nix::libc::ESRCH || e.raw_code().abs() == nix::libc::ENODEV =>
            {
                Ok(())
            }
            other => Ok(other?),
        }
    }

    /// The interface that holds `addr` (the node's underlay address): its index and name.
    pub async fn holding(&self, addr: Ipv4Addr) -> Result<Option<(u32, String)>, NetError> {
        let mut addresses = self.handle.address().get().execute();
        let mut index = None;
        while let Some(msg) = addresses.try_next().await? {
            let holds = msg.attributes.iter().any(|a| {
                matches!(a, AddressAttribute::Address(IpAddr::V4(ip)) | AddressAttribute::Local(IpAddr::V4(ip)) if *ip == addr)
            });
            if holds {
                index = Some(msg.header.index);
                break;
            }
        }
        let Some(index) = index else { return Ok(None) };
        let mut links = self.handle.link().get().match_index(index).execute();
        let Some(link) = links.try_next().await? else { return Ok(None) };
        let name = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        });
        Ok(name.map(|name| (index, name)))
    }

    async fn set_up(&self, index: u32) -> Result<(), NetError> {
        let msg = rtnetlink::LinkUnspec::new_with_index(index).up().build();
        self.handle.link().set(msg).execute().await?;
        Ok(())
    }

    async fn message(&self, name: &str) -> Result<Option<LinkMessage>, NetError> {
        let mut links = self.handle.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(msg) => Ok(msg),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -(nix::errno::Errno::ENODEV as i32) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

fn strip_vni(mut msg: LinkMessage) -> LinkMessage {
    for attr in &mut msg.attributes {
        if let LinkAttribute::LinkInfo(infos) = attr {
            for info in infos {
                if let NlLinkInfo::Data(InfoData::Vxlan(vxlan)) = info {
                    vxlan.retain(|v| !matches!(v, InfoVxlan::Id(_)));
                }
            }
        }
    }
    msg
}

fn link_infos(msg: &LinkMessage) -> &[NlLinkInfo] {
    msg.attributes
        .iter()
        .find_map(|attr| match attr {
            LinkAttribute::LinkInfo(infos) => Some(infos.as_slice()),
            _ => None,
        })
        .unwrap_or_default()
}

fn link_kind(msg: &LinkMessage) -> Option<&InfoKind> {
    link_infos(msg).iter().find_map(|i| match i {
        NlLinkInfo::Kind(kind) => Some(kind),
        _ => None,
    })
}

fn is_external_vxlan(msg: &LinkMessage, port: u16) -> bool {
    let data = link_infos(msg).iter().find_map(|i| match i {
        NlLinkInfo::Data(InfoData::Vxlan(data)) => Some(data),
        _ => None,
    });
    link_kind(msg) == Some(&InfoKind::Vxlan)
        && data.is_some_and(|d| {
            d.contains(&InfoVxlan::CollectMetadata(true))
                && d.contains(&InfoVxlan::Port(port))
                && d.contains(&InfoVxlan::Gbp)
        })
}

/// The route message of a workload's host route.
fn host_route(r: &HostRoute) -> rtnetlink::packet_route::route::RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.addr, 32)
        .output_interface(r.ifindex)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
        .build()
}

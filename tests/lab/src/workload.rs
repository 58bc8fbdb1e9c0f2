//! Workloads: namespaces with one veth and an overlay address, standing in for containers
//! until the executor exists.

use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use shoal_api::MacAddr;

use crate::{cmd::run_ok, Host};

/// A workload namespace on one host.
#[derive(Debug, Clone)]
pub struct Workload {
    pub netns: String,
    /// Host-side veth, in the host's namespace (what shoald attaches to).
    pub host_iface: String,
    pub addr: Ipv4Addr,
    pub mac: MacAddr,
    /// Underlay address of the host it runs on.
    pub node_addr: Ipv4Addr,
}

pub fn create(lab: &str, host: &Host, name: &str, addr: Ipv4Addr, prefix: u8, mtu: u32) -> Result<Workload> {
    let netns = format!("{lab}-{}-{name}", host.name);
    run_ok(&["ip", "netns", "add", &netns])?;
    run_ok(&["ip", "-n", &netns, "link", "set", "lo", "up"])?;
    // As Docker does for containers on networks without IPv6: no link-local addresses, no
    // router solicitations (the overlay carries IPv4 only and drops the rest).
    let nsenter_net = format!("--net=/run/netns/{netns}");
    run_ok(&[
        "nsenter",
        &nsenter_net,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ])?;
    let workload = plug(host, &netns, name, "eth0", addr, prefix, mtu)?;
    // The network's gateway is its first address (the overlay's default), the way out.
    let network = u32::from(addr) & (u32::MAX << (32 - u32::from(prefix)));
    let gateway = Ipv4Addr::from(network + 1);
    if gateway != addr && prefix < 31 {
        run_ok(&["ip", "-n", &netns, "route", "add", "default", "via", &gateway.to_string()])?;
    }
    Ok(workload)
}

/// A veth from `host` (`shw-<name>`) into `netns` (`inside`), up, with `addr` and a MAC
/// derived from it.
pub(crate) fn plug(
    host: &Host,
    netns: &str,
    name: &str,
    inside: &str,
    addr: Ipv4Addr,
    prefix: u8,
    mtu: u32,
) -> Result<Workload> {
    let host_iface = format!("shw-{name}");
    if host_iface.len() > 15 {
        bail!("workload name {name:?} is too long (at most 11 characters)");
    }
    let mac = MacAddr::from_ipv4(addr);
    let (mtu, cidr, mac_text) = (mtu.to_string(), format!("{addr}/{prefix}"), mac.to_string());
    run_ok(&[
        "ip",
        "-n",
        &host.netns,
        "link",
        "add",
        &host_iface,
        "mtu",
        &mtu,
        "type",
        "veth",
        "peer",
        "name",
        inside,
        "netns",
        netns,
    ])?;
    run_ok(&["ip", "-n", &host.netns, "link", "set", &host_iface, "up"])?;
    run_ok(&["ip", "-n", netns, "link", "set", inside, "address", &mac_text, "mtu", &mtu])?;
    run_ok(&["ip", "-n", netns, "addr", "add", &cidr, "dev", inside])?;
    run_ok(&["ip", "-n", netns, "link", "set", inside, "up"])?;
    Ok(Workload { netns: netns.to_owned(), host_iface, addr, mac, node_addr: host.addr })
}

impl Workload {
    /// The endpoint the data plane needs for this workload on `network`.
    pub fn endpoint(&self, network: &str) -> shoal_api::dataplane::Endpoint {
        shoal_api::dataplane::Endpoint {
            network: network.to_owned(),
            addr: self.addr,
            mac: self.mac,
            node_addr: self.node_addr,
            interface: Some(self.host_iface.clone()),
        }
    }
}

/// A TCP server inside a namespace that answers each line `x` with `<text> <x>`, on a thread
/// of this process; `{peer}` in `text` becomes the address the connection came from (what a
/// backend sees of its client). Stops when dropped.
pub struct TextServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TextServer {
    pub fn start(netns: &str, port: u16, text: &str) -> Result<TextServer> {
        use std::sync::{atomic::AtomicBool, Arc};
        let stop = Arc::new(AtomicBool::new(false));
        let listener = crate::in_netns(netns, move || {
            let listener = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
            listener.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(listener)
        })??;
        // The socket belongs to the namespace it was made in, whichever thread uses it.
        let (flag, text) = (stop.clone(), text.to_owned());
        let thread = std::thread::spawn(move || serve(listener, &flag, &text));
        Ok(TextServer { stop, thread: Some(thread) })
    }
}

fn serve(listener: std::net::TcpListener, stop: &std::sync::atomic::AtomicBool, text: &str) {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                // One thread per connection: a long-lived client must not block the others.
                let text = text.replace("{peer}", &peer.ip().to_string());
                std::thread::spawn(move || answer_lines(stream, &text));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// Answers every line `x` on `stream` with `<text> <x>` until the peer closes it.
fn answer_lines(stream: std::net::TcpStream, text: &str) {
    use std::io::{BufRead, BufReader, Write};
    let _ = stream.set_nonblocking(false);
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if writeln!(&stream, "{text} {}", line.trim_end()).is_err() {
            return;
        }
        line.clear();
    }
}

impl Drop for TextServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A UDP server inside a namespace that answers each datagram `x` with `<text> <x>` (with
/// `{peer}` as in `TextServer`), on a thread of this process. Stops when dropped.
pub struct UdpTextServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpTextServer {
    pub fn start(netns: &str, port: u16, text: &str) -> Result<UdpTextServer> {
        use std::sync::{atomic::AtomicBool, Arc};
        let socket = crate::in_netns(netns, move || std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))??;
        socket.set_read_timeout(Some(std::time::Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, text) = (stop.clone(), text.to_owned());
        let thread = std::thread::spawn(move || {
            // Room for the largest datagram (those past the MTU arrive in fragments).
            let mut buf = vec![0u8; 65536];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((len, from)) = socket.recv_from(&mut buf) else { continue };
                let text = text.replace("{peer}", &from.ip().to_string());
                let _ = socket.send_to(format!("{text} {}", String::from_utf8_lossy(&buf[..len])).as_bytes(), from);
            }
        });
        Ok(UdpTextServer { stop, thread: Some(thread) })
    }
}

impl Drop for UdpTextServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A TCP server inside a namespace that writes `bytes` bytes to each connection and closes
/// it, on a thread of this process (for transfers far bigger than a packet).
pub struct BulkServer {
    _thread: std::thread::JoinHandle<()>,
}

impl BulkServer {
    pub fn start(netns: &str, port: u16, bytes: usize) -> Result<BulkServer> {
        let listener = crate::in_netns(netns, move || std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))??;
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let _ = std::io::Write::write_all(&mut stream, &vec![b'x'; bytes]);
            }
        });
        Ok(BulkServer { _thread: thread })
    }

    /// How many bytes a connection from `netns` to `to` gets before the server closes it;
    /// an error if any read waits more than 5 seconds.
    pub fn fetch(netns: &str, to: std::net::SocketAddr) -> Result<usize> {
        crate::in_netns(netns, move || {
            let mut stream = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(5))?;
            stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut stream, &mut got)?;
            Ok::<_, std::io::Error>(got.len())
        })?
        .with_context(|| format!("fetching from {to}"))
    }
}

/// A UDP socket opened inside a namespace on a port of the kernel's choosing, kept across
/// exchanges: every datagram it sends belongs to the same client flow.
pub struct UdpClient {
    socket: std::net::UdpSocket,
}

impl UdpClient {
    pub fn open(netns: &str) -> Result<UdpClient> {
        let socket = crate::in_netns(netns, || std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))??;
        socket.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
        Ok(UdpClient { socket })
    }

    /// Sends `message` to `to` and waits for one answer; returns it with where it came from.
    pub fn ask(&self, to: std::net::SocketAddr, message: &str) -> Result<(String, std::net::SocketAddr)> {
        self.socket.send_to(message.as_bytes(), to)?;
        let mut buf = vec![0u8; 65536];
        let (len, from) = self.socket.recv_from(&mut buf).with_context(|| format!("no answer from {to}"))?;
        Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), from))
    }
}

/// A TCP connection opened from inside a namespace, kept open across exchanges.
pub struct Conversation {
    stream: std::net::TcpStream,
    reader: std::io::BufReader<std::net::TcpStream>,
}

impl Conversation {
    /// Connects from inside `netns`; the socket stays in that namespace afterwards.
    pub fn open(netns: &str, addr: Ipv4Addr, port: u16) -> Result<Conversation> {
        let stream = crate::in_netns(netns, move || {
            std::net::TcpStream::connect_timeout(&(addr, port).into(), std::time::Duration::from_secs(3))
        })??;
        stream.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
        Ok(Conversation { reader: std::io::BufReader::new(stream.try_clone()?), stream })
    }

    /// The connection's local port (the client's side of its flow).
    pub fn local_port(&self) -> Result<u16> {
        Ok(self.stream.local_addr()?.port())
    }

    /// Sends a line and returns the reply line.
    pub fn say(&mut self, message: &str) -> Result<String> {
        use std::io::{BufRead, Write};
        writeln!(&self.stream, "{message}")?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            bail!("the connection was closed");
        }
        Ok(reply.trim_end().to_owned())
    }
}

/// From inside `netns`: connects to `addr:port`, sends `message` and returns the reply line.
pub fn tcp_exchange(netns: &str, addr: Ipv4Addr, port: u16, message: &str) -> Result<String> {
    let message = message.to_owned();
    crate::in_netns(netns, move || -> Result<String> {
        let stream = std::net::TcpStream::connect_timeout(&(addr, port).into(), EXCHANGE_TIMEOUT)?;
        say_and_hear(stream, &message)
    })?
}

/// How long an exchange may take to connect, and then to answer.
const EXCHANGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Like `tcp_exchange`, from the fixed source address and port `from` (a flow whose hash is
/// known, to hit one slot of a balancer's table).
pub fn tcp_exchange_from(
    netns: &str,
    from: std::net::SocketAddrV4,
    to: std::net::SocketAddrV4,
    message: &str,
) -> Result<String> {
    use nix::sys::socket::{bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
    let message = message.to_owned();
    crate::in_netns(netns, move || -> Result<String> {
        let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        // connect() honours the send timeout (Linux).
        let timeout = nix::sys::time::TimeVal::new(EXCHANGE_TIMEOUT.as_secs() as i64, 0);
        setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(from))?;
        connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(to))
            .with_context(|| format!("connecting {from} -> {to}"))?;
        say_and_hear(std::net::TcpStream::from(fd), &message)
    })?
}

fn say_and_hear(stream: std::net::TcpStream, message: &str) -> Result<String> {
    use std::io::{BufRead, BufReader, Write};
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    writeln!(&stream, "{message}")?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    Ok(reply.trim_end().to_owned())
}

/// From inside `netns`: `busybox ping -c count` to `addr`; returns how many replies came back.
pub fn ping(netns: &str, addr: Ipv4Addr, count: u32) -> Result<u32> {
    let argv: Vec<String> = ["busybox", "ping", "-c", &count.to_string(), "-W", "2", "-i", "0.2", &addr.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = crate::netns::command(netns, &argv).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "3 packets transmitted, 3 packets received, 0% packet loss"; busybox prints it whether
    // or not replies came (exit status 1 then), so its absence means ping itself failed.
    text.lines()
        .find_map(|l| l.split(", ").nth(1)?.strip_suffix(" packets received")?.parse().ok())
        .with_context(|| format!("ping {addr} from {netns} failed: {}{}", text, String::from_utf8_lossy(&out.stderr)))
}

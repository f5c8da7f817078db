//! Network namespaces and a two-host veth topology, created by the test and
//! deleted when dropped. Traffic only ever goes between these namespaces.

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

/// Runs `ip <args>`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Result<Netns> {
        let _ = ip(&["netns", "del", &name]); // a leftover from a killed run
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `f` on a thread that has entered this namespace (network only,
    /// so the mount namespace, and with it bpffs, stays as it is).
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path).expect("entering the test namespace");
            f()
        })
        .join()
        .expect("a thread inside the namespace panicked")
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &str) -> std::io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: a valid namespace fd; affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Two namespaces joined by a veth pair: `server` (the gateway host) and
/// `client` (two IPv4 and two IPv6 source addresses).
pub struct Topology {
    pub n: u32,
    pub server: Netns,
    pub client: Netns,
    /// Interface in `server` that the XDP program protects.
    pub server_if: String,
    pub client_if: String,
}

/// MACs match the defaults of `gateway_common::packet::craft::Frame`, so
/// crafted frames are addressed to the server's interface.
pub const SERVER_MAC: &str = "02:00:00:00:00:02";
pub const CLIENT_MAC: &str = "02:00:00:00:00:01";

impl Topology {
    pub fn new() -> Result<Topology> {
        // Subnet 10.99.<n>.0/24 and fd99:0:0:<n>::/64, unique per test.
        let n = (std::process::id() % 200 + crate::unique()) % 250 + 1;
        let tag = format!("{}-{n}", std::process::id() % 100_000);
        let server = Netns::new(format!("gwt-s-{tag}"))?;
        let client = Netns::new(format!("gwt-c-{tag}"))?;
        let server_if = format!("gws{n}");
        let client_if = format!("gwc{n}");
        let t = Topology {
            n,
            server,
            client,
            server_if,
            client_if,
        };
        t.wire()?;
        Ok(t)
    }

    /// Makes the veth pair between the namespaces, with its addresses.
    fn wire(&self) -> Result<()> {
        let (n, server, client) = (self.n, &self.server, &self.client);
        let (server_if, client_if) = (&self.server_if, &self.client_if);
        ip(&[
            "link",
            "add",
            server_if,
            "netns",
            &server.name,
            "address",
            SERVER_MAC,
            "type",
            "veth",
            "peer",
            "name",
            client_if,
            "netns",
            &client.name,
            "address",
            CLIENT_MAC,
        ])?;
        server.ip(&["addr", "add", &format!("10.99.{n}.1/24"), "dev", server_if])?;
        server.ip(&[
            "-6",
            "addr",
            "add",
            &format!("fd99:0:0:{n}::1/64"),
            "dev",
            server_if,
            "nodad",
        ])?;
        for host in [2, 3, 4] {
            client.ip(&[
                "addr",
                "add",
                &format!("10.99.{n}.{host}/24"),
                "dev",
                client_if,
            ])?;
            client.ip(&[
                "-6",
                "addr",
                "add",
                &format!("fd99:0:0:{n}::{host}/64"),
                "dev",
                client_if,
                "nodad",
            ])?;
        }
        server.ip(&["link", "set", server_if, "up"])?;
        client.ip(&["link", "set", client_if, "up"])?;
        Ok(())
    }

    /// Deletes the veth pair and makes it again, with the same names and
    /// addresses: what a driver reload does to an interface (an XDP
    /// program attached to it goes with it).
    pub fn rewire(&self) -> Result<()> {
        self.server.ip(&["link", "del", &self.server_if])?;
        self.wire()
    }

    pub fn server_v4(&self) -> IpAddr {
        format!("10.99.{}.1", self.n).parse().unwrap()
    }

    pub fn server_v6(&self) -> IpAddr {
        format!("fd99:0:0:{}::1", self.n).parse().unwrap()
    }

    /// Client source address `host` (2, 3 or 4) of the given family.
    pub fn client_v4(&self, host: u8) -> IpAddr {
        format!("10.99.{}.{host}", self.n).parse().unwrap()
    }

    pub fn client_v6(&self, host: u8) -> IpAddr {
        format!("fd99:0:0:{}::{host}", self.n).parse().unwrap()
    }

    /// A TCP listener in the server namespace. The kernel completes
    /// handshakes into its backlog, so nothing needs to accept.
    pub fn listen(&self, addr: SocketAddr) -> std::net::TcpListener {
        self.server.run(move || {
            std::net::TcpListener::bind(addr).expect("listening in the server namespace")
        })
    }

    /// One TCP connect from `src` to `dst`; whether it completed in time.
    pub fn connect(&self, src: IpAddr, dst: SocketAddr, timeout: Duration) -> bool {
        self.client.run(move || connect_from(src, dst, timeout))
    }

    /// Frames the veth pair itself dropped (client tx + server rx), which
    /// never reached the XDP program.
    pub fn veth_drops(&self) -> u64 {
        let read = |ns: &Netns, dev: &str, field: &str| -> u64 {
            let out = Command::new("ip")
                .args(["-n", &ns.name, "-s", "-j", "link", "show", "dev", dev])
                .output()
                .expect("ip -s link");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            v[0]["stats64"][field]["dropped"].as_u64().unwrap_or(0)
        };
        read(&self.client, &self.client_if, "tx") + read(&self.server, &self.server_if, "rx")
    }

    /// Sends raw Ethernet frames out of the client interface.
    pub fn send_frames(&self, frames: Vec<Vec<u8>>) -> Result<usize> {
        let ifname = self.client_if.clone();
        self.client.run(move || send_raw(&ifname, &frames))
    }
}

/// A TCP connect from a chosen source address.
pub fn connect_from(src: IpAddr, dst: SocketAddr, timeout: Duration) -> bool {
    use socket2::{Domain, Socket, Type};
    let domain = if dst.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let Ok(s) = Socket::new(domain, Type::STREAM, None) else {
        return false;
    };
    if s.bind(&SocketAddr::new(src, 0).into()).is_err() {
        return false;
    }
    s.connect_timeout(&dst.into(), timeout).is_ok()
}

fn send_raw(ifname: &str, frames: &[Vec<u8>]) -> Result<usize> {
    let c = std::ffi::CString::new(ifname)?;
    // SAFETY: plain libc socket calls with valid arguments and buffers.
    unsafe {
        let ifindex = libc::if_nametoindex(c.as_ptr());
        if ifindex == 0 {
            bail!("no interface {ifname}");
        }
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("AF_PACKET socket (needs CAP_NET_RAW)");
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        let mut sent = 0;
        for (i, f) in frames.iter().enumerate() {
            // Pace the flood a little: a veth queue holds a few hundred
            // frames and drops the rest before XDP sees them.
            if i % 64 == 63 {
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            loop {
                let r = libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                if r >= 0 {
                    break;
                }
                let e = std::io::Error::last_os_error();
                // A full device queue: wait for it to drain and send the
                // same frame again.
                if e.raw_os_error() == Some(libc::ENOBUFS) {
                    std::thread::yield_now();
                    continue;
                }
                libc::close(fd);
                return Err(e).context("sending a raw frame");
            }
            sent += 1;
        }
        libc::close(fd);
        Ok(sent)
    }
}

/// A connection from `src` to `dst` with `request` written on it, or
/// `None` when none could be made within `timeout`.
fn send_request(
    src: IpAddr,
    dst: SocketAddr,
    request: &str,
    timeout: Duration,
) -> Option<std::net::TcpStream> {
    use std::io::Write as _;

    use socket2::{Domain, Socket, Type};
    let domain = if dst.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, None).ok()?;
    s.bind(&SocketAddr::new(src, 0).into()).ok()?;
    s.connect_timeout(&dst.into(), timeout).ok()?;
    let mut stream: std::net::TcpStream = s.into();
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(request.as_bytes()).ok()?;
    Some(stream)
}

/// One HTTP/1.1 request from `src`; the response status, or `None` when no
/// connection could be made within `timeout`.
pub fn http_status(src: IpAddr, dst: SocketAddr, request: &str, timeout: Duration) -> Option<u16> {
    use std::io::Read as _;
    let mut stream = send_request(src, dst, request, timeout)?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).ok()?;
    let head = std::str::from_utf8(&buf[..n]).ok()?;
    head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// One HTTP/1.1 request from `src` that the server answers and closes
/// (`Connection: close`); the whole response, or `None` when no connection
/// could be made within `timeout`.
pub fn http_response(
    src: IpAddr,
    dst: SocketAddr,
    request: &str,
    timeout: Duration,
) -> Option<String> {
    use std::io::Read as _;
    let mut stream = send_request(src, dst, request, timeout)?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out).ok()?;
    String::from_utf8(out).ok()
}

impl Topology {
    /// `http_response` from the client namespace.
    pub fn http_text(
        &self,
        src: IpAddr,
        dst: SocketAddr,
        request: String,
        timeout: Duration,
    ) -> Option<String> {
        self.client
            .run(move || http_response(src, dst, &request, timeout))
    }

    /// `http_status` from the client namespace.
    pub fn http(
        &self,
        src: IpAddr,
        dst: SocketAddr,
        request: String,
        timeout: Duration,
    ) -> Option<u16> {
        self.client
            .run(move || http_status(src, dst, &request, timeout))
    }
}

//! The seed's client and server: the traffic packetflow's demo, tests and benchmarks trace.
//!
//! The client sends "Hello from client!" (padded to `--size` bytes), the server answers
//! "Hello from server!" padded to the length it received, and they print the seed's lines.
//! Over TCP the client reads until the whole answer is back before the next exchange, so
//! every exchange is one request and one response on the wire.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::error::user;

pub const REQUEST: &str = "Hello from client!";
pub const RESPONSE: &str = "Hello from server!";

/// Parses "127.0.0.1", "::1", "[::1]" or "localhost".
pub fn parse_addr(s: &str) -> Result<IpAddr> {
    let t = s.trim_start_matches('[').trim_end_matches(']');
    if t == "localhost" {
        return Ok(IpAddr::from([127, 0, 0, 1]));
    }
    t.parse().map_err(|_| user(format!("'{s}' is not an IP address (expected e.g. 127.0.0.1 or ::1)")))
}

/// `text` padded with '.' (or cut) to exactly `size` bytes.
pub fn padded(text: &str, size: usize) -> Vec<u8> {
    let mut v = text.as_bytes().to_vec();
    v.resize(size, b'.');
    v
}

fn shown(msg: &[u8]) -> String {
    String::from_utf8_lossy(msg).trim_end_matches('.').to_string()
}

/// The seed server: answers each message with "Hello from server!".
#[derive(clap::Args)]
pub struct ServeOpts {
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on (an IP address or localhost).
    #[arg(long, default_value = "0.0.0.0", value_name = "ADDR", value_parser = parse_addr)]
    pub bind: IpAddr,
    /// UDP instead of TCP.
    #[arg(long)]
    pub udp: bool,
    /// Print the seed's lines for every message (default: each client's first).
    #[arg(short, long)]
    pub verbose: bool,
    /// Exit after the first client disconnects (UDP: after --count messages).
    #[arg(long)]
    pub once: bool,
    /// With --once over UDP: how many messages to answer.
    #[arg(long, default_value_t = 1)]
    pub count: u64,
}

fn bind_error(e: io::Error, addr: SocketAddr) -> anyhow::Error {
    match e.kind() {
        io::ErrorKind::AddrInUse => user(format!("port {} is already in use on {}", addr.port(), addr.ip())),
        io::ErrorKind::AddrNotAvailable => user(format!("{} is not an address of this host", addr.ip())),
        io::ErrorKind::PermissionDenied => user(format!("not allowed to listen on port {}", addr.port())),
        _ => user(format!("cannot listen on {addr}: {e}")),
    }
}

pub fn serve(o: &ServeOpts) -> Result<()> {
    let addr = SocketAddr::new(o.bind, o.port);
    if o.udp {
        return serve_udp(o, addr);
    }
    let listener = TcpListener::bind(addr).map_err(|e| bind_error(e, addr))?;
    println!("Server listening on port {}", listener.local_addr()?.port());
    loop {
        let (stream, _) = listener.accept()?;
        println!("Client connected");
        let verbose = o.verbose;
        let handle = std::thread::spawn(move || serve_conn(stream, verbose));
        if o.once {
            let n = handle.join().unwrap_or(Ok(0))?;
            println!("Client disconnected after {n} messages");
            return Ok(());
        }
    }
}

fn serve_conn(mut s: TcpStream, verbose: bool) -> Result<u64> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut n_msgs = 0u64;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e.into()),
        };
        let first = n_msgs == 0;
        if first || verbose {
            println!("Received message: {}", shown(&buf[..n]));
        }
        s.write_all(&padded(RESPONSE, n))?;
        if first || verbose {
            println!("Response sent: {RESPONSE}");
        }
        n_msgs += 1;
    }
    if !verbose && n_msgs > 1 {
        println!("Client disconnected after {n_msgs} messages");
    }
    Ok(n_msgs)
}

fn serve_udp(o: &ServeOpts, addr: SocketAddr) -> Result<()> {
    let sock = UdpSocket::bind(addr).map_err(|e| bind_error(e, addr))?;
    println!("Server listening on port {}", sock.local_addr()?.port());
    let mut buf = vec![0u8; 65536];
    let mut n_msgs = 0u64;
    loop {
        let (n, peer) = sock.recv_from(&mut buf)?;
        if n_msgs == 0 {
            println!("Client connected");
        }
        if n_msgs == 0 || o.verbose {
            println!("Received message: {}", shown(&buf[..n]));
        }
        sock.send_to(&padded(RESPONSE, n), peer)?;
        if n_msgs == 0 || o.verbose {
            println!("Response sent: {RESPONSE}");
        }
        n_msgs += 1;
        if o.once && n_msgs >= o.count.max(1) {
            println!("Served {n_msgs} messages");
            return Ok(());
        }
    }
}

/// The seed client: sends "Hello from client!" and prints the answer.
#[derive(clap::Args)]
pub struct ClientOpts {
    /// Server address (an IP address or localhost).
    #[arg(value_name = "ADDR", value_parser = parse_addr)]
    pub addr: IpAddr,
    /// Server port.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// UDP instead of TCP.
    #[arg(long)]
    pub udp: bool,
    /// How many exchanges.
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Message size: the greeting padded with '.' (or cut) to this many bytes.
    #[arg(long, default_value_t = 18, value_name = "BYTES")]
    pub size: usize,
    /// Pause between exchanges, in ms.
    #[arg(long, default_value = "0", value_name = "MS", value_parser = pause)]
    pub interval: Duration,
    /// Print every exchange, not just the first.
    #[arg(short, long)]
    pub verbose: bool,
    /// Instead of exchanging messages: open N TCP connections one after another, each
    /// closed once connected, and print the connect() times.
    #[arg(long, value_name = "N", conflicts_with = "udp")]
    pub connections: Option<u64>,
}

fn pause(s: &str) -> Result<Duration, std::num::ParseIntError> {
    s.parse().map(Duration::from_millis)
}

fn connect_error(e: io::Error, addr: SocketAddr) -> anyhow::Error {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            user(format!("cannot connect to {addr}: connection refused (is the server running?)"))
        }
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => user(format!("cannot connect to {addr}: no answer")),
        _ => user(format!("cannot connect to {addr}: {e}")),
    }
}

/// Runs the exchanges; returns each round-trip time.
pub fn client(o: &ClientOpts) -> Result<Vec<Duration>> {
    if o.size == 0 {
        crate::user_bail!("--size must be at least 1 byte");
    }
    let addr = SocketAddr::new(o.addr, o.port);
    if let Some(n) = o.connections {
        return connections(addr, n, o.interval);
    }
    let request = padded(REQUEST, o.size);
    let mut rtts = Vec::with_capacity(o.count as usize);
    let mut answer = vec![0u8; o.size.max(65536)];
    if o.udp {
        if o.size > 65507 {
            crate::user_bail!("--size {} is larger than a UDP datagram can be (65507)", o.size);
        }
        let local: SocketAddr = if o.addr.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
        let sock = UdpSocket::bind(local)?;
        sock.connect(addr).map_err(|e| connect_error(e, addr))?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        println!("Connected to server {addr}");
        for i in 0..o.count {
            let t0 = Instant::now();
            sock.send(&request).map_err(|e| connect_error(e, addr))?;
            let n = sock.recv(&mut answer).map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    user(format!("no response from {addr} within 2 s"))
                }
                _ => connect_error(e, addr),
            })?;
            rtts.push(t0.elapsed());
            report_exchange(i, o.verbose, &answer[..n]);
            pace(o.interval);
        }
    } else {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| connect_error(e, addr))?;
        s.set_nodelay(true)?;
        println!("Connected to server {addr}");
        for i in 0..o.count {
            let t0 = Instant::now();
            s.write_all(&request)?;
            let mut got = 0;
            while got < o.size {
                let n = s.read(&mut answer[got..o.size])?;
                if n == 0 {
                    crate::user_bail!("the server at {addr} closed the connection");
                }
                got += n;
            }
            rtts.push(t0.elapsed());
            report_exchange(i, o.verbose, &answer[..o.size]);
            pace(o.interval);
        }
    }
    if o.count > 1 && !o.verbose {
        let mut sorted = rtts.clone();
        sorted.sort();
        let pct = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6;
        println!(
            "{} exchanges of {} bytes: round trip p50 {:.1} µs, p99 {:.1} µs",
            rtts.len(),
            o.size,
            pct(0.5),
            pct(0.99)
        );
    }
    Ok(rtts)
}

/// `n` connections to `addr`, one after another; returns each connect() time.
fn connections(addr: SocketAddr, n: u64, interval: Duration) -> Result<Vec<Duration>> {
    let mut times = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| connect_error(e, addr))?;
        times.push(t0.elapsed());
        drop(s);
        pace(interval);
    }
    let mut sorted = times.clone();
    sorted.sort();
    if let (Some(mid), Some(max)) = (sorted.get(sorted.len() / 2), sorted.last()) {
        println!(
            "{n} connections to {addr}: connect() p50 {:.1} µs, max {:.1} µs",
            mid.as_secs_f64() * 1e6,
            max.as_secs_f64() * 1e6
        );
    }
    Ok(times)
}

fn report_exchange(i: u64, verbose: bool, answer: &[u8]) {
    if i == 0 || verbose {
        println!("Message sent: {REQUEST}");
        println!("Server response: {}", shown(answer));
    }
}

fn pace(d: Duration) {
    if !d.is_zero() {
        std::thread::sleep(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(parse_addr("127.0.0.1").unwrap(), IpAddr::from([127, 0, 0, 1]));
        assert_eq!(parse_addr("[::1]").unwrap(), "::1".parse::<IpAddr>().unwrap());
        assert_eq!(parse_addr("localhost").unwrap(), IpAddr::from([127, 0, 0, 1]));
        assert!(parse_addr("not-an-ip").is_err());
    }

    #[test]
    fn pads_and_cuts() {
        assert_eq!(padded("abc", 5), b"abc..");
        assert_eq!(padded("abcdef", 3), b"abc");
    }

    #[test]
    fn exchange_over_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let srv = std::thread::spawn(move || {
            serve(&ServeOpts {
                port,
                bind: IpAddr::from([127, 0, 0, 1]),
                udp: false,
                verbose: false,
                once: true,
                count: 0,
            })
        });
        let mut rtts = Vec::new();
        for _ in 0..50 {
            match client(&ClientOpts {
                addr: IpAddr::from([127, 0, 0, 1]),
                port,
                udp: false,
                count: 3,
                size: 100,
                interval: Duration::ZERO,
                verbose: false,
                connections: None,
            }) {
                Ok(r) => {
                    rtts = r;
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        assert_eq!(rtts.len(), 3);
        srv.join().unwrap().unwrap();
    }
}

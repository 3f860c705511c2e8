//! Capture filter expressions: the pcap-filter subset people type, compiled for the kernel.
//!
//! Supported: `host`, `net` (CIDR or dotted prefix), `port`, `portrange`, the `src`/`dst`
//! (`src or dst`, `src and dst`) qualifiers, `tcp`/`udp` before a port, `ip`/`ip6` before a
//! host or net, the protocols `tcp`, `udp`, `icmp`, `icmp6`, `ip`, `ip6`, and `and`/`or`/
//! `not` (`&&`, `||`, `!`) with parentheses. As in pcap-filter, `not` binds tightest and
//! `and`/`or` have equal precedence, left to right; a bare address after `and`/`or` keeps
//! the qualifiers before it (`host a or b`). Semantics follow libpcap's: `host` also matches
//! ARP/RARP addresses, IPv6 protocols are read from the fixed header (no extension-header
//! chasing), ports match TCP, UDP and SCTP, and only first IPv4 fragments.
//!
//! Compilation: the distinct primitives (at most `MAX_PRIMS`) become a list the kernel
//! evaluates into a bitmask; the and/or/not structure becomes a truth table over it.
//!
//! One file of ~590 lines: the lexer, parser and code generator share their token and
//! primitive types and read best together; the last 130 lines are its tests.

use std::net::IpAddr;

use packetflow_common::capture::{
    CAPTURE_MAX, CaptureConfig, DIR_BOTH, DIR_DST, DIR_EITHER, DIR_SRC, MAX_PRIMS, P_HOST, P_ICMP, P_ICMP6, P_IP,
    P_IP6, P_NET, P_PORT, P_TCP, P_UDP, Prim,
};

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Prim(Prim),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

#[derive(Debug, PartialEq, Eq)]
pub struct ExprError(pub String);

impl std::fmt::Display for ExprError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ExprError {}

/// Deepest nesting of `not`/`!` and parentheses together: the parser recurses once per level.
pub const MAX_DEPTH: usize = 64;
/// Most primitives an expression may name (repeats included): an and/or chain becomes a tree
/// as deep as it is long, which evaluation walks recursively.
pub const MAX_TERMS: usize = 256;

const SUPPORTED: &str =
    "host, net, port, portrange, src, dst, tcp, udp, icmp, icmp6, ip, ip6, and, or, not, parentheses";

#[derive(Clone, Debug)]
struct Tok {
    text: String,
    /// Character offset in the expression (for messages).
    at: usize,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, ExprError> {
    let mut out = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        if two == "&&" || two == "||" {
            out.push(Tok { text: two, at: i });
            i += 2;
            continue;
        }
        if matches!(c, '(' | ')' | '!') {
            out.push(Tok { text: c.to_string(), at: i });
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && !chars[i].is_whitespace() && !matches!(chars[i], '(' | ')' | '!' | '&' | '|') {
            i += 1;
        }
        if i == start {
            return Err(ExprError(format!("bad filter expression: unexpected '{c}' at position {} of '{s}'", i + 1)));
        }
        out.push(Tok { text: chars[start..i].iter().collect(), at: start });
    }
    Ok(out)
}

/// The qualifiers in force for a primitive (kept for `host a or b`).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Quals {
    proto: Option<u8>,
    dir: u8,
    ty: Option<&'static str>,
}

struct Parser<'a> {
    src: &'a str,
    toks: Vec<Tok>,
    pos: usize,
    last: Option<Quals>,
    /// `not`/`!` and open parentheses around the current position.
    depth: usize,
    /// Primitives parsed so far.
    terms: usize,
}

/// The expression as messages quote it: long ones cut (positions still point into it).
fn quoted(src: &str) -> String {
    const MAX: usize = 120;
    if src.chars().count() <= MAX {
        src.to_string()
    } else {
        format!("{}…", src.chars().take(MAX).collect::<String>())
    }
}

fn is_op(t: &str) -> bool {
    matches!(t, "and" | "&&" | "or" | "||" | "not" | "!" | "(" | ")")
}

impl Parser<'_> {
    fn err(&self, tok: Option<&Tok>, what: &str) -> ExprError {
        match tok {
            Some(t) => ExprError(format!(
                "bad filter expression: {what} '{}' at position {} of '{}' (supported: {SUPPORTED})",
                quoted(&t.text),
                t.at + 1,
                quoted(self.src)
            )),
            None => ExprError(format!("bad filter expression: {what} at the end of '{}'", quoted(self.src))),
        }
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn expr(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.unary()?;
        while let Some(t) = self.peek() {
            let is_and = matches!(t.text.as_str(), "and" | "&&");
            let is_or = matches!(t.text.as_str(), "or" | "||");
            if !is_and && !is_or {
                break;
            }
            self.pos += 1;
            let right = self.unary()?;
            left = if is_and {
                Expr::And(Box::new(left), Box::new(right))
            } else {
                Expr::Or(Box::new(left), Box::new(right))
            };
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, ExprError> {
        let Some(t) = self.peek().cloned() else {
            return Err(self.err(None, "an expression is missing"));
        };
        match t.text.as_str() {
            "not" | "!" | "(" => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(ExprError(format!(
                        "bad filter expression: the filter expression nests deeper than {MAX_DEPTH} levels of not, ! and parentheses (at position {})",
                        t.at + 1
                    )));
                }
                self.pos += 1;
                let e = if t.text == "(" {
                    let e = self.expr()?;
                    match self.next() {
                        Some(c) if c.text == ")" => e,
                        Some(other) => return Err(self.err(Some(&other), "expected ')' but found")),
                        None => return Err(self.err(None, "a ')' is missing")),
                    }
                } else {
                    Expr::Not(Box::new(self.unary()?))
                };
                self.depth -= 1;
                Ok(e)
            }
            ")" => Err(self.err(Some(&t), "unexpected")),
            _ => {
                self.terms += 1;
                if self.terms > MAX_TERMS {
                    return Err(ExprError(format!(
                        "bad filter expression: the filter expression has more than {MAX_TERMS} terms (at position {})",
                        t.at + 1
                    )));
                }
                self.prim()
            }
        }
    }

    fn prim(&mut self) -> Result<Expr, ExprError> {
        let first = self.peek().cloned().expect("checked by caller");
        // A bare value after and/or keeps the previous primitive's qualifiers.
        let starts_bare = looks_like_value(&first.text);
        let mut q = if starts_bare {
            match self.last {
                Some(q) if q.ty.is_some() => q,
                _ if first.text.parse::<IpAddr>().is_ok() => Quals { proto: None, dir: DIR_EITHER, ty: Some("host") },
                _ => {
                    return Err(self.err(Some(&first), "a bare value needs a qualifier (host, net, port) before it:"));
                }
            }
        } else {
            Quals { proto: None, dir: DIR_EITHER, ty: None }
        };
        if !starts_bare {
            // [proto] [dir] [type] value, or a protocol alone.
            if let Some(t) = self.peek()
                && matches!(t.text.as_str(), "tcp" | "udp" | "icmp" | "icmp6" | "ip" | "ip6")
            {
                let t = self.next().expect("peeked");
                let next_is_qual = self
                    .peek()
                    .is_some_and(|n| matches!(n.text.as_str(), "src" | "dst" | "host" | "net" | "port" | "portrange"));
                if !next_is_qual {
                    let kind = match t.text.as_str() {
                        "tcp" => P_TCP,
                        "udp" => P_UDP,
                        "icmp" => P_ICMP,
                        "icmp6" => P_ICMP6,
                        "ip" => P_IP,
                        _ => P_IP6,
                    };
                    self.last = None;
                    return Ok(Expr::Prim(Prim { kind, ..Prim::NONE }));
                }
                q.proto = Some(match t.text.as_str() {
                    "tcp" => 6,
                    "udp" => 17,
                    "ip" => 4,
                    "ip6" => 41,
                    _ => {
                        return Err(self.err(Some(&t), "this protocol cannot qualify a host, net or port:"));
                    }
                });
            }
            if let Some(t) = self.peek()
                && matches!(t.text.as_str(), "src" | "dst")
            {
                let t = self.next().expect("peeked");
                q.dir = if t.text == "src" { DIR_SRC } else { DIR_DST };
                // "src or dst" / "src and dst" as one qualifier.
                let pair = self.toks.get(self.pos).zip(self.toks.get(self.pos + 1));
                if let Some((op, other)) = pair
                    && matches!(op.text.as_str(), "or" | "and")
                    && other.text == if t.text == "src" { "dst" } else { "src" }
                {
                    q.dir = if op.text == "or" { DIR_EITHER } else { DIR_BOTH };
                    self.pos += 2;
                }
            }
            let Some(t) = self.next() else {
                return Err(self.err(None, "host, net, port or portrange is missing"));
            };
            q.ty = Some(match t.text.as_str() {
                "host" => "host",
                "net" => "net",
                "port" => "port",
                "portrange" => "portrange",
                _ if looks_like_value(&t.text) && q.proto.is_none() && t.text.parse::<IpAddr>().is_ok() => {
                    self.pos -= 1;
                    "host"
                }
                _ if is_op(&t.text) => {
                    return Err(self.err(Some(&t), "expected host, net, port or portrange, found"));
                }
                _ => return Err(self.err(Some(&t), "unknown word")),
            });
        }
        let Some(v) = self.next() else {
            return Err(self.err(None, "a value is missing"));
        };
        if is_op(&v.text) {
            return Err(self.err(Some(&v), "expected a value, found"));
        }
        let prim = self.value(&q, &v)?;
        self.last = Some(q);
        Ok(Expr::Prim(prim))
    }

    fn value(&self, q: &Quals, v: &Tok) -> Result<Prim, ExprError> {
        let ty = q.ty.expect("type set");
        let mut p = Prim { dir: q.dir, ..Prim::NONE };
        match ty {
            "host" | "net" => {
                let (addr, prefix) = if ty == "host" {
                    let a: IpAddr = v.text.parse().map_err(|_| self.err(Some(v), "not an IP address:"))?;
                    (a, if a.is_ipv4() { 32 } else { 128 })
                } else {
                    parse_net(&v.text)
                        .ok_or_else(|| self.err(Some(v), "not a network (e.g. 198.18.0.0/15, 198.18, fd00::/8):"))?
                };
                p.kind = if ty == "host" { P_HOST } else { P_NET };
                p.prefix = prefix;
                match addr {
                    IpAddr::V4(a) => {
                        p.family = 4;
                        p.addr[..4].copy_from_slice(&a.octets());
                    }
                    IpAddr::V6(a) => {
                        p.family = 6;
                        p.addr = a.octets();
                    }
                }
                match q.proto {
                    None => {}
                    Some(4) if p.family == 4 => p.l4 = 1,
                    Some(41) if p.family == 6 => p.l4 = 1,
                    Some(_) => {
                        return Err(self.err(Some(v), "this protocol does not fit the address"));
                    }
                }
            }
            _ => {
                p.kind = P_PORT;
                let (lo, hi) = if ty == "port" {
                    let n = parse_port(&v.text).ok_or_else(|| self.err(Some(v), "not a port number:"))?;
                    (n, n)
                } else {
                    let (a, b) = v
                        .text
                        .split_once('-')
                        .and_then(|(a, b)| Some((parse_port(a)?, parse_port(b)?)))
                        .ok_or_else(|| self.err(Some(v), "not a port range (e.g. 8000-8080):"))?;
                    (a.min(b), a.max(b))
                };
                p.port_lo = lo;
                p.port_hi = hi;
                p.l4 = match q.proto {
                    None => 0,
                    Some(6) => 6,
                    Some(17) => 17,
                    Some(_) => return Err(self.err(Some(v), "ports belong to tcp or udp, not to")),
                };
            }
        }
        Ok(p)
    }
}

fn looks_like_value(t: &str) -> bool {
    t.chars().next().is_some_and(|c| c.is_ascii_digit() || c == ':') || t.parse::<IpAddr>().is_ok()
}

fn parse_port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok()
}

/// "198.18.0.0/15", "fd00::/8", "198.18" (a dotted prefix), "10.1.2.3" (a /32).
fn parse_net(s: &str) -> Option<(IpAddr, u8)> {
    if let Some((a, p)) = s.split_once('/') {
        let a: IpAddr = a.parse().ok()?;
        let p: u8 = p.parse().ok()?;
        let max = if a.is_ipv4() { 32 } else { 128 };
        return (p <= max).then_some((a, p));
    }
    if let Ok(a) = s.parse::<IpAddr>() {
        return Some((a, if a.is_ipv4() { 32 } else { 128 }));
    }
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() > 3 || parts.is_empty() {
        return None;
    }
    let mut o = [0u8; 4];
    for (i, p) in parts.iter().enumerate() {
        o[i] = p.parse().ok()?;
    }
    Some((IpAddr::from(o), 8 * parts.len() as u8))
}

/// Parses an expression ("" = everything).
pub fn parse(s: &str) -> Result<Option<Expr>, ExprError> {
    let toks = tokenize(s)?;
    if toks.is_empty() {
        return Ok(None);
    }
    let mut p = Parser { src: s, toks, pos: 0, last: None, depth: 0, terms: 0 };
    let e = p.expr()?;
    if let Some(t) = p.peek().cloned() {
        return Err(p.err(Some(&t), if t.text == ")" { "unbalanced" } else { "expected and/or before" }));
    }
    Ok(Some(e))
}

fn collect(e: &Expr, prims: &mut Vec<Prim>) {
    match e {
        Expr::Prim(p) => {
            if !prims.contains(p) {
                prims.push(*p);
            }
        }
        Expr::Not(a) => collect(a, prims),
        Expr::And(a, b) | Expr::Or(a, b) => {
            collect(a, prims);
            collect(b, prims);
        }
    }
}

fn eval(e: &Expr, prims: &[Prim], mask: usize) -> bool {
    match e {
        Expr::Prim(p) => mask & (1 << prims.iter().position(|x| x == p).expect("collected")) != 0,
        Expr::Not(a) => !eval(a, prims, mask),
        Expr::And(a, b) => eval(a, prims, mask) && eval(b, prims, mask),
        Expr::Or(a, b) => eval(a, prims, mask) || eval(b, prims, mask),
    }
}

/// The kernel's view of an expression: primitives, and the truth table (one byte per
/// combination of primitive results) for the `CAP_TABLE` map.
pub struct Compiled {
    pub config: CaptureConfig,
    pub table: Vec<u8>,
}

pub fn compile(s: &str, snaplen: u32) -> Result<Compiled, ExprError> {
    let mut cfg = CaptureConfig::ALL;
    cfg.snaplen = snaplen.clamp(1, CAPTURE_MAX as u32);
    let mut table = vec![0u8; 1 << MAX_PRIMS];
    let Some(e) = parse(s)? else {
        table[0] = 1;
        return Ok(Compiled { config: cfg, table });
    };
    let mut prims = Vec::new();
    collect(&e, &mut prims);
    if prims.len() > MAX_PRIMS {
        return Err(ExprError(format!(
            "bad filter expression: '{s}' uses {} different primitives; the in-kernel filter takes at most {MAX_PRIMS}",
            prims.len()
        )));
    }
    cfg.nprims = prims.len() as u32;
    for (i, p) in prims.iter().enumerate() {
        cfg.prims[i] = *p;
    }
    for (mask, t) in table.iter_mut().enumerate().take(1 << prims.len()) {
        *t = u8::from(eval(&e, &prims, mask));
    }
    Ok(Compiled { config: cfg, table })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct C {
        nprims: u32,
        prims: [Prim; MAX_PRIMS],
        table: Vec<u8>,
    }

    fn ok(s: &str) -> C {
        let c = compile(s, 65535).unwrap_or_else(|e| panic!("{s}: {e}"));
        C { nprims: c.config.nprims, prims: c.config.prims, table: c.table }
    }

    fn bit(c: &C, mask: usize) -> bool {
        c.table[mask] != 0
    }

    #[test]
    fn primitives() {
        let c = ok("host 198.18.0.1");
        assert_eq!((c.nprims, c.prims[0].kind, c.prims[0].dir, c.prims[0].prefix), (1, P_HOST, DIR_EITHER, 32));
        let c = ok("src net 198.18.0.0/15");
        assert_eq!((c.prims[0].kind, c.prims[0].dir, c.prims[0].prefix), (P_NET, DIR_SRC, 15));
        let c = ok("net 198.18");
        assert_eq!((c.prims[0].prefix, &c.prims[0].addr[..4]), (16, &[198, 18, 0, 0][..]));
        let c = ok("dst portrange 9000-8000");
        assert_eq!((c.prims[0].port_lo, c.prims[0].port_hi, c.prims[0].dir), (8000, 9000, DIR_DST));
        let c = ok("tcp dst port 80");
        assert_eq!((c.prims[0].kind, c.prims[0].l4, c.prims[0].dir), (P_PORT, 6, DIR_DST));
        let c = ok("host fd00::1");
        assert_eq!((c.prims[0].family, c.prims[0].prefix), (6, 128));
        let c = ok("ip6");
        assert_eq!(c.prims[0].kind, P_IP6);
        let c = ok("src or dst port 53");
        assert_eq!(c.prims[0].dir, DIR_EITHER);
        let c = ok("src and dst host 198.18.0.1");
        assert_eq!(c.prims[0].dir, DIR_BOTH);
        let c = ok("ip host 198.18.0.1");
        assert_eq!(c.prims[0].l4, 1);
    }

    #[test]
    fn truth_tables() {
        // and/or: equal precedence, left to right: (a or b) and c.
        let c = ok("tcp or udp and port 53");
        assert_eq!(c.nprims, 3);
        // bits: 0 tcp, 1 udp, 2 port
        assert!(!bit(&c, 0b001), "tcp without port 53");
        assert!(bit(&c, 0b101));
        assert!(bit(&c, 0b110));
        let c = ok("not (tcp or udp)");
        assert!(bit(&c, 0b00) && !bit(&c, 0b01) && !bit(&c, 0b10));
        let c = ok("!tcp && !icmp");
        assert!(bit(&c, 0) && !bit(&c, 1) && !bit(&c, 2));
        let c = ok("");
        assert_eq!(c.nprims, 0);
        assert!(bit(&c, 0));
        // The same primitive twice is one bit.
        let c = ok("port 80 or port 80");
        assert_eq!(c.nprims, 1);
    }

    #[test]
    fn qualifiers_carry_over_to_bare_values() {
        let c = ok("host 198.18.0.1 or 198.18.0.2");
        assert_eq!((c.nprims, c.prims[1].kind, c.prims[1].addr[3]), (2, P_HOST, 2));
        let c = ok("tcp port 80 or 443");
        assert_eq!((c.prims[1].port_lo, c.prims[1].l4), (443, 6));
        let c = ok("198.18.0.1");
        assert_eq!(c.prims[0].kind, P_HOST);
    }

    #[test]
    fn refusals_point_at_the_token() {
        for (s, needle) in [
            ("port 80 and fooo", "unknown word 'fooo' at position 13"),
            ("port", "a value is missing"),
            ("port eighty", "'eighty'"),
            ("host 300.1.1.1", "'300.1.1.1'"),
            ("(tcp", "')' is missing"),
            ("tcp)", "unbalanced ')'"),
            ("tcp udp", "expected and/or before 'udp'"),
            ("80", "needs a qualifier"),
            ("ether host 00:11:22:33:44:55", "'ether'"),
            ("vlan 100", "'vlan'"),
            ("len > 100", "'len'"),
            ("icmp port 7", "cannot qualify a host, net or port: 'icmp'"),
            ("ip6 host 1.2.3.4", "does not fit"),
            ("and", "'and'"),
            ("host 1.1.1.1 &| 2", "'&'"),
            ("portrange 1-x", "'1-x'"),
            ("not", "missing"),
        ] {
            let e = compile(s, 100).err().expect(s).0;
            assert!(e.contains(needle), "{s}: {e}");
            assert!(e.starts_with("bad filter expression"), "{e}");
        }
        let many = (1..=13).map(|p| format!("port {p}")).collect::<Vec<_>>().join(" or ");
        assert!(compile(&many, 100).err().expect("too many").0.contains("at most 12"));
    }

    #[test]
    fn nesting_and_length_are_bounded() {
        // Once a stack overflow (abort) in the recursive parser.
        let deep = format!("{}tcp", "!".repeat(100_000));
        let e = compile(&deep, 100).err().expect("refused").0;
        assert!(e.contains("filter expression nests deeper than 64 levels"), "{e}");
        assert!(e.len() < 300 && !e.contains('\n'), "one short sentence: {e}");
        let parens = format!("{}tcp{}", "(".repeat(100_000), ")".repeat(100_000));
        assert!(compile(&parens, 100).err().expect("refused").0.contains("nests deeper than 64"));
        let mixed = format!("{}tcp{}", "not (".repeat(33), ")".repeat(33));
        assert!(
            compile(&mixed, 100).err().expect("refused").0.contains("at position 161"),
            "the 65th level: the 33rd not"
        );
        // 64 levels are fine.
        let ok64 = format!("{}tcp{}", "not (".repeat(32), ")".repeat(32));
        assert_eq!(ok(&ok64).nprims, 1);
        let c = ok(&ok64);
        assert!(!bit(&c, 0) && bit(&c, 1), "32 nots: tcp itself");
        // Depth counts what is open, not every level ever opened.
        let wide = vec!["(!tcp)"; 200].join(" or ");
        assert_eq!(ok(&wide).nprims, 1);
        // A long and/or chain (a tree as deep as it is long).
        let long = vec!["port 80"; 100_000].join(" or ");
        let e = compile(&long, 100).err().expect("refused").0;
        assert!(e.contains("more than 256 terms") && e.len() < 400, "{e}");
        assert_eq!(ok(&vec!["port 80"; 256].join(" or ")).nprims, 1);
    }
}

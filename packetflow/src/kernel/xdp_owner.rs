//! Who holds an interface's XDP attachment, and (with `--force`) taking it away.
//!
//! An interface holds one XDP program per mode. The daemon checks before attaching and
//! refuses to replace another program unless told to: the kernel reports the program id
//! over rtnetlink (IFLA_XDP), aya names it, and /proc/*/fdinfo names the processes that
//! hold it. Removal is rtnetlink (`IFLA_XDP_FD = -1`) for a netlink attachment, or
//! BPF_LINK_DETACH for a bpf_link one: only the link on this interface (the same program
//! may be attached elsewhere too). A link tells its device's index but not its network
//! namespace, so when links of the program sit on the same index in several namespaces
//! nothing is detached and the user is told why.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Result, anyhow};

use crate::error::user;

/// The XDP program attached to an interface.
#[derive(Clone, Debug)]
pub struct Holder {
    pub prog_id: u32,
    /// The program's name, when the kernel tells it.
    pub prog_name: String,
    /// "native", "generic", "offload" or "multiple".
    pub mode: &'static str,
    /// Processes with the program or its link open: (pid, command).
    pub processes: Vec<(u32, String)>,
}

impl Holder {
    /// "program 42 'xdp_fw' (generic), held by pid 123 (xdpd)".
    pub fn describe(&self) -> String {
        let name = if self.prog_name.is_empty() {
            String::new()
        } else {
            format!(" '{}'", crate::format::output::printable(&self.prog_name))
        };
        let who = if self.processes.is_empty() {
            "held by no process (attached through netlink, or pinned)".to_string()
        } else {
            let p: Vec<String> = self
                .processes
                .iter()
                .map(|(pid, comm)| format!("pid {pid} ({})", crate::format::output::printable(comm)))
                .collect();
            format!("held by {}", p.join(", "))
        };
        format!("XDP program {}{name} ({}), {who}", self.prog_id, self.mode)
    }
}

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLM_F_REQUEST: u16 = 1;
pub(crate) const NLM_F_ACK: u16 = 4;
const IFLA_XDP: u16 = 43;
const NLA_F_NESTED: u16 = 1 << 15;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_FLAGS: u16 = 3;
const IFLA_XDP_PROG_ID: u16 = 4;
/// rtnetlink's header for link messages (struct ifinfomsg).
const IFINFOMSG_LEN: usize = 16;

/// The XDP program on `ifindex` (in the current network namespace), if any.
pub fn holder(ifindex: u32) -> Result<Option<Holder>> {
    let reply = request(RTM_GETLINK, NLM_F_REQUEST, ifindex, &[])?;
    let Some(xdp) = attrs(&reply[IFINFOMSG_LEN.min(reply.len())..]).find(|(t, _)| *t & !NLA_F_NESTED == IFLA_XDP)
    else {
        return Ok(None);
    };
    let mut attached = 0u8;
    let mut prog_id = 0u32;
    for (t, v) in attrs(xdp.1) {
        match t {
            IFLA_XDP_ATTACHED if !v.is_empty() => attached = v[0],
            IFLA_XDP_PROG_ID if v.len() >= 4 => prog_id = u32::from_ne_bytes(v[..4].try_into().expect("4 bytes")),
            _ => {}
        }
    }
    if attached == 0 || prog_id == 0 {
        return Ok(None);
    }
    let mode = match attached {
        1 => "native",
        2 => "generic",
        3 => "offload",
        _ => "multiple",
    };
    let prog_name = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)
        .and_then(|p| p.name_as_str().map(str::to_string))
        .unwrap_or_default();
    Ok(Some(Holder { prog_id, prog_name, mode, processes: processes_holding(prog_id) }))
}

/// Detaches `h` from `ifindex` (interface `ifname`, in the current network namespace):
/// through rtnetlink, or by detaching its bpf_link there. Other interfaces keep theirs.
pub fn remove(ifindex: u32, ifname: &str, h: &Holder) -> Result<()> {
    let flags: u32 = match h.mode {
        "native" => 1 << 2,
        "generic" => 1 << 1,
        "offload" => 1 << 3,
        _ => 0,
    };
    let mut inner = Vec::new();
    put_attr(&mut inner, IFLA_XDP_FD, &(-1i32).to_ne_bytes());
    put_attr(&mut inner, IFLA_XDP_FLAGS, &flags.to_ne_bytes());
    let mut attr = Vec::new();
    put_attr(&mut attr, IFLA_XDP | NLA_F_NESTED, &inner);
    match request(RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, ifindex, &attr) {
        Ok(_) => Ok(()),
        // A bpf_link owns it: netlink may not touch it, but the link can be detached.
        Err(e) if e.downcast_ref::<io::Error>().and_then(io::Error::raw_os_error) == Some(libc::EBUSY) => {
            detach_link_of(h, ifindex, ifname)
        }
        Err(e) => Err(e),
    }
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_DETACH: libc::c_long = 34;

/// An fd for bpf_link `id`, closed on drop.
fn link_fd(id: u32) -> Result<OwnedFd> {
    // union bpf_attr: { link_id, next_id, open_flags }.
    let attr = [id, 0, 0, 0];
    // SAFETY: bpf(2) reads the 16 bytes of `attr` (the size passed), which lives across the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_GET_FD_BY_ID, attr.as_ptr(), size_of::<[u32; 4]>()) };
    if fd < 0 {
        return Err(anyhow!("opening bpf_link {id}: {}", io::Error::last_os_error()));
    }
    // SAFETY: a new fd the kernel just gave us, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The device index of an XDP bpf_link (`bpf_link_info.xdp.ifindex`; 0 once detached).
fn link_ifindex(fd: i32) -> Result<u32> {
    // struct bpf_link_info: type, id, prog_id, then the union (8-byte aligned) whose xdp
    // member starts with ifindex. A larger buffer than the kernel's is fine (zeroed tail).
    let mut info = [0u32; 64];
    // union bpf_attr: { bpf_fd, info_len, info (u64) }.
    let mut attr = [0u64; 2];
    attr[0] = u64::from(fd as u32) | ((size_of::<[u32; 64]>() as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: bpf(2) reads the 16 bytes of `attr` and writes at most info_len (256) bytes
    // into `info`, which `attr[1]` points to and which outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, attr.as_ptr(), size_of::<[u64; 2]>()) };
    if r < 0 {
        return Err(anyhow!("reading bpf_link info: {}", io::Error::last_os_error()));
    }
    Ok(info[4])
}

/// BPF_LINK_DETACH on the XDP link running `h`'s program on `ifindex`, and on no other.
fn detach_link_of(h: &Holder, ifindex: u32, ifname: &str) -> Result<()> {
    use aya::programs::links::LinkType;
    let prog_id = h.prog_id;
    let mut here = Vec::new();
    for l in aya::programs::loaded_links().filter_map(Result::ok) {
        if l.program_id() != prog_id || l.link_type().ok() != Some(LinkType::Xdp) {
            continue;
        }
        let fd = link_fd(l.id())?;
        if link_ifindex(fd.as_raw_fd())? == ifindex {
            here.push((l.id(), fd));
        }
    }
    match here.len() {
        0 => Err(anyhow!("no bpf_link holds XDP program {prog_id} on interface index {ifindex}")),
        1 => {
            let (id, fd) = &here[0];
            let attr = [fd.as_raw_fd() as u32, 0, 0, 0];
            // SAFETY: bpf(2) reads the 16 bytes of `attr` (the size passed), which lives across
            // the call.
            let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, attr.as_ptr(), size_of::<[u32; 4]>()) };
            if r < 0 {
                return Err(anyhow!("detaching bpf_link {id}: {}", io::Error::last_os_error()));
            }
            Ok(())
        }
        n => Err(user(format!(
            "interface {ifname} has the {}; --force detaches nothing: that program is attached through {n} bpf_links on interface index {ifindex} in different network namespaces and the kernel does not tell which one is {ifname}'s (stop its holder instead)",
            h.describe()
        ))),
    }
}

/// (pid, comm) of every process with an fd whose fdinfo says `prog_id: N`.
fn processes_holding(prog_id: u32) -> Vec<(u32, String)> {
    let needle = format!("prog_id:\t{prog_id}\n");
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.filter_map(Result::ok) {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        let holds =
            fds.filter_map(Result::ok).any(|f| std::fs::read_to_string(f.path()).is_ok_and(|s| s.contains(&needle)));
        if holds {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default().trim().to_string();
            out.push((pid, comm));
        }
    }
    out
}

pub(crate) fn put_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// Netlink attributes in `buf`: (type, value).
pub(crate) fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]);
        if len < 4 || len > rest.len() {
            return None;
        }
        let value = &rest[4..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        Some((kind, value))
    })
}

/// Sends one rtnetlink link message about `ifindex`; returns the reply's payload (for
/// RTM_NEWLINK) or an empty vector (for an ACK). Errors carry the kernel's errno.
fn request(kind: u16, flags: u16, ifindex: u32, attrs_buf: &[u8]) -> Result<Vec<u8>> {
    // SAFETY: socket(2) has no memory preconditions; the fd is owned by the guard below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error().into());
    }
    let _close = scopeguard(fd);
    let mut msg = Vec::with_capacity(64);
    let total = 16 + IFINFOMSG_LEN + attrs_buf.len();
    msg.extend_from_slice(&(total as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    let mut ifi = [0u8; IFINFOMSG_LEN];
    ifi[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    msg.extend_from_slice(&ifi);
    msg.extend_from_slice(attrs_buf);
    // SAFETY: send(2) reads `msg.len()` bytes from `msg`, which is that long.
    if unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(io::Error::last_os_error().into());
    }
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`, which we own mutably.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error().into());
    }
    let buf = &buf[..n as usize];
    if buf.len() < 16 {
        return Err(anyhow!("short netlink reply"));
    }
    let len = (u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize).min(buf.len());
    let rtype = u16::from_ne_bytes([buf[4], buf[5]]);
    let payload = &buf[16..len];
    match rtype {
        NLMSG_ERROR if payload.len() >= 4 => {
            let errno = -i32::from_ne_bytes(payload[..4].try_into().expect("4 bytes"));
            if errno == 0 { Ok(Vec::new()) } else { Err(io::Error::from_raw_os_error(errno).into()) }
        }
        RTM_NEWLINK => Ok(payload.to_vec()),
        t => Err(anyhow!("unexpected netlink reply type {t}")),
    }
}

/// Closes `fd` when dropped.
fn scopeguard(fd: i32) -> impl Drop {
    struct Close(i32);
    impl Drop for Close {
        fn drop(&mut self) {
            // SAFETY: the guard owns this fd and closes it once, on drop.
            unsafe { libc::close(self.0) };
        }
    }
    Close(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip() {
        let mut b = Vec::new();
        put_attr(&mut b, 3, &[1, 2, 3]);
        put_attr(&mut b, 4, &7u32.to_ne_bytes());
        let v: Vec<(u16, Vec<u8>)> = attrs(&b).map(|(t, v)| (t, v.to_vec())).collect();
        assert_eq!(v, vec![(3, vec![1, 2, 3]), (4, 7u32.to_ne_bytes().to_vec())]);
        assert_eq!(attrs(&[5, 0, 1]).count(), 0, "truncated input yields nothing");
    }
}

//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`): just enough to find
//! the byte offset of a struct field, through anonymous unions and structs, and whether a
//! tracepoint exists. The programs read kernel memory at these offsets, so one binary
//! works across kernel versions whose struct layouts differ.

use std::collections::HashMap;

use packetflow_common::Offsets;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;
const KIND_TYPEDEF: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0} is not valid BTF ({1})")]
    Invalid(String, &'static str),
}

struct Member {
    name: u32,
    ty: u32,
    /// Bit offset within the parent.
    bits: u32,
}

struct Type {
    kind: u32,
    name: u32,
    /// Size for structs/unions/ints, referenced type for pointers/typedefs/modifiers.
    size_or_target: u32,
    members: Vec<Member>,
}

pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<String, Vec<u32>>,
}

impl Btf {
    pub const VMLINUX: &'static str = "/sys/kernel/btf/vmlinux";

    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        let data =
            std::fs::read(Self::VMLINUX).map_err(|source| BtfError::Read { path: Self::VMLINUX.into(), source })?;
        Btf::parse(&data).map_err(|why| BtfError::Invalid(Self::VMLINUX.into(), why))
    }

    pub fn parse(data: &[u8]) -> Result<Btf, &'static str> {
        let u32_at = |off: usize| -> Result<u32, &'static str> {
            data.get(off..off + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok_or("truncated")
        };
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err("bad magic");
        }
        let hdr_len = u32_at(4)? as usize;
        let type_off = u32_at(8)? as usize;
        let type_len = u32_at(12)? as usize;
        let str_off = u32_at(16)? as usize;
        let str_len = u32_at(20)? as usize;
        let strings =
            data.get(hdr_len + str_off..hdr_len + str_off + str_len).ok_or("string section out of bounds")?.to_vec();
        let start = hdr_len + type_off;
        let end = start + type_len;
        if end > data.len() {
            return Err("type section out of bounds");
        }
        // Type id 0 is void.
        let mut types = vec![Type { kind: 0, name: 0, size_or_target: 0, members: vec![] }];
        let mut off = start;
        while off < end {
            let name = u32_at(off)?;
            let info = u32_at(off + 4)?;
            let size_or_target = u32_at(off + 8)?;
            off += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => off += 4,
                KIND_ARRAY => off += 12,
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let raw = u32_at(off + 8)?;
                        let bits = if kind_flag { raw & 0x00ff_ffff } else { raw };
                        members.push(Member { name: u32_at(off)?, ty: u32_at(off + 4)?, bits });
                        off += 12;
                    }
                }
                KIND_ENUM => {
                    // (name, value): the value kept in `bits`.
                    for _ in 0..vlen {
                        members.push(Member { name: u32_at(off)?, ty: 0, bits: u32_at(off + 4)? });
                        off += 8;
                    }
                }
                KIND_FUNC_PROTO => off += 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => off += 12 * vlen,
                _ => {}
            }
            types.push(Type { kind, name, size_or_target, members });
        }
        let mut btf = Btf { types, strings, by_name: HashMap::new() };
        for id in 1..btf.types.len() as u32 {
            let name = btf.str_at(btf.types[id as usize].name).to_string();
            if !name.is_empty() {
                btf.by_name.entry(name).or_default().push(id);
            }
        }
        Ok(btf)
    }

    fn str_at(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let n = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..n]).unwrap_or("")
    }

    /// Follows typedefs and const/volatile/restrict/type-tag modifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t) if matches!(t.kind, KIND_TYPEDEF | 9 | 10 | 11 | 18) => id = t.size_or_target,
                _ => break,
            }
        }
        id
    }

    fn struct_id(&self, name: &str) -> Option<u32> {
        self.by_name.get(name)?.iter().copied().find(|&id| {
            matches!(self.types[id as usize].kind, KIND_STRUCT | KIND_UNION)
                && !self.types[id as usize].members.is_empty()
        })
    }

    /// Bit offset of member `name` in type `id`, searching anonymous members too.
    /// Returns the offset and the member's type.
    fn member(&self, id: u32, name: &str) -> Option<(u32, u32)> {
        let t = self.types.get(self.resolve(id) as usize)?;
        for m in &t.members {
            let mname = self.str_at(m.name);
            if mname == name {
                return Some((m.bits, m.ty));
            }
            if mname.is_empty()
                && let Some((bits, ty)) = self.member(m.ty, name)
            {
                return Some((m.bits + bits, ty));
            }
        }
        None
    }

    /// Byte offset of `path` ("field" or "field.subfield") inside struct `ty`.
    pub fn offset(&self, ty: &str, path: &str) -> Option<u32> {
        let mut id = self.struct_id(ty)?;
        let mut bits = 0;
        for part in path.split('.') {
            let (b, t) = self.member(id, part)?;
            bits += b;
            id = t;
        }
        (bits % 8 == 0).then_some(bits / 8)
    }

    /// The values of enum `name` (32-bit enums only), by value.
    pub fn enum_values(&self, name: &str) -> Vec<(u32, String)> {
        let Some(id) = self
            .by_name
            .get(name)
            .and_then(|ids| ids.iter().copied().find(|&id| self.types[id as usize].kind == KIND_ENUM))
        else {
            return Vec::new();
        };
        let mut v: Vec<(u32, String)> =
            self.types[id as usize].members.iter().map(|m| (m.bits, self.str_at(m.name).to_string())).collect();
        v.sort();
        v
    }

    /// Whether the kernel has a tracepoint usable by tp_btf/raw_tp of this name.
    pub fn has_tracepoint(&self, name: &str) -> bool {
        self.by_name.contains_key(&format!("btf_trace_{name}"))
    }

    /// Offsets of every field the programs read; `Offsets::MISSING` where absent.
    pub fn offsets(&self) -> Offsets {
        let o = |ty: &str, path: &str| self.offset(ty, path).unwrap_or(Offsets::MISSING);
        let msg_iter = o("msghdr", "msg_iter");
        let count = o("iov_iter", "count");
        Offsets {
            skb_head: o("sk_buff", "head"),
            skb_data: o("sk_buff", "data"),
            skb_len: o("sk_buff", "len"),
            skb_network_header: o("sk_buff", "network_header"),
            skb_transport_header: o("sk_buff", "transport_header"),
            skb_dev: o("sk_buff", "dev"),
            skb_sk: o("sk_buff", "sk"),
            dev_ifindex: o("net_device", "ifindex"),
            dev_flags: o("net_device", "flags"),
            dev_nd_net: o("net_device", "nd_net"),
            net_ns_inum: o("net", "ns.inum"),
            sk_family: o("sock_common", "skc_family"),
            sk_daddr: o("sock_common", "skc_daddr"),
            sk_rcv_saddr: o("sock_common", "skc_rcv_saddr"),
            sk_dport: o("sock_common", "skc_dport"),
            sk_num: o("sock_common", "skc_num"),
            sk_v6_daddr: o("sock_common", "skc_v6_daddr"),
            sk_v6_rcv_saddr: o("sock_common", "skc_v6_rcv_saddr"),
            sk_protocol: o("sock", "sk_protocol"),
            skb_cb: o("sk_buff", "cb"),
            tcp_write_seq: o("tcp_sock", "write_seq"),
            tcp_rcv_nxt: o("tcp_sock", "rcv_nxt"),
            tcp_copied_seq: o("tcp_sock", "copied_seq"),
            msg_iter_count: if msg_iter == Offsets::MISSING || count == Offsets::MISSING {
                Offsets::MISSING
            } else {
                msg_iter + count
            },
            skb_refdst: o("sk_buff", "_skb_refdst"),
            dst_dev: o("dst_entry", "dev"),
            sk_state: o("sock_common", "skc_state"),
            sk_err: o("sock", "sk_err"),
            sk_ack_backlog: o("sock", "sk_ack_backlog"),
            sk_max_ack_backlog: o("sock", "sk_max_ack_backlog"),
            icsk_syn_qlen: o("inet_connection_sock", "icsk_accept_queue.qlen"),
            sk_net: o("sock_common", "skc_net.net"),
            net_syncookies: o("net", "ipv4.sysctl_tcp_syncookies"),
            task_files: o("task_struct", "files"),
            files_fdt: o("files_struct", "fdt"),
            fdt_fd: o("fdtable", "fd"),
            file_private_data: o("file", "private_data"),
            socket_sk: o("socket", "sk"),
            sk_wq: o("sock", "sk_wq"),
            wq_head: o("socket_wq", "wait.head"),
            wqe_entry: o("wait_queue_entry", "entry"),
            wqe_private: o("wait_queue_entry", "private"),
            task_pid: o("task_struct", "pid"),
            task_tgid: o("task_struct", "tgid"),
            epe_wait: o("eppoll_entry", "wait"),
            epe_base: o("eppoll_entry", "base"),
            epi_ep: o("epitem", "ep"),
            ep_wq_head: o("eventpoll", "wq.head"),
            skb_data_len: o("sk_buff", "data_len"),
            _pad: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built BTF blob: struct outer { int a; union { int b; struct { int c; }; }; }.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0".to_vec();
        let mut types = Vec::new();
        let mut push = |words: &[u32]| types.extend(words.iter().flat_map(|w| w.to_le_bytes()));
        // 1: int (name "int"=1), size 4, encoding
        push(&[1, KIND_INT << 24, 4, 32]);
        // 2: anon struct { int c; } size 4
        push(&[0, (KIND_STRUCT << 24) | 1, 4, 15, 1, 0]);
        // 3: anon union { int b; struct 2; } size 4
        push(&[0, (KIND_UNION << 24) | 2, 4, 13, 1, 0, 0, 2, 0]);
        // 4: struct outer { int a; union 3 at 32 bits } size 8
        push(&[5, (KIND_STRUCT << 24) | 2, 8, 11, 1, 0, 0, 3, 32]);
        let mut data = Vec::new();
        for w in [0xeb9f_u32 | (1 << 16), 24, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            data.extend(w.to_le_bytes());
        }
        data.extend(types);
        data.extend(strings);
        data
    }

    #[test]
    fn finds_fields_through_anonymous_members() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.offset("outer", "a"), Some(0));
        assert_eq!(btf.offset("outer", "b"), Some(4));
        assert_eq!(btf.offset("outer", "c"), Some(4));
        assert_eq!(btf.offset("outer", "nope"), None);
        assert_eq!(btf.offset("missing", "a"), None);
    }

    /// The running kernel (this project's CI machine and the VM kernels) has every field
    /// the programs read.
    #[test]
    fn this_kernel_has_every_field() {
        let btf = Btf::from_sys_fs().expect("kernel BTF");
        let o = btf.offsets();
        let text = format!("{o:?}");
        assert!(!text.contains(&Offsets::MISSING.to_string()), "fields missing from this kernel's BTF: {text}");
    }

    #[test]
    fn this_kernel_names_its_drop_reasons() {
        let btf = Btf::from_sys_fs().expect("kernel BTF");
        let v = btf.enum_values("skb_drop_reason");
        assert!(v.iter().any(|(_, n)| n == "SKB_DROP_REASON_NO_SOCKET"), "{v:?}");
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, not at all").is_err());
        assert!(Btf::parse(&[]).is_err());
        let mut b = blob();
        b.truncate(30);
        assert!(Btf::parse(&b).is_err());
    }
}

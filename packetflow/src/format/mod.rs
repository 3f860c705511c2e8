//! Files packetflow writes and reads.

pub mod chrome;
pub mod ndjson;
pub mod output;
pub mod pcap_read;
pub mod pcapng;
pub mod recording;
pub mod trace_files;

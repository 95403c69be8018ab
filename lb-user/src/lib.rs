//! The lb agent: loads the XDP program, owns its configuration maps, runs health checks.

/// The compiled XDP object (built by `build.rs` from `lb-ebpf`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"));

//! The kernel side as user space sees it, one module per concern. Modules depend only on those
//! above them in this list (no cycles):
//!
//! - `sys`: every `unsafe` (bpffs, interface indexes, map bytes, memory mappings of the tables).
//! - `hooks`: which hook (XDP or TC) each interface gets, and why.
//! - `sizing`: the data plane's sizes (`TableConfig`) and how much of them is used (`Usage`).
//! - `counters`: the counter arrays by id, a region for each possible CPU (`Counters`).
//! - `spec`: the one table of the pinned maps (`MAPS`): name, version, kind, key and value,
//!   sizing, and how a resize copies each.
//! - `flow_tables`: the flow tables (`FlowTable`), their seed, and how the flows of an older
//!   agent's tables are carried into them (spec's rows for them use its copy, as they use `tables`').
//! - `tables`: the Maglev tables (an array of maps), each written through a memory mapping.
//! - `pins`: the pin directory, pinned links, maps of another layout, `down`.
//! - `load`: loading the BPF object with its maps sized from the spec table.
//! - `maps`: the pinned maps opened (`Maps`) and what they hold (`KernelState`).
//! - `evictions`: the agent's warning when the flow tables evict flows in use (`EvictionWatch`).
//! - `backend_vips`: each backend's VIPs (`lb_bevip_v1`), from what the maps hold.
//! - `resize`: moving a pinned data plane to other sizes.
//! - `upgrade`: counter maps of an older layout version carried over and retired.
//! - `links`: `attach` (resizing first when asked for other room).
//! - `local`: the local path's cgroup programs attached through pinned links (`attach_local`),
//!   with its `unsafe` bpf(2) calls in `local_sys` (beside `sys`: they are its own).
//! - `local_end`: the local path's connected sockets whose backend left, ended (`GoneWatch`),
//!   through sock_diag in `local_diag` (its `unsafe` netlink calls, beside `sys` too).
//! - `inspect`: one read of the kernel per request (`Inspection`), flows, predictions.
//! - `writer`: writing differences (`Writer`) through the map operations of a `Store`.
mod backend_vips;
mod counters;
mod evictions;
#[cfg(test)]
pub(crate) mod fake_store;
mod flow_tables;
mod hooks;
mod inspect;
mod links;
mod load;
mod local;
mod local_diag;
mod local_end;
mod local_sys;
mod maps;
mod pins;
mod resize;
mod sizing;
pub mod spec;
mod sys;
mod tables;
mod upgrade;
mod writer;
#[cfg(test)]
mod writer_tests;

pub use evictions::{EVICTIONS_READ_EVERY, EVICTIONS_WARN_EVERY, EvictionNotes, EvictionWatch};
pub use flow_tables::FlowTable;
pub use hooks::{HookChoice, HookKind, IfaceHook, IfaceSpec, Plan, check_ifaces, plan};
pub use inspect::{
    BackendView, FlowView, Inspection, ServiceView, parse_vip, predict, predict_slot,
};
pub use links::{Attached, attach, attach_made};
pub use load::{
    Programs, ensure_loaded, ipv6_half_id, is_fresh, load, load_object, load_programs, load_with,
    make_maps, pmtu_program_id, program_id, tc_program, xdp_program,
};
pub use local::{
    LocalAttached, attach_local, cgroup2_root_in, check_cgroup, default_cgroup, local_hash,
    local_state, local_vip,
};
pub use local_end::{BackendGone, Ended, GoneWatch, end_sockets};
pub use maps::{FilterCheck, KernelService, KernelState, Maps};
pub use pins::{
    DEFAULT_PIN_DIR, Removed, check_layouts, detach_local, down, ensure_pin_dir, foreign_layouts,
    pinned_hook_links, pinned_links, sock_links,
};
pub use sizing::{TableConfig, Usage};
pub use spec::{MAPS, MapSpec, Sizing};
#[allow(unused_imports)]
pub(crate) use sys::if_index;
pub use upgrade::retire_predecessors;
pub use writer::{Applied, KernelStore, Store, Writer};

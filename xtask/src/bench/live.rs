//! Packets per second through the whole XDP path, with real redirects: BPF_PROG_TEST_RUN in
//! live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`, aya's `TestRunAttrs::xdp_live_frames`). The
//! kernel builds frames from one packet, runs the program on each and carries out its verdict:
//! `lb_xdp` (flow lookup, rewrite, FIB lookup) redirects each into the backend-side veth of a
//! namespace the bench creates, whose peer drops it with a one-instruction XDP program. The floor
//! is a program that only redirects to the same veth. Both run behind a restore stage that writes
//! the packet back first (see `restore_stage`); the raw programs are loaded with the bpf syscall
//! and then driven through aya like the others. One thread pinned to one CPU, so the rate
//! is per core; the kernel's duration per frame includes the redirect and the veth's transmit.
//! `lb_xdp`'s counters must show every frame forwarded as the tracked flow it is.
use super::{
    packet::Kind,
    stats::Summary,
    sys::{self, Netns, Pins},
    xdp::{self, Bench, Size},
};
use anyhow::{Context as _, Result, ensure};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use aya_obj::programs::XdpAttachType;
use lb_common::Stat;
use serde::Serialize;
use std::{
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

#[derive(Clone, Copy)]
pub struct Plan {
    pub rounds: usize,
    /// Frames per test run.
    pub frames: u32,
    /// Frames the kernel runs between two transmits (`batch_size`).
    pub batch: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub case: String,
    /// Million packets per second on one core, of the rounds.
    pub floor_mpps: Summary,
    pub lb_mpps: Summary,
    /// lb_xdp's rate over the floor's, round by round.
    pub ratio: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub rounds: usize,
    pub frames: u32,
    pub batch: u32,
    pub rows: Vec<Row>,
    pub checks: Vec<String>,
}

const SIZE: Size = Size {
    services: 3,
    backends: 10,
};
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// The attach type aya loads XDP programs with (`BPF_XDP`); a tail call needs the same.
const BPF_XDP: u32 = 37;
const XDP_DROP: i32 = 1;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_TAIL_CALL: i32 = 12;
const BPF_FUNC_REDIRECT: i32 = 23;
/// Bytes of the packet the restore stage writes back at most.
const RESTORE_MAX: usize = 128;

/// The bpf(2) system call with the union `attr`: its non-negative result.
fn bpf(cmd: libc::c_long, attr: &[u8], what: &str) -> Result<i64> {
    // SAFETY: attr is a zeroed-then-filled union bpf_attr for `cmd`; every pointer in it points
    // into memory the caller keeps alive across the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), attr.len() as u32) };
    ensure!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
    Ok(r)
}

/// A new map (BPF_MAP_CREATE) of `type` with 4-byte keys.
fn raw_map(map_type: u32, value_size: u32, entries: u32, what: &str) -> Result<OwnedFd> {
    let mut attr = [0u8; 72];
    for (i, v) in [map_type, 4, value_size, entries].iter().enumerate() {
        attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    let fd = bpf(BPF_MAP_CREATE, &attr, what)?;
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `map[key] = value` (BPF_MAP_UPDATE_ELEM).
fn raw_update(map: &OwnedFd, key: u32, value: &[u8], what: &str) -> Result<()> {
    let mut attr = [0u8; 32];
    attr[0..4].copy_from_slice(&(map.as_raw_fd() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(&key as *const u32 as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(value.as_ptr() as u64).to_ne_bytes());
    bpf(BPF_MAP_UPDATE_ELEM, &attr, what)?;
    Ok(())
}

/// One BPF instruction: opcode, destination and source registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut i = [0u8; 8];
    i[0] = code;
    i[1] = (dst & 0xf) | (src << 4);
    i[2..4].copy_from_slice(&off.to_ne_bytes());
    i[4..8].copy_from_slice(&imm.to_ne_bytes());
    i
}
const MOV64_IMM: u8 = 0xb7;
const MOV64_REG: u8 = 0xbf;
const ADD64_IMM: u8 = 0x07;
const ST_W: u8 = 0x62;
const LDX_W: u8 = 0x61;
const LDX_DW: u8 = 0x79;
const STX_DW: u8 = 0x7b;
const LD_IMM64: u8 = 0x18;
const JEQ_IMM: u8 = 0x15;
const JGT_REG: u8 = 0x2d;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
/// `src` of a 64-bit load whose immediate is a map's descriptor.
const PSEUDO_MAP_FD: u8 = 1;

/// `r{dst} = map` (two instructions).
fn ld_map(dst: u8, map: &OwnedFd) -> [[u8; 8]; 2] {
    [
        insn(LD_IMM64, dst, PSEUDO_MAP_FD, 0, map.as_raw_fd()),
        insn(0, 0, 0, 0, 0),
    ]
}

/// The restore stage: writes the first `len` bytes (a multiple of 8) of the packet back from
/// `saved[0]`, then tail-calls `progs[0]`. The kernel's live-frames mode reuses a frame's page
/// without resetting its data, so without it a program that rewrites the packet would see its
/// own output on the next use of the page.
fn restore_stage(saved: &OwnedFd, progs: &OwnedFd, len: usize) -> Vec<[u8; 8]> {
    let mut p = vec![
        insn(MOV64_REG, 6, 1, 0, 0),
        insn(ST_W, 10, 0, -4, 0),
        insn(MOV64_REG, 2, 10, 0, 0),
        insn(ADD64_IMM, 2, 0, 0, -4),
    ];
    p.extend(ld_map(1, saved));
    p.push(insn(CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM));
    let words = len / 8;
    // Instructions between each jump and `out`.
    let after_null = 5 + 2 * words + 5;
    p.push(insn(JEQ_IMM, 0, 0, after_null as i16, 0));
    p.push(insn(LDX_W, 2, 6, 0, 0));
    p.push(insn(LDX_W, 3, 6, 4, 0));
    p.push(insn(MOV64_REG, 4, 2, 0, 0));
    p.push(insn(ADD64_IMM, 4, 0, 0, len as i32));
    p.push(insn(JGT_REG, 4, 3, (2 * words + 5) as i16, 0));
    for w in 0..words {
        let off = (8 * w) as i16;
        p.push(insn(LDX_DW, 5, 0, off, 0));
        p.push(insn(STX_DW, 2, 5, off, 0));
    }
    p.push(insn(MOV64_REG, 1, 6, 0, 0));
    p.extend(ld_map(2, progs));
    p.push(insn(MOV64_IMM, 3, 0, 0, 0));
    p.push(insn(CALL, 0, 0, 0, BPF_FUNC_TAIL_CALL));
    // out: the tail call did not happen.
    p.push(insn(MOV64_IMM, 0, 0, 0, XDP_DROP));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// Loads an XDP program of `insns` with the bpf syscall, pins it at `pin` and opens it with aya.
fn raw_program(name: &str, insns: &[[u8; 8]], pin: &Path) -> Result<Xdp> {
    let code: Vec<u8> = insns.concat();
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(code.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&1u32.to_ne_bytes());
    attr[28..32].copy_from_slice(&(log.len() as u32).to_ne_bytes());
    attr[32..40].copy_from_slice(&(log.as_mut_ptr() as u64).to_ne_bytes());
    let n = name.len().min(15);
    attr[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    attr[68..72].copy_from_slice(&BPF_XDP.to_ne_bytes());
    let fd = bpf(BPF_PROG_LOAD, &attr, name).with_context(|| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        format!("verifier: {}", String::from_utf8_lossy(&log[..end]))
    })?;
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u8; 16];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_OBJ_PIN, &attr, name)?;
    Ok(Xdp::from_pin(pin, XdpAttachType::Interface)?)
}

/// `target` behind the restore stage, for frames like `frame`.
struct Restored {
    prog: Xdp,
    _maps: [OwnedFd; 2],
}

fn restored(name: &str, target: BorrowedFd<'_>, frame: &[u8], dir: &Path) -> Result<Restored> {
    let len = (frame.len() / 8 * 8).min(RESTORE_MAX);
    let saved = raw_map(
        BPF_MAP_TYPE_ARRAY,
        RESTORE_MAX as u32,
        1,
        "the saved packet",
    )?;
    let mut value = [0u8; RESTORE_MAX];
    value[..len].copy_from_slice(&frame[..len]);
    raw_update(&saved, 0, &value, "the saved packet")?;
    let progs = raw_map(BPF_MAP_TYPE_PROG_ARRAY, 4, 1, "the program array")?;
    let prog = raw_program(name, &restore_stage(&saved, &progs, len), &dir.join(name))?;
    raw_update(
        &progs,
        0,
        &(target.as_raw_fd() as u32).to_ne_bytes(),
        "the tail call's target",
    )?;
    Ok(Restored {
        prog,
        _maps: [saved, progs],
    })
}

/// Frames the backend-side peer's XDP program dropped (`ethtool -S`).
fn peer_xdp_drops() -> Result<u64> {
    ethtool_sum(&format!("{}p", xdp::BACKEND_IF), "rx_queue_", "_xdp_drops")
}

/// Frames the backend-side veth could not hand to its peer because the peer's queue was full:
/// the kernel drops them and counts them on the sending side (`tx_queue_N_xdp_xmit_errors`).
fn full_queue_drops() -> Result<u64> {
    ethtool_sum(xdp::BACKEND_IF, "tx_queue_", "_xdp_xmit_errors")
}

/// The sum of the `ethtool -S` counters of `dev` named `prefix`..`suffix`.
fn ethtool_sum(dev: &str, prefix: &str, suffix: &str) -> Result<u64> {
    let out = sys::run(&["ethtool", "-S", dev])?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter(|(k, _)| k.starts_with(prefix) && k.ends_with(suffix))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum())
}

/// Runs `prog` in live-frames mode on `frame` arriving on `ifindex`: ns per frame.
fn live(prog: &Xdp, frame: &[u8], ifindex: u32, plan: &Plan) -> Result<f64> {
    let ctx = xdp::xdp_ctx(ifindex, frame.len());
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat: plan.frames,
        attrs: TestRunAttrs::new().xdp_live_frames(plan.batch),
        ..TestRunOptions::new()
    })?;
    // The kernel's duration is the mean per frame.
    Ok(r.duration.as_nanos() as f64)
}

pub fn run(plan: Plan) -> Result<Results> {
    let ns = Netns::new("live")?;
    xdp::topology(&ns.name)?;
    let pins = Pins::new("live");
    let dir = pins.dir.clone();
    let out = lbtest::in_netns(&ns.name, move || measure(&dir, &plan));
    drop(pins);
    drop(ns);
    out
}

fn measure(dir: &Path, plan: &Plan) -> Result<Results> {
    sys::pin_thread_to(std::thread::available_parallelism().map_or(0, |n| n.get() - 1));
    let ifindex = [
        xdp::if_index(xdp::CLIENT_IF)?,
        xdp::if_index(xdp::BACKEND_IF)?,
    ];
    let mut lb = Bench::load(dir, ifindex, &xdp::table(SIZE)?, None)?;
    lb.apply(SIZE)?;
    // The peers drop what they receive (a veth transmits XDP frames only to a peer with an XDP
    // program); the floor redirects to the backend-side veth, where lb_xdp sends the flow.
    let mut drop_prog = raw_program(
        "live_drop",
        &[insn(MOV64_IMM, 0, 0, 0, XDP_DROP), insn(EXIT, 0, 0, 0, 0)],
        &dir.join("live_drop"),
    )?;
    for peer in [
        format!("{}p", xdp::CLIENT_IF),
        format!("{}p", xdp::BACKEND_IF),
    ] {
        drop_prog
            .attach(&peer, XdpMode::Driver)
            .with_context(|| format!("attaching the drop program to {peer}"))?;
    }
    let floor = raw_program(
        "live_floor",
        &[
            insn(MOV64_IMM, 1, 0, 0, ifindex[1] as i32),
            insn(MOV64_IMM, 2, 0, 0, 0),
            insn(CALL, 0, 0, 0, BPF_FUNC_REDIRECT),
            insn(EXIT, 0, 0, 0, 0),
        ],
        &dir.join("live_floor"),
    )?;
    let mut rows = Vec::new();
    let mut checks = Vec::new();
    for (case, v6) in [
        ("IPv4 TCP, tracked flow", false),
        ("IPv6 TCP, tracked flow", true),
    ] {
        let first = lb.frames(Kind::Syn, v6, 1);
        let (next, _) = lb.establish_from(Kind::Ack, v6, &first)?;
        let frame = &next[0];
        let tag = if v6 { "6" } else { "4" };
        let floor_r = restored(&format!("live_rf{tag}"), floor.fd()?.as_fd(), frame, dir)?;
        let lb_fd = lb.program(lb_common::PROG_XDP)?.fd()?.as_fd();
        let lb_r = restored(&format!("live_rl{tag}"), lb_fd, frame, dir)?;
        let before = lb.counters()?;
        let (dropped, full) = (peer_xdp_drops()?, full_queue_drops()?);
        let (mut f, mut l) = (Vec::new(), Vec::new());
        for _ in 0..plan.rounds {
            f.push(1e3 / live(&floor_r.prog, frame, ifindex[0], plan)?);
            l.push(1e3 / live(&lb_r.prog, frame, ifindex[0], plan)?);
        }
        let after = lb.counters()?;
        let arrived = peer_xdp_drops()? - dropped;
        let lost = full_queue_drops()? - full;
        let sent = 2 * plan.rounds as u64 * plan.frames as u64;
        // Every frame sent either reached the peer or was dropped, counted, at its full queue
        // (the redirects outrun the peer on this shared VM: a full run lost 1.05% once). The
        // interface's own packets (IPv6 neighbour discovery, MLD) reach the peer too.
        ensure!(
            (sent..=sent + 100).contains(&(arrived + lost)),
            "{case}: {arrived} frames reached the backend-side peer and {lost} were dropped at \
             its full queue, {sent} were sent"
        );
        checks.push(format!(
            "{case}: frames that reached the backend-side peer's XDP program: {arrived}, dropped \
             at its full queue: {lost} ({sent} sent by the floor and lb_xdp, {} of the \
             interface's own)",
            arrived + lost - sent
        ));
        let delta =
            |s: Stat| after.get(s.name()).unwrap_or(&0) - before.get(s.name()).unwrap_or(&0);
        let want = plan.rounds as u64 * plan.frames as u64;
        for s in [Stat::Forwarded, Stat::Redirect] {
            let got = delta(s);
            checks.push(if got == want {
                format!("{case}: lb_xdp {} {got}", s.name())
            } else {
                format!(
                    "MISMATCH: {case}: lb_xdp {} {got}, expected {want}",
                    s.name()
                )
            });
        }
        let ratio: Vec<f64> = l.iter().zip(&f).map(|(a, b)| a / b).collect();
        rows.push(Row {
            case: case.to_string(),
            floor_mpps: Summary::of(&f).context("no rounds")?,
            lb_mpps: Summary::of(&l).context("no rounds")?,
            ratio: Summary::of(&ratio).context("no rounds")?,
        });
    }
    Ok(Results {
        rounds: plan.rounds,
        frames: plan.frames,
        batch: plan.batch,
        rows,
        checks,
    })
}

/// The section of BENCHMARKS.md.
pub fn markdown(o: &mut String, s: &super::Section<Results>) {
    use super::report::num;
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "\n## Live frames: packets per second per core through the whole XDP path\n\n\
         BPF_PROG_TEST_RUN with `BPF_F_TEST_XDP_LIVE_FRAMES`: the kernel runs the program on \
         frames made from one packet and carries out the verdict, so `lb_xdp`'s redirects really \
         go out of the backend-side veth (its peer drops them with an XDP program). `lb_xdp`: the \
         data plane of 3 services × 10 backends, one tracked flow, flow lookup, rewrite, FIB \
         lookup and redirect. Floor: a program that only redirects to the same veth. The kernel \
         reuses a frame's page without resetting its data, so both run behind the same restore \
         stage (a map lookup, the packet's first bytes written back, a tail call). One thread on \
         one CPU; million packets per second, median of the rounds (spread in brackets).\n"
    );
    if super::report::missing(o, s) {
        return;
    }
    let Some(r) = &s.result else {
        return;
    };
    let _ = writeln!(
        o,
        "{} rounds of {} frames, batch size {}.\n\n\
         | case | floor Mpps | lb_xdp Mpps | lb_xdp / floor | lb_xdp ns per packet |\n|---|---|---|---|---|",
        r.rounds,
        num(r.frames as f64, 0),
        r.batch
    );
    let cell = |s: &Summary| format!("{} ({}–{})", num(s.p50, 2), num(s.min, 2), num(s.max, 2));
    for row in &r.rows {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} |",
            row.case,
            cell(&row.floor_mpps),
            cell(&row.lb_mpps),
            num(row.ratio.p50, 2),
            num(1e3 / row.lb_mpps.p50, 0)
        );
    }
    let _ = writeln!(o);
    for c in &r.checks {
        let _ = writeln!(o, "- {c}");
    }
    let _ = writeln!(o);
}

//! Packets per second through the whole XDP path, with real redirects: BPF_PROG_TEST_RUN in
//! live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`, aya's `TestRunAttrs::xdp_live_frames`). The
//! kernel builds frames from one packet, runs the program on each and carries out its verdict:
//! `lb_xdp` (flow lookup, rewrite, FIB lookup) redirects each into the backend-side veth of a
//! namespace the bench creates, whose peer drops it with a one-instruction XDP program. The floor
//! is a program that only redirects to the same veth. One thread pinned to one CPU, so the rate
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
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
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
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_TYPE_XDP: u32 = 6;
const XDP_DROP: i32 = 1;
/// `bpf_redirect` helper number.
const BPF_FUNC_REDIRECT: i32 = 23;

/// One BPF instruction: opcode, registers (dst low nibble, src high), offset, immediate.
fn insn(code: u8, dst: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut i = [0u8; 8];
    i[0] = code;
    i[1] = dst & 0xf;
    i[2..4].copy_from_slice(&off.to_ne_bytes());
    i[4..8].copy_from_slice(&imm.to_ne_bytes());
    i
}
const MOV64_IMM: u8 = 0xb7;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;

/// Loads an XDP program of `insns` with the bpf syscall, pins it at `pin` and opens it with aya.
fn raw_program(name: &str, insns: &[[u8; 8]], pin: &Path) -> Result<Xdp> {
    let code: Vec<u8> = insns.concat();
    let license = c"GPL";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(code.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    let n = name.len().min(15);
    attr[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: attr is a zeroed union bpf_attr for BPF_PROG_LOAD whose pointers outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            attr.as_ptr(),
            attr.len() as u32,
        )
    };
    ensure!(
        fd >= 0,
        "loading {name}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u8; 16];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: attr is a union bpf_attr for BPF_OBJ_PIN whose path outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_ptr(), attr.len() as u32) };
    ensure!(
        r == 0,
        "pinning {name}: {}",
        std::io::Error::last_os_error()
    );
    Ok(Xdp::from_pin(pin, XdpAttachType::Interface)?)
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
        &[insn(MOV64_IMM, 0, 0, XDP_DROP), insn(EXIT, 0, 0, 0)],
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
            insn(MOV64_IMM, 1, 0, ifindex[1] as i32),
            insn(MOV64_IMM, 2, 0, 0),
            insn(CALL, 0, 0, BPF_FUNC_REDIRECT),
            insn(EXIT, 0, 0, 0),
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
        let before = lb.counters()?;
        let (mut f, mut l) = (Vec::new(), Vec::new());
        for _ in 0..plan.rounds {
            f.push(1e3 / live(&floor, frame, ifindex[0], plan)?);
            l.push(1e3 / live(lb.program(lb_common::PROG_XDP)?, frame, ifindex[0], plan)?);
        }
        let after = lb.counters()?;
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
         lookup and redirect. Floor: a program that only redirects to the same veth. One thread \
         on one CPU; million packets per second, median of the rounds (spread in brackets).\n"
    );
    if let Some(e) = &s.error {
        let _ = writeln!(o, "**This section failed in this run:** `{e}`\n");
        return;
    }
    let Some(r) = &s.result else {
        let _ = writeln!(o, "Not run in this run (`--only` chose another section).\n");
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

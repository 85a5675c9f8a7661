//! Only the packet programs the interfaces' hooks run are verified and loaded (issue 12: the
//! verifier takes a few hundred milliseconds of CPU for each): `load_programs` loads the ones
//! asked for and leaves the others unloaded in the object, `ensure_loaded` loads one later (a
//! driver that refuses native XDP gets TC then), and `attach` with no interface (the local path
//! alone) loads none but still makes the maps.
use lbctl::dataplane::{self, HookKind, Programs, TableConfig, ensure_loaded, program_id};
use lbtest::privileged_or_skip;
use std::path::{Path, PathBuf};

/// Removes a pin directory on drop, also when the test fails.
struct Pins(PathBuf);

impl Pins {
    fn new(name: &str) -> Pins {
        let dir = PathBuf::from(format!("/sys/fs/bpf/{name}"));
        let _ = dataplane::down(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        Pins(dir)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = dataplane::down(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Which of the two packet programs of `ebpf` are loaded.
fn loaded(ebpf: &mut aya::Ebpf) -> (bool, bool) {
    let xdp = program_id(ebpf, HookKind::Xdp).expect("the XDP program's id");
    let tc = program_id(ebpf, HookKind::Tc).expect("the TC program's id");
    (xdp.is_some(), tc.is_some())
}

/// The kernel id of program `name` of `ebpf`, which must be loaded.
/// The kernel id of program `name` (an IPv6 half or a path-MTU program) of `ebpf`.
fn tail_id(ebpf: &aya::Ebpf, name: &str) -> u32 {
    ebpf.program(name)
        .unwrap_or_else(|| panic!("{name} is not in the object"))
        .info()
        .unwrap_or_else(|e| panic!("{name} is not loaded: {e}"))
        .id()
}

fn load(dir: &Path, programs: Programs) -> aya::Ebpf {
    dataplane::load_programs(dir, &TableConfig::default(), programs).expect("loading")
}

#[test]
fn only_the_programs_asked_for_are_loaded() {
    if !privileged_or_skip("only_the_programs_asked_for_are_loaded") {
        return;
    }
    let pins = Pins::new("lbt-loadprog");
    let dir = &pins.0;

    let mut none = load(dir, Programs::NONE);
    assert_eq!(
        loaded(&mut none),
        (false, false),
        "Programs::NONE loaded one"
    );
    // The maps are there all the same: a writer opens them.
    dataplane::Writer::open(dir).expect("the maps of a load without programs");
    // A hook that needs its program later (the TC fallback of a refused native XDP) gets it,
    // and only it.
    let id = ensure_loaded(&mut none, HookKind::Tc).expect("loading TC later");
    assert!(id > 0);
    assert_eq!(loaded(&mut none), (false, true));
    assert_eq!(
        ensure_loaded(&mut none, HookKind::Tc).expect("TC again"),
        id,
        "a loaded program was loaded again"
    );
    // Its IPv6 half came with it, in the TC program array; the XDP one's slot stays empty.
    assert_eq!(
        dataplane::ipv6_half_id(dir, HookKind::Tc).expect("the TC array"),
        Some(tail_id(&none, lb_common::PROG_TC6)),
        "lb_tc's IPv6 half is not in its program array"
    );
    assert_eq!(
        dataplane::pmtu_program_id(dir, HookKind::Tc).expect("the TC path-MTU array"),
        Some(tail_id(&none, lb_common::PROG_TC_PMTU)),
        "lb_tc's path-MTU program is not in its program array"
    );
    assert_eq!(
        dataplane::ipv6_half_id(dir, HookKind::Xdp).expect("the XDP array"),
        None
    );
    assert_eq!(
        dataplane::pmtu_program_id(dir, HookKind::Xdp).expect("the XDP path-MTU array"),
        None
    );
    drop(none);

    let mut xdp = load(
        dir,
        Programs {
            xdp: true,
            tc: false,
        },
    );
    assert_eq!(loaded(&mut xdp), (true, false));
    assert_eq!(
        dataplane::ipv6_half_id(dir, HookKind::Xdp).expect("the XDP array"),
        Some(tail_id(&xdp, lb_common::PROG_XDP6)),
        "lb_xdp's IPv6 half is not in its program array"
    );
    assert_eq!(
        dataplane::pmtu_program_id(dir, HookKind::Xdp).expect("the XDP path-MTU array"),
        Some(tail_id(&xdp, lb_common::PROG_XDP_PMTU)),
        "lb_xdp's path-MTU program is not in its program array"
    );
    drop(xdp);

    let mut both = load(dir, Programs::BOTH);
    assert_eq!(loaded(&mut both), (true, true));
    drop(both);

    // No interface (the local path alone): no packet program loaded (the ids say what `attach`
    // loaded, run or not), the maps made.
    let attached =
        dataplane::attach(dir, &[], &TableConfig::default()).expect("attach, no interface");
    assert_eq!(
        (
            attached.program_id,
            attached.xdp_program_id,
            attached.tc_program_id
        ),
        (0, None, None),
        "{attached:?}"
    );
    assert!(attached.hooks.is_empty() && attached.attached.is_empty());
    dataplane::Maps::open(dir).expect("the maps");
}

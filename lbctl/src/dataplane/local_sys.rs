//! The `unsafe` of the local path: the three bpf(2) commands aya 0.14 has no public call for
//! (opening a pinned link as a descriptor, reading which cgroup a link is attached to, and
//! replacing a link's program in place with BPF_LINK_UPDATE).
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `union bpf_attr`, large enough for every command used here; unused bytes stay zero.
#[repr(C)]
#[derive(Default)]
struct Attr {
    words: [u64; 8],
}

impl Attr {
    fn set_u32(&mut self, offset: usize, v: u32) {
        let word = &mut self.words[offset / 8];
        let shift = (offset % 8) * 8;
        // Little- and big-endian hosts lay out two u32 fields in one u64 differently.
        let shift = if cfg!(target_endian = "little") {
            shift
        } else {
            32 - shift
        };
        *word = (*word & !(0xffff_ffffu64 << shift)) | (v as u64) << shift;
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, zero-padded bpf_attr of the size passed, living for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens the object pinned at `path` (BPF_OBJ_GET).
pub(super) fn open_pin(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let name = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = Attr::default();
    attr.words[0] = name.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // SAFETY: the kernel just returned this descriptor to us, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What the kernel says of a cgroup link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CgroupLink {
    /// The program it runs.
    pub prog_id: u32,
    /// The cgroup it is attached to (its inode number on cgroup2).
    pub cgroup_id: u64,
}

/// The program and cgroup of the link `link` (BPF_OBJ_GET_INFO_BY_FD on a link).
pub(super) fn cgroup_link(link: BorrowedFd<'_>) -> io::Result<CgroupLink> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then for cgroup links cgroup_id (u64,
    // at byte 16) and attach_type.
    let mut info = [0u64; 32];
    let mut attr = Attr::default();
    attr.set_u32(0, link.as_raw_fd() as u32);
    attr.set_u32(4, size_of_val(&info) as u32);
    attr.words[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let prog_id = if cfg!(target_endian = "little") {
        (info[1] & 0xffff_ffff) as u32
    } else {
        (info[1] >> 32) as u32
    };
    Ok(CgroupLink {
        prog_id,
        cgroup_id: info[2],
    })
}

/// Makes the link `link` run `prog` instead of its program, without a moment unattached.
pub(super) fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.set_u32(0, link.as_raw_fd() as u32);
    attr.set_u32(4, prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

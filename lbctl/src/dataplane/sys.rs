//! Every `unsafe` of the data plane's user side, each with why it is sound: mounting bpffs,
//! naming an interface, viewing a map value's bytes, and mapping pages of the mmapable table map
//! (`memmap2`).
use crate::error::{Error, Result};
use aya::{Pod, maps::MapData};
use std::{
    ffi::CString,
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` is on a bpffs.
pub(super) fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `statfs` is plain old data, so all zeroes is a valid value; statfs(2) reads a
    // NUL-terminated path and writes at most one `statfs` into it.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Mounts a bpffs on /sys/fs/bpf.
pub(super) fn mount_bpffs() -> Result<()> {
    let src = c"bpf";
    let target = c"/sys/fs/bpf";
    // SAFETY: mount(2) reads three NUL-terminated static strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Error::io(
            "mounting bpffs on /sys/fs/bpf",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The index of network interface `iface`.
pub(crate) fn if_index(iface: &str) -> Result<u32> {
    let c = CString::new(iface).map_err(|_| Error::NoInterface(iface.to_string()))?;
    // SAFETY: if_nametoindex(3) reads a NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(Error::NoInterface(iface.to_string())),
        i => Ok(i),
    }
}

/// The bytes of a map key or value.
pub(super) fn bytes_of<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `Pod` types (lb-common's map types, integers and arrays of them) are `repr(C)`,
    // made of integers and padded explicitly: every byte of the value is initialised. The slice
    // borrows `v` and covers exactly its size.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// Bytes `start..start + len` of an mmapable array map's values (a Maglev table), mapped into
/// this process read-only (`memmap2` widens the mapping to whole pages); unmapped on drop. The
/// kernel refuses a range outside the map's values, and a map created without BPF_F_MMAPABLE.
pub(super) fn map_read(map: &MapData, start: usize, len: usize) -> Result<memmap2::Mmap> {
    let fd = map.fd().as_fd();
    // SAFETY: memmap2's maps are unsound only if the mapped object changes while the slice is
    // held. The BPF program only reads the tables; the agent's writer writes a table only before
    // it is put in place, and never again after.
    unsafe { options(start, len).map(&fd) }
        .map_err(|e| Error::io("mapping a Maglev table into memory", e))
}

/// `map_read`, writable. The writes reach the kernel's pages directly (a shared mapping).
pub(super) fn map_write(map: &MapData, start: usize, len: usize) -> Result<memmap2::MmapMut> {
    let fd = map.fd().as_fd();
    // SAFETY: as in `map_read`; this process is the tables' only writer, and writes only
    // blocks no service's entry names (the program never writes a table).
    unsafe { options(start, len).map_mut(&fd) }
        .map_err(|e| Error::io("mapping a Maglev table into memory", e))
}

/// Sets elements `keys[i]` of map `map` to `values[i]` (created or replaced), in order, with
/// one system call (BPF_MAP_UPDATE_BATCH, which aya does not offer). For an array of maps the
/// values are the maps' descriptors: the kernel then waits for an RCU grace period after each
/// update, once for a batch. A failure says how many elements were written before it.
pub(super) fn map_update_batch<K: Pod, V: Pod>(
    map: &MapData,
    keys: &[K],
    values: &[V],
) -> std::result::Result<(), (usize, std::io::Error)> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    if keys.len() != values.len() {
        return Err((
            0,
            std::io::Error::other("as many keys as values are needed"),
        ));
    }
    if keys.is_empty() {
        return Ok(());
    }
    let count = u32::try_from(keys.len()).map_err(|e| (0, std::io::Error::other(e)))?;
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `keys` and `values` hold `count` keys and values of the map's sizes (the caller's
    // `K` and `V` are the map's types) and live until the call returns. The kernel reads them
    // and writes `count` only.
    unsafe { bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr) }
        .map_err(|e| ((attr.count as usize).min(keys.len()), e))
}

/// An element of a write to one of two maps, the IPv4 one or the IPv6 one: its key and value.
pub(super) enum Family<K4, V4, K6, V6> {
    V4(K4, V4),
    V6(K6, V6),
}

/// Writes `items` in order into `map4` and `map6`, each run of one family with one
/// `map_update_batch`. A failure says how many were written before it.
pub(super) fn update_by_family<K4: Pod, V4: Pod, K6: Pod, V6: Pod>(
    map4: &MapData,
    map6: &MapData,
    items: &[Family<K4, V4, K6, V6>],
) -> std::result::Result<(), (usize, std::io::Error)> {
    let mut done = 0;
    while done < items.len() {
        let v6 = matches!(items[done], Family::V6(..));
        let (mut keys4, mut values4, mut keys6, mut values6) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for item in &items[done..] {
            match item {
                Family::V4(k, v) if !v6 => {
                    keys4.push(*k);
                    values4.push(*v);
                }
                Family::V6(k, v) if v6 => {
                    keys6.push(*k);
                    values6.push(*v);
                }
                _ => break,
            }
        }
        let len = keys4.len() + keys6.len();
        let written = if v6 {
            map_update_batch(map6, &keys6, &values6)
        } else {
            map_update_batch(map4, &keys4, &values4)
        };
        match written {
            Ok(()) => done += len,
            Err((n, e)) => return Err((done + n.min(len), e)),
        }
    }
    Ok(())
}

/// Empties element `key` of an array of maps (BPF_MAP_DELETE_ELEM; the kernel has no batch
/// deletion for one). An empty element is `NotFound`.
pub(super) fn map_delete(map: &MapData, key: u32) -> std::io::Result<()> {
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    elem_call(BPF_MAP_DELETE_ELEM, map, key, 0)
}

/// The value of element `key` of a map whose values are 4 bytes (BPF_MAP_LOOKUP_ELEM; for a
/// program array, the id of the program in the slot); None for an empty element.
pub(super) fn map_lookup_u32(map: &MapData, key: u32) -> std::io::Result<Option<u32>> {
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    let mut value = 0u32;
    match elem_call(BPF_MAP_LOOKUP_ELEM, map, key, &mut value as *mut u32 as u64) {
        Ok(()) => Ok(Some(value)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// An element command `cmd` on element `key` of `map`, its value at address `value` (0: none).
fn elem_call(cmd: libc::c_long, map: &MapData, key: u32, value: u64) -> std::io::Result<()> {
    /// The element commands' part of `union bpf_attr`.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value,
        flags: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for the element commands, of the size passed;
    // its key points at `key`, which lives until the call returns, and its value (when not 0)
    // at 4 writable bytes of the caller's, the size of the values of the maps it is used on.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The first `len` values of array map `map`, read with as few system calls as the kernel allows
/// (BPF_MAP_LOOKUP_BATCH, which aya does not offer; one lookup a value takes a system call each).
pub(super) fn array_read_batch<T: Pod + Default>(
    map: &MapData,
    len: u32,
) -> std::io::Result<Vec<T>> {
    let mut values = vec![T::default(); len as usize];
    array_walk_batch(map, len, len, |k, v: &T| values[k as usize] = *v)?;
    Ok(values)
}

/// Gives `f` each of the first `len` values of array map `map` with its index, read
/// BPF_MAP_LOOKUP_BATCH `chunk` values at a time (so that a large map is never copied whole).
pub(super) fn array_walk_batch<T: Pod + Default>(
    map: &MapData,
    len: u32,
    chunk: u32,
    mut f: impl FnMut(u32, &T),
) -> std::io::Result<()> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let chunk = chunk.clamp(1, len.max(1));
    let (mut keys, mut values) = (
        vec![0u32; chunk as usize],
        vec![T::default(); chunk as usize],
    );
    let (mut token, mut next, mut read) = (0u32, 0u32, 0u32);
    // Each call returns at least one element or ends the walk: at most `len` calls.
    for first in (0..=len).map(|i| i == 0) {
        if read >= len {
            break;
        }
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk.min(len - read),
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `keys` and `values` hold `chunk` (at least `count`) keys and values of the
        // map's sizes (`T` is the map's value type), the tokens are `u32` (an array's key): all
        // live until it returns.
        let r = unsafe { bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let end = matches!(&r, Err(e) if e.raw_os_error() == Some(libc::ENOENT));
        if !end {
            r?;
        }
        let got = attr.count.min(len - read);
        for (k, v) in keys.iter().zip(&values).take(got as usize) {
            if *k < len {
                f(*k, v);
            }
        }
        read += got;
        token = next;
        if end || got == 0 {
            break;
        }
    }
    if read < len {
        return Err(std::io::Error::other(format!(
            "the kernel gave {read} of {len} values"
        )));
    }
    Ok(())
}

/// The batch commands' part of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Runs batch command `cmd` of the `bpf` system call on `attr`.
///
/// # Safety
/// The buffers `attr` points at (keys, values, batch tokens) must be valid for what `cmd` reads
/// and writes, for `count` elements of the map's key and value sizes.
unsafe fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix for the batch commands, of the size passed;
    // the caller vouches for the buffers it points at.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn options(start: usize, len: usize) -> memmap2::MmapOptions {
    let mut o = memmap2::MmapOptions::new();
    o.offset(start as u64).len(len);
    o
}

/// The driver of network interface `iface` and its bus (empty for a virtual device), as
/// `ethtool -i` shows them (ETHTOOL_GDRVINFO).
pub(crate) fn if_driver(iface: &str) -> Result<(String, String)> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    let name = iface.as_bytes();
    if name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(Error::NoInterface(iface.to_string()));
    }
    let fail = |e: std::io::Error| Error::io(format!("reading the driver of {iface}"), e);
    // SAFETY: `DrvInfo` and `ifreq` are plain old data (all zeroes is valid); the ioctl reads the
    // NUL-terminated name in `ifreq` and writes at most one `DrvInfo` through `ifr_data`, which
    // points at `info`, alive for the call; the socket is closed on every path.
    unsafe {
        let mut info: DrvInfo = std::mem::zeroed();
        info.cmd = ETHTOOL_GDRVINFO;
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(name) {
            *d = *s as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&raw mut info).cast();
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
        let rc = libc::ioctl(fd, SIOCETHTOOL as _, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(match err.raw_os_error() {
                Some(libc::ENODEV) => Error::NoInterface(iface.to_string()),
                _ => fail(err),
            });
        }
        let text = |b: &[u8]| {
            let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
            String::from_utf8_lossy(&b[..end]).into_owned()
        };
        Ok((text(&info.driver), text(&info.bus_info)))
    }
}

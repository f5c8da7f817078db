//! Loading the embedded eBPF object, pinning its maps, attaching the XDP
//! program to interfaces, and finding out whether a program is running.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    programs::{ProgramError, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use gateway_common::{names, XDP_PROGRAM};

use crate::{config::AttachMode, error::UsageError};

/// The eBPF object built by build.rs; empty in fuzzing builds (see build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway-xdp"));

/// The embedded object, or an error when this build has none.
fn object() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        bail!("this build has no eBPF object (fuzzing build)");
    }
    Ok(OBJECT)
}

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Fails unless `dir`'s nearest existing ancestor lives on a bpffs mount.
pub fn check_bpffs(dir: &Path) -> Result<()> {
    let mut probe: PathBuf = dir.to_owned();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    let c = CString::new(probe.as_os_str().as_encoded_bytes()).context("pin path contains NUL")?;
    // SAFETY: valid C string and a zeroed statfs out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 || st.f_type as i64 != BPF_FS_MAGIC {
        return Err(UsageError(format!(
            "{} is not on a bpffs mount: mount it with `mount -t bpf bpf /sys/fs/bpf` \
             (`cargo xtask setup` does) or set xdp.pin_dir",
            probe.display()
        ))
        .into());
    }
    Ok(())
}

/// Fails with a usage error unless every interface exists.
pub fn check_interfaces(ifaces: &[String]) -> Result<()> {
    for name in ifaces {
        let c = CString::new(name.as_str())
            .map_err(|_| UsageError(format!("bad interface name {name:?}")))?;
        // SAFETY: valid C string.
        if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
            return Err(UsageError(format!(
                "interface {name:?} does not exist (see `ip link`); fix xdp.interfaces"
            ))
            .into());
        }
    }
    Ok(())
}

/// Turns permission errors into the one line an operator needs.
pub fn explain(e: anyhow::Error) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        anyhow!(
            "not permitted to use eBPF: run as root or with CAP_BPF, CAP_NET_ADMIN and \
             CAP_PERFMON ({text})"
        )
    } else {
        e
    }
}

/// Parses the object and creates its (unpinned) maps without loading any
/// program; callers load the programs they need.
pub fn load_object() -> Result<Ebpf> {
    let object = object()?;
    raise_memlock();
    EbpfLoader::new()
        .load(object)
        .map_err(|e| explain(anyhow!(e).context("loading the eBPF object")))
}

/// Loads the object. With `pin_path`, every map is reused from (or pinned
/// to) that directory so the CLI and a restarted daemon share them.
pub fn load(pin_path: Option<&Path>) -> Result<Ebpf> {
    let object = object()?;
    raise_memlock();
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = match pin_path {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the pin directory {}", dir.display()))?;
            names::ALL.iter().map(|n| (*n, dir.join(n))).collect()
        }
        None => Vec::new(),
    };
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(object)
        .map_err(|e| explain(anyhow!(e).context("loading the eBPF object")))?;
    let prog: &mut Xdp = xdp_program(&mut ebpf)?;
    prog.load().map_err(|e| explain(verifier_context(e)))?;
    Ok(ebpf)
}

fn verifier_context(e: ProgramError) -> anyhow::Error {
    anyhow!(e).context("the kernel refused the XDP program")
}

/// One of the benchmark's programs (`gateway_bench_tx`: the same frame
/// again; `gateway_bench_syn`: a SYN from a random source;
/// `gateway_bench_drop`: the floor, read the source and drop), loaded.
pub fn bench_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("the eBPF object has no {name} program"))?
        .try_into()
        .with_context(|| format!("{name} is not an XDP program"))?;
    prog.load().map_err(|e| explain(verifier_context(e)))?;
    Ok(prog)
}

pub fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    ebpf.program_mut(XDP_PROGRAM)
        .context("the eBPF object has no XDP program")?
        .try_into()
        .context("gateway_xdp is not an XDP program")
}

/// Attaches to `iface`, returning the mode it ended up in. `Auto` tries the
/// driver (native) mode first and falls back to generic (skb) mode.
pub fn attach(
    ebpf: &mut Ebpf,
    iface: &str,
    mode: AttachMode,
) -> Result<(AttachMode, aya::programs::xdp::XdpLinkId)> {
    let prog = xdp_program(ebpf)?;
    let try_mode = |prog: &mut Xdp, m: XdpMode| {
        prog.attach(iface, m)
            .map_err(|e| explain(anyhow!(e).context(format!("attaching XDP to {iface}"))))
    };
    match mode {
        AttachMode::Driver => try_mode(prog, XdpMode::Driver).map(|id| (AttachMode::Driver, id)),
        AttachMode::Skb => try_mode(prog, XdpMode::Skb).map(|id| (AttachMode::Skb, id)),
        AttachMode::Auto => match try_mode(prog, XdpMode::Driver) {
            Ok(id) => Ok((AttachMode::Driver, id)),
            Err(e) => {
                tracing::warn!(
                    interface = iface,
                    "native XDP is not available ({e:#}); using generic (skb) mode, which is slower"
                );
                try_mode(prog, XdpMode::Skb).map(|id| (AttachMode::Skb, id))
            }
        },
    }
}

/// Where the link of `iface` is pinned when the program stays attached.
pub fn link_pin(pin_path: &Path, iface: &str) -> PathBuf {
    pin_path.join(format!("link_{iface}"))
}

/// Links of `iface` pinned by versions with an older map schema (the
/// `v1`.. siblings of `pin_path`), newest first.
fn older_link_pins(pin_path: &Path, iface: &str) -> Vec<PathBuf> {
    let Some(parent) = pin_path.parent() else {
        return Vec::new();
    };
    (1..gateway_common::SCHEMA_VERSION)
        .rev()
        .map(|v| link_pin(&parent.join(format!("v{v}")), iface))
        .filter(|p| p.exists())
        .collect()
}

/// Removes the pinned links (`xdp.keep_attached`) of interfaces that are no
/// longer in `interfaces`, in this schema's pin directory and older ones.
/// Nothing else holds such a link, so removing its pin detaches the
/// program, whose maps nobody updates any more, from that interface.
/// Returns the interfaces it detached from.
pub fn drop_stale_links(pin_path: &Path, interfaces: &[String]) -> Vec<String> {
    remove_links(
        pin_path,
        interfaces,
        "detached from an interface no longer in xdp.interfaces",
    )
}

/// Removes every pinned link (this schema's and older ones') but those of
/// `keep`, saying `why` for each. Returns the interfaces it detached from.
pub fn remove_links(pin_path: &Path, keep: &[String], why: &str) -> Vec<String> {
    let interfaces = keep;
    let older = pin_path.parent().into_iter().flat_map(|parent| {
        (1..gateway_common::SCHEMA_VERSION).map(move |v| parent.join(format!("v{v}")))
    });
    let mut dropped = Vec::new();
    for dir in std::iter::once(pin_path.to_owned()).chain(older) {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(iface) = name.strip_prefix("link_") else {
                continue;
            };
            if interfaces.iter().any(|i| i == iface) {
                continue;
            }
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::warn!(interface = iface, pin = %e.path().display(), "{why}");
                    dropped.push(iface.to_owned());
                }
                Err(err) => tracing::warn!(
                    pin = %e.path().display(),
                    "could not remove a stale XDP link: {err}"
                ),
            }
        }
    }
    dropped
}

/// Attaches to `iface`, or, when a previous daemon left its program
/// attached (a pinned link), swaps this program in on that link atomically,
/// so there is no moment without a program. With `keep`, the link is (or
/// stays) pinned and outlives this process; without, a found pin is
/// removed so the program detaches when this process exits. Returns the
/// attach mode ("kept" for a taken-over link).
pub fn attach_or_take_over(
    ebpf: &mut Ebpf,
    iface: &str,
    mode: AttachMode,
    pin_path: &Path,
    keep: bool,
) -> Result<String> {
    use aya::programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    };
    let pin = link_pin(pin_path, iface);
    // A link an older version (map schema) left attached is taken over the
    // same way, so an upgrade with keep_attached never leaves the interface
    // unprotected or fails to attach; its old maps are left behind.
    let found = if pin.exists() {
        Some(pin.clone())
    } else {
        older_link_pins(pin_path, iface).into_iter().next()
    };
    if let Some(found) = found {
        let from_older = found != pin;
        let pinned = PinnedLink::from_pin(&found)
            .with_context(|| format!("opening the pinned link {}", found.display()))?;
        let fd: FdLink = if keep && !from_older {
            pinned.into()
        } else {
            pinned
                .unpin()
                .with_context(|| format!("unpinning {}", found.display()))?
        };
        let link = XdpLink::try_from(fd).context("the pinned link is not an XDP link")?;
        let id = match xdp_program(ebpf)?.attach_to_link(link) {
            Ok(id) => id,
            Err(e) => {
                // A link whose interface went away (deleted and made
                // again by a driver reload, a bond or VLAN rebuilt) is
                // dead: it protects nothing. Its pin goes, and the program
                // is attached afresh.
                tracing::warn!(
                    interface = iface,
                    pin = %found.display(),
                    "the pinned XDP link is dead ({e}); attaching afresh"
                );
                let _ = std::fs::remove_file(&found);
                return attach_fresh(ebpf, iface, mode, &pin, keep);
            }
        };
        if from_older && keep {
            let fd: FdLink = xdp_program(ebpf)?
                .take_link(id)?
                .try_into()
                .map_err(|_| anyhow!("{iface}: the taken-over link is not a BPF link"))?;
            fd.pin(&pin)
                .with_context(|| format!("pinning the XDP link at {}", pin.display()))?;
        }
        tracing::info!(
            interface = iface,
            from = %found.display(),
            "took over the XDP link a previous daemon left attached"
        );
        return Ok("kept".into());
    }
    attach_fresh(ebpf, iface, mode, &pin, keep)
}

/// Attaches to `iface` with no link to take over; with `keep`, pins the
/// new link at `pin`.
fn attach_fresh(
    ebpf: &mut Ebpf,
    iface: &str,
    mode: AttachMode,
    pin: &Path,
    keep: bool,
) -> Result<String> {
    use aya::programs::links::FdLink;
    let (got, id) = attach(ebpf, iface, mode)?;
    if keep {
        let link = xdp_program(ebpf)?.take_link(id)?;
        let fd: FdLink = link
            .try_into()
            .map_err(|_| anyhow!("{iface}: this kernel attached XDP without a BPF link, which cannot be pinned; set xdp.keep_attached = false"))?;
        fd.pin(pin)
            .with_context(|| format!("pinning the XDP link at {}", pin.display()))?;
    }
    Ok(got.name().into())
}

/// Whether a loaded program uses the map with id `stats_id`, i.e. whether
/// the maps at a pin path belong to a live program; `None` when this
/// process may not list programs. That takes CAP_SYS_ADMIN, which the
/// packaged service (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) does not have.
pub fn program_running(stats_id: u32) -> Option<bool> {
    let mut denied = false;
    for p in aya::programs::loaded_programs() {
        match p {
            Ok(p) => {
                if matches!(p.map_ids(), Ok(Some(ids)) if ids.contains(&stats_id)) {
                    return Some(true);
                }
            }
            Err(aya::programs::ProgramError::SyscallError(e))
                if matches!(e.io_error.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
            {
                denied = true
            }
            // A program unloaded while the list was walked.
            Err(_) => {}
        }
    }
    (!denied).then_some(false)
}

fn raise_memlock() {
    // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; harmless after.
    let rl = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

//! The worker balancer: for every listen address (one SO_REUSEPORT group),
//! an instance of the sk_reuseport program whose socket array holds that
//! group's socket of each worker, attached to the group. The program sends
//! each new connection to the least loaded worker and counts it there at
//! once; a worker publishes its exact open-connection count into every
//! instance's load array whenever a connection closes (per connection, not
//! per request). Without the privileges to load it, plain SO_REUSEPORT
//! hashing still works.

use std::{net::TcpListener as StdListener, sync::Mutex};

use anyhow::{Context as _, Result};
use aya::{
    maps::{Array, MapData, ReusePortSockArray},
    programs::SkReuseport,
    Ebpf,
};
use gateway_common::reuseport::{COUNT_MAP, LOAD_MAP, MAX_WORKERS, PROGRAM, WORKERS_MAP};

struct Group {
    /// Owns the program (attached to the group) and the socket array.
    _ebpf: Ebpf,
    load: Array<MapData, u32>,
}

pub struct Balancer {
    groups: Mutex<Vec<Group>>,
}

impl Balancer {
    /// `sockets[worker][address]`, as `workers::bind` returns them.
    pub fn attach(sockets: &[Vec<StdListener>]) -> Result<Balancer> {
        let workers = sockets.len();
        anyhow::ensure!(
            workers as u32 <= MAX_WORKERS,
            "more than {MAX_WORKERS} workers"
        );
        let addresses = sockets.first().map_or(0, Vec::len);
        let mut groups = Vec::new();
        for a in 0..addresses {
            let mut ebpf = crate::kernel::loader::load_object()?;
            let prog: &mut SkReuseport = ebpf
                .program_mut(PROGRAM)
                .context("the eBPF object has no sk_reuseport program")?
                .try_into()
                .context("gateway_reuseport is not an sk_reuseport program")?;
            prog.load().map_err(|e| {
                crate::kernel::loader::explain(
                    anyhow::anyhow!(e).context("loading the sk_reuseport program"),
                )
            })?;
            let mut socks = ReusePortSockArray::try_from(
                ebpf.take_map(WORKERS_MAP).context("no WORKERS map")?,
            )?;
            for (w, per_worker) in sockets.iter().enumerate() {
                socks
                    .set(w as u32, &per_worker[a], 0)
                    .context("adding a worker socket to WORKERS")?;
            }
            let mut count: Array<MapData, u32> =
                Array::try_from(ebpf.take_map(COUNT_MAP).context("no WORKER_COUNT map")?)?;
            count.set(0, workers as u32, 0)?;
            let load: Array<MapData, u32> =
                Array::try_from(ebpf.take_map(LOAD_MAP).context("no WORKER_LOAD map")?)?;
            let prog: &mut SkReuseport =
                ebpf.program_mut(PROGRAM).expect("found above").try_into()?;
            prog.attach(&sockets[0][a])
                .context("attaching the sk_reuseport program to the listen group")?;
            // The program keeps WORKERS alive; the handle can go.
            drop(socks);
            groups.push(Group { _ebpf: ebpf, load });
        }
        Ok(Balancer {
            groups: Mutex::new(groups),
        })
    }

    /// Publishes `worker`'s open-connection count to every group.
    pub fn publish(&self, worker: usize, load: u32) {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        for g in groups.iter_mut() {
            let _ = g.load.set(worker as u32, load, 0);
        }
    }
}

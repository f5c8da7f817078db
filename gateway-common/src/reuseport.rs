//! Names and limits of the sk_reuseport worker balancer.

/// Workers the balancer can address (bounds the program's scan loop).
pub const MAX_WORKERS: u32 = 64;
/// Name of the sk_reuseport program inside the object.
pub const PROGRAM: &str = "gateway_reuseport";
pub const WORKERS_MAP: &str = "WORKERS";
pub const LOAD_MAP: &str = "WORKER_LOAD";
pub const COUNT_MAP: &str = "WORKER_COUNT";

//! Runtime policy persisted in `state_dir/xdp-state.json`: blocklist and
//! allowlist entries added at runtime (with expiry, cause and comment) and
//! limit overrides. Written atomically (temp file, fsync, rename, fsync of
//! the directory) so a crash leaves either the old or the new file.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use gateway_common::cidr::Cidr;
use serde::{Deserialize, Serialize};

use super::clock;

pub const STATE_FILE: &str = "xdp-state.json";
const STATE_VERSION: u32 = 1;
/// Locked (flock) by every process that reads the state to change it:
/// the CLI's commands and the daemon's bans and reloads, so neither loses
/// the other's update.
const LOCK_FILE: &str = ".xdp-state.lock";

/// Holds the state directory's lock until dropped.
pub struct StateLock {
    _file: fs::File,
}

/// Waits for and takes the state directory's lock (creating the directory
/// and the lock file if needed). Hold it from loading the state until the
/// change is saved and applied to the maps.
pub fn lock(state_dir: &Path) -> Result<StateLock> {
    use std::os::fd::AsRawFd as _;
    fs::create_dir_all(state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
    let path = state_dir.join(LOCK_FILE);
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("locking {}", path.display()));
    }
    Ok(StateLock { _file: f })
}

/// One runtime blocklist entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockEntry {
    #[serde(with = "cidr_str")]
    pub cidr: Cidr,
    /// Wall-clock deadline (ms since the epoch); `None` = permanent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
    /// Who added it: "manual" (CLI) or an abuse cause ("auth_failures", ...).
    pub cause: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    pub added_unix_ms: u64,
}

impl BlockEntry {
    pub fn expired(&self, now_unix_ms: u64) -> bool {
        matches!(self.expires_unix_ms, Some(t) if t <= now_unix_ms)
    }
}

/// Runtime overrides of the [xdp] limits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syn_rate: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syn_burst: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_syn_rate: Option<u64>,
}

impl LimitOverrides {
    pub fn is_empty(&self) -> bool {
        *self == LimitOverrides::default()
    }
}

/// Everything persisted about the kernel policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    #[serde(default)]
    pub block: Vec<BlockEntry>,
    #[serde(default, with = "cidr_vec")]
    pub allow: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "LimitOverrides::is_empty")]
    pub limits: LimitOverrides,
    /// Backends drained with `gateway backends drain`, by URL.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drained: Vec<String>,
}

impl State {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(STATE_FILE)
    }

    /// Loads the state; a missing file is an empty state. Expired entries
    /// are dropped on the way in.
    pub fn load(state_dir: &Path) -> Result<State> {
        let path = Self::path(state_dir);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State {
                    version: STATE_VERSION,
                    ..State::default()
                })
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut state: State = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is corrupt; move it aside to start from an empty state",
                path.display()
            )
        })?;
        if state.version != STATE_VERSION {
            bail!(
                "{} has state version {} but this gateway understands {STATE_VERSION}",
                path.display(),
                state.version
            );
        }
        let now = clock::unix_ms();
        state.block.retain(|e| !e.expired(now));
        Ok(state)
    }

    /// Writes the state atomically.
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        fs::create_dir_all(state_dir)
            .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
        let path = Self::path(state_dir);
        let tmp = state_dir.join(format!(".{STATE_FILE}.{}.tmp", std::process::id()));
        let mut state = self.clone();
        state.version = STATE_VERSION;
        let json = serde_json::to_vec_pretty(&state).context("encoding the state")?;
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(state_dir)?.sync_all()
        };
        write()
            .inspect_err(|_| {
                let _ = fs::remove_file(&tmp);
            })
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Adds or replaces the entry for `e.cidr`.
    pub fn upsert_block(&mut self, e: BlockEntry) {
        self.block.retain(|b| b.cidr != e.cidr);
        self.block.push(e);
    }

    /// Removes the entry for `cidr`; whether it was there.
    pub fn remove_block(&mut self, cidr: &Cidr) -> bool {
        let before = self.block.len();
        self.block.retain(|b| b.cidr != *cidr);
        before != self.block.len()
    }
}

mod cidr_str {
    use gateway_common::cidr::Cidr;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(c: &Cidr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(c)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| D::Error::custom(format!("{s:?}: {e}")))
    }
}

mod cidr_vec {
    use gateway_common::cidr::Cidr;
    use serde::{de::Error, ser::SerializeSeq, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[Cidr], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for c in v {
            seq.serialize_element(&c.to_string())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Cidr>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|s| {
                s.parse()
                    .map_err(|e| D::Error::custom(format!("{s:?}: {e}")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(c: &str, expires: Option<u64>) -> BlockEntry {
        BlockEntry {
            cidr: c.parse().unwrap(),
            expires_unix_ms: expires,
            cause: "manual".into(),
            comment: Some("test".into()),
            added_unix_ms: 1,
        }
    }

    #[test]
    fn round_trip_and_expiry_on_load() {
        let dir = tempdir();
        let mut s = State::load(&dir).unwrap();
        assert!(s.block.is_empty(), "a missing file is an empty state");
        s.upsert_block(entry("203.0.113.0/24", None));
        s.upsert_block(entry("2001:db8::/48", Some(clock::unix_ms() + 60_000)));
        s.upsert_block(entry("198.51.100.9", Some(1))); // long expired
        s.allow.push("10.0.0.0/8".parse().unwrap());
        s.limits.syn_rate = Some(7);
        s.save(&dir).unwrap();
        let back = State::load(&dir).unwrap();
        assert_eq!(
            back.block.len(),
            2,
            "the expired entry must be dropped: {back:?}"
        );
        assert_eq!(back.allow, s.allow);
        assert_eq!(back.limits.syn_rate, Some(7));
        assert!(!dir
            .join(format!(".{STATE_FILE}.{}.tmp", std::process::id()))
            .exists());
    }

    #[test]
    fn upsert_replaces_and_remove_reports() {
        let mut s = State::default();
        s.upsert_block(entry("203.0.113.0/24", None));
        s.upsert_block(entry("203.0.113.0/24", Some(5)));
        assert_eq!(s.block.len(), 1);
        assert_eq!(s.block[0].expires_unix_ms, Some(5));
        assert!(s.remove_block(&"203.0.113.0/24".parse().unwrap()));
        assert!(!s.remove_block(&"203.0.113.0/24".parse().unwrap()));
    }

    #[test]
    fn corrupt_file_is_an_error_not_an_empty_state() {
        let dir = tempdir();
        fs::write(State::path(&dir), "{ not json").unwrap();
        let err = format!("{:#}", State::load(&dir).unwrap_err());
        assert!(err.contains("corrupt"), "{err}");
        // And the file is left alone for the operator.
        assert_eq!(fs::read_to_string(State::path(&dir)).unwrap(), "{ not json");
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "gateway-state-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }
}

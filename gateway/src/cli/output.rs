//! Small formatting helpers shared by the commands' table output.

use std::{
    io::Write,
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use gateway_common::SourceKey;

/// A kernel source key as an address (v4-mapped keys print as IPv4).
pub fn source(key: &SourceKey) -> IpAddr {
    let v6 = Ipv6Addr::from(*key);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Remaining time as the config writes durations, rounded to seconds.
pub fn remaining(d: Option<Duration>) -> String {
    match d {
        None => "never".into(),
        Some(d) => crate::config::duration::format(Duration::from_secs(d.as_secs().max(1))),
    }
}

/// Where a command writes: the terminal, or buffers the daemon sends back
/// over the admin socket.
pub struct Io<'a> {
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
}

/// Prints rows as aligned columns; the first row is the header.
pub fn table(io: &mut Io, rows: &[Vec<String>]) -> std::io::Result<()> {
    let Some(first) = rows.first() else {
        return Ok(());
    };
    let mut widths = vec![0; first.len()];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in rows {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(&widths).enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        writeln!(io.out, "{}", line.trim_end())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_keys_print_as_ipv4() {
        let k = gateway_common::v4_mapped([192, 0, 2, 1]);
        assert_eq!(source(&k).to_string(), "192.0.2.1");
        let v6: [u8; 16] = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(source(&v6).to_string(), "2001:db8::1");
    }

    #[test]
    fn remaining_rounds_up_to_a_second() {
        assert_eq!(remaining(None), "never");
        assert_eq!(remaining(Some(Duration::from_millis(10))), "1s");
        assert_eq!(remaining(Some(Duration::from_secs(901))), "15m1s");
    }
}

//! The access log: one line per answered request on stderr, in the daemon
//! log's format (`--log-format text` or `json`), at the `access` target's
//! `info` level as `GATEWAY_LOG` filters it.
//!
//! The line is written by hand. Through tracing's formatter, its 17 fields
//! cost about 23k instructions a request (as much as proxying the request
//! itself): each field went through `fmt`'s dynamic dispatch, string
//! escaping and float printing. Here one buffer per thread is filled with
//! the same fields and written with one `write` as tracing's was.
//!
//! Durations are printed in milliseconds with microsecond precision (three
//! decimals).

use std::{
    cell::RefCell,
    io::Write as _,
    net::IpAddr,
    sync::OnceLock,
    time::{Duration, SystemTime},
};

/// How lines are written: the daemon log's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

static FORMAT: OnceLock<Format> = OnceLock::new();

/// Sets the format, once, as the daemon's logging is set up.
pub fn set_format(f: Format) {
    let _ = FORMAT.set(f);
}

/// A field's name with what goes around it in each format, joined at
/// compile time: ` name=` and `,"name":`.
#[derive(Clone, Copy)]
struct Key {
    text: &'static [u8],
    json: &'static [u8],
}

macro_rules! key {
    ($name:literal) => {
        Key {
            text: concat!(" ", $name, "=").as_bytes(),
            json: concat!(",\"", $name, "\":").as_bytes(),
        }
    };
}

/// One request's line.
pub struct Entry<'a> {
    pub request_id: &'a str,
    pub client: IpAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub key: &'a str,
    pub model: &'a str,
    pub backend: &'a str,
    pub status: u16,
    pub stream: bool,
    pub bytes: u64,
    pub ttft: Option<Duration>,
    pub duration: Duration,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub attempts: u32,
    pub group: Option<&'a str>,
    pub outcome: &'a str,
}

impl Entry<'_> {
    /// Writes the line to stderr if the `access` target is on. Where the
    /// daemon's logging was not set up (the gateway embedded, as the tests
    /// run it), it goes to whatever tracing subscriber there is instead.
    pub fn log(&self) {
        let Some(&format) = FORMAT.get() else {
            self.trace();
            return;
        };
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return;
        }
        thread_local! {
            static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
        }
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            self.write(&mut line, format, SystemTime::now());
            // As tracing's writer: one write, and a log that cannot be
            // written is not the request's failure.
            let _ = std::io::stderr().lock().write_all(&line);
        });
    }

    /// The same fields as a tracing event.
    fn trace(&self) {
        tracing::info!(
            target: "access",
            request_id = self.request_id,
            client = %self.client,
            method = self.method,
            path = self.path,
            key = self.key,
            model = self.model,
            backend = self.backend,
            status = self.status,
            stream = self.stream,
            bytes = self.bytes,
            ttft_ms = self.ttft.map(|t| t.as_secs_f64() * 1000.0),
            duration_ms = self.duration.as_secs_f64() * 1000.0,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            attempts = self.attempts,
            group = self.group,
            outcome = self.outcome,
        );
    }

    /// The line, newline included, into `out`.
    fn write(&self, out: &mut Vec<u8>, format: Format, at: SystemTime) {
        let mut w = Line { out, format };
        w.start(at);
        w.raw(key!("request_id"), self.request_id);
        let mut ip = [0u8; 45];
        let n = crate::pipeline::proxy::ip_text(self.client, &mut ip);
        w.raw_bytes(key!("client"), &ip[..n]);
        w.raw(key!("method"), self.method);
        w.raw(key!("path"), self.path);
        w.string(key!("key"), self.key);
        w.string(key!("model"), self.model);
        w.string(key!("backend"), self.backend);
        w.number(key!("status"), u64::from(self.status));
        w.bool(key!("stream"), self.stream);
        w.number(key!("bytes"), self.bytes);
        if let Some(t) = self.ttft {
            w.millis(key!("ttft_ms"), t);
        }
        w.millis(key!("duration_ms"), self.duration);
        if let Some(n) = self.prompt_tokens {
            w.number(key!("prompt_tokens"), n);
        }
        if let Some(n) = self.completion_tokens {
            w.number(key!("completion_tokens"), n);
        }
        w.number(key!("attempts"), u64::from(self.attempts));
        if let Some(g) = self.group {
            w.string(key!("group"), g);
        }
        w.string(key!("outcome"), self.outcome);
        w.end();
    }
}

/// A line being written in one of the formats.
struct Line<'a> {
    out: &'a mut Vec<u8>,
    format: Format,
}

impl Line<'_> {
    fn start(&mut self, at: SystemTime) {
        let mut ts = [0u8; 27];
        timestamp(at, &mut ts);
        match self.format {
            Format::Text => {
                self.out.extend_from_slice(&ts);
                self.out.extend_from_slice(b"  INFO access:");
            }
            Format::Json => {
                self.out.extend_from_slice(b"{\"timestamp\":\"");
                self.out.extend_from_slice(&ts);
                self.out.extend_from_slice(b"\",\"level\":\"INFO\"");
            }
        }
    }

    fn end(&mut self) {
        if self.format == Format::Json {
            self.out.extend_from_slice(b",\"target\":\"access\"}");
        }
        self.out.push(b'\n');
    }

    fn name(&mut self, name: Key) {
        self.out.extend_from_slice(match self.format {
            Format::Text => name.text,
            Format::Json => name.json,
        });
    }

    /// A value written as it is in text (an id, an address, a method, a
    /// path: none has a space or a control character), as a string in
    /// JSON.
    fn raw(&mut self, name: Key, v: &str) {
        self.raw_bytes(name, v.as_bytes());
    }

    fn raw_bytes(&mut self, name: Key, v: &[u8]) {
        self.name(name);
        match self.format {
            Format::Text => self.out.extend_from_slice(v),
            Format::Json => quoted(self.out, v, Format::Json),
        }
    }

    /// A string, quoted and escaped in both formats.
    fn string(&mut self, name: Key, v: &str) {
        self.name(name);
        quoted(self.out, v.as_bytes(), self.format);
    }

    fn number(&mut self, name: Key, n: u64) {
        self.name(name);
        let mut digits = [0u8; 20];
        self.out
            .extend_from_slice(crate::http1::decimal(n, &mut digits));
    }

    fn bool(&mut self, name: Key, b: bool) {
        self.name(name);
        self.out
            .extend_from_slice(if b { b"true" } else { b"false" });
    }

    /// Milliseconds with three decimals (microsecond precision).
    fn millis(&mut self, name: Key, d: Duration) {
        self.name(name);
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let mut digits = [0u8; 20];
        self.out
            .extend_from_slice(crate::http1::decimal(us / 1000, &mut digits));
        let frac = us % 1000;
        self.out.extend_from_slice(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
    }
}

/// `"v"` with `"`, `\` and control characters escaped: in text as Rust's
/// `Debug` escapes them (what tracing's text format printed), in JSON as
/// RFC 8259 section 7 does.
fn quoted(out: &mut Vec<u8>, v: &[u8], format: Format) {
    out.push(b'"');
    // Runs with nothing to escape (usually the whole value) go in one copy.
    let mut rest = v;
    while let Some(i) = rest
        .iter()
        .position(|&b| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f)
    {
        out.extend_from_slice(&rest[..i]);
        escape(out, rest[i], format);
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

fn escape(out: &mut Vec<u8>, b: u8, format: Format) {
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        0..0x20 if format == Format::Json => {
            out.extend_from_slice(b"\\u00");
            hex_byte(out, b);
        }
        0..0x20 | 0x7f if format == Format::Text => {
            // As `Debug` writes it: `\u{1b}`, `\u{1}`.
            out.extend_from_slice(b"\\u{");
            if b >= 0x10 {
                out.push(crate::http1::HEX_DIGITS[usize::from(b >> 4)]);
            }
            out.push(crate::http1::HEX_DIGITS[usize::from(b & 0xf)]);
            out.push(b'}');
        }
        _ => out.push(b),
    }
}

fn hex_byte(out: &mut Vec<u8>, b: u8) {
    out.push(crate::http1::HEX_DIGITS[usize::from(b >> 4)]);
    out.push(crate::http1::HEX_DIGITS[usize::from(b & 0xf)]);
}

/// `at` as RFC 3339 in UTC with microseconds, as tracing's default timer
/// prints it: `2026-12-02T08:42:07.485719Z`.
fn timestamp(at: SystemTime, out: &mut [u8; 27]) {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (y, m, d) = civil(secs / 86_400);
    let day = secs % 86_400;
    let mut put = |at: usize, n: u64, width: usize| {
        let mut n = n;
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, y, 4);
    put(5, m, 2);
    put(8, d, 2);
    put(11, day / 3600, 2);
    put(14, day / 60 % 60, 2);
    put(17, day % 60, 2);
    put(20, u64::from(since.subsec_micros()), 6);
    for (i, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (26, b'Z'),
    ] {
        out[i] = c;
    }
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            request_id: "4af684dd24e6fd7b0000000000004947",
            client: "2001:db8::7".parse().unwrap(),
            method: "POST",
            path: "/v1/chat/completions",
            key: "team \"a\"\\b\n",
            model: "llama-3",
            backend: "http://10.0.0.5:8000",
            status: 200,
            stream: true,
            bytes: 1234,
            ttft: Some(Duration::from_micros(12_345)),
            duration: Duration::from_nanos(4_598_784_123),
            prompt_tokens: Some(10),
            completion_tokens: Some(16),
            attempts: 1,
            group: None,
            outcome: "ok",
        }
    }

    fn line(e: &Entry, f: Format) -> String {
        let mut out = Vec::new();
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_664_927_485_719);
        e.write(&mut out, f, at);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn text_lines_read_as_tracing_wrote_them() {
        assert_eq!(
            line(&entry(), Format::Text),
            "2025-12-02T08:42:07.485719Z  INFO access: \
             request_id=4af684dd24e6fd7b0000000000004947 client=2001:db8::7 \
             method=POST path=/v1/chat/completions key=\"team \\\"a\\\"\\\\b\\n\" \
             model=\"llama-3\" backend=\"http://10.0.0.5:8000\" status=200 stream=true \
             bytes=1234 ttft_ms=12.345 duration_ms=4598.784 prompt_tokens=10 \
             completion_tokens=16 attempts=1 outcome=\"ok\"\n"
        );
        // What is absent is left out; a group is named.
        let mut e = entry();
        (e.ttft, e.prompt_tokens, e.completion_tokens) = (None, None, None);
        e.group = Some("canary");
        e.key = "\u{1b}[31mx\u{7f}\u{1}";
        let text = line(&e, Format::Text);
        assert!(
            !text.contains("ttft_ms") && !text.contains("tokens="),
            "{text}"
        );
        assert!(text.contains(" group=\"canary\" outcome="), "{text}");
        // Escape codes in a name do not reach a terminal or journald.
        assert!(text.contains(&format!("key={:?}", e.key)), "{text}");
        assert!(!text.bytes().any(|b| b < 0x20 && b != b'\n'), "{text:?}");
    }

    #[test]
    fn json_lines_parse_with_the_fields_typed() {
        let text = line(&entry(), Format::Json);
        assert!(text.ends_with("}\n") && text.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["timestamp"], "2025-12-02T08:42:07.485719Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "access");
        assert_eq!(v["request_id"], "4af684dd24e6fd7b0000000000004947");
        assert_eq!(v["client"], "2001:db8::7");
        assert_eq!(v["key"], "team \"a\"\\b\n");
        assert_eq!(v["status"], 200);
        assert_eq!(v["stream"], true);
        assert_eq!(v["ttft_ms"], 12.345);
        assert_eq!(v["duration_ms"], 4598.784);
        assert_eq!(v["completion_tokens"], 16);
        assert!(v.get("group").is_none());
        let mut e = entry();
        e.key = "\u{1}\u{1f}é";
        let v: serde_json::Value = serde_json::from_str(&line(&e, Format::Json)).unwrap();
        assert_eq!(v["key"], "\u{1}\u{1f}é");
    }

    #[test]
    fn timestamps_are_rfc_3339_in_utc() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400, "2000-02-29T00:00:00.000000Z"),
            (4_107_542_399, "2100-02-28T23:59:59.000000Z"),
            (1_709_251_199, "2024-02-29T23:59:59.000000Z"),
        ] {
            let mut ts = [0u8; 27];
            timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(secs), &mut ts);
            assert_eq!(std::str::from_utf8(&ts).unwrap(), want, "{secs}");
        }
        // Every day of four centuries against a day-by-day count.
        let (mut y, mut m, mut d) = (1970, 1, 1);
        for days in 0..146_097 {
            assert_eq!(civil(days), (y, m, d), "day {days}");
            let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
            let len = match m {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            d += 1;
            if d > len {
                (d, m) = (1, m + 1);
                if m > 12 {
                    (m, y) = (1, y + 1);
                }
            }
        }
    }
}

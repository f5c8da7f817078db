//! Backend responses as the HTTP/1.1 client reads them: the head parser and
//! framing never panic, and the chunked decoder hands out the same data and
//! the same verdict however the bytes are split across reads; the strict
//! decoder the client side uses accepts nothing the lenient one reads
//! differently.
#![no_main]

use gateway::upstream::h1::{inspect_head, Chunked};
use libfuzzer_sys::fuzz_target;

fn decode(c: &mut Chunked, input: &[u8], out: &mut Vec<u8>) -> Result<usize, &'static str> {
    c.decode(input, &mut |d| out.extend_from_slice(d))
}

/// Decodes `data` whole and in two reads split at a point `cut` picks;
/// both must agree. Returns what was used and the data.
fn split_agrees(
    make: fn() -> Chunked,
    data: &[u8],
    cut: u8,
) -> Result<(usize, Vec<u8>), &'static str> {
    let mut whole = make();
    let mut want = Vec::new();
    let verdict = decode(&mut whole, data, &mut want);
    if let Ok(used) = verdict {
        assert!(used <= data.len());
        assert!(
            used == data.len() || whole.is_done(),
            "stopped early without an end"
        );
    }
    let cut = (cut as usize * data.len()) / 255;
    let mut split = make();
    let mut got = Vec::new();
    let first = decode(&mut split, &data[..cut], &mut got);
    let verdict2 = match first {
        Err(e) => Err(e),
        Ok(used) if split.is_done() => Ok(used),
        Ok(used) => decode(&mut split, &data[cut..], &mut got).map(|u| used + u),
    };
    assert_eq!(verdict, verdict2, "split at {cut}");
    if verdict.is_ok() {
        assert_eq!(want, got, "split at {cut}");
        assert_eq!(whole.is_done(), split.is_done());
    }
    verdict.map(|used| (used, want))
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    if let Ok(Some(head)) = inspect_head(data) {
        assert!(head.len <= data.len());
        assert!((100..=999).contains(&head.status));
        if head.body == Some(u64::MAX) {
            assert!(
                !head.keep_alive,
                "a body that runs to the close ends the connection"
            );
        }
    }

    let lenient = split_agrees(Chunked::default, data, cut);
    // The request side's strict decoder: the same split-invariance, and
    // whatever it accepts the lenient one accepts the same way.
    let strict = split_agrees(Chunked::strict, data, cut);
    if let Ok(strict) = strict {
        assert_eq!(
            Ok(strict),
            lenient,
            "strict accepts what lenient reads otherwise"
        );
    }
});

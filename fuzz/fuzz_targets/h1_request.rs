//! Client request heads as the HTTP/1.1 server connection reads them: the
//! parser and framing never panic, a head found complete in a prefix of
//! the bytes is the same head in all of them, and a request whose body
//! framing is ambiguous is never kept alive.
#![no_main]

use gateway::listener::h1::inspect_head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let whole = inspect_head(data, 32);
    if let Ok(Some(h)) = &whole {
        assert!(h.len <= data.len());
    }
    if let Err(status) = whole {
        assert!(status == 400 || status == 431, "refused with {status}");
    }
    // The same bytes arriving in two reads: what the first read settles,
    // the whole settles the same way.
    let cut = (cut as usize * data.len()) / 255;
    match inspect_head(&data[..cut], 32) {
        Ok(Some(h)) => {
            let w = whole.expect("complete in a prefix, refused whole");
            let w = w.expect("complete in a prefix, incomplete whole");
            assert_eq!((h.len, h.body, h.keep_alive), (w.len, w.body, w.keep_alive));
        }
        Err(status) if status == 431 => {
            // Too many headers already in the prefix stays too many.
            assert_eq!(whole.err(), Some(431), "split at {cut}");
        }
        _ => {}
    }
});

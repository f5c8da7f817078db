//! Multipart forms as the audio endpoints take them: `form::inspect` must
//! not panic on any body, and a form it accepts, once its `model` is
//! renamed by `form::upstream_body`, must read back the same with the new
//! name (the rest of the body, the audio, untouched).
#![no_main]

use bytes::Bytes;
use gateway::pipeline::form::{inspect, upstream_body};
use libfuzzer_sys::fuzz_target;

/// The first byte picks the content type's spelling; the rest is the body.
const TYPES: &[&[u8]] = &[
    b"multipart/form-data; boundary=XyZ",
    b"multipart/form-data; boundary=\"a:b c\"",
    b"Multipart/Form-Data;charset=utf-8;boundary=--",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let ct = TYPES[usize::from(pick) % TYPES.len()];
    let Ok(form) = inspect(body, Some(ct)) else {
        return;
    };
    let renamed = upstream_body(Bytes::copy_from_slice(body), &form, Some("renamed/model-1"));
    let again = inspect(&renamed, Some(ct)).unwrap_or_else(|e| {
        panic!(
            "the renamed form does not read back: {e}\n{:?}",
            String::from_utf8_lossy(&renamed)
        )
    });
    assert_eq!(again.info.model, "renamed/model-1");
    assert_eq!(again.info.stream, form.info.stream);
    assert_eq!(again.info.media, form.info.media);
});

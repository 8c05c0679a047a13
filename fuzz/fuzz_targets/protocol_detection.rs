//! Protocol detection on a connection's first bytes. A decision, once made, holds
//! whatever bytes follow: detection never changes its mind as more arrives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_proxy::detect::{classify, PEEK_LIMIT};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(PEEK_LIMIT)];
    let mut decided = None;
    for end in 0..=data.len() {
        match (decided, classify(&data[..end])) {
            (None, now) => decided = now,
            (Some(before), now) => assert_eq!(now, Some(before), "detection changed its mind at byte {end}"),
        }
    }
});

//! Pack files: the framing (magic, header length) with a fixed key, and the header plaintext.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sysstate_repo::crypto::MasterKey;

fuzz_target!(|data: &[u8]| {
    let key = MasterKey::from_bytes([7; 32]);
    let _ = sysstate_repo::pack::read_header(&key, data);
    let _ = sysstate_repo::pack::decode_header_plaintext(data);
});

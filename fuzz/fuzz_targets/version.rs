//! Version manifests: framed and sealed with a fixed key, and the JSON plaintext.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sysstate_repo::crypto::MasterKey;
use sysstate_repo::version::Version;

fuzz_target!(|data: &[u8]| {
    let key = MasterKey::from_bytes([7; 32]);
    let _ = Version::decode(&key, data);
    let _ = Version::decode_plaintext(data);
});

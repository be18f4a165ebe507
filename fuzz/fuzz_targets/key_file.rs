//! Key files: the JSON decoder and the parameter checks that run before argon2id.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sysstate_repo::keys::KeyFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = KeyFile::decode(data) {
        // Unwrapping runs argon2id with the file's parameters: only try cheap ones, so the
        // fuzzer explores the parsing and checks rather than hashing.
        if key.params.memory_kib <= 64 && key.params.iterations <= 2 {
            let _ = key.unwrap_key(b"passphrase");
        }
    }
});

//! Index files: framed and sealed with a fixed key, and the plaintext decoder.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sysstate_repo::crypto::MasterKey;
use sysstate_repo::index::IndexFile;

fuzz_target!(|data: &[u8]| {
    let key = MasterKey::from_bytes([7; 32]);
    let _ = IndexFile::decode(&key, data);
    if let Ok(file) = IndexFile::decode_plaintext(data) {
        // Whatever decodes must encode and decode to the same value.
        let again = IndexFile::decode(&key, &file.encode(&key)).expect("re-encoded index decodes");
        assert_eq!(again, file);
    }
});

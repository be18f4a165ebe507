//! Trees: the decoder, its validation (no unsafe names survive) and deterministic re-encoding.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sysstate_repo::tree::{is_safe_name, Tree};

fuzz_target!(|data: &[u8]| {
    if let Ok(tree) = Tree::decode(data) {
        assert!(tree.nodes.iter().all(|n| is_safe_name(&n.name)));
        let mut again = tree.clone();
        let bytes = again.encode();
        assert_eq!(Tree::decode(&bytes).expect("re-encoded tree decodes"), tree);
    }
});

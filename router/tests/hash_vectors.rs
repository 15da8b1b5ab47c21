//! Reproduces every vector computed by Dynamo's `dynamo-kv-hashing` 1.6.1.

use kvplane_router::hash;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    tokens: Vec<u32>,
    block_size: usize,
    salt: Option<String>,
    lora_name: Option<String>,
    salt_hash: u64,
    block_hashes: Vec<u64>,
    sequence_hashes: Vec<u64>,
}

#[derive(Deserialize)]
struct Vectors {
    cases: Vec<Case>,
}

#[test]
fn every_dynamo_vector_matches() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/dynamo_chained_hash.json"
    );
    let text = std::fs::read_to_string(path).expect("read vectors");
    let vectors: Vectors = serde_json::from_str(&text).expect("parse vectors");
    assert_eq!(vectors.cases.len(), 10, "vector file changed");
    for (i, case) in vectors.cases.iter().enumerate() {
        let salt = hash::salt_hash(case.salt.as_deref(), case.lora_name.as_deref());
        assert_eq!(salt, case.salt_hash, "case {i}: salt_hash");
        let blocks = hash::block_hashes(&case.tokens, case.block_size, salt);
        assert_eq!(blocks, case.block_hashes, "case {i}: block_hashes");
        let seq = hash::sequence_hashes(&case.tokens, case.block_size, salt);
        assert_eq!(seq, case.sequence_hashes, "case {i}: sequence_hashes");
    }
}

//! vLLM KV event decoder on hand-built msgpack frames of both msgspec encodings.

use kvplane_router::Tier;
use kvplane_router::vllm::{IndexOp, VllmEvent, VllmTranslator, decode_batch};
use rmpv::Value;

fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).unwrap();
    out
}

fn ints(v: &[u64]) -> Value {
    Value::Array(v.iter().map(|&x| Value::from(x)).collect())
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(
        entries
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
    )
}

fn expected() -> Vec<VllmEvent> {
    vec![
        VllmEvent::BlockStored {
            block_hashes: vec![11, 12],
            parent_block_hash: None,
            token_ids: (0..8).collect(),
            block_size: 4,
            lora_id: None,
            medium: Some("GPU".into()),
        },
        VllmEvent::BlockStored {
            block_hashes: vec![13],
            parent_block_hash: Some(12),
            token_ids: (8..12).collect(),
            block_size: 4,
            lora_id: Some(3),
            medium: Some("CPU".into()),
        },
        VllmEvent::BlockRemoved {
            block_hashes: vec![13],
            medium: Some("CPU".into()),
        },
        VllmEvent::AllBlocksCleared,
    ]
}

#[test]
fn positional_array_form() {
    // msgspec array_like=True, tag=True: [tag, fields...]; batch [ts, events, dp_rank].
    let events = Value::Array(vec![
        Value::Array(vec![
            "BlockStored".into(),
            ints(&[11, 12]),
            Value::Nil,
            ints(&(0..8).collect::<Vec<_>>()),
            4u64.into(),
            Value::Nil,
            "GPU".into(),
            // A field a newer vLLM might append: ignored.
            Value::from("extra"),
        ]),
        Value::Array(vec![
            "BlockStored".into(),
            ints(&[13]),
            12u64.into(),
            ints(&(8..12).collect::<Vec<_>>()),
            4u64.into(),
            3u64.into(),
            "CPU".into(),
        ]),
        Value::Array(vec!["BlockRemoved".into(), ints(&[13]), "CPU".into()]),
        Value::Array(vec!["AllBlocksCleared".into()]),
        Value::Array(vec!["SomeFutureEvent".into(), 1u64.into()]),
    ]);
    let batch = Value::Array(vec![Value::F64(12.5), events, 0u64.into()]);
    let b = decode_batch(&encode(&batch)).unwrap();
    assert_eq!(b.ts, 12.5);
    assert_eq!(b.data_parallel_rank, Some(0));
    assert_eq!(b.events, expected());
    assert_eq!(b.unknown_events, 1);
}

#[test]
fn tagged_map_form_with_unknown_keys() {
    let events = Value::Array(vec![
        map(vec![
            ("type", "BlockStored".into()),
            ("block_hashes", ints(&[11, 12])),
            ("parent_block_hash", Value::Nil),
            ("token_ids", ints(&(0..8).collect::<Vec<_>>())),
            ("block_size", 4u64.into()),
            ("medium", "GPU".into()),
            ("some_new_key", Value::from(true)),
        ]),
        map(vec![
            ("block_hashes", ints(&[13])),
            ("type", "BlockStored".into()),
            ("parent_block_hash", 12u64.into()),
            ("token_ids", ints(&(8..12).collect::<Vec<_>>())),
            ("block_size", 4u64.into()),
            ("lora_id", 3u64.into()),
            ("medium", "CPU".into()),
        ]),
        map(vec![
            ("type", "BlockRemoved".into()),
            ("block_hashes", ints(&[13])),
            ("medium", "CPU".into()),
        ]),
        map(vec![("type", "AllBlocksCleared".into())]),
    ]);
    let batch = map(vec![
        ("ts", Value::F64(1.0)),
        ("events", events),
        ("unknown", Value::Nil),
    ]);
    let b = decode_batch(&encode(&batch)).unwrap();
    assert_eq!(b.events, expected());
    assert_eq!(b.data_parallel_rank, None);
}

#[test]
fn byte_hashes_and_malformed_input() {
    let ev = Value::Array(vec![
        "BlockRemoved".into(),
        Value::Array(vec![Value::Binary(vec![7; 32])]),
    ]);
    let b = decode_batch(&encode(&Value::Array(vec![
        Value::F64(0.0),
        Value::Array(vec![ev]),
    ])))
    .unwrap();
    let VllmEvent::BlockRemoved {
        block_hashes,
        medium,
    } = &b.events[0]
    else {
        panic!()
    };
    assert_eq!(block_hashes.len(), 1);
    assert_eq!(*medium, None);
    // Errors, not panics.
    assert!(decode_batch(&[0xc1]).is_err());
    assert!(decode_batch(&encode(&Value::from(5u64))).is_err());
    let bad = Value::Array(vec![
        Value::F64(0.0),
        Value::Array(vec![Value::Array(vec!["BlockStored".into(), "x".into()])]),
    ]);
    assert!(decode_batch(&encode(&bad)).is_err());
}

#[test]
fn translator_hashes_tokens_and_resolves_parents() {
    let mut tr = VllmTranslator::new(1, 4, 1 << 20);
    let ev = expected();
    let Some(IndexOp::Store {
        parent,
        hashes,
        tier,
    }) = tr.translate(&ev[0])
    else {
        panic!()
    };
    let tokens: Vec<u32> = (0..8).collect();
    assert_eq!(parent, None);
    assert_eq!(
        hashes,
        kvplane_router::hash::sequence_hashes(&tokens, 4, 1337)
    );
    assert_eq!(tier, Tier::Hbm);
    let Some(IndexOp::Store {
        parent: p2,
        tier: t2,
        ..
    }) = tr.translate(&ev[1])
    else {
        panic!()
    };
    assert_eq!(
        p2,
        Some(hashes[1]),
        "vLLM parent 12 maps to our second hash"
    );
    assert_eq!(t2, Tier::Host);
    assert!(matches!(
        tr.translate(&ev[2]),
        Some(IndexOp::Remove {
            tier: Some(Tier::Host),
            ..
        })
    ));
    assert_eq!(tr.translate(&ev[3]), Some(IndexOp::Clear));
    assert_eq!(tr.tracked_blocks(), 0);
    // A parent never seen is reported, not guessed.
    let orphan = VllmEvent::BlockStored {
        block_hashes: vec![99],
        parent_block_hash: Some(98),
        token_ids: vec![1, 2, 3, 4],
        block_size: 4,
        lora_id: None,
        medium: None,
    };
    assert_eq!(tr.translate(&orphan), None);
    assert_eq!(tr.unknown_parents, 1);
}

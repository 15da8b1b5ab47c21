//! The router service over real TCP on 127.0.0.1: publisher snapshots and resync, sequence
//! gaps, the disconnect grace period, vLLM feed, and the HTTP API's status codes.

use kvplane_router::Tier;
use kvplane_router::events::{
    Frame, KvEvent, NamespaceBlocks, PROTOCOL_VERSION, Publisher, PublisherConfig, SnapshotBlock,
    Source, WorkerBlocks, WorkerSnapshot, read_frame_body, write_frame,
};
use kvplane_router::service::{RouterService, ServiceConfig};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(grace_ms: u64) -> ServiceConfig {
    ServiceConfig {
        events_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        grace_ms,
        ..ServiceConfig::default()
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The daemon-side model: worker -> ordered chain of (hash, parent) on HBM.
type Model = Arc<Mutex<BTreeMap<u64, Vec<(u64, Option<u64>)>>>>;

fn provider(model: Model) -> kvplane_router::events::SnapshotProvider {
    Arc::new(move || {
        model
            .lock()
            .unwrap()
            .iter()
            .map(|(&worker, blocks)| WorkerBlocks {
                worker,
                namespaces: vec![NamespaceBlocks {
                    namespace: "ns".into(),
                    blocks: blocks
                        .iter()
                        .map(|&(hash, parent)| SnapshotBlock {
                            hash,
                            parent,
                            tiers: Tier::Hbm.bit(),
                        })
                        .collect(),
                }],
            })
            .collect()
    })
}

fn chain(start: u64, n: u64) -> Vec<(u64, Option<u64>)> {
    (start..start + n)
        .map(|h| (h, if h == start { None } else { Some(h - 1) }))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_snapshot_events_and_resync_after_drop() {
    let svc = RouterService::start(config(60_000)).await.unwrap();
    let state = svc.state.clone();
    let model: Model = Arc::default();
    // Worker 1 holds a chain before the router is even connected: the snapshot carries it.
    model.lock().unwrap().insert(1, chain(100, 4));
    let publisher = Publisher::start(
        PublisherConfig {
            routers: vec![svc.events_addr],
            node: "node-a".into(),
            backoff_initial_ms: 10,
            backoff_max_ms: 50,
            ..PublisherConfig::default()
        },
        provider(model.clone()),
        &tokio::runtime::Handle::current(),
    );
    let holds = |s: &kvplane_router::service::RouterState, w, h| {
        s.index
            .with_tree("ns", |t| t.holds(w, h, None))
            .unwrap_or(false)
    };
    eventually("snapshot applied", || holds(&state, 1, 103)).await;

    // Live events.
    let b = chain(200, 3);
    model.lock().unwrap().insert(2, b.clone());
    publisher.stored(2, "ns", &b, Tier::Hbm);
    eventually("stored event applied", || holds(&state, 2, 202)).await;
    publisher.removed(1, "ns", &[103], None);
    eventually("removed event applied", || !holds(&state, 1, 103)).await;
    model.lock().unwrap().get_mut(&1).unwrap().pop();

    // Drop the connection; change state while the router cannot hear about it.
    let link = publisher.link_stats(svc.events_addr).unwrap();
    let connects_before = link.connects.load(std::sync::atomic::Ordering::Relaxed);
    state.disconnect_all();
    {
        let mut m = model.lock().unwrap();
        m.remove(&2);
        m.insert(3, chain(300, 2));
    }
    publisher.cleared(2, None);
    publisher.stored(3, "ns", &chain(300, 2), Tier::Hbm);
    // After the reconnect snapshot the router converges to the daemon's state.
    eventually("reconnected and converged", || {
        link.connects.load(std::sync::atomic::Ordering::Relaxed) > connects_before
            && holds(&state, 3, 301)
            && !holds(&state, 2, 200)
            && holds(&state, 1, 102)
    })
    .await;
    assert!(!holds(&state, 1, 103));
    assert!(
        link.snapshots_sent
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    // Shutdown closes the connection: the router sees the node's workers disconnect.
    publisher.shutdown();
    eventually("publisher connection closed", || {
        state.worker_list().iter().all(|w| !w.connected)
    })
    .await;
    svc.shutdown();
}

async fn raw_client(addr: std::net::SocketAddr, source: Source) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    write_frame(
        &mut s,
        &Frame::Hello {
            node: "raw".into(),
            protocol: PROTOCOL_VERSION,
            source,
        },
    )
    .await
    .unwrap();
    s
}

fn stored(hashes: Vec<u64>, parent: Option<u64>) -> KvEvent {
    KvEvent::Stored {
        namespace: "ns".into(),
        parent,
        hashes,
        tier: Tier::Host,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_gap_requests_resync_and_grace_period_drops_worker() {
    let svc = RouterService::start(config(150)).await.unwrap();
    let state = svc.state.clone();
    let mut s = raw_client(svc.events_addr, Source::Kvplane).await;
    let snap = Frame::Snapshot {
        workers: vec![WorkerSnapshot {
            seq: 0,
            state: WorkerBlocks {
                worker: 9,
                namespaces: vec![],
            },
        }],
    };
    write_frame(&mut s, &snap).await.unwrap();
    let ev = |seq, event| Frame::Event {
        worker: 9,
        seq,
        event,
    };
    write_frame(&mut s, &ev(1, stored(vec![1, 2], None)))
        .await
        .unwrap();
    // seq 2 is lost; seq 3 must trigger a Resync and be ignored.
    write_frame(&mut s, &ev(3, stored(vec![3], Some(2))))
        .await
        .unwrap();
    let body = tokio::time::timeout(Duration::from_secs(5), read_frame_body(&mut s, 1 << 20))
        .await
        .expect("resync in time")
        .unwrap()
        .unwrap();
    assert_eq!(Frame::decode(&body).unwrap(), Frame::Resync);
    let held = |h| {
        state
            .index
            .with_tree("ns", |t| t.holds(9, h, Some(Tier::Host)))
            .unwrap()
    };
    assert!(held(2));
    assert!(!held(3), "event after a gap must not be applied");
    let w = &state.worker_list()[0];
    assert!(w.awaiting_snapshot);
    // Events keep being ignored until the snapshot arrives.
    write_frame(&mut s, &ev(4, stored(vec![4], Some(3))))
        .await
        .unwrap();
    let snap = Frame::Snapshot {
        workers: vec![WorkerSnapshot {
            seq: 4,
            state: WorkerBlocks {
                worker: 9,
                namespaces: vec![NamespaceBlocks {
                    namespace: "ns".into(),
                    blocks: (1..=4)
                        .map(|h| SnapshotBlock {
                            hash: h,
                            parent: (h > 1).then(|| h - 1),
                            tiers: Tier::Host.bit(),
                        })
                        .collect(),
                }],
            },
        }],
    };
    write_frame(&mut s, &snap).await.unwrap();
    write_frame(&mut s, &ev(5, stored(vec![5], Some(4))))
        .await
        .unwrap();
    s.flush().await.unwrap();
    eventually("snapshot and seq 5 applied", || {
        state
            .index
            .with_tree("ns", |t| (1..=5).all(|h| t.holds(9, h, Some(Tier::Host))))
            .unwrap()
    })
    .await;
    assert_eq!(state.candidates().len(), 1);

    // Disconnect: still a candidate during the grace period, gone after it.
    drop(s);
    eventually("marked disconnected", || !state.worker_list()[0].connected).await;
    assert_eq!(state.candidates().len(), 1, "kept during the grace period");
    eventually("dropped after grace", || state.candidates().is_empty()).await;
    assert_eq!(state.index.node_count(), 0, "its blocks left the index");
    svc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_feed_over_the_frame_listener() {
    use rmpv::Value;
    let svc = RouterService::start(config(60_000)).await.unwrap();
    let state = svc.state.clone();
    let mut s = raw_client(
        svc.events_addr,
        Source::Vllm {
            worker: 42,
            namespace: "llama".into(),
            block_size: 4,
        },
    )
    .await;
    let tokens: Vec<u32> = (0..8).collect();
    let stored = Value::Array(vec![
        "BlockStored".into(),
        Value::Array(vec![Value::from(1001u64), Value::from(1002u64)]),
        Value::Nil,
        Value::Array(tokens.iter().map(|&t| Value::from(t)).collect()),
        Value::from(4u64),
        Value::Nil,
        Value::from("GPU"),
    ]);
    let batch = Value::Array(vec![Value::F64(1.5), Value::Array(vec![stored])]);
    let mut payload = Vec::new();
    rmpv::encode::write_value(&mut payload, &batch).unwrap();
    let mut body = 7u64.to_be_bytes().to_vec();
    body.extend_from_slice(&payload);
    s.write_all(&(body.len() as u32).to_be_bytes())
        .await
        .unwrap();
    s.write_all(&body).await.unwrap();
    s.flush().await.unwrap();
    // The router indexes the blocks under its own token hashes: a token query finds them.
    let expected = kvplane_router::hash::sequence_hashes(&tokens, 4, 1337);
    eventually("vLLM blocks indexed", || {
        state
            .index
            .find_matches("llama", &expected)
            .first()
            .is_some_and(|o| o.worker == 42 && o.blocks == 2)
    })
    .await;
    svc.shutdown();
}

async fn http(addr: std::net::SocketAddr, raw: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_status_codes() {
    let svc = RouterService::start(config(60_000)).await.unwrap();
    let a = svc.http_addr;
    assert_eq!(
        http(a, b"GET /healthz HTTP/1.1\r\n\r\n").await,
        (200, "ok\n".into())
    );
    // No workers yet: 503 with a reason.
    let (st, body) = http(
        a,
        &post("/route", r#"{"namespace":"ns","block_hashes":[1,2]}"#),
    )
    .await;
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("no workers"));

    // Two workers via snapshot; worker 2 holds the prefix.
    let mut s = raw_client(svc.events_addr, Source::Kvplane).await;
    let tokens: Vec<u32> = (0..64).collect();
    let hashes = kvplane_router::hash::sequence_hashes(&tokens, 16, 1337);
    let blocks = |n: usize| NamespaceBlocks {
        namespace: "ns".into(),
        blocks: hashes[..n]
            .iter()
            .enumerate()
            .map(|(i, &h)| SnapshotBlock {
                hash: h,
                parent: (i > 0).then(|| hashes[i - 1]),
                tiers: Tier::Hbm.bit(),
            })
            .collect(),
    };
    let snap = Frame::Snapshot {
        workers: vec![
            WorkerSnapshot {
                seq: 0,
                state: WorkerBlocks {
                    worker: 1,
                    namespaces: vec![blocks(1)],
                },
            },
            WorkerSnapshot {
                seq: 0,
                state: WorkerBlocks {
                    worker: 2,
                    namespaces: vec![blocks(4)],
                },
            },
        ],
    };
    write_frame(&mut s, &snap).await.unwrap();
    s.flush().await.unwrap();
    let state = svc.state.clone();
    eventually("snapshot", || state.candidates().len() == 2).await;

    let body = serde_json::json!({"namespace": "ns", "token_ids": tokens}).to_string();
    let (st, resp) = http(a, &post("/route", &body)).await;
    assert_eq!(st, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["worker"], 2);
    assert_eq!(v["total_blocks"], 4);
    assert_eq!(v["scores"].as_array().unwrap().len(), 2);
    assert_eq!(v["scores"][0]["cached_hbm"], 4);

    let (st, resp) = http(a, b"GET /workers HTTP/1.1\r\n\r\n").await;
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&resp)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let (st, resp) = http(a, b"GET /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(st, 200);
    assert!(
        resp.contains("kvplane_router_route_requests_total 1"),
        "{resp}"
    );
    assert!(resp.contains("kvplane_router_index_blocks 4"), "{resp}");

    // Bad requests: 4xx with a reason.
    for (raw, want) in [
        (post("/route", "{not json"), 400),
        (post("/route", r#"{"namespace":"ns"}"#), 422),
        (
            post("/route", r#"{"token_ids":[1],"block_hashes":[1]}"#),
            422,
        ),
        (post("/route", r#"{"token_ids":[1],"block_size":0}"#), 422),
        (post("/route", r#"{"token_ids":[1],"bogus":1}"#), 400),
        (post("/nope", "{}"), 404),
        (b"DELETE /route HTTP/1.1\r\n\r\n".to_vec(), 405),
        (b"POST /route HTTP/1.1\r\n\r\n".to_vec(), 411),
        (
            b"POST /route HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n".to_vec(),
            413,
        ),
        (
            b"POST /route HTTP/1.1\r\nContent-Length: x\r\n\r\n".to_vec(),
            400,
        ),
        (
            b"POST /route HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            501,
        ),
        (b"garbage\r\n\r\n".to_vec(), 400),
        (
            [
                b"GET /healthz HTTP/1.1\r\nX: ".to_vec(),
                vec![b'a'; 20_000],
                b"\r\n\r\n".to_vec(),
            ]
            .concat(),
            431,
        ),
    ] {
        let (st, body) = http(a, &raw).await;
        assert_eq!(
            st,
            want,
            "{}: {body}",
            String::from_utf8_lossy(&raw[..raw.len().min(60)])
        );
        assert!(body.contains("error"), "reason given: {body}");
    }
    svc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_event_connections_do_not_hurt_the_router() {
    let svc = RouterService::start(config(60_000)).await.unwrap();
    let state = svc.state.clone();
    // No Hello: closed.
    let mut s = TcpStream::connect(svc.events_addr).await.unwrap();
    s.write_all(&[0, 0, 0, 3, 1, 2, 3]).await.unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    // Undecodable frame after Hello is skipped; an absurd length ends that connection only.
    let mut s = raw_client(svc.events_addr, Source::Kvplane).await;
    s.write_all(&[0, 0, 0, 2, 0xc1, 0xc1]).await.unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let _ = s.read_to_end(&mut buf).await;
    // A short vLLM frame ends that connection too.
    let mut v = raw_client(
        svc.events_addr,
        Source::Vllm {
            worker: 5,
            namespace: "x".into(),
            block_size: 16,
        },
    )
    .await;
    v.write_all(&[0, 0, 0, 1, 9]).await.unwrap();
    let _ = v.read_to_end(&mut buf).await;
    eventually("bad frames counted", || {
        state
            .metrics
            .bad_frames
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    })
    .await;
    let (st, _) = http(svc.http_addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
    assert_eq!(st, 200);
    svc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_queue_overflow_falls_back_to_a_snapshot() {
    let svc = RouterService::start(config(60_000)).await.unwrap();
    let state = svc.state.clone();
    let model: Model = Arc::default();
    model.lock().unwrap().insert(1, Vec::new());
    let publisher = Publisher::start(
        PublisherConfig {
            routers: vec![svc.events_addr],
            node: "node-q".into(),
            queue_frames: 2,
            backoff_initial_ms: 10,
            ..PublisherConfig::default()
        },
        provider(model.clone()),
        &tokio::runtime::Handle::current(),
    );
    let link = publisher.link_stats(svc.events_addr).unwrap();
    eventually("connected", || {
        link.connected.load(std::sync::atomic::Ordering::Acquire) && !state.candidates().is_empty()
    })
    .await;
    // A burst far beyond the 2-frame queue: some events are dropped, memory stays bounded,
    // and the snapshot that replaces them brings the router to the daemon's state.
    let blocks = chain(1_000, 2_000);
    for b in blocks.chunks(1) {
        model.lock().unwrap().get_mut(&1).unwrap().push(b[0]);
        publisher.stored(1, "ns", b, Tier::Hbm);
    }
    eventually("converged after overflow", || {
        state
            .index
            .with_tree("ns", |t| {
                (1_000..3_000).all(|h| t.holds(1, h, Some(Tier::Hbm)))
            })
            .unwrap_or(false)
    })
    .await;
    assert!(
        link.frames_dropped
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    assert!(
        link.snapshots_sent
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    svc.shutdown();
}

/// Whether `worker` holds block `h` of namespace "ns" on the host tier.
fn holds_on_host(state: &kvplane_router::service::RouterState, worker: u64, h: u64) -> bool {
    state
        .index
        .with_tree("ns", |t| t.holds(worker, h, Some(Tier::Host)))
        .unwrap_or(false)
}

/// The next frame `r` carries, within 5 s (`what` names it if it does not come).
async fn next_frame(r: &mut (impl tokio::io::AsyncRead + Unpin), what: &str) -> Frame {
    let body = tokio::time::timeout(Duration::from_secs(5), read_frame_body(r, 1 << 20))
        .await
        .expect(what)
        .unwrap()
        .unwrap();
    Frame::decode(&body).unwrap()
}

fn snapshot_of(worker: u64, hashes: &[u64], seq: u64) -> Frame {
    Frame::Snapshot {
        workers: vec![WorkerSnapshot {
            seq,
            state: WorkerBlocks {
                worker,
                namespaces: vec![NamespaceBlocks {
                    namespace: "ns".into(),
                    blocks: hashes
                        .iter()
                        .enumerate()
                        .map(|(i, &hash)| SnapshotBlock {
                            hash,
                            parent: (i > 0).then(|| hashes[i - 1]),
                            tiers: Tier::Host.bit(),
                        })
                        .collect(),
                }],
            },
        }],
    }
}

/// A worker id belongs to the connection that announced it while that connection lives:
/// another connection's snapshot naming it (with the highest sequence number, which
/// would have silenced the real one's events), its events and loads for it, a snapshot
/// under the same node name that leaves it out, and a vLLM feed claiming it change
/// nothing, and the owner's events still apply. Before, each of these rewrote, wiped or
/// silenced the victim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_connection_cannot_rewrite_or_silence_a_live_workers_blocks() {
    use std::sync::atomic::Ordering::Relaxed;
    let svc = RouterService::start(config(60_000)).await.unwrap();
    let state = svc.state.clone();
    let held = |h| holds_on_host(&state, 9, h);
    let mut owner = raw_client(svc.events_addr, Source::Kvplane).await;
    write_frame(&mut owner, &snapshot_of(9, &[1, 2, 3], 0))
        .await
        .unwrap();
    eventually("the owner's snapshot", || held(3)).await;

    // Same node name ("raw"), as any client may claim.
    let mut spoof = raw_client(svc.events_addr, Source::Kvplane).await;
    write_frame(&mut spoof, &snapshot_of(9, &[], u64::MAX))
        .await
        .unwrap();
    write_frame(&mut spoof, &snapshot_of(10, &[7], 0))
        .await
        .unwrap();
    let removed = KvEvent::Removed {
        namespace: "ns".into(),
        hashes: vec![1, 2, 3],
        tier: Some(Tier::Host),
    };
    let event = Frame::Event {
        worker: 9,
        seq: 1,
        event: removed,
    };
    write_frame(&mut spoof, &event).await.unwrap();
    let load = Frame::Load {
        worker: 9,
        active_requests: 0,
        decode_blocks: u64::MAX,
    };
    write_frame(&mut spoof, &load).await.unwrap();
    let mut vllm = raw_client(
        svc.events_addr,
        Source::Vllm {
            worker: 9,
            namespace: "ns".into(),
            block_size: 16,
        },
    )
    .await;
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), vllm.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "a vLLM feed claiming a live worker is closed"
    );
    eventually("the spoofed frames seen", || {
        state.metrics.frames_foreign_worker.load(Relaxed) >= 4
    })
    .await;
    // The spoofer's own worker 10 is in; its frames are all behind it.
    eventually("the spoofer's own snapshot", || {
        holds_on_host(&state, 10, 7)
    })
    .await;
    assert!((1..=3).all(held), "the owner's blocks are untouched");
    let w9 = state
        .worker_list()
        .into_iter()
        .find(|w| w.worker == 9)
        .unwrap();
    assert_eq!(w9.decode_blocks, 0, "the spoofed load is ignored");
    // The owner's next event still applies (its sequence was not pushed to u64::MAX).
    let event = Frame::Event {
        worker: 9,
        seq: 1,
        event: stored(vec![4], Some(3)),
    };
    write_frame(&mut owner, &event).await.unwrap();
    eventually("the owner's event", || held(4)).await;
    svc.shutdown();
}

/// At most `max_event_connections` event connections: one more is closed at once; a
/// connection that sends no Hello within `hello_timeout_ms` is closed, which frees its
/// place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_connections_are_capped_and_must_say_hello_in_time() {
    use std::sync::atomic::Ordering::Relaxed;
    let svc = RouterService::start(ServiceConfig {
        max_event_connections: 2,
        hello_timeout_ms: 300,
        ..config(60_000)
    })
    .await
    .unwrap();
    let state = svc.state.clone();
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(TcpStream::connect(svc.events_addr).await.unwrap());
        let n = idle.len() as u64;
        eventually("accepted", || state.metrics.connections.load(Relaxed) == n).await;
    }
    let t0 = Instant::now();
    let mut third = TcpStream::connect(svc.events_addr).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut buf))
        .await
        .expect("the third connection is closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // Refused, not timed out: the counter below says which; the bound only keeps a
    // loaded machine from failing it.
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(state.metrics.connections_refused.load(Relaxed), 1);
    // The silent two are closed after the Hello timeout.
    for s in &mut idle {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("a connection without a Hello is closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    // (Accepted after `started`, each closed 300 ms after its accept.)
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    // Their places are free again: a publisher connects and its snapshot lands.
    let mut s = raw_client(svc.events_addr, Source::Kvplane).await;
    write_frame(&mut s, &snapshot_of(3, &[1], 0)).await.unwrap();
    eventually("a worker after the idle ones left", || {
        state.worker_list().iter().any(|w| w.worker == 3)
    })
    .await;
    svc.shutdown();
}

/// Connections that have not sent their Hello hold places of their own: past
/// `max_pending_event_connections` (in all, or from one address) a new one is closed at
/// once, while connections past their Hello do not count against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_before_their_hello_are_capped_in_all_and_per_address() {
    use std::sync::atomic::Ordering::Relaxed;
    for (all, per_ip) in [(2, 100), (100, 2)] {
        let svc = RouterService::start(ServiceConfig {
            hello_timeout_ms: 2_000,
            max_pending_event_connections: all,
            max_pending_event_connections_per_ip: per_ip,
            ..config(60_000)
        })
        .await
        .unwrap();
        let state = svc.state.clone();
        // Two publishers past their Hello do not count.
        let mut publishers = Vec::new();
        for w in [1, 2] {
            let mut s = raw_client(svc.events_addr, Source::Kvplane).await;
            write_frame(&mut s, &snapshot_of(w, &[w], 0)).await.unwrap();
            publishers.push(s);
            eventually("a publisher's worker", || {
                state.worker_list().iter().any(|x| x.worker == w)
            })
            .await;
        }
        let mut silent = Vec::new();
        for _ in 0..2 {
            silent.push(TcpStream::connect(svc.events_addr).await.unwrap());
            let n = 2 + silent.len() as u64;
            eventually("accepted", || state.metrics.connections.load(Relaxed) == n).await;
        }
        let mut third = TcpStream::connect(svc.events_addr).await.unwrap();
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_millis(1_500), third.read_to_end(&mut buf))
            .await
            .expect("closed at once, well before the 2 s Hello timeout")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert_eq!(
            state.metrics.connections_refused.load(Relaxed),
            1,
            "all {all}, per address {per_ip}"
        );
        // One of the silent two says Hello: its place is free for the next.
        write_frame(
            &mut silent[0],
            &Frame::Hello {
                node: "late".into(),
                protocol: PROTOCOL_VERSION,
                source: Source::Kvplane,
            },
        )
        .await
        .unwrap();
        write_frame(&mut silent[0], &snapshot_of(3, &[3], 0))
            .await
            .unwrap();
        eventually("the late publisher's worker", || {
            state.worker_list().iter().any(|x| x.worker == 3)
        })
        .await;
        let mut next = raw_client(svc.events_addr, Source::Kvplane).await;
        write_frame(&mut next, &snapshot_of(4, &[4], 0))
            .await
            .unwrap();
        eventually("a connection in the freed place", || {
            state.worker_list().iter().any(|x| x.worker == 4)
        })
        .await;
        assert_eq!(state.metrics.connections_refused.load(Relaxed), 1);
        svc.shutdown();
    }
}

/// A router that accepts and then never reads: the publisher's writes time out
/// (`write_timeout_ms`) and it reconnects, and while it waits the frames it queues stay
/// under `queue_bytes` (the rest dropped, a snapshot scheduled). Before, the write
/// blocked for as long as the router lived, with up to `queue_frames` frames of any
/// size queued behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_stops_reading_costs_the_publisher_a_bounded_queue_and_a_reconnect() {
    use std::sync::atomic::Ordering::Relaxed;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let keep = held.clone();
    let accept = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            keep.lock().unwrap().push(s); // never read
        }
    });
    let model: Model = Arc::default();
    model.lock().unwrap().insert(1, Vec::new());
    let publisher = Publisher::start(
        PublisherConfig {
            routers: vec![addr],
            node: "node-stuck".into(),
            queue_bytes: 1 << 20,
            write_timeout_ms: 300,
            backoff_initial_ms: 10,
            ..PublisherConfig::default()
        },
        provider(model),
        &tokio::runtime::Handle::current(),
    );
    let link = publisher.link_stats(addr).unwrap();
    eventually("connected", || link.connected.load(Relaxed)).await;
    // 4,096-block chains, ~40 KB a frame, until the socket buffers are full and a write
    // times out.
    let t0 = Instant::now();
    let mut start = 0u64;
    while link.connects.load(Relaxed) < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the publisher never gave up on the stuck router"
        );
        publisher.stored(1, "ns", &chain(start, 4096), Tier::Hbm);
        start += 4096;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        link.frames_dropped.load(Relaxed) > 0,
        "the byte budget dropped frames"
    );
    eventually("a snapshot on the new connection", || {
        link.snapshots_sent.load(Relaxed) >= 2
    })
    .await;
    publisher.shutdown();
    accept.abort();
}

/// A peer that asks for a Resync in a loop gets at most one snapshot per
/// `min_snapshot_interval_ms`: each costs the daemon a walk of its registry under the lock
/// every session waits on. It used to get one per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_requests_in_a_loop_get_at_most_one_snapshot_per_interval() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let model: Model = Arc::default();
    model.lock().unwrap().insert(1, chain(1, 8));
    let publisher = Publisher::start(
        PublisherConfig {
            routers: vec![addr],
            node: "node-resync".into(),
            min_snapshot_interval_ms: 500,
            ..PublisherConfig::default()
        },
        provider(model),
        &tokio::runtime::Handle::current(),
    );
    let (s, _) = listener.accept().await.unwrap();
    let (mut r, mut w) = s.into_split();
    let asker = tokio::spawn(async move {
        for _ in 0..200 {
            if write_frame(&mut w, &Frame::Resync).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let t0 = Instant::now();
    let mut snapshots = 0;
    while t0.elapsed() < Duration::from_millis(1_200) {
        let left = Duration::from_millis(1_200).saturating_sub(t0.elapsed());
        let Ok(Ok(Some(body))) = tokio::time::timeout(left, read_frame_body(&mut r, 1 << 20)).await
        else {
            break;
        };
        if matches!(Frame::decode(&body), Ok(Frame::SnapshotBegin { .. })) {
            snapshots += 1;
        }
    }
    // The connect snapshot, then at most one per 500 ms of a 1.2 s window of requests.
    assert!(
        (2..=4).contains(&snapshots),
        "{snapshots} snapshots for ~200 Resyncs in 1.2 s"
    );
    asker.abort();
    publisher.shutdown();
}

/// Frames in flight share `max_frame_memory_bytes`, charged at what decoding them may
/// take: while one connection's 1 MiB frame (8 MiB decoded, the whole budget here) is
/// still arriving, another's 100 KB snapshot waits, and lands once the first is done. A
/// vLLM frame over 16 MiB ends its connection. Before, every connection could hold and
/// decode a 256 MiB frame at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_in_flight_share_one_memory_budget() {
    let svc = RouterService::start(ServiceConfig {
        max_frame_memory_bytes: 8 << 20,
        ..config(60_000)
    })
    .await
    .unwrap();
    let state = svc.state.clone();
    let mut big = raw_client(svc.events_addr, Source::Kvplane).await;
    big.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
    big.write_all(&[0xc1; 10]).await.unwrap();
    big.flush().await.unwrap();
    eventually("the big frame holds the whole budget", || {
        state.frame_memory_free_mib() == 0
    })
    .await;
    let hashes: Vec<u64> = (1..=4_000).map(|h| h << 40).collect();
    let mut small = raw_client(svc.events_addr, Source::Kvplane).await;
    let snapshot = snapshot_of(5, &hashes, 0);
    assert!(snapshot.encode().unwrap().len() > 64 << 10);
    write_frame(&mut small, &snapshot).await.unwrap();
    small.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !state.worker_list().iter().any(|w| w.worker == 5),
        "the second frame was read while the first held the whole budget"
    );
    big.write_all(&vec![0xc1; (1 << 20) - 10]).await.unwrap();
    big.flush().await.unwrap();
    eventually("the second frame once the first is done", || {
        state.worker_list().iter().any(|w| w.worker == 5)
    })
    .await;

    let mut vllm = raw_client(
        svc.events_addr,
        Source::Vllm {
            worker: 6,
            namespace: "ns".into(),
            block_size: 16,
        },
    )
    .await;
    vllm.write_all(&((16u32 << 20) + 1).to_be_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), vllm.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "a vLLM frame over 16 MiB ends its connection"
    );
    svc.shutdown();
}

/// A daemon that reconnects before the router has seen its old connection close (a
/// half-open socket after a partition): the new connection's snapshot is refused while
/// the old one lives, and once it closes the new one is asked for a snapshot, which
/// takes the worker; an event for a worker whose connection is gone asks for one too.
/// Before, the new connection's events and snapshot were ignored for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnected_daemon_takes_its_worker_back_once_the_old_link_closes() {
    let svc = RouterService::start(config(60_000)).await.unwrap();
    let state = svc.state.clone();
    let held = |h| holds_on_host(&state, 9, h);
    let mut old = raw_client(svc.events_addr, Source::Kvplane).await;
    write_frame(&mut old, &snapshot_of(9, &[1], 0))
        .await
        .unwrap();
    eventually("the old link's snapshot", || held(1)).await;
    let mut new = raw_client(svc.events_addr, Source::Kvplane).await;
    write_frame(&mut new, &snapshot_of(9, &[1, 2], 5))
        .await
        .unwrap();
    eventually("the new link's claim refused", || {
        state
            .metrics
            .frames_foreign_worker
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    })
    .await;
    assert!(!held(2));
    drop(old);
    assert_eq!(
        next_frame(&mut new, "a Resync once the old link closed").await,
        Frame::Resync
    );
    write_frame(&mut new, &snapshot_of(9, &[1, 2], 5))
        .await
        .unwrap();
    eventually("the new link's snapshot", || held(2)).await;
    let event = Frame::Event {
        worker: 9,
        seq: 6,
        event: stored(vec![3], Some(2)),
    };
    write_frame(&mut new, &event).await.unwrap();
    eventually("the new link's event", || held(3)).await;

    // An event naming a worker whose link is gone asks for a snapshot.
    let mut third = raw_client(svc.events_addr, Source::Kvplane).await;
    drop(new);
    eventually("the second link closed", || {
        !state
            .worker_list()
            .iter()
            .any(|w| w.worker == 9 && w.connected)
    })
    .await;
    let event = Frame::Event {
        worker: 9,
        seq: 7,
        event: stored(vec![4], Some(3)),
    };
    write_frame(&mut third, &event).await.unwrap();
    assert_eq!(
        next_frame(&mut third, "a Resync for a worker whose link is gone").await,
        Frame::Resync
    );
    svc.shutdown();
}

/// The publisher's Hello leaves at once, not with the snapshot: a snapshot slow to build
/// (here 1 s) must not make the router close the link for a missing Hello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publishers_hello_is_not_held_back_by_its_snapshot() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let slow: kvplane_router::events::SnapshotProvider = Arc::new(|| {
        std::thread::sleep(Duration::from_millis(1_000));
        Vec::new()
    });
    // The publisher on a runtime of its own, as in the daemon: the provider blocks its
    // thread, which on this test's runtime could hold up the reading task too.
    let publisher_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let publisher = Publisher::start(
        PublisherConfig {
            routers: vec![addr],
            node: "node-slow".into(),
            ..PublisherConfig::default()
        },
        slow,
        publisher_rt.handle(),
    );
    let (mut s, _) = listener.accept().await.unwrap();
    let t0 = Instant::now();
    assert!(matches!(
        next_frame(&mut s, "a frame").await,
        Frame::Hello { .. }
    ));
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "the Hello came {:?} after the accept",
        t0.elapsed()
    );
    publisher.shutdown();
    publisher_rt.shutdown_background();
}

/// A frame that cannot get room in the frame budget ends its own connection after
/// waiting 10 s, and a peer that took room and then sends its frame no further is cut
/// off once its body is late (10 s plus 1 s per 4 MiB), rather than either waiting, or
/// holding up every other connection's large frames, for good. The budget is whole
/// again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_stalls_or_cannot_get_room_ends_its_connection_in_bounded_time() {
    let svc = RouterService::start(ServiceConfig {
        max_frame_memory_bytes: 8 << 20,
        ..config(60_000)
    })
    .await
    .unwrap();
    let state = svc.state.clone();
    let t0 = Instant::now();
    let mut stalled = raw_client(svc.events_addr, Source::Kvplane).await;
    // 8 MiB: its body is late after 10 + 2 s, after the other frame's 10 s wait.
    stalled
        .write_all(&(8u32 << 20).to_be_bytes())
        .await
        .unwrap();
    stalled.write_all(&[0xc1; 10]).await.unwrap();
    stalled.flush().await.unwrap();
    eventually("the stalled frame holds the whole budget", || {
        state.frame_memory_free_mib() == 0
    })
    .await;
    let mut waiting = raw_client(svc.events_addr, Source::Kvplane).await;
    let hashes: Vec<u64> = (1..=4_000).map(|h| h << 40).collect();
    write_frame(&mut waiting, &snapshot_of(5, &hashes, 0))
        .await
        .unwrap();
    waiting.flush().await.unwrap();
    let mut buf = Vec::new();
    for (s, what) in [
        (&mut waiting, "waiting for room"),
        (&mut stalled, "stalled"),
    ] {
        let closed = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "the {what} connection was never closed");
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(20),
        "closed after {took:?}"
    );
    eventually("the budget whole again", || {
        state.frame_memory_free_mib() == 8
    })
    .await;
    assert!(!state.worker_list().iter().any(|w| w.worker == 5));
    svc.shutdown();
}

/// A provider of `workers` x 2 namespaces x `n` blocks, chains of 350 on host.
fn big_provider(workers: &[u64], n: u64) -> kvplane_router::events::SnapshotProvider {
    let workers = workers.to_vec();
    Arc::new(move || {
        workers
            .iter()
            .map(|&worker| WorkerBlocks {
                worker,
                namespaces: ["ns", "other"]
                    .iter()
                    .map(|ns| NamespaceBlocks {
                        namespace: (*ns).into(),
                        blocks: (0..n)
                            .map(|i| {
                                let hash = (worker << 32) | i;
                                SnapshotBlock {
                                    hash,
                                    parent: (i % 350 != 0).then(|| hash - 1),
                                    tiers: Tier::Host.bit(),
                                }
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect()
    })
}

/// A snapshot goes in frames of at most `snapshot_chunk_blocks` blocks (it used to be one
/// frame of at most 256 MiB, ~6 M blocks: a fuller daemon could not sync a router over
/// TCP), the frames carry every block once, and a router takes them whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_goes_in_frames_of_bounded_size_and_lands_whole() {
    // A listener standing in for the router sees the frames.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let chunked = |routers| PublisherConfig {
        routers,
        node: "big".into(),
        backoff_initial_ms: 10,
        backoff_max_ms: 50,
        snapshot_chunk_blocks: 100,
        ..PublisherConfig::default()
    };
    let p = Publisher::start(
        chunked(vec![addr]),
        big_provider(&[1, 2], 1_050),
        &tokio::runtime::Handle::current(),
    );
    let (mut s, _) = listener.accept().await.unwrap();
    assert!(matches!(
        next_frame(&mut s, "hello").await,
        Frame::Hello { protocol: 2, .. }
    ));
    match next_frame(&mut s, "snapshot begin").await {
        Frame::SnapshotBegin { workers } => {
            let ids: Vec<u64> = workers.iter().map(|w| w.worker).collect();
            assert_eq!(ids, vec![1, 2]);
        }
        other => panic!("expected SnapshotBegin, got {other:?}"),
    }
    let mut got: BTreeMap<(u64, String), Vec<u64>> = BTreeMap::new();
    let mut frames = 0;
    loop {
        match next_frame(&mut s, "snapshot blocks").await {
            Frame::SnapshotBlocks {
                worker,
                namespace,
                blocks,
            } => {
                assert!(
                    !blocks.is_empty() && blocks.len() <= 100,
                    "{}",
                    blocks.len()
                );
                frames += 1;
                got.entry((worker, namespace))
                    .or_default()
                    .extend(blocks.iter().map(|b| b.hash));
            }
            Frame::SnapshotEnd => break,
            other => panic!("expected SnapshotBlocks or SnapshotEnd, got {other:?}"),
        }
    }
    assert_eq!(frames, 2 * 2 * 11, "1,050 blocks in frames of 100");
    for w in [1u64, 2] {
        for ns in ["ns", "other"] {
            let want: Vec<u64> = (0..1_050).map(|i| (w << 32) | i).collect();
            assert_eq!(got[&(w, ns.to_string())], want, "worker {w} {ns}");
        }
    }
    p.shutdown();

    // A router takes such a snapshot whole, and the events after it.
    let svc = RouterService::start(config(60_000)).await.unwrap();
    let state = svc.state.clone();
    let p = Publisher::start(
        chunked(vec![svc.events_addr]),
        big_provider(&[1, 2], 1_050),
        &tokio::runtime::Handle::current(),
    );
    let holds = |w: u64, ns: &str, i: u64| {
        state
            .index
            .with_tree(ns, |t| t.holds(w, (w << 32) | i, None))
            .unwrap_or(false)
    };
    eventually("every block of the chunked snapshot, and its end", || {
        [1u64, 2].iter().all(|&w| {
            ["ns", "other"].iter().all(|ns| {
                [0, 99, 100, 349, 350, 1_049]
                    .iter()
                    .all(|&i| holds(w, ns, i))
            })
        }) && state
            .worker_list()
            .iter()
            .all(|w| !w.awaiting_snapshot && w.connected)
    })
    .await;
    p.stored(
        1,
        "ns",
        &[((1 << 32) | 5_000, Some((1 << 32) | 1_049))],
        Tier::Host,
    );
    eventually("an event after the chunked snapshot", || {
        holds(1, "ns", 5_000)
    })
    .await;
    p.shutdown();
    svc.shutdown();
}

/// A snapshot cut short (its connection gone before `SnapshotEnd`) leaves its workers
/// waiting for the next one, ignoring events meanwhile; blocks for a worker the snapshot
/// did not begin are ignored and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_cut_short_leaves_its_workers_waiting_for_the_next() {
    use kvplane_router::events::WorkerSeq;
    use std::sync::atomic::Ordering::Relaxed;
    let svc = RouterService::start(config(60_000)).await.unwrap();
    let state = svc.state.clone();
    let blocks = |hashes: &[u64]| -> Vec<SnapshotBlock> {
        hashes
            .iter()
            .map(|&hash| SnapshotBlock {
                hash,
                parent: (hash > 1).then(|| hash - 1),
                tiers: Tier::Host.bit(),
            })
            .collect()
    };
    let part = |worker, hashes: &[u64]| Frame::SnapshotBlocks {
        worker,
        namespace: "ns".into(),
        blocks: blocks(hashes),
    };
    let holds = |h| {
        state
            .index
            .with_tree("ns", |t| t.holds(9, h, None))
            .unwrap_or(false)
    };
    let mut s = raw_client(svc.events_addr, Source::Kvplane).await;
    let begin = |seq| Frame::SnapshotBegin {
        workers: vec![WorkerSeq { worker: 9, seq }],
    };
    // Worker 9's event `seq`, storing block `hash` after `hash - 1`.
    let event = |seq, hash: u64| Frame::Event {
        worker: 9,
        seq,
        event: stored(vec![hash], Some(hash - 1)),
    };
    write_frame(&mut s, &begin(5)).await.unwrap();
    write_frame(&mut s, &part(9, &[1, 2])).await.unwrap();
    write_frame(&mut s, &part(10, &[7])).await.unwrap();
    write_frame(&mut s, &event(6, 3)).await.unwrap();
    eventually("the blocks sent so far", || holds(2)).await;
    eventually("the frames read", || {
        state.metrics.frames.load(Relaxed) >= 5
    })
    .await;
    drop(s);
    eventually("the connection gone", || {
        state.worker_list().iter().all(|w| !w.connected)
    })
    .await;
    let w = state
        .worker_list()
        .into_iter()
        .find(|w| w.worker == 9)
        .unwrap();
    assert!(w.awaiting_snapshot, "a snapshot cut short is not current");
    assert!(!holds(3), "an event during the snapshot was applied");
    assert!(state.worker_list().iter().all(|w| w.worker != 10));
    assert!(state.metrics.frames_foreign_worker.load(Relaxed) >= 1);

    // The next connection's whole snapshot makes it current; its events apply again.
    let mut s = raw_client(svc.events_addr, Source::Kvplane).await;
    write_frame(&mut s, &begin(6)).await.unwrap();
    write_frame(&mut s, &part(9, &[1, 2, 3])).await.unwrap();
    write_frame(&mut s, &Frame::SnapshotEnd).await.unwrap();
    write_frame(&mut s, &event(7, 4)).await.unwrap();
    eventually("current again, and the next event applied", || holds(4)).await;
    let w = state
        .worker_list()
        .into_iter()
        .find(|w| w.worker == 9)
        .unwrap();
    assert!(!w.awaiting_snapshot && w.last_seq == 7, "{w:?}");
    svc.shutdown();
}

/// A snapshot listing more workers than `max_workers_per_connection` ends its
/// connection and registers none of them (each would cost the router a worker entry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_too_many_workers_ends_its_connection() {
    use kvplane_router::events::WorkerSeq;
    let svc = RouterService::start(ServiceConfig {
        max_workers_per_connection: 4,
        ..config(60_000)
    })
    .await
    .unwrap();
    let state = svc.state.clone();
    let mut s = raw_client(svc.events_addr, Source::Kvplane).await;
    let workers = (1..=5).map(|worker| WorkerSeq { worker, seq: 0 }).collect();
    write_frame(&mut s, &Frame::SnapshotBegin { workers })
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the connection is ended")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(state.worker_list().is_empty());
    // Four are fine.
    let mut s = raw_client(svc.events_addr, Source::Kvplane).await;
    let workers = (1..=4).map(|worker| WorkerSeq { worker, seq: 0 }).collect();
    write_frame(&mut s, &Frame::SnapshotBegin { workers })
        .await
        .unwrap();
    write_frame(&mut s, &Frame::SnapshotEnd).await.unwrap();
    eventually("four workers", || state.worker_list().len() == 4).await;
    svc.shutdown();
}

//! Metrics: the Prometheus text rendering the control server serves on `GET /metrics`,
//! read from the data plane's sink (`crate::metrics`) on the control thread (formatting,
//! the block manager's stats under its lock); the control plane never writes there.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use kvplane_ffi::Opcode;

use super::access::View;
use crate::block::{BlockStats, Tier};
use crate::metrics::opcode_name;
use crate::session::SessionSummary;

/// The data plane's sink, re-exported under the names the control plane has always used.
pub use crate::metrics::{
    DataPlaneMetrics, InFlight, LATENCY_BUCKETS_US, LatencyHistogram, Link, NamespaceLookups,
};

/// The daemon-wide counters the session layer keeps (copied out of `dataplane::Counters`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SessionCounters {
    pub sessions_active: u64,
    pub sessions_total: u64,
    pub sessions_reclaimed: u64,
    pub protocol_violations: u64,
    /// Sessions ended because a copy faulted in the engine's own KV buffer.
    pub engine_memory_faults: u64,
    /// Sessions ended because serving them panicked (a daemon bug).
    pub sessions_panicked: u64,
    /// Data-plane thread panics outside an operation (each ended that thread's sessions).
    pub dataplane_thread_panics: u64,
    /// Engine KV buffers mapped now (against `serve.max_mapped_bytes`).
    pub engine_mapped_bytes: u64,
    /// Mappings of engines' host KV regions held now (against `serve.max_engine_mappings`).
    pub engine_mappings: u32,
    pub ops_completed: u64,
    pub ops_failed: u64,
}

/// Everything one scrape renders, gathered on the control thread.
pub struct Scrape<'a> {
    pub blocks: Option<&'a BlockStats>,
    pub metrics: &'a DataPlaneMetrics,
    pub counters: &'a SessionCounters,
    pub sessions: &'a [SessionSummary],
    /// Global namespace id -> name.
    pub namespace_names: &'a BTreeMap<u32, String>,
    pub uptime_s: f64,
    /// The data-plane device (`/status` `device`).
    pub device: &'a super::admin::DeviceStatus,
    /// The NATS publisher's counters (absent without `events.nats_url`).
    pub nats: Option<&'a kvplane_router::nats::NatsPublisherStats>,
    /// Each router of `events.routers` and its link's counters.
    pub routers: &'a [(std::net::SocketAddr, Arc<kvplane_router::events::LinkStats>)],
    /// Who asks: namespace-labelled series are rendered only for namespaces it may see
    /// (`sessions` is already filtered).
    pub view: &'a View,
}

/// Label value escaping per the Prometheus text format.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);
impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", esc(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// Prometheus text exposition (format 0.0.4) of one scrape.
pub fn render(s: &Scrape<'_>) -> String {
    let mut o = Out(String::with_capacity(16 << 10));
    o.family(
        "kvplane_build_info",
        "gauge",
        "Version and device backend (value 1).",
    );
    o.sample(
        "kvplane_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("backend", &s.device.backend),
        ],
        1,
    );
    o.family(
        "kvplane_device_info",
        "gauge",
        "The data-plane device (value 1): the backend in use and the [device] backend \
         configured (auto falls back to host without a usable GPU; /status says why).",
    );
    o.sample(
        "kvplane_device_info",
        &[("backend", &s.device.backend), ("choice", &s.device.choice)],
        1,
    );
    o.family(
        "kvplane_gpus",
        "gauge",
        "GPUs NVML lists on this machine (0 without an NVIDIA driver).",
    );
    o.sample("kvplane_gpus", &[], s.device.gpus.len());
    o.family(
        "kvplane_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
    );
    o.sample("kvplane_uptime_seconds", &[], format!("{:.3}", s.uptime_s));
    o.family(
        "kvplane_tenant_fds_closing",
        "gauge",
        "Descriptors engines sent that wait for the closer thread (one whose close blocks \
         holds up the rest; attaches take in nothing more while it is behind).",
    );
    o.sample(
        "kvplane_tenant_fds_closing",
        &[],
        kvplane_shm::sys::untrusted_fds_backlog(),
    );
    o.family(
        "kvplane_tenant_fds_leaked_total",
        "counter",
        "Descriptors engines sent that were left open because the closer's queue was full.",
    );
    o.sample(
        "kvplane_tenant_fds_leaked_total",
        &[],
        kvplane_shm::sys::untrusted_fds_leaked(),
    );

    if let Some(b) = s.blocks {
        o.family("kvplane_block_bytes", "gauge", "Bytes of one KV block.");
        o.sample("kvplane_block_bytes", &[], b.block_bytes);
        o.family(
            "kvplane_blocks",
            "gauge",
            "Distinct blocks stored in any tier.",
        );
        o.sample("kvplane_blocks", &[], b.blocks);
        o.family(
            "kvplane_tier_capacity_blocks",
            "gauge",
            "Block slots of each tier.",
        );
        for t in &b.tiers {
            o.sample(
                "kvplane_tier_capacity_blocks",
                &[("tier", t.tier.name())],
                t.capacity_slots,
            );
        }
        o.family("kvplane_tier_blocks", "gauge", "Blocks held by each tier.");
        for t in &b.tiers {
            o.sample(
                "kvplane_tier_blocks",
                &[("tier", t.tier.name())],
                t.used_slots,
            );
        }
        o.family(
            "kvplane_tier_capacity_bytes",
            "gauge",
            "Block bytes each tier can hold.",
        );
        for t in &b.tiers {
            let v = t.capacity_slots as u64 * b.block_bytes as u64;
            o.sample("kvplane_tier_capacity_bytes", &[("tier", t.tier.name())], v);
        }
        o.family(
            "kvplane_tier_used_bytes",
            "gauge",
            "Block bytes held by each tier.",
        );
        for t in &b.tiers {
            let v = t.used_slots as u64 * b.block_bytes as u64;
            o.sample("kvplane_tier_used_bytes", &[("tier", t.tier.name())], v);
        }
        o.family(
            "kvplane_tier_removals_total",
            "counter",
            "Blocks removed from a tier, by reason (evicted, demoted, dropped, ...).",
        );
        for t in &b.tiers {
            for (reason, n) in &t.removed {
                o.sample(
                    "kvplane_tier_removals_total",
                    &[("tier", t.tier.name()), ("reason", reason)],
                    n,
                );
            }
        }
        let quota_namespaces: Vec<_> = b
            .namespaces
            .iter()
            .filter(|q| s.view.sees_namespace(&q.name))
            .collect();
        if !quota_namespaces.is_empty() {
            o.family(
                "kvplane_namespace_blocks",
                "gauge",
                "Blocks a namespace with a quota holds in each tier.",
            );
            for q in &quota_namespaces {
                for t in Tier::ALL {
                    o.sample(
                        "kvplane_namespace_blocks",
                        &[("namespace", &q.name), ("tier", t.name())],
                        q.used_slots[t],
                    );
                }
            }
            o.family(
                "kvplane_namespace_quota_blocks",
                "gauge",
                "A namespace's quota in each tier, in blocks (tiers without a limit are absent).",
            );
            for q in &quota_namespaces {
                for t in Tier::ALL {
                    if let Some(max) = q.max_slots[t] {
                        o.sample(
                            "kvplane_namespace_quota_blocks",
                            &[("namespace", &q.name), ("tier", t.name())],
                            max,
                        );
                    }
                }
            }
        }
        o.family(
            "kvplane_registry_lookup_blocks_total",
            "counter",
            "Registry lookups, in blocks, all namespaces (hit = found in some tier).",
        );
        o.sample(
            "kvplane_registry_lookup_blocks_total",
            &[("result", "hit")],
            b.lookup_hits,
        );
        o.sample(
            "kvplane_registry_lookup_blocks_total",
            &[("result", "miss")],
            b.lookup_misses,
        );
        o.family(
            "kvplane_blocks_saved_total",
            "counter",
            "Blocks newly stored by saves.",
        );
        o.sample("kvplane_blocks_saved_total", &[], b.saves_stored);
        o.family(
            "kvplane_blocks_loaded_total",
            "counter",
            "Blocks handed to engines by loads.",
        );
        o.sample("kvplane_blocks_loaded_total", &[], b.loads_served);
        o.family(
            "kvplane_nvme_errors_total",
            "counter",
            "NVMe failures, by kind.",
        );
        o.sample(
            "kvplane_nvme_errors_total",
            &[("kind", "write")],
            b.nvme_write_errors,
        );
        o.sample(
            "kvplane_nvme_errors_total",
            &[("kind", "read")],
            b.nvme_read_errors,
        );
        o.sample(
            "kvplane_nvme_errors_total",
            &[("kind", "corrupt")],
            b.nvme_corrupt_dropped,
        );
        o.family(
            "kvplane_nvme_scan_slots",
            "gauge",
            "Slots found by the start-up NVMe scan, by outcome.",
        );
        o.sample(
            "kvplane_nvme_scan_slots",
            &[("outcome", "valid")],
            b.nvme_scan_valid,
        );
        o.sample(
            "kvplane_nvme_scan_slots",
            &[("outcome", "corrupt")],
            b.nvme_scan_corrupt,
        );
        o.sample(
            "kvplane_nvme_scan_slots",
            &[("outcome", "duplicate")],
            b.nvme_scan_duplicates,
        );
        o.family(
            "kvplane_events_dropped_total",
            "counter",
            "Block events dropped (full channel).",
        );
        o.sample("kvplane_events_dropped_total", &[], b.events_dropped);
    }

    if !s.routers.is_empty() {
        type Get = fn(&kvplane_router::events::LinkStats) -> u64;
        let families: [(&str, &str, &str, Get); 6] = [
            (
                "kvplane_router_link_connected",
                "gauge",
                "1 while the event connection to this router is up.",
                |l| u64::from(l.connected.load(Ordering::Relaxed)),
            ),
            (
                "kvplane_router_link_connects_total",
                "counter",
                "Event connections to this router established (TLS handshake included).",
                |l| l.connects.load(Ordering::Relaxed),
            ),
            (
                "kvplane_router_link_snapshots_total",
                "counter",
                "Full snapshots sent to this router (each (re)connect, each Resync or overflow).",
                |l| l.snapshots_sent.load(Ordering::Relaxed),
            ),
            (
                "kvplane_router_link_frames_sent_total",
                "counter",
                "Event frames sent to this router.",
                |l| l.frames_sent.load(Ordering::Relaxed),
            ),
            (
                "kvplane_router_link_frames_dropped_total",
                "counter",
                "Event frames dropped from this router's full queue (a snapshot follows).",
                |l| l.frames_dropped.load(Ordering::Relaxed),
            ),
            (
                "kvplane_router_link_tls_failures_total",
                "counter",
                "TLS failures with this router: its certificate not trusted, or ours refused.",
                |l| l.tls_failures.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, get) in families {
            o.family(name, kind, help);
            for (addr, link) in s.routers {
                o.sample(name, &[("router", &addr.to_string())], get(link));
            }
        }
    }

    if let Some(n) = s.nats {
        let flag = |b: &std::sync::atomic::AtomicBool| u64::from(b.load(Ordering::Relaxed));
        for (name, kind, help, value) in [
            (
                "kvplane_nats_published_total",
                "counter",
                "KV event messages JetStream acknowledged (snapshot messages included).",
                n.published.load(Ordering::Relaxed),
            ),
            (
                "kvplane_nats_dropped_total",
                "counter",
                "KV changes dropped from the full NATS queue (a full re-publication follows).",
                n.dropped.load(Ordering::Relaxed),
            ),
            (
                "kvplane_nats_snapshots_total",
                "counter",
                "Full re-publications of this worker (start-up and after each overflow).",
                n.snapshots.load(Ordering::Relaxed),
            ),
            (
                "kvplane_nats_publish_errors_total",
                "counter",
                "Failed NATS publish attempts (each is retried).",
                n.publish_errors.load(Ordering::Relaxed),
            ),
            (
                "kvplane_nats_healthy",
                "gauge",
                "1 if the last NATS publish attempt succeeded.",
                flag(&n.healthy),
            ),
            (
                "kvplane_nats_connected",
                "gauge",
                "1 while the connection to NATS is up (0: away, or refused: the log says why).",
                flag(&n.connected),
            ),
        ] {
            o.family(name, kind, help);
            o.sample(name, &[], value);
        }
    }

    o.family(
        "kvplane_lookup_blocks_total",
        "counter",
        "Blocks asked for by engine lookups, per namespace: hits by the tier that holds them, misses.",
    );
    for (ns, l) in &s.metrics.lookups() {
        let fallback = format!("0x{ns:08x}");
        let name = s
            .namespace_names
            .get(ns)
            .map(String::as_str)
            .unwrap_or(&fallback);
        if !s.view.sees_namespace(name) {
            continue;
        }
        for t in Tier::ALL {
            let v = l.hits[t];
            o.sample(
                "kvplane_lookup_blocks_total",
                &[("namespace", name), ("tier", t.name()), ("result", "hit")],
                v,
            );
        }
        o.sample(
            "kvplane_lookup_blocks_total",
            &[("namespace", name), ("tier", "none"), ("result", "miss")],
            l.misses,
        );
    }

    o.family(
        "kvplane_link_bytes_total",
        "counter",
        "Block bytes moved over each link.",
    );
    for link in Link::ALL {
        o.sample(
            "kvplane_link_bytes_total",
            &[("link", link.name())],
            s.metrics.link_bytes(link),
        );
    }

    o.family(
        "kvplane_ops_in_flight",
        "gauge",
        "Ring operations the data plane is executing now (its queue depth).",
    );
    o.sample(
        "kvplane_ops_in_flight",
        &[],
        s.metrics.in_flight.load(Ordering::Relaxed),
    );
    o.family(
        "kvplane_ops_total",
        "counter",
        "Ring operations completed, by result.",
    );
    o.sample(
        "kvplane_ops_total",
        &[("result", "ok")],
        s.counters.ops_completed,
    );
    o.sample(
        "kvplane_ops_total",
        &[("result", "error")],
        s.counters.ops_failed,
    );

    o.family(
        "kvplane_op_duration_seconds",
        "histogram",
        "Time the data plane spent on one ring operation, by opcode.",
    );
    for &op in Opcode::ALL {
        let h = s.metrics.op_latency(op);
        if h.count() == 0 {
            continue;
        }
        let (cumulative, sum_s, count) = h.snapshot();
        let name = opcode_name(op);
        for (i, c) in cumulative.iter().enumerate() {
            let le = match LATENCY_BUCKETS_US.get(i) {
                Some(us) => format!("{}", *us as f64 / 1e6),
                None => "+Inf".to_string(),
            };
            o.sample(
                "kvplane_op_duration_seconds_bucket",
                &[("op", name), ("le", &le)],
                c,
            );
        }
        o.sample(
            "kvplane_op_duration_seconds_sum",
            &[("op", name)],
            format!("{sum_s:.9}"),
        );
        o.sample("kvplane_op_duration_seconds_count", &[("op", name)], count);
    }

    o.family("kvplane_sessions", "gauge", "Engine sessions attached now.");
    o.sample("kvplane_sessions", &[], s.counters.sessions_active);
    o.family(
        "kvplane_sessions_total",
        "counter",
        "Engine sessions ever attached.",
    );
    o.sample("kvplane_sessions_total", &[], s.counters.sessions_total);
    o.family(
        "kvplane_sessions_reclaimed_total",
        "counter",
        "Sessions whose engine died (leases reclaimed).",
    );
    o.sample(
        "kvplane_sessions_reclaimed_total",
        &[],
        s.counters.sessions_reclaimed,
    );
    o.family(
        "kvplane_protocol_violations_total",
        "counter",
        "Sessions ended for a malformed ring or segment.",
    );
    o.sample(
        "kvplane_protocol_violations_total",
        &[],
        s.counters.protocol_violations,
    );
    o.family(
        "kvplane_engine_memory_faults_total",
        "counter",
        "Sessions ended because a copy faulted in the engine's own KV buffer.",
    );
    o.sample(
        "kvplane_engine_memory_faults_total",
        &[],
        s.counters.engine_memory_faults,
    );
    o.family(
        "kvplane_sessions_panicked_total",
        "counter",
        "Sessions ended because serving them panicked (a daemon bug; see the error log).",
    );
    o.sample(
        "kvplane_sessions_panicked_total",
        &[],
        s.counters.sessions_panicked,
    );
    o.family(
        "kvplane_dataplane_thread_panics_total",
        "counter",
        "Data-plane thread panics outside an operation; each ended that thread's sessions.",
    );
    o.sample(
        "kvplane_dataplane_thread_panics_total",
        &[],
        s.counters.dataplane_thread_panics,
    );
    o.family(
        "kvplane_engine_mapped_bytes",
        "gauge",
        "Bytes of engine KV buffers the daemon maps now.",
    );
    o.sample(
        "kvplane_engine_mapped_bytes",
        &[],
        s.counters.engine_mapped_bytes,
    );
    o.family(
        "kvplane_engine_mappings",
        "gauge",
        "Mappings the daemon holds for engines' host KV regions now (regions and the gaps between them).",
    );
    o.sample("kvplane_engine_mappings", &[], s.counters.engine_mappings);
    o.family(
        "kvplane_session_info",
        "gauge",
        "One series per attached session (value 1).",
    );
    for sess in s.sessions {
        let id = sess.session_id.to_string();
        let pid = sess.pid.to_string();
        let uid = sess.uid.to_string();
        let ns = sess.namespaces.join(",");
        o.sample(
            "kvplane_session_info",
            &[
                ("session", &id),
                ("pid", &pid),
                ("uid", &uid),
                ("namespaces", &ns),
            ],
            1,
        );
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// `auto` on a machine with no driver: the host backend, no GPUs.
    fn host_fallback() -> super::super::admin::DeviceStatus {
        super::super::admin::DeviceStatus {
            backend: "host".into(),
            choice: "auto".into(),
            ordinal: 0,
            fallback_reason: Some("no NVIDIA driver".into()),
            describe: "host backend".into(),
            gpus: Vec::new(),
            gpu_note: Some("no NVIDIA driver".into()),
            nvme_g1_path: crate::tier::NvmeG1Path::decide(
                crate::tier::nvme::DirectToG1::Auto,
                kvplane_cuda::BackendKind::Host,
                true,
            )
            .unwrap()
            .describe,
        }
    }

    #[test]
    fn render_names_units_and_escapes_labels() {
        let m = DataPlaneMetrics::default();
        m.record_op(Opcode::Save, Duration::from_micros(40));
        m.add_link_bytes(Link::EngineToHost, 4096);
        m.record_lookup(7, &[Some(Tier::Host), Some(Tier::Nvme), None], 2, 3);
        let names = BTreeMap::from([(7u32, "a\"b".to_string())]);
        let counters = SessionCounters {
            sessions_active: 1,
            ..Default::default()
        };
        let link = Arc::new(kvplane_router::events::LinkStats::default());
        link.connected
            .store(true, std::sync::atomic::Ordering::Relaxed);
        link.tls_failures
            .store(3, std::sync::atomic::Ordering::Relaxed);
        let routers = [("10.0.0.5:7470".parse().unwrap(), link)];
        let text = render(&Scrape {
            blocks: None,
            metrics: &m,
            counters: &counters,
            sessions: &[],
            namespace_names: &names,
            uptime_s: 1.0,
            device: &host_fallback(),
            nats: None,
            routers: &routers,
            view: &View::All,
        });
        assert!(
            text.contains("kvplane_link_bytes_total{link=\"engine_to_host\"} 4096\n"),
            "{text}"
        );
        assert!(
            text.contains("kvplane_router_link_connected{router=\"10.0.0.5:7470\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kvplane_router_link_tls_failures_total{router=\"10.0.0.5:7470\"} 3\n"),
            "{text}"
        );
        assert!(text.contains(
            "kvplane_lookup_blocks_total{namespace=\"a\\\"b\",tier=\"nvme\",result=\"hit\"} 1\n"
        ));
        assert!(text.contains(
            "kvplane_lookup_blocks_total{namespace=\"a\\\"b\",tier=\"none\",result=\"miss\"} 1\n"
        ));
        assert!(
            text.contains("kvplane_op_duration_seconds_bucket{op=\"save\",le=\"0.00005\"} 1\n")
        );
        assert!(text.contains("kvplane_op_duration_seconds_bucket{op=\"save\",le=\"+Inf\"} 1\n"));
        assert!(text.contains("kvplane_op_duration_seconds_count{op=\"save\"} 1\n"));
        assert!(
            !text.contains("op=\"load\""),
            "empty histograms are not rendered"
        );
        assert!(text.contains("kvplane_sessions 1\n"));
        assert!(text.contains("kvplane_build_info{version=\""), "{text}");
        assert!(
            text.contains("kvplane_device_info{backend=\"host\",choice=\"auto\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("kvplane_gpus 0\n"), "{text}");
        // Every sample line belongs to a declared family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {name} "))
                    || text.contains(&format!("# TYPE {base} ")),
                "{line}"
            );
        }
    }

    #[test]
    fn views_hide_other_namespaces_and_sessions() {
        let m = DataPlaneMetrics::default();
        m.record_lookup(1, &[Some(Tier::Host)], 1, 1);
        m.record_lookup(2, &[Some(Tier::Host)], 1, 1);
        let names = BTreeMap::from([(1u32, "mine".to_string()), (2u32, "theirs".to_string())]);
        let session = |uid: u32, ns: &str| SessionSummary {
            session_id: u64::from(uid),
            pid: 100 + uid as i32,
            uid,
            namespaces: vec![ns.into()],
            queue_pairs: 1,
        };
        let all = [session(7, "mine"), session(8, "theirs")];
        let counters = SessionCounters::default();
        let render_as = |view: &View| {
            let sessions: Vec<SessionSummary> = all
                .iter()
                .filter(|s| view.sees_session(s))
                .cloned()
                .collect();
            render(&Scrape {
                blocks: None,
                metrics: &m,
                counters: &counters,
                sessions: &sessions,
                namespace_names: &names,
                uptime_s: 1.0,
                device: &host_fallback(),
                nats: None,
                routers: &[],
                view,
            })
        };
        let tenant = View::Tenant {
            uid: 7,
            namespaces: ["mine".to_string()].into(),
        };
        let text = render_as(&tenant);
        assert!(text.contains("namespace=\"mine\""), "{text}");
        assert!(
            !text.contains("theirs") && !text.contains("uid=\"8\""),
            "{text}"
        );
        assert!(text.contains("uid=\"7\""), "{text}");
        let text = render_as(&View::Aggregate);
        assert!(
            !text.contains("namespace=") && !text.contains("uid="),
            "{text}"
        );
        assert!(
            text.contains("kvplane_link_bytes_total"),
            "aggregates stay: {text}"
        );
        let text = render_as(&View::All);
        assert!(
            text.contains("theirs") && text.contains("uid=\"8\""),
            "{text}"
        );
    }
}

//! How long registry lookups take on Redis: `discover`, `discover_pattern` and `get` (the
//! lookup behind `locate`), beside the raw redis-rs command each one is built on, in the
//! same run.
//!
//! Run: `cargo run --release --features redis --example redis_registry_bench`
//! (options: `-- --machines N --types N --iters N`; Redis from `SWITCHYARD_REDIS_URL`,
//! default `redis://127.0.0.1:6379/`). It registers N machines over a few types in a
//! namespace of its own (timing each `register`), measures each call closed-loop with an
//! HDR histogram, prints p50/p99/p99.9/max in µs and the ratio ours/raw at p50, then
//! removes its keys.
//!
//! A sender does none of these per message: routes are cached until the registry says the
//! target left (see `tests/redis_registry.rs`, `steady_state_sends_do_no_redis_round_trip`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use switchyard::redis::{RedisConfig, RedisRegistry};
use switchyard::{MachineEntry, MachineId, Registry};

struct Args {
    machines: usize,
    types: usize,
    iters: usize,
}

fn args() -> Args {
    let mut a = Args {
        machines: 200,
        types: 8,
        iters: 5_000,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i + 1 < v.len() {
        let n: usize = match v[i + 1].parse() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("`{} {}`: expected a positive number", v[i], v[i + 1]);
                std::process::exit(2);
            }
        };
        match v[i].as_str() {
            "--machines" => a.machines = n,
            "--types" => a.types = n,
            "--iters" => a.iters = n,
            other => {
                eprintln!("unknown option {other}; use --machines N --types N --iters N");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    a
}

struct Stats {
    name: &'static str,
    h: Histogram<u64>,
}

impl Stats {
    fn new(name: &'static str) -> Stats {
        Stats {
            name,
            h: Histogram::new(3).expect("3 significant digits is a valid histogram"),
        }
    }
    fn record(&mut self, d: Duration) {
        let _ = self
            .h
            .record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }
    fn us(&self, q: f64) -> f64 {
        self.h.value_at_quantile(q) as f64 / 1000.0
    }
    fn print(&self, raw: Option<&Stats>) {
        let ratio = raw.map_or(String::new(), |r| {
            format!("  ours/raw p50 {:.2}", self.us(0.5) / r.us(0.5))
        });
        println!(
            "{:<36} p50 {:>8.1}  p99 {:>8.1}  p99.9 {:>8.1}  max {:>8.1} µs{ratio}",
            self.name,
            self.us(0.5),
            self.us(0.99),
            self.us(0.999),
            self.h.max() as f64 / 1000.0,
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let ns = format!("sy-bench-reg-{}", std::process::id());
    let cfg = RedisConfig::from_env().namespace(&ns);
    println!(
        "command: cargo run --release --features redis --example redis_registry_bench -- \
         --machines {} --types {} --iters {}",
        a.machines, a.types, a.iters
    );
    println!(
        "server {}, {} machines over {} types, {} calls each, closed loop, one client task",
        cfg.redacted_url(),
        a.machines,
        a.types,
        a.iters
    );
    let reg = match RedisRegistry::connect(cfg.clone()).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let mut ids = Vec::with_capacity(a.machines);
    // Includes hearing its own `joined` event back on the subscription.
    let mut reg_stats = Stats::new("register (until its event is heard)");
    for i in 0..a.machines {
        let mut metadata = BTreeMap::new();
        metadata.insert(
            "sy.zmq.router".to_string(),
            "tcp://10.0.0.7:41234".to_string(),
        );
        let e = MachineEntry {
            id: MachineId::from(""),
            machine_type: format!("Service_{}", i % a.types).into(),
            host_id: "bench-host".into(),
            process_id: "bench-proc".into(),
            context: None,
            version: Some("1.0.0".into()),
            accepts: vec!["PING".into()],
            metadata,
        };
        let s = Instant::now();
        let r = reg.register(e).await;
        reg_stats.record(s.elapsed());
        match r {
            Ok(e) => ids.push(e.id),
            Err(e) => {
                eprintln!("register failed: {e}");
                std::process::exit(1);
            }
        }
    }
    let mut raw = match redis::Client::open(cfg.url.as_str()) {
        Ok(c) => match c.get_multiplexed_async_connection().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("raw connection failed: {e}");
                std::process::exit(1);
            }
        },
        Err(e) => {
            eprintln!("bad URL: {e}");
            std::process::exit(1);
        }
    };
    let prefix = reg.key_prefix().to_string();
    let mut get = Stats::new("get (locate)");
    let mut raw_get = Stats::new("raw HGETALL");
    let mut disc = Stats::new("discover (1 type)");
    let mut raw_disc = Stats::new("raw ZRANGE + pipelined HGETALLs");
    let mut pat = Stats::new("discover_pattern (\"service_1*\")");
    let before = reg.round_trips();
    for i in 0..a.iters {
        let id = &ids[i % ids.len()];
        let t = format!("Service_{}", i % a.types);

        let s = Instant::now();
        let _ = std::hint::black_box(reg.get(id).await);
        get.record(s.elapsed());

        let s = Instant::now();
        let r: redis::RedisResult<BTreeMap<String, String>> = redis::cmd("HGETALL")
            .arg(format!("{prefix}m:{id}"))
            .query_async(&mut raw)
            .await;
        let _ = std::hint::black_box(r);
        raw_get.record(s.elapsed());

        let s = Instant::now();
        let _ = std::hint::black_box(reg.discover(&t).await);
        disc.record(s.elapsed());

        let s = Instant::now();
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("{prefix}type:{t}"))
            .arg(0)
            .arg(-1)
            .query_async(&mut raw)
            .await
            .unwrap_or_default();
        let mut p = redis::pipe();
        for m in &members {
            p.cmd("HGETALL").arg(format!("{prefix}m:{m}"));
        }
        let r: redis::RedisResult<Vec<BTreeMap<String, String>>> = p.query_async(&mut raw).await;
        let _ = std::hint::black_box(r);
        raw_disc.record(s.elapsed());

        let s = Instant::now();
        let _ = std::hint::black_box(reg.discover_pattern("service_1*").await);
        pat.record(s.elapsed());
    }
    let per_round = (reg.round_trips() - before) as f64 / a.iters as f64;
    get.print(Some(&raw_get));
    raw_get.print(None);
    disc.print(Some(&raw_disc));
    raw_disc.print(None);
    pat.print(None);
    reg_stats.print(None);
    println!(
        "round trips per round of (get, discover, discover_pattern): {per_round:.2} \
         (1 + 1 + 2 expected)"
    );
    for id in &ids {
        let _ = reg.deregister(id).await;
    }
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:*"))
        .query_async(&mut raw)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query_async(&mut raw).await;
    }
}

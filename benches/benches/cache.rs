//! Registration cache: hit lookup, invalidation of one range among 100k entries, and
//! free-to-invalidated latency through the host backend's notices. Also (issue 13) hits among
//! 100k page-strided entries of ONE domain, by domain (`lookup`) and by address (`lookup_at`,
//! the `Bridge::register` hit path without the NIC; `bridge_reg --hits` measures the bridge
//! itself on an RDMA device).
//!
//! `cargo bench -p p2pbridge-benches --bench cache`. Targets (issue 4): hit lookup <= 50 ns
//! median; invalidation among 100k entries <= 2 us. These measure the cache and the notice
//! path (no NIC): cold registration, which is the NIC's cost, is in `bridge_reg`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use p2pbridge::cache::{CachePolicy, Cost, Domain, RegCache};
use p2pbridge::gpu::{AllocationKey, BackendKind, HostBackend, MemoryBackend};

const N: u64 = 100_000;

fn key(id: u64) -> Domain {
    Domain::Alloc(AllocationKey { backend: BackendKind::Cuda, device: 0, id })
}

/// 100k entries: 1000 allocations x 100 disjoint 64 KiB registrations, plus host VA ones.
fn full_cache() -> RegCache<u64> {
    let c = RegCache::new(CachePolicy {
        max_entries: 2 * N as usize,
        max_bytes: u64::MAX,
        merge: false,
        ..CachePolicy::default()
    });
    for i in 0..N {
        let (alloc, slot) = (i / 100, i % 100);
        let start = 0x7f00_0000_0000 + slot * 0x2_0000;
        c.insert(key(alloc), start..start + 0x1_0000, 7, Cost::Unpinned, i).unwrap();
    }
    c
}

/// 100k 4 KiB entries at a 2-page stride in one allocation, declared for lookups by address.
fn one_domain() -> (RegCache<u64>, Domain, u64) {
    let c = RegCache::new(CachePolicy { max_entries: 2 * N as usize, max_bytes: u64::MAX, ..CachePolicy::default() });
    let (d, base) = (key(1_000_000), 0x7e00_0000_0000u64);
    for i in 0..N {
        let start = base + i * 8192;
        c.insert(d, start..start + 4096, 7, Cost::Pinned, i).unwrap();
    }
    c.declare(d, base..base + N * 8192);
    (c, d, base)
}

fn benches(c: &mut Criterion) {
    let (one, d, base) = one_domain();
    let mut rng = p2pbridge_test_support::Rng(0x9e37_79b9_7f4a_7c15);
    c.bench_function("cache hit lookup, random entry of 100k in one domain", |b| {
        b.iter(|| {
            let start = base + rng.below(N) * 8192;
            black_box(one.lookup(d, black_box(start..start + 4096), 7))
        })
    });
    c.bench_function("cache hit lookup_at (by address), random entry of 100k in one domain", |b| {
        b.iter(|| {
            let start = base + rng.below(N) * 8192;
            black_box(one.lookup_at(black_box(start..start + 4096), 7))
        })
    });
    drop(one);
    let cache = full_cache();
    let hot = 0x7f00_0000_0000 + 42 * 0x2_0000 + 4096;
    c.bench_function("cache hit lookup, hot entry (100k entries)", |b| {
        b.iter(|| black_box(cache.lookup(key(777), black_box(hot..hot + 8192), 3)))
    });
    let mut i = 0u64;
    c.bench_function("cache hit lookup, random entry of 100k", |b| {
        b.iter(|| {
            i = (i + 7919) % N;
            let start = 0x7f00_0000_0000 + (i % 100) * 0x2_0000 + 4096;
            black_box(cache.lookup(key(i / 100), start..start + 8192, 3))
        })
    });

    c.bench_function("invalidate one range among 100k entries", |b| {
        let cache = full_cache();
        let mut j = 0u64;
        b.iter_batched(
            || {
                // Put back what the previous iteration removed, outside the timed part.
                j = (j + 7919) % N;
                let start = 0x7f00_0000_0000 + (j % 100) * 0x2_0000;
                let _ = cache.insert(key(j / 100), start..start + 0x1_0000, 7, Cost::Unpinned, j);
                (key(j / 100), start)
            },
            |(d, start)| black_box(cache.remove_overlapping(d, start..start + 0x1_0000).len()),
            BatchSize::SmallInput,
        )
    });

    c.bench_function("free-to-invalidated (host backend notice + cache invalidation)", |b| {
        let host = HostBackend::new();
        let cache = Arc::new(RegCache::<u64>::new(CachePolicy::default()));
        b.iter_batched(
            || {
                let buf = host.alloc(65_536).unwrap();
                let d = Domain::Alloc(buf.key());
                cache.insert(d, buf.addr()..buf.addr() + buf.len(), 7, Cost::Unpinned, 0).unwrap();
                let c2 = cache.clone();
                let sub = host.notices().subscribe(buf.key(), 0..buf.len(), move |n| {
                    drop(c2.remove_overlapping(Domain::Alloc(n.key), 0..u64::MAX));
                    n.ack();
                });
                (buf, sub)
            },
            |(buf, sub)| {
                drop(buf); // notice -> invalidate -> ack -> munmap
                sub
            },
            BatchSize::SmallInput,
        )
    });
}

/// The criterion group (the macro defines an undocumented `pub fn cache`).
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group! {
        name = cache;
        config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
        targets = benches
    }
}
criterion_main!(group::cache);

//! Hit rates of the ranker's history cache under three eviction policies at equal byte budgets,
//! replayed on the same key streams: the exact least-recently-used map the cache was before
//! (copied here), `quick_cache` with its default options, and [`HistoryCache`] as it is now
//! (`quick_cache`, half the bytes protected, a longer memory of evicted keys).
//!
//! The stream is `llamarec traffic synth`'s: each request from a user drawn uniformly from the
//! data set's users (the arrival times do not matter to a cache without expiry, only the order).
//! A request may first append the user's next real event (`new-event share`, the share of
//! requests that carry one), which changes the user's history and so its cache key. Histories
//! start at half of each user's sequence and advance through the rest; a user whose sequence is
//! used up gets no more events. A second draw, users weighted by their number of ratings, checks
//! skewed traffic. An entry's size is the real KV state of its `[prefix][history]` prompt part,
//! tokenized with the model's tokenizer and the `alpaca` template, with the gateway's 20 history
//! titles: tokens × layers × 2 × kv heads × head dim × 4 bytes (f32), from the model's config.
//! Each row is the mean over `--seeds` streams (seeds `--first-seed`, `--first-seed` + 1, ...).
//!
//! ```text
//! cargo run --release --locked -p ranker-service --example history_cache_policies -- \
//!     [--requests 50000] [--seeds 3] [--first-seed 1] [--assets assets] [--model assets/models/SmolLM2-135M-Instruct.Q4_1.gguf]
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::rc::Rc;

use llamarec_common::data::{DataConfig, Dataset};
use llamarec_common::rng::Rng;
use ranker_service::history_cache::{history_key, HistoryCache};
use ranker_service::{GgufFile, LlamaConfig, PromptRenderer, PromptTemplate, Tokenizer};

/// History titles the gateway sends (`[gateway] prompt_history`).
const PROMPT_HISTORY: usize = 20;

/// The exact LRU the ranker's history cache was before it moved onto `quick_cache`: a hash map
/// plus a `last_used -> key` ordered map, evicting the least recently used entry first; a value
/// larger than the whole capacity is not cached.
struct ExactLru {
    capacity: usize,
    used: usize,
    clock: u64,
    slots: HashMap<u64, (Rc<[u32]>, usize, u64)>,
    order: BTreeMap<u64, u64>,
}

impl ExactLru {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            used: 0,
            clock: 0,
            slots: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    fn get(&mut self, key: u64, ids: &[u32]) -> bool {
        self.clock += 1;
        let Some(slot) = self.slots.get_mut(&key).filter(|s| *s.0 == *ids) else {
            return false;
        };
        self.order.remove(&slot.2);
        slot.2 = self.clock;
        self.order.insert(self.clock, key);
        true
    }

    fn insert(&mut self, key: u64, ids: Rc<[u32]>, bytes: usize) {
        if bytes > self.capacity {
            return;
        }
        if let Some(old) = self.slots.remove(&key) {
            self.order.remove(&old.2);
            self.used -= old.1;
        }
        while self.used + bytes > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(old) = self.slots.remove(&oldest) {
                self.used -= old.1;
            }
        }
        self.clock += 1;
        self.order.insert(self.clock, key);
        self.used += bytes;
        self.slots.insert(key, (ids, bytes, self.clock));
    }
}

#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<u64, (Rc<[u32]>, usize)> for ByBytes {
    fn weight(&self, _key: &u64, entry: &(Rc<[u32]>, usize)) -> u64 {
        entry.1.max(1) as u64
    }
}

const POLICIES: [&str; 3] = [
    "exact LRU (before)",
    "quick_cache, default options",
    "HistoryCache (quick_cache, as configured)",
];

enum Policy {
    Lru(ExactLru),
    QuickDefaults(quick_cache::unsync::Cache<u64, (Rc<[u32]>, usize), ByBytes>),
    Configured(HistoryCache<()>),
}

impl Policy {
    fn all(budget: usize, typical_entry: usize) -> [Self; 3] {
        [
            Self::Lru(ExactLru::new(budget)),
            Self::QuickDefaults(quick_cache::unsync::Cache::with_weighter(
                (budget / typical_entry).max(1),
                budget as u64,
                ByBytes,
            )),
            Self::Configured(HistoryCache::with_typical_entry(budget, typical_entry)),
        ]
    }

    fn get(&mut self, key: u64, ids: &[u32]) -> bool {
        match self {
            Self::Lru(c) => c.get(key, ids),
            Self::QuickDefaults(c) => c.get(&key).is_some_and(|e| *e.0 == *ids),
            Self::Configured(c) => c.get(key, ids).is_some(),
        }
    }

    fn insert(&mut self, key: u64, ids: &Rc<[u32]>, bytes: usize) {
        match self {
            Self::Lru(c) => c.insert(key, ids.clone(), bytes),
            Self::QuickDefaults(c) => c.insert(key, (ids.clone(), bytes)),
            Self::Configured(c) => c.insert(key, ids, (), bytes),
        }
    }

    fn used(&self) -> usize {
        match self {
            Self::Lru(c) => c.used,
            Self::QuickDefaults(c) => c.weight() as usize,
            Self::Configured(c) => c.used_bytes(),
        }
    }
}

/// One request of a stream: its history part's ids (what the key hashes) and the tokens and
/// bytes of its `[prefix][history]` state.
struct Lookup {
    key: u64,
    ids: Rc<[u32]>,
    tokens: usize,
    bytes: usize,
}

struct Args {
    requests: usize,
    seeds: u64,
    first_seed: u64,
    assets: PathBuf,
    model: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        requests: 50_000,
        seeds: 3,
        first_seed: 1,
        assets: "assets".into(),
        model: "assets/models/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--requests" => a.requests = value.parse().expect("--requests"),
            "--seeds" => a.seeds = value.parse().expect("--seeds"),
            "--first-seed" => a.first_seed = value.parse().expect("--first-seed"),
            "--assets" => a.assets = value.into(),
            "--model" => a.model = value.into(),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(
        a.requests > 0 && a.seeds > 0,
        "--requests and --seeds must be > 0"
    );
    a
}

fn describe(name: &str, tokens: &mut [usize], bytes_per_token: usize) {
    tokens.sort_unstable();
    let mean = tokens.iter().sum::<usize>() as f64 / tokens.len() as f64;
    println!(
        "- {name}: [prefix][history] {mean:.0} tokens on average (min {}, median {}, max {}), {:.1} MiB; \
         all users together {:.1} GiB",
        tokens[0],
        tokens[tokens.len() / 2],
        tokens[tokens.len() - 1],
        mean * bytes_per_token as f64 / (1u64 << 20) as f64,
        tokens.iter().sum::<usize>() as f64 * bytes_per_token as f64 / (1u64 << 30) as f64,
    );
}

fn main() -> anyhow::Result<()> {
    let args = args();
    let gguf = GgufFile::open(&args.model)?;
    let cfg = LlamaConfig::from_gguf(&gguf)?;
    let renderer = PromptRenderer::new(PromptTemplate::alpaca(), Tokenizer::from_gguf(&gguf)?)?;
    let bytes_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4;
    let data = Dataset::load(&DataConfig::default(), &args.assets)?;
    let users = &data.users;

    // Each (user, history length) rendered and tokenized once.
    let mut memo: HashMap<(usize, usize), Rc<Lookup>> = HashMap::new();
    let mut lookup = |user: usize, len: usize| -> anyhow::Result<Rc<Lookup>> {
        if let Some(l) = memo.get(&(user, len)) {
            return Ok(l.clone());
        }
        let items = &users[user].items[..len];
        let titles: Vec<&str> = items[len.saturating_sub(PROMPT_HISTORY)..]
            .iter()
            .map(|&i| data.items[i as usize].title.as_str())
            .collect();
        let prompt = renderer.tokenize(&renderer.render(&titles, &["A candidate (1995)"])?)?;
        anyhow::ensure!(prompt.splittable, "user {user}'s prompt does not split");
        let tokens = prompt.prefix_len + prompt.history_len;
        let l = Rc::new(Lookup {
            key: history_key(prompt.history()),
            ids: prompt.history().into(),
            tokens,
            bytes: tokens * bytes_per_token,
        });
        memo.insert((user, len), l.clone());
        Ok(l)
    };
    let start = |user: usize| users[user].items.len().div_ceil(2).max(1);

    println!(
        "{} users, {} bytes of KV state per token ({} layers x 2 x {} kv heads x {} head dim x 4 B); the last {PROMPT_HISTORY} titles:",
        users.len(),
        bytes_per_token,
        cfg.num_layers,
        cfg.num_kv_heads,
        cfg.head_dim
    );
    let mut at_start = (0..users.len())
        .map(|u| lookup(u, start(u)).map(|l| l.tokens))
        .collect::<anyhow::Result<Vec<_>>>()?;
    describe(
        "at the start of the streams (half of each user's ratings)",
        &mut at_start,
        bytes_per_token,
    );
    let mut full = (0..users.len())
        .map(|u| lookup(u, users[u].items.len()).map(|l| l.tokens))
        .collect::<anyhow::Result<Vec<_>>>()?;
    describe(
        "after all of each user's ratings",
        &mut full,
        bytes_per_token,
    );
    let typical_entry = at_start.iter().sum::<usize>() / at_start.len() * bytes_per_token;
    println!(
        "\n{} requests per stream, mean over seeds {}..={}; hit rate = requests served from the cache, \
         cached tokens = share of all requests' [prefix][history] tokens they held\n",
        args.requests,
        args.first_seed,
        args.first_seed + args.seeds - 1
    );
    println!("| users drawn | new-event share | budget | policy | hit rate | cached tokens | cached tokens, min–max over seeds |");
    println!("|---|---|---|---|---|---|---|");

    let budgets: [(usize, &str); 4] = [
        (64 << 20, "64 MiB"),
        (256 << 20, "256 MiB"),
        (1 << 30, "1 GiB"),
        (4 << 30, "4 GiB"),
    ];
    // Activity-weighted draws (a user's chance proportional to their number of ratings).
    let cumulative: Vec<usize> = users
        .iter()
        .scan(0, |acc, u| {
            *acc += u.items.len();
            Some(*acc)
        })
        .collect();
    for (draw, weighted) in [("uniform (synth)", false), ("by activity", true)] {
        for event_share in [0.0f32, 0.1, 0.5] {
            // [budget][policy] -> per seed (hit rate, cached tokens)
            let mut results = vec![vec![Vec::new(); POLICIES.len()]; budgets.len()];
            let mut with_event = 0usize;
            for seed in args.first_seed..args.first_seed + args.seeds {
                // The stream, shared by every budget and policy.
                let mut rng = Rng::new(seed);
                let mut len: Vec<usize> = (0..users.len()).map(start).collect();
                let mut stream = Vec::with_capacity(args.requests);
                for _ in 0..args.requests {
                    let user = if weighted {
                        let r = rng.below(*cumulative.last().expect("users"));
                        cumulative.partition_point(|c| *c <= r)
                    } else {
                        rng.below(users.len())
                    };
                    if rng.next_f32() < event_share && len[user] < users[user].items.len() {
                        len[user] += 1;
                        with_event += 1;
                    }
                    stream.push(lookup(user, len[user])?);
                }
                let total_tokens: usize = stream.iter().map(|l| l.tokens).sum();
                for (b, &(budget, _)) in budgets.iter().enumerate() {
                    for (p, mut policy) in
                        Policy::all(budget, typical_entry).into_iter().enumerate()
                    {
                        let (mut hits, mut hit_tokens) = (0usize, 0usize);
                        for l in &stream {
                            if policy.get(l.key, &l.ids) {
                                hits += 1;
                                hit_tokens += l.tokens;
                            } else {
                                policy.insert(l.key, &l.ids, l.bytes);
                            }
                            assert!(policy.used() <= budget, "{} over its budget", POLICIES[p]);
                        }
                        results[b][p].push((
                            hits as f64 / args.requests as f64,
                            hit_tokens as f64 / total_tokens as f64,
                        ));
                    }
                }
            }
            let actual = with_event as f64 / (args.requests as u64 * args.seeds) as f64;
            for (b, &(_, budget_name)) in budgets.iter().enumerate() {
                for (p, name) in POLICIES.iter().enumerate() {
                    let r = &results[b][p];
                    let mean = |f: fn(&(f64, f64)) -> f64| {
                        100.0 * r.iter().map(f).sum::<f64>() / r.len() as f64
                    };
                    let tokens = r.iter().map(|x| 100.0 * x.1);
                    let (lo, hi) = (
                        tokens.clone().fold(f64::INFINITY, f64::min),
                        tokens.fold(0.0, f64::max),
                    );
                    println!(
                        "| {draw} | {event_share:.1} (actual {actual:.2}) | {budget_name} | {name} | {:.2} % | {:.2} % | {lo:.2}–{hi:.2} % |",
                        mean(|x| x.0),
                        mean(|x| x.1),
                    );
                }
            }
        }
    }
    Ok(())
}

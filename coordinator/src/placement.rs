//! Expert placement: which workers hold which experts, as a pure function
//! `plan(problem, previous) -> Placement` (no I/O; the async shell only applies the result).
//!
//! Follows the EPLB recipe: per MoE layer, hand the `redundant` extra replicas one by one to
//! the expert with the highest load per replica, then place replicas heaviest first on the
//! least-loaded worker that has room and does not hold that expert yet.
//!
//! Invariants (property-tested below):
//! - every expert of every MoE layer has at least one replica, and no worker holds two
//!   replicas of one expert;
//! - no worker holds more experts in a layer than its capacity;
//! - the plan is deterministic, and planning again from a plan's own output changes nothing
//!   (replicas still valid under the new problem are kept where they are, so a membership
//!   change moves as few experts as possible).

use std::collections::BTreeSet;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("no workers to place experts on")]
    NoWorkers,
    #[error("layer {layer} has {experts} experts; the workers have room for {slots}")]
    InsufficientCapacity {
        layer: usize,
        experts: usize,
        slots: usize,
    },
    #[error("load table has {found} rows of {width}, expected {layers} rows of {experts}")]
    LoadShape {
        found: usize,
        width: usize,
        layers: usize,
        experts: usize,
    },
}

/// A worker and how many experts per layer it can hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerSlot {
    pub id: String,
    pub experts_per_layer: usize,
}

#[derive(Clone, Debug)]
pub struct Problem {
    /// Number of MoE layers placed (dense layers need no placement).
    pub layers: usize,
    pub experts: usize,
    pub workers: Vec<WorkerSlot>,
    /// Extra replicas per layer beyond one per expert.
    pub redundant: usize,
    /// Expected load `[layer][expert]` (e.g. a moving average of tokens routed); `None` is
    /// uniform.
    pub load: Option<Vec<Vec<f64>>>,
}

/// `replicas[layer][expert]`: the ids of the workers holding that expert, sorted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub replicas: Vec<Vec<Vec<String>>>,
}

impl Placement {
    /// Experts worker `id` holds in `layer`, ascending.
    pub fn experts_on(&self, layer: usize, id: &str) -> Vec<u32> {
        self.replicas[layer]
            .iter()
            .enumerate()
            .filter(|(_, ws)| ws.iter().any(|w| w == id))
            .map(|(e, _)| e as u32)
            .collect()
    }
}

/// Places a model's experts on ranks `0..world` (worker ids are the rank numbers), each rank
/// holding at most `experts_per_rank` experts per MoE layer, and returns the holder table the
/// workers load from: `holders[layer][expert]` = ranks, ascending (empty for dense layers).
pub fn rank_holders(
    cfg: &switchyard_worker::ModelConfig,
    world: usize,
    experts_per_rank: usize,
    redundant: usize,
) -> Result<Vec<Vec<Vec<u32>>>, PlanError> {
    plan_holders(cfg, &vec![experts_per_rank; world], redundant, None)
}

/// A holder table for ranks with room for `slots[rank]` experts per MoE layer (0: all of
/// them), placed by `load` (`[layer][expert]` over all layers; dense rows ignored; `None`:
/// uniform).
pub fn plan_holders(
    cfg: &switchyard_worker::ModelConfig,
    slots: &[usize],
    redundant: usize,
    load: Option<&[Vec<f64>]>,
) -> Result<Vec<Vec<Vec<u32>>>, PlanError> {
    let sparse: Vec<usize> = (0..cfg.num_layers)
        .filter(|l| cfg.sparse_layers[*l])
        .collect();
    let problem = Problem {
        layers: sparse.len(),
        experts: cfg.num_experts,
        workers: slots
            .iter()
            .enumerate()
            .map(|(i, &s)| WorkerSlot {
                id: i.to_string(),
                experts_per_layer: if s == 0 { cfg.num_experts } else { s },
            })
            .collect(),
        redundant,
        load: load.map(|l| {
            sparse
                .iter()
                .map(|&layer| {
                    let mut row = l.get(layer).cloned().unwrap_or_default();
                    row.resize(cfg.num_experts, 0.0);
                    row
                })
                .collect()
        }),
    };
    let placement = plan(&problem, None)?;
    let mut holders = vec![vec![]; cfg.num_layers];
    for (i, &l) in sparse.iter().enumerate() {
        let mut layer: Vec<Vec<u32>> = placement.replicas[i]
            .iter()
            .map(|ws| {
                ws.iter()
                    .map(|w| w.parse::<u32>().expect("rank ids are numbers"))
                    .collect()
            })
            .collect();
        for ranks in &mut layer {
            ranks.sort_unstable();
        }
        holders[l] = layer;
    }
    Ok(holders)
}

/// Holders for a new group of ranks that leaves every expert where it is: `old` is the
/// previous table (`[layer][expert]` → old ranks; dense layers empty), `map[r]` the new rank
/// of old rank `r` (`None`: gone). An expert left with no holder goes to the new rank holding
/// the fewest experts of that layer among those with room (`slots[rank]`, 0: every expert),
/// lowest rank on ties. So a lost worker costs only its own experts: the survivors keep all
/// of theirs and load just the orphans.
pub fn carry_over(
    old: &[Vec<Vec<u32>>],
    map: &[Option<u32>],
    slots: &[usize],
) -> Result<Vec<Vec<Vec<u32>>>, PlanError> {
    let world = slots.len();
    if world == 0 {
        return Err(PlanError::NoWorkers);
    }
    old.iter()
        .enumerate()
        .map(|(layer, row)| {
            let experts = row.len();
            let mut held = vec![0usize; world];
            let mut new: Vec<Vec<u32>> = row
                .iter()
                .map(|ranks| {
                    let mut r: Vec<u32> = ranks
                        .iter()
                        .filter_map(|&o| map.get(o as usize).copied().flatten())
                        .filter(|&n| (n as usize) < world)
                        .collect();
                    r.sort_unstable();
                    r.dedup();
                    for &n in &r {
                        held[n as usize] += 1;
                    }
                    r
                })
                .collect();
            let room = |n: usize, held: &[usize]| slots[n] == 0 || held[n] < slots[n];
            for ranks in new.iter_mut().filter(|r| r.is_empty()) {
                let to = (0..world)
                    .filter(|&n| room(n, &held))
                    .min_by_key(|&n| (held[n], n))
                    .ok_or(PlanError::InsufficientCapacity {
                        layer,
                        experts,
                        slots: slots
                            .iter()
                            .map(|&s| if s == 0 { experts } else { s })
                            .sum(),
                    })?;
                held[to] += 1;
                ranks.push(to as u32);
            }
            Ok(new)
        })
        .collect()
}

/// Expert load per rank of one layer: each expert's load split evenly over its replicas.
fn rank_loads(layer: &[Vec<u32>], load: &[f64], world: usize) -> Vec<f64> {
    let mut per = vec![0.0; world];
    for (e, ranks) in layer.iter().enumerate() {
        let l = load.get(e).copied().unwrap_or(0.0).max(0.0);
        for &r in ranks {
            if let Some(x) = per.get_mut(r as usize) {
                *x += l / ranks.len() as f64;
            }
        }
    }
    per
}

/// How unevenly `holders` spreads `load` over `world` ranks: per MoE layer with any load, the
/// busiest rank's expert load over the mean rank's, averaged over those layers (1.0 = even).
pub fn imbalance(holders: &[Vec<Vec<u32>>], load: &[Vec<f64>], world: usize) -> f64 {
    let ratios: Vec<f64> = holders
        .iter()
        .zip(load)
        .filter(|(l, _)| !l.is_empty())
        .filter_map(|(l, ld)| {
            let per = rank_loads(l, ld, world);
            let total: f64 = per.iter().sum();
            (total > 0.0).then(|| per.iter().cloned().fold(0.0, f64::max) / (total / world as f64))
        })
        .collect();
    if ratios.is_empty() {
        1.0
    } else {
        ratios.iter().sum::<f64>() / ratios.len() as f64
    }
}

/// A re-placement for `load` that moves few experts: per MoE layer, starting from `current`,
/// first give each expert the replica count the planner would (adding replicas on the
/// least-loaded ranks with room, dropping them from the busiest), then repeatedly relieve the
/// busiest rank by moving one expert to the least-loaded rank (only if that rank holds fewer
/// experts: each held expert also costs its weight reads), or swapping one pair between them,
/// choosing the change that lowers their larger load most, until no change gains 1% of the
/// mean rank load. Returns the new table and the replicas that must be loaded somewhere
/// new.
pub fn rebalance(
    cfg: &switchyard_worker::ModelConfig,
    slots: &[usize],
    redundant: usize,
    load: &[Vec<f64>],
    current: &[Vec<Vec<u32>>],
) -> Result<(Vec<Vec<Vec<u32>>>, usize), PlanError> {
    let world = slots.len();
    if world == 0 {
        return Err(PlanError::NoWorkers);
    }
    let caps: Vec<usize> = slots
        .iter()
        .map(|&s| if s == 0 { cfg.num_experts } else { s })
        .collect();
    let mut out = current.to_vec();
    let mut moved = 0;
    for (layer, table) in out.iter_mut().enumerate() {
        if table.is_empty() {
            continue;
        }
        let mut ld = load.get(layer).cloned().unwrap_or_default();
        ld.resize(table.len(), 0.0);
        let problem = Problem {
            layers: 1,
            experts: table.len(),
            workers: caps
                .iter()
                .enumerate()
                .map(|(i, &c)| WorkerSlot {
                    id: i.to_string(),
                    experts_per_layer: c,
                })
                .collect(),
            redundant,
            load: Some(vec![ld.clone()]),
        };
        let slots_total: usize = caps.iter().sum();
        if slots_total < table.len() {
            return Err(PlanError::InsufficientCapacity {
                layer,
                experts: table.len(),
                slots: slots_total,
            });
        }
        let extra = redundant.min(slots_total - table.len());
        let target = replica_counts(&problem, 0, extra, &caps);
        moved += refine_layer(&ld, &target, &caps, table);
    }
    Ok((out, moved))
}

/// Adjusts one layer's holder table in place (see [`rebalance`]); replicas added or moved.
fn refine_layer(load: &[f64], target: &[usize], caps: &[usize], table: &mut [Vec<u32>]) -> usize {
    let world = caps.len();
    let held_by =
        |table: &[Vec<u32>], w: usize| table.iter().filter(|h| h.contains(&(w as u32))).count();
    let mut moved = 0;
    // 1. Replica counts.
    let mut order: Vec<usize> = (0..table.len()).collect();
    order.sort_by(|&a, &b| load[b].total_cmp(&load[a]).then(a.cmp(&b)));
    for &e in &order {
        while table[e].len() > target[e].max(1) {
            let wl = rank_loads(table, load, world);
            let &w = table[e]
                .iter()
                .max_by(|a, b| wl[**a as usize].total_cmp(&wl[**b as usize]))
                .expect("more than one holder");
            table[e].retain(|x| *x != w);
        }
        while table[e].len() < target[e] {
            let wl = rank_loads(table, load, world);
            let pick = (0..world)
                .filter(|&w| !table[e].contains(&(w as u32)) && held_by(table, w) < caps[w])
                .min_by(|&a, &b| wl[a].total_cmp(&wl[b]).then(a.cmp(&b)));
            let Some(w) = pick else { break };
            table[e].push(w as u32);
            table[e].sort_unstable();
            moved += 1;
        }
    }
    // 2. Relieve the busiest rank, one move or swap at a time.
    let share = |table: &[Vec<u32>], e: usize| load[e] / table[e].len().max(1) as f64;
    for _ in 0..4 * table.len() {
        let wl = rank_loads(table, load, world);
        let mean = wl.iter().sum::<f64>() / world as f64;
        let b = (0..world)
            .max_by(|&x, &y| wl[x].total_cmp(&wl[y]).then(y.cmp(&x)))
            .expect("ranks");
        let l = (0..world)
            .min_by(|&x, &y| wl[x].total_cmp(&wl[y]).then(x.cmp(&y)))
            .expect("ranks");
        let min_gain = 0.01 * mean;
        if b == l || wl[b] - wl[l] <= min_gain {
            break;
        }
        let (bu, lu) = (b as u32, l as u32);
        let on_b: Vec<usize> = (0..table.len())
            .filter(|&e| table[e].contains(&bu) && !table[e].contains(&lu))
            .collect();
        let on_l: Vec<usize> = (0..table.len())
            .filter(|&e| table[e].contains(&lu) && !table[e].contains(&bu))
            .collect();
        // (resulting larger load, expert from b, expert from l)
        let mut best: Option<(f64, usize, Option<usize>)> = None;
        let mut consider = |m: f64, e: usize, f: Option<usize>| {
            if m < wl[b] - min_gain && best.as_ref().is_none_or(|x| m < x.0) {
                best = Some((m, e, f));
            }
        };
        // A plain move only when it leaves the two ranks' expert counts no further apart (each
        // held expert has a fixed cost, its weights read every step, beside its tokens).
        if held_by(table, l) < caps[l] && held_by(table, l) < held_by(table, b) {
            for &e in &on_b {
                let s = share(table, e);
                consider((wl[b] - s).max(wl[l] + s), e, None);
            }
        }
        for &e in &on_b {
            for &f in &on_l {
                let d = share(table, e) - share(table, f);
                if d > 0.0 {
                    consider((wl[b] - d).max(wl[l] + d), e, Some(f));
                }
            }
        }
        let Some((_, e, f)) = best else { break };
        let mut swap = |x: usize, from: u32, to: u32| {
            for r in table[x].iter_mut() {
                if *r == from {
                    *r = to;
                }
            }
            table[x].sort_unstable();
        };
        swap(e, bu, lu);
        moved += 1;
        if let Some(f) = f {
            swap(f, lu, bu);
            moved += 1;
        }
    }
    moved
}

/// Per-rank assignments (`RankExperts`) of a holder table, for ranks `0..world`.
pub fn rank_experts(
    holders: &[Vec<Vec<u32>>],
    world: usize,
) -> Vec<switchyard_proto::cluster::v1::RankExperts> {
    use switchyard_proto::cluster::v1::{ExpertAssignment, RankExperts};
    (0..world as u32)
        .map(|r| RankExperts {
            rank: r,
            assignments: holders
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_empty())
                .map(|(layer, l)| ExpertAssignment {
                    layer: layer as u32,
                    experts: l
                        .iter()
                        .enumerate()
                        .filter(|(_, hs)| hs.contains(&r))
                        .map(|(e, _)| e as u32)
                        .collect(),
                })
                .collect(),
        })
        .collect()
}

fn load_of(p: &Problem, layer: usize, e: usize) -> f64 {
    p.load.as_ref().map_or(1.0, |l| l[layer][e].max(0.0))
}

/// Whether replica counts can be placed on workers with these capacities, each replica of an
/// expert on a different worker (Gale–Ryser: for every k, the k largest counts fit in
/// `Σ_w min(cap_w, k)`).
fn feasible(counts: &[usize], caps: &[usize]) -> bool {
    let mut c = counts.to_vec();
    c.sort_unstable_by(|a, b| b.cmp(a));
    let mut lhs = 0;
    for (i, ci) in c.iter().enumerate() {
        lhs += ci;
        if lhs > caps.iter().map(|u| (*u).min(i + 1)).sum::<usize>() {
            return false;
        }
    }
    true
}

/// Replica count per expert of one layer: one each, then the extras one by one to the expert
/// with the highest load per replica (ties to the lower id) among those whose extra replica
/// still leaves the layer placeable.
fn replica_counts(p: &Problem, layer: usize, extra: usize, caps: &[usize]) -> Vec<usize> {
    let mut counts = vec![1usize; p.experts];
    for _ in 0..extra {
        let mut order: Vec<usize> = (0..p.experts).collect();
        order.sort_by(|&a, &b| {
            let (la, lb) = (
                load_of(p, layer, a) / counts[a] as f64,
                load_of(p, layer, b) / counts[b] as f64,
            );
            lb.total_cmp(&la).then(a.cmp(&b))
        });
        let pick = order.into_iter().find(|&e| {
            counts[e] += 1;
            let ok = feasible(&counts, caps);
            counts[e] -= 1;
            ok
        });
        match pick {
            Some(e) => counts[e] += 1,
            None => break,
        }
    }
    counts
}

/// Places `counts` replicas by the Havel–Hakimi greedy (experts with most replicas first, each
/// onto the workers with the most room left), which succeeds whenever [`feasible`] holds.
fn place_feasible(counts: &[usize], caps: &[usize]) -> Vec<BTreeSet<usize>> {
    let mut room = caps.to_vec();
    let mut held = vec![BTreeSet::new(); counts.len()];
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    for e in order {
        let mut ws: Vec<usize> = (0..caps.len()).filter(|&w| room[w] > 0).collect();
        ws.sort_by(|&a, &b| room[b].cmp(&room[a]).then(a.cmp(&b)));
        for &w in ws.iter().take(counts[e]) {
            room[w] -= 1;
            held[e].insert(w);
        }
    }
    held
}

/// Keeps still-valid previous replicas, then places the rest heaviest first on the
/// least-loaded worker with room. `None` when that greedy corners itself (the remaining room
/// is only on workers that already hold the expert); the caller then uses [`place_feasible`].
fn place_balanced(
    p: &Problem,
    layer: usize,
    counts: &[usize],
    prev: Option<&Vec<Vec<String>>>,
) -> Option<Vec<BTreeSet<usize>>> {
    let nw = p.workers.len();
    let mut held: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); p.experts];
    let mut used = vec![0usize; nw];
    let mut wload = vec![0.0f64; nw];
    if let Some(prev) = prev {
        for (e, ids) in prev.iter().enumerate().take(p.experts) {
            for id in ids {
                if held[e].len() >= counts[e] {
                    break;
                }
                if let Some(w) = p.workers.iter().position(|x| &x.id == id) {
                    if used[w] < p.workers[w].experts_per_layer && held[e].insert(w) {
                        used[w] += 1;
                        wload[w] += load_of(p, layer, e) / counts[e] as f64;
                    }
                }
            }
        }
    }
    let mut todo: Vec<usize> = (0..p.experts)
        .flat_map(|e| std::iter::repeat_n(e, counts[e] - held[e].len()))
        .collect();
    todo.sort_by(|&a, &b| {
        let (la, lb) = (
            load_of(p, layer, a) / counts[a] as f64,
            load_of(p, layer, b) / counts[b] as f64,
        );
        lb.total_cmp(&la).then(a.cmp(&b))
    });
    for e in todo {
        let w = (0..nw)
            .filter(|&w| used[w] < p.workers[w].experts_per_layer && !held[e].contains(&w))
            .min_by(|&a, &b| {
                wload[a]
                    .total_cmp(&wload[b])
                    .then(used[a].cmp(&used[b]))
                    .then(a.cmp(&b))
            })?;
        held[e].insert(w);
        used[w] += 1;
        wload[w] += load_of(p, layer, e) / counts[e] as f64;
    }
    Some(held)
}

pub fn plan(p: &Problem, previous: Option<&Placement>) -> Result<Placement, PlanError> {
    if p.workers.is_empty() {
        return Err(PlanError::NoWorkers);
    }
    if let Some(l) = &p.load {
        if l.len() != p.layers || l.iter().any(|r| r.len() != p.experts) {
            return Err(PlanError::LoadShape {
                found: l.len(),
                width: l.first().map_or(0, |r| r.len()),
                layers: p.layers,
                experts: p.experts,
            });
        }
    }
    let slots: usize = p.workers.iter().map(|w| w.experts_per_layer).sum();
    let mut replicas = Vec::with_capacity(p.layers);
    for layer in 0..p.layers {
        if slots < p.experts {
            return Err(PlanError::InsufficientCapacity {
                layer,
                experts: p.experts,
                slots,
            });
        }
        let extra = p.redundant.min(slots - p.experts);
        let caps: Vec<usize> = p.workers.iter().map(|w| w.experts_per_layer).collect();
        let counts = replica_counts(p, layer, extra, &caps);
        let held = place_balanced(
            p,
            layer,
            &counts,
            previous.and_then(|pl| pl.replicas.get(layer)),
        )
        .unwrap_or_else(|| place_feasible(&counts, &caps));
        replicas.push(
            held.into_iter()
                .map(|ws| {
                    let mut ids: Vec<String> =
                        ws.into_iter().map(|w| p.workers[w].id.clone()).collect();
                    ids.sort();
                    ids
                })
                .collect(),
        );
    }
    Ok(Placement { replicas })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn workers(caps: &[usize]) -> Vec<WorkerSlot> {
        caps.iter()
            .enumerate()
            .map(|(i, c)| WorkerSlot {
                id: format!("w{i}"),
                experts_per_layer: *c,
            })
            .collect()
    }

    fn check_invariants(p: &Problem, pl: &Placement) {
        assert_eq!(pl.replicas.len(), p.layers);
        for (l, layer) in pl.replicas.iter().enumerate() {
            assert_eq!(layer.len(), p.experts);
            for ws in layer {
                assert!(!ws.is_empty(), "an expert has no replica");
                let set: BTreeSet<&String> = ws.iter().collect();
                assert_eq!(set.len(), ws.len(), "duplicate replica on one worker");
            }
            for w in &p.workers {
                assert!(
                    pl.experts_on(l, &w.id).len() <= w.experts_per_layer,
                    "capacity exceeded"
                );
            }
        }
    }

    fn problem() -> impl Strategy<Value = Problem> {
        (
            1usize..4,
            1usize..40,
            prop::collection::vec(1usize..20, 1..6),
            0usize..10,
            any::<bool>(),
            any::<u64>(),
        )
            .prop_map(|(layers, experts, caps, redundant, skewed, seed)| {
                let mut caps = caps;
                // Make it feasible: top up the first worker.
                let total: usize = caps.iter().sum();
                if total < experts {
                    caps[0] += experts - total;
                }
                let mut rng = switchyard_kernels::rng::Rng::new(seed);
                let load = skewed.then(|| {
                    (0..layers)
                        .map(|_| {
                            (0..experts)
                                .map(|_| (rng.next_f64() * 10.0).powi(3))
                                .collect()
                        })
                        .collect()
                });
                Problem {
                    layers,
                    experts,
                    workers: workers(&caps),
                    redundant,
                    load,
                }
            })
    }

    proptest! {
        #[test]
        fn plans_satisfy_invariants_and_are_idempotent(p in problem()) {
            let a = plan(&p, None).unwrap();
            check_invariants(&p, &a);
            prop_assert_eq!(&plan(&p, None).unwrap(), &a);
            prop_assert_eq!(&plan(&p, Some(&a)).unwrap(), &a);
            let slots: usize = p.workers.iter().map(|w| w.experts_per_layer).sum();
            let want = p.experts + p.redundant.min(slots - p.experts);
            // Every worker able to hold every expert: all requested extras fit, up to one
            // replica per worker per expert.
            let roomy = p.workers.iter().all(|w| w.experts_per_layer >= p.experts);
            let cap = p.experts * p.workers.len();
            for layer in &a.replicas {
                let total: usize = layer.iter().map(|ws| ws.len()).sum();
                prop_assert!(total <= want);
                if roomy {
                    prop_assert_eq!(total, want.min(cap));
                }
            }
        }

        #[test]
        fn losing_a_worker_keeps_survivors_placements(p in problem()) {
            prop_assume!(p.workers.len() >= 2);
            let a = plan(&p, None).unwrap();
            let mut q = p.clone();
            let gone = q.workers.pop().unwrap();
            // Give the survivors room for everything.
            for w in &mut q.workers { w.experts_per_layer = p.experts; }
            let b = plan(&q, Some(&a)).unwrap();
            check_invariants(&q, &b);
            for (la, lb) in a.replicas.iter().zip(&b.replicas) {
                for (wa, wb) in la.iter().zip(lb) {
                    let kept: Vec<&String> = wa.iter().filter(|w| **w != gone.id).collect();
                    // Every surviving replica stays unless the expert now needs fewer replicas.
                    let still = kept.iter().filter(|w| wb.contains(w)).count();
                    prop_assert!(still == kept.len() || wb.len() <= kept.len());
                }
            }
        }
    }

    #[test]
    fn uniform_load_balances_experts_evenly() {
        let p = Problem {
            layers: 2,
            experts: 32,
            workers: workers(&[32, 32, 32]),
            redundant: 0,
            load: None,
        };
        let pl = plan(&p, None).unwrap();
        for l in 0..2 {
            let counts: Vec<usize> = p
                .workers
                .iter()
                .map(|w| pl.experts_on(l, &w.id).len())
                .collect();
            assert!(
                counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
                "{counts:?}"
            );
        }
    }

    #[test]
    fn hot_experts_get_the_replicas_and_load_evens_out() {
        let mut load = vec![1.0; 8];
        load[3] = 20.0;
        load[5] = 10.0;
        let p = Problem {
            layers: 1,
            experts: 8,
            workers: workers(&[8, 8, 8, 8]),
            redundant: 4,
            load: Some(vec![load.clone()]),
        };
        let pl = plan(&p, None).unwrap();
        assert_eq!(
            pl.replicas[0][3].len(),
            4,
            "hottest expert replicated on every worker"
        );
        assert_eq!(pl.replicas[0][5].len(), 2);
        let per_worker: Vec<f64> = p
            .workers
            .iter()
            .map(|w| {
                pl.experts_on(0, &w.id)
                    .iter()
                    .map(|&e| load[e as usize] / pl.replicas[0][e as usize].len() as f64)
                    .sum()
            })
            .collect();
        let max = per_worker.iter().cloned().fold(0.0, f64::max);
        let mean = per_worker.iter().sum::<f64>() / 4.0;
        assert!(max / mean < 1.2, "max/mean {}", max / mean);
    }

    fn cfg(layers: usize, experts: usize) -> switchyard_worker::ModelConfig {
        let mut c = switchyard_worker::ModelConfig::from_json(
            &switchyard_worker::presets::preset("tiny").expect("tiny preset"),
        )
        .expect("valid preset");
        c.num_layers = layers;
        c.num_experts = experts;
        c.sparse_layers = vec![true; layers];
        c
    }

    #[test]
    fn rebalance_evens_a_skewed_load_and_keeps_what_it_can() {
        let c = cfg(2, 8);
        let slots = [0, 0, 0, 0];
        let current = plan_holders(&c, &slots, 0, None).unwrap();
        // Experts 0 and 1 take most of the traffic; uniform placement put them on one rank
        // in layer 0 only if it did; make sure the measured imbalance is what we think.
        let mut load = vec![vec![1.0; 8]; 2];
        load[0][0] = 30.0;
        load[0][4] = 30.0;
        load[1][2] = 25.0;
        load[1][6] = 25.0;
        let before = imbalance(&current, &load, 4);
        let (next, moved) = rebalance(&c, &slots, 0, &load, &current).unwrap();
        let after = imbalance(&next, &load, 4);
        assert!(after < before, "before {before} after {after}");
        assert!(moved > 0 && moved < 16, "moved {moved}");
        // Planning again for the same load moves nothing.
        let (again, moved_again) = rebalance(&c, &slots, 0, &load, &next).unwrap();
        assert_eq!(again, next);
        assert_eq!(moved_again, 0);
        // Replicas for the hot experts bring it closer still, within each rank's room.
        let (rep, _) = rebalance(&c, &slots, 4, &load, &next).unwrap();
        assert!(imbalance(&rep, &load, 4) <= after + 1e-9);
        let tight = [3, 3, 3, 3];
        let cur = plan_holders(&c, &tight, 0, None).unwrap();
        let (t, _) = rebalance(&c, &tight, 4, &load, &cur).unwrap();
        for l in &t {
            assert!(l.iter().all(|h| !h.is_empty()));
            for r in 0..4u32 {
                assert!(l.iter().filter(|h| h.contains(&r)).count() <= 3);
            }
        }
        assert!(imbalance(&t, &load, 4) < imbalance(&cur, &load, 4));
    }

    proptest! {
        #[test]
        fn rebalance_keeps_invariants_and_never_worsens_without_replicas(
            experts in 2usize..24,
            caps in prop::collection::vec(0usize..12, 2..5),
            seed in any::<u64>(),
            redundant in 0usize..4,
        ) {
            let c = cfg(2, experts);
            let mut caps = caps;
            let room: usize = caps.iter().map(|&x| if x == 0 { experts } else { x }).sum();
            prop_assume!(room >= experts);
            let mut rng = switchyard_kernels::rng::Rng::new(seed);
            let load: Vec<Vec<f64>> = (0..2)
                .map(|_| (0..experts).map(|_| (rng.next_f64() * 10.0).powi(3)).collect())
                .collect();
            let world = caps.len();
            let cur = plan_holders(&c, &caps, redundant, None).unwrap();
            let (next, _) = rebalance(&c, &caps, redundant, &load, &cur).unwrap();
            for l in &next {
                for h in l {
                    prop_assert!(!h.is_empty());
                    let mut d = h.clone();
                    d.dedup();
                    prop_assert_eq!(d.len(), h.len());
                }
                for (r, cap) in caps.iter_mut().enumerate() {
                    let cap = if *cap == 0 { experts } else { *cap };
                    prop_assert!(l.iter().filter(|h| h.contains(&(r as u32))).count() <= cap);
                }
            }
            if redundant == 0 {
                prop_assert!(imbalance(&next, &load, world) <= imbalance(&cur, &load, world) + 1e-9);
            }
        }
    }

    #[test]
    fn imbalance_of_an_even_spread_is_one() {
        let c = cfg(1, 8);
        let h = plan_holders(&c, &[0, 0], 0, None).unwrap();
        assert!((imbalance(&h, &[vec![1.0; 8]], 2) - 1.0).abs() < 1e-12);
        // Everything on one expert: that rank carries it all.
        let mut l = vec![0.0; 8];
        l[3] = 5.0;
        assert!((imbalance(&h, &[l], 2) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn slots_bound_each_rank() {
        let c = cfg(2, 8);
        let h = plan_holders(&c, &[3, 3, 2], 0, None).unwrap();
        for (r, cap) in [3, 3, 2].iter().enumerate() {
            for l in &h {
                assert!(l.iter().filter(|hs| hs.contains(&(r as u32))).count() <= *cap);
            }
        }
        assert!(matches!(
            plan_holders(&c, &[3, 3], 0, None),
            Err(PlanError::InsufficientCapacity { .. })
        ));
    }

    #[test]
    fn insufficient_capacity_is_an_error() {
        let p = Problem {
            layers: 1,
            experts: 8,
            workers: workers(&[3, 4]),
            redundant: 0,
            load: None,
        };
        assert_eq!(
            plan(&p, None),
            Err(PlanError::InsufficientCapacity {
                layer: 0,
                experts: 8,
                slots: 7
            })
        );
        let p = Problem {
            layers: 1,
            experts: 8,
            workers: vec![],
            redundant: 0,
            load: None,
        };
        assert_eq!(plan(&p, None), Err(PlanError::NoWorkers));
    }

    #[test]
    fn carrying_over_keeps_every_expert_in_place_and_spreads_the_orphans() {
        // One dense layer, one of 4 experts over old ranks 0..3; old rank 1 is lost and old
        // rank 2 becomes new rank 1.
        let old = vec![vec![], vec![vec![0], vec![1], vec![1, 2], vec![1]]];
        let map = [Some(0), None, Some(1)];
        let new = carry_over(&old, &map, &[0, 0]).unwrap();
        assert_eq!(new[0], Vec::<Vec<u32>>::new());
        // Expert 0 stays on rank 0, expert 2 keeps its surviving replica; the orphans 1 and 3
        // go to the rank holding fewer experts at the time (1 holds one, 0 holds one: rank 0,
        // then rank 1).
        assert_eq!(new[1], vec![vec![0], vec![0], vec![1], vec![1]]);
        // Room is honoured: with one slot each, neither survivor has room for an orphan.
        assert_eq!(
            carry_over(&old, &map, &[1, 1]),
            Err(PlanError::InsufficientCapacity {
                layer: 1,
                experts: 4,
                slots: 2
            })
        );
        let tight = carry_over(&old, &map, &[2, 2]).unwrap();
        assert!(tight[1].iter().all(|r| r.len() == 1));
        assert_eq!(carry_over(&old, &map, &[]), Err(PlanError::NoWorkers));
    }
}

//! Executes one `StepPlan` of the cluster protocol on a worker's [`Engine`]: frees finished or
//! preempted sequences, feeds each chunk, samples where the plan asks, and reports sampled
//! tokens, per-expert load and KV usage.
//!
//! Sampling is a pure function of (logits, parameters, the sequence's tokens so far, seed,
//! position): the random draw for position `p` comes from a generator seeded with
//! `mix(seed, p)`, so a sequence re-homed or recomputed after preemption samples exactly what
//! it would have sampled where it was.

use crate::engine::{ChunkSpec, Engine, Logits};
use crate::WorkerError;
use std::collections::HashMap;
use switchyard_kernels::rng::Rng;
use switchyard_kernels::sampling::{self, SamplingParams};
use switchyard_proto::cluster::v1::{SampledToken, SeqChunk, StepPlan, StepResult, TokenLogprob};

pub struct Executor {
    pub engine: Engine,
    /// Tokens fed so far per sequence (the repetition-penalty history).
    history: HashMap<u64, Vec<u32>>,
}

fn mix(seed: u64, pos: u64) -> u64 {
    seed ^ pos
        .wrapping_add(1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(17)
}

/// The sampling parameters a chunk carries (unset top_p / penalty mean disabled).
pub fn chunk_params(c: &SeqChunk) -> SamplingParams {
    SamplingParams {
        temperature: c.temperature,
        top_k: c.top_k as usize,
        top_p: if c.top_p == 0.0 { 1.0 } else { c.top_p },
        min_p: c.min_p,
        repetition_penalty: if c.repetition_penalty == 0.0 {
            1.0
        } else {
            c.repetition_penalty
        },
        seed: c.seed,
    }
}

impl Executor {
    pub fn new(engine: Engine) -> Self {
        Executor {
            engine,
            history: HashMap::new(),
        }
    }

    pub fn execute(&mut self, plan: &StepPlan) -> Result<StepResult, WorkerError> {
        let t0 = std::time::Instant::now();
        for id in &plan.free_seqs {
            self.engine.release(*id);
            self.history.remove(id);
        }
        for c in &plan.chunks {
            let have = self.engine.seq_len(c.seq_id) as u32;
            if c.start_pos == 0 && have > 0 {
                // Recompute after preemption or re-homing: start over.
                self.engine.release(c.seq_id);
                self.history.remove(&c.seq_id);
            } else if c.start_pos != have {
                return Err(WorkerError::Sequence {
                    seq_id: c.seq_id,
                    detail: format!(
                        "chunk starts at {} but {} positions are cached",
                        c.start_pos, have
                    ),
                });
            }
            chunk_params(c).validate()?;
        }
        let specs: Vec<ChunkSpec> = plan
            .chunks
            .iter()
            .map(|c| ChunkSpec {
                seq_id: c.seq_id,
                tokens: &c.tokens,
                logits: if c.sample { Logits::Last } else { Logits::None },
            })
            .collect();
        let out = self.engine.step(&specs, false)?;
        let vocab = self.engine.config().vocab_size;
        let mut tokens = Vec::new();
        let mut row = 0;
        for c in &plan.chunks {
            let h = self.history.entry(c.seq_id).or_default();
            h.extend_from_slice(&c.tokens);
            if c.sample {
                let raw = &out.logits[row * vocab..(row + 1) * vocab];
                let mut logits = raw.to_vec();
                row += 1;
                let p = chunk_params(c);
                let pos = h.len() as u64;
                let token = sampling::sample(&mut logits, &p, h, &mut Rng::new(mix(p.seed, pos)));
                let (logprob, top) = sampling::logprobs(raw, token, c.top_logprobs as usize);
                tokens.push(SampledToken {
                    seq_id: c.seq_id,
                    token,
                    logprob,
                    top: top
                        .into_iter()
                        .map(|(token, logprob)| TokenLogprob { token, logprob })
                        .collect(),
                });
            }
        }
        let (all_to_all_seconds, all_to_all_bytes) = self.engine.take_exchange_stats();
        Ok(StepResult {
            step: plan.step,
            tokens,
            expert_load: out.expert_load,
            kv_blocks_used: self.engine.kv_used() as u32,
            all_to_all_seconds,
            all_to_all_bytes,
            step_seconds: t0.elapsed().as_secs_f64(),
        })
    }
}

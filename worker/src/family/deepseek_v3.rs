//! DeepSeek-V3 / R1 and Kimi K2 (`DeepseekV3ForCausalLM`): multi-head latent attention (a
//! compressed KV latent plus a decoupled rope key, optional query compression, interleaved
//! rope), the first `first_k_dense_replace` layers dense, then sigmoid-scored routing with
//! `e_score_correction_bias`, group-limited top-k and `routed_scaling_factor`, plus
//! `n_shared_experts` always-on experts. Multi-token-prediction layers
//! (`num_nextn_predict_layers`) are not part of the decoder and are skipped.

use super::*;

pub static FAMILY: Family = Family {
    arch: Arch::DeepseekV3,
    hf_name: "DeepseekV3ForCausalLM",
    model_type: "deepseek_v3",
    names: Names {
        shared: "shared_experts",
        ..Names::STANDARD
    },
    parse,
};

/// `0.1 · mscale · ln(scale) + 1` for scale > 1 (YaRN's attention temperature).
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn parse(o: &Obj<'_>, c: &Common) -> Result<Parts, ConfigError> {
    let (num_experts, experts_per_tok) = experts(o, "n_routed_experts")?;
    refuse_if(
        o.bool("attention_bias", false)?,
        "attention_bias",
        "biases on MLA projections are not implemented",
    )?;
    if let Some(f) = o.str("scoring_func")? {
        refuse_if(
            f != "sigmoid",
            "scoring_func",
            &format!("{f:?} (only \"sigmoid\")"),
        )?;
    }
    if let Some(m) = o.str("topk_method")? {
        refuse_if(
            m != "noaux_tc",
            "topk_method",
            &format!("{m:?} (only \"noaux_tc\")"),
        )?;
    }
    let freq = o.opt_usize("moe_layer_freq")?.unwrap_or(1);
    refuse_if(freq != 1, "moe_layer_freq", &format!("{freq} (only 1)"))?;
    let q_lora_rank = o.opt_usize("q_lora_rank")?;
    if q_lora_rank == Some(0) {
        return Err(invalid("q_lora_rank", "must be positive or null".into()));
    }
    let kv_lora_rank = o.pos("kv_lora_rank")?;
    let nope = o.pos("qk_nope_head_dim")?;
    let rope = o.pos("qk_rope_head_dim")?;
    let v = o.pos("v_head_dim")?;
    for (f, x) in [
        ("kv_lora_rank", kv_lora_rank),
        ("qk_nope_head_dim", nope),
        ("qk_rope_head_dim", rope),
        ("v_head_dim", v),
        ("q_lora_rank", q_lora_rank.unwrap_or(1)),
    ] {
        if x > 1 << 14 {
            return Err(invalid(f, format!("{x} is beyond any supported model")));
        }
    }
    if rope % 2 != 0 || kv_lora_rank + rope > 1024 {
        return Err(invalid(
            "qk_rope_head_dim",
            format!("rope dims must be even and kv_lora_rank + rope at most 1024, got {rope} and {kv_lora_rank}"),
        ));
    }
    let n_group = o.opt_usize("n_group")?.unwrap_or(1);
    let topk_group = o.opt_usize("topk_group")?.unwrap_or(1);
    if n_group == 0 || (num_experts > 0 && num_experts % n_group != 0) {
        return Err(invalid(
            "n_group",
            format!("{n_group} does not divide n_routed_experts {num_experts}"),
        ));
    }
    if topk_group == 0 || topk_group > n_group {
        return Err(invalid(
            "topk_group",
            format!("{topk_group} is not in 1..={n_group}"),
        ));
    }
    if num_experts > 0 && experts_per_tok > topk_group * (num_experts / n_group) {
        return Err(invalid(
            "num_experts_per_tok",
            format!("{experts_per_tok} exceeds the experts of {topk_group} groups"),
        ));
    }
    let scaling = o.f64("routed_scaling_factor")?.unwrap_or(1.0) as f32;
    if !(scaling.is_finite() && scaling > 0.0) {
        return Err(invalid("routed_scaling_factor", "must be positive".into()));
    }
    let first_dense = o.opt_usize("first_k_dense_replace")?.unwrap_or(0);
    let shared = o.opt_usize("n_shared_experts")?.unwrap_or(0);
    let moe_inter = o.pos("moe_intermediate_size")?;
    let mut softmax_scale = 1.0 / ((nope + rope) as f64).sqrt();
    // YaRN sharpens attention by mscale_all_dim (transformers: scaling *= mscale²).
    if let Some(Value::Object(rs)) = o.get("rope_scaling") {
        let ro = Obj(rs);
        if let (Some(ma), Some(f)) = (ro.f64("mscale_all_dim")?, ro.f64("factor")?) {
            if ma != 0.0 {
                let m = yarn_mscale(f, ma);
                softmax_scale *= m * m;
            }
        }
    }
    Ok(Parts {
        head_dim: nope + rope,
        intermediate_size: o.pos("intermediate_size")?,
        moe_intermediate_size: moe_inter,
        num_experts,
        experts_per_tok,
        attention: AttentionSpec::Mla(MlaSpec {
            q_lora_rank,
            kv_lora_rank,
            qk_nope_head_dim: nope,
            qk_rope_head_dim: rope,
            v_head_dim: v,
            interleave: o.bool("rope_interleave", true)?,
            softmax_scale: softmax_scale as f32,
        }),
        router: RouterSpec::SigmoidGrouped {
            n_group,
            topk_group,
            renormalize: o.bool("norm_topk_prob", false)?,
            scaling,
        },
        experts: ExpertSpec {
            act: Activation::Silu,
            bias: false,
        },
        shared_expert: (shared > 0).then_some(SharedExpertSpec {
            intermediate_size: shared * moe_inter,
            gated: false,
        }),
        sparse_layers: (0..c.num_layers)
            .map(|l| num_experts > 0 && l >= first_dense)
            .collect(),
        windows: vec![None; c.num_layers],
        rope_dim: rope,
        skipped_layers: o.opt_usize("num_nextn_predict_layers")?.unwrap_or(0),
    })
}

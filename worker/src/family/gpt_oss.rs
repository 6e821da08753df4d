//! GPT-OSS (`GptOssForCausalLM`): GQA with q/k/v/o biases and a learned sink per head,
//! sliding and full layers alternating by `layer_types`, a biased router (top-k logits, then
//! softmax over them), experts fused as `gate_up_proj` (gate/up interleaved) with biases and a
//! clamped SwiGLU, YaRN rotary (`truncate: false`).

use super::*;

pub static FAMILY: Family = Family {
    arch: Arch::GptOss,
    hf_name: "GptOssForCausalLM",
    model_type: "gpt_oss",
    names: Names {
        router: "router",
        experts: ExpertNames::FusedInterleaved,
        ..Names::STANDARD
    },
    parse,
};

fn parse(o: &Obj<'_>, c: &Common) -> Result<Parts, ConfigError> {
    let (num_experts, experts_per_tok) = experts(o, "num_local_experts")?;
    let head_dim = head_dim(o, c)?;
    let inter = o.pos("intermediate_size")?;
    let bias = o.bool("attention_bias", true)?;
    let alpha = o.f64("swiglu_alpha")?.unwrap_or(1.702) as f32;
    let limit = o.f64("swiglu_limit")?.unwrap_or(7.0) as f32;
    if !(alpha.is_finite() && limit.is_finite() && limit > 0.0) {
        return Err(invalid(
            "swiglu_limit",
            format!("alpha {alpha} and limit {limit} must be finite, limit positive"),
        ));
    }
    Ok(Parts {
        head_dim,
        intermediate_size: inter,
        moe_intermediate_size: inter,
        num_experts,
        experts_per_tok,
        attention: AttentionSpec::Gqa {
            qkv_bias: bias,
            o_bias: bias,
            qk_norm: QkNorm::None,
            sinks: true,
        },
        router: RouterSpec::TopkSoftmax,
        experts: ExpertSpec {
            act: Activation::ClampedSwiglu { alpha, limit },
            bias: true,
        },
        shared_expert: None,
        sparse_layers: vec![num_experts > 0; c.num_layers],
        windows: layer_windows(o, c.num_layers, None)?,
        rope_dim: head_dim,
        skipped_layers: 0,
    })
}

/// GPT-OSS's `layer_types` as released: even layers slide, odd ones see everything.
pub fn alternating_layer_types(layers: usize) -> Vec<&'static str> {
    (0..layers)
        .map(|l| {
            if l % 2 == 0 {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect()
}

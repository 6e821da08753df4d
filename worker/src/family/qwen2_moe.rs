//! Qwen2-MoE (`Qwen2MoeForCausalLM`): GQA with q/k/v biases, softmax top-k routing, and a
//! shared expert on every sparse layer scaled by `sigmoid(x · shared_expert_gate)`.

use super::*;

pub static FAMILY: Family = Family {
    arch: Arch::Qwen2Moe,
    hf_name: "Qwen2MoeForCausalLM",
    model_type: "qwen2_moe",
    names: Names {
        shared: "shared_expert",
        shared_gate: "shared_expert_gate",
        ..Names::STANDARD
    },
    parse,
};

fn parse(o: &Obj<'_>, c: &Common) -> Result<Parts, ConfigError> {
    refuse_qwen_sliding_window(o)?;
    let (num_experts, experts_per_tok) = experts(o, "num_experts")?;
    let head_dim = head_dim(o, c)?;
    let shared = o.usize("shared_expert_intermediate_size")?;
    Ok(Parts {
        head_dim,
        intermediate_size: o.pos("intermediate_size")?,
        moe_intermediate_size: o.pos("moe_intermediate_size")?,
        num_experts,
        experts_per_tok,
        attention: AttentionSpec::Gqa {
            qkv_bias: o.bool("qkv_bias", true)?,
            o_bias: false,
            qk_norm: QkNorm::None,
            sinks: false,
        },
        router: RouterSpec::Softmax {
            renormalize: o.bool("norm_topk_prob", false)?,
        },
        experts: ExpertSpec {
            act: Activation::Silu,
            bias: false,
        },
        shared_expert: (shared > 0).then_some(SharedExpertSpec {
            intermediate_size: shared,
            gated: true,
        }),
        sparse_layers: sparse_by_step(o, c.num_layers, num_experts)?,
        windows: layer_windows(o, c.num_layers, None)?,
        rope_dim: head_dim,
        skipped_layers: 0,
    })
}

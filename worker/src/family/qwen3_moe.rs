//! Qwen3-MoE (`Qwen3MoeForCausalLM`): GQA with per-head q/k RMSNorm, softmax top-k routing
//! (`norm_topk_prob`), dense layers by `decoder_sparse_step` / `mlp_only_layers`.

use super::*;

pub static FAMILY: Family = Family {
    arch: Arch::Qwen3Moe,
    hf_name: "Qwen3MoeForCausalLM",
    model_type: "qwen3_moe",
    names: Names::STANDARD,
    parse,
};

fn parse(o: &Obj<'_>, c: &Common) -> Result<Parts, ConfigError> {
    refuse_qwen_sliding_window(o)?;
    let (num_experts, experts_per_tok) = experts(o, "num_experts")?;
    let head_dim = head_dim(o, c)?;
    let bias = o.bool("attention_bias", false)?;
    Ok(Parts {
        head_dim,
        intermediate_size: o.pos("intermediate_size")?,
        moe_intermediate_size: o.pos("moe_intermediate_size")?,
        num_experts,
        experts_per_tok,
        attention: AttentionSpec::Gqa {
            qkv_bias: bias,
            o_bias: bias,
            qk_norm: QkNorm::PerHead,
            sinks: false,
        },
        router: RouterSpec::Softmax {
            renormalize: o.bool("norm_topk_prob", false)?,
        },
        experts: ExpertSpec {
            act: Activation::Silu,
            bias: false,
        },
        shared_expert: None,
        sparse_layers: sparse_by_step(o, c.num_layers, num_experts)?,
        windows: layer_windows(o, c.num_layers, None)?,
        rope_dim: head_dim,
        skipped_layers: 0,
    })
}

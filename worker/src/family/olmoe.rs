//! OLMoE (`OlmoeForCausalLM`): GQA with q/k RMSNorm over the whole projection width (not per
//! head), softmax top-k routing without renormalisation by default, every layer sparse.

use super::*;

pub static FAMILY: Family = Family {
    arch: Arch::Olmoe,
    hf_name: "OlmoeForCausalLM",
    model_type: "olmoe",
    names: Names::STANDARD,
    parse,
};

fn parse(o: &Obj<'_>, c: &Common) -> Result<Parts, ConfigError> {
    refuse_if(
        o.get("clip_qkv").is_some(),
        "clip_qkv",
        "clipping of q/k/v activations is not implemented",
    )?;
    let (num_experts, experts_per_tok) = experts(o, "num_experts")?;
    let head_dim = head_dim(o, c)?;
    let inter = o.pos("intermediate_size")?;
    let bias = o.bool("attention_bias", false)?;
    Ok(Parts {
        head_dim,
        intermediate_size: inter,
        moe_intermediate_size: inter,
        num_experts,
        experts_per_tok,
        attention: AttentionSpec::Gqa {
            qkv_bias: bias,
            o_bias: bias,
            qk_norm: QkNorm::Full,
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
        sparse_layers: vec![num_experts > 0; c.num_layers],
        windows: layer_windows(o, c.num_layers, None)?,
        rope_dim: head_dim,
        skipped_layers: 0,
    })
}

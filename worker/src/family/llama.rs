//! Llama (`LlamaForCausalLM`): the dense decoder most small models share (SmolLM2, Llama 3):
//! GQA with optional biases (`attention_bias`), every layer a SiLU-gated MLP under `mlp`, no
//! experts. Served as is, or upcycled into a Mixtral-layout MoE by `switchyard import
//! --upcycle-experts`.

use super::*;

pub static FAMILY: Family = Family {
    arch: Arch::Llama,
    hf_name: "LlamaForCausalLM",
    model_type: "llama",
    names: Names::STANDARD,
    parse,
};

fn parse(o: &Obj<'_>, c: &Common) -> Result<Parts, ConfigError> {
    refuse_if(
        o.bool("mlp_bias", false)?,
        "mlp_bias",
        "biases on the MLP projections are not implemented",
    )?;
    let head_dim = head_dim(o, c)?;
    let bias = o.bool("attention_bias", false)?;
    let inter = o.pos("intermediate_size")?;
    Ok(Parts {
        head_dim,
        intermediate_size: inter,
        moe_intermediate_size: inter,
        num_experts: 0,
        experts_per_tok: 0,
        attention: AttentionSpec::Gqa {
            qkv_bias: bias,
            o_bias: bias,
            qk_norm: QkNorm::None,
            sinks: false,
        },
        router: RouterSpec::Softmax { renormalize: true },
        experts: ExpertSpec {
            act: Activation::Silu,
            bias: false,
        },
        shared_expert: None,
        sparse_layers: vec![false; c.num_layers],
        windows: vec![None; c.num_layers],
        rope_dim: head_dim,
        skipped_layers: 0,
    })
}

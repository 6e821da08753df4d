//! Mixtral (`MixtralForCausalLM`): GQA, one sliding window for every layer when set, softmax
//! top-k routing renormalised, experts `w1` (gate) / `w3` (up) / `w2` (down) under
//! `block_sparse_moe`.

use super::*;

pub static FAMILY: Family = Family {
    arch: Arch::Mixtral,
    hf_name: "MixtralForCausalLM",
    model_type: "mixtral",
    names: Names {
        mlp: "block_sparse_moe",
        router: "gate",
        experts: ExpertNames::Separate {
            gate: "w1",
            up: "w3",
            down: "w2",
        },
        shared: "",
        shared_gate: "",
    },
    parse,
};

fn parse(o: &Obj<'_>, c: &Common) -> Result<Parts, ConfigError> {
    let (num_experts, experts_per_tok) = experts(o, "num_local_experts")?;
    let head_dim = head_dim(o, c)?;
    let window = o.opt_usize("sliding_window")?;
    if window == Some(0) {
        return Err(invalid("sliding_window", "must be positive".into()));
    }
    let inter = o.pos("intermediate_size")?;
    Ok(Parts {
        head_dim,
        intermediate_size: inter,
        moe_intermediate_size: inter,
        num_experts,
        experts_per_tok,
        attention: AttentionSpec::Gqa {
            qkv_bias: false,
            o_bias: false,
            qk_norm: QkNorm::None,
            sinks: false,
        },
        router: RouterSpec::Softmax { renormalize: true },
        experts: ExpertSpec {
            act: Activation::Silu,
            bias: false,
        },
        shared_expert: None,
        sparse_layers: vec![num_experts > 0; c.num_layers],
        windows: vec![window; c.num_layers],
        rope_dim: head_dim,
        skipped_layers: 0,
    })
}

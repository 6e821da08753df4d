use super::*;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf")
}

/// Every block format decodes as llama.cpp's gguf-py does (`gguf.quants.dequantize`, random
/// blocks with finite scales: `scripts/gguf-dequant-fixture.py`).
#[test]
fn dequantization_matches_gguf_py() {
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("dequant.json")).unwrap()).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), GgmlType::ALL.len(), "a case per type");
    for c in cases {
        let ty = GgmlType::from_id(c["ggml_type"].as_u64().unwrap() as u32).unwrap();
        assert_eq!(ty.name(), c["type"].as_str().unwrap());
        let hex = c["bytes"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let want: Vec<f32> = c["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let (block, size) = ty.block();
        assert_eq!(bytes.len(), want.len() / block * size, "{}", ty.name());
        let got = dequant::dequantize(ty, &bytes, want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "{} element {i}: {g} vs gguf-py {w}",
                ty.name()
            );
        }
    }
}

/// llama.cpp's `LlamaModel.permute` (the converter's), written as the converter writes it:
/// rows reshaped `[heads, 2, d/2]`, the last two axes swapped.
fn permute(v: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let d = v.len() / cols / heads;
    let mut out = vec![0.0; v.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                let src = (h * d + j * (d / 2) + i) * cols;
                let dst = (h * d + i * 2 + j) * cols;
                out[dst..dst + cols].copy_from_slice(&v[src..src + cols]);
            }
        }
    }
    out
}

#[test]
fn unpermute_undoes_the_converters_permute() {
    for (heads, d, cols) in [(4, 16, 8), (2, 64, 3), (9, 64, 1)] {
        let v: Vec<f32> = (0..heads * d * cols).map(|x| x as f32).collect();
        let p = permute(&v, heads, cols);
        assert_ne!(p, v);
        assert_eq!(import::unpermute_rows(&p, heads, cols), v);
    }
}

#[test]
fn a_fixture_file_reads_whole() {
    let f = GgufFile::open(&fixtures().join("tiny-qwen3-moe-q8_0.gguf")).unwrap();
    assert_eq!(f.str("general.architecture").unwrap(), "qwen3moe");
    assert_eq!(f.usize("qwen3moe.expert_count").unwrap(), 8);
    let t = f.tensor("blk.0.ffn_gate_exps.weight").unwrap();
    assert_eq!(t.shape(), vec![8, 32, 64]);
    assert_eq!(t.ty, GgmlType::Q8_0);
    assert_eq!(f.strings("tokenizer.ggml.tokens").unwrap().len(), 2048);
}

/// Every truncation of a real file's header and first tensor, and random byte flips, give an
/// error or a file whose tensors lie inside it: never a panic or a read out of bounds.
#[test]
fn fuzz_truncated_and_corrupted_files_are_refused_or_in_bounds() {
    let path = fixtures().join("tiny-olmoe-q8_0.gguf");
    let b = std::fs::read(&path).unwrap();
    let header = GgufFile::parse(&path, &b).unwrap().2[0].offset + 64;
    for n in 0..header {
        assert!(GgufFile::parse(&path, &b[..n]).is_err(), "prefix {n}");
    }
    let mut rng = switchyard_kernels::rng::Rng::new(7);
    for _ in 0..crate::fuzz_cases() {
        let mut m = b[..header.min(b.len())].to_vec();
        for _ in 0..1 + rng.next_u64() % 4 {
            let i = (rng.next_u64() as usize) % m.len();
            m[i] = rng.next_u64() as u8;
        }
        if let Ok((_, _, tensors)) = GgufFile::parse(&path, &m) {
            for t in tensors {
                assert!(t.offset + t.nbytes <= m.len(), "{}", t.name);
                let _ = dequant::dequantize(t.ty, &m[t.offset..t.offset + t.nbytes], t.elements());
            }
        }
    }
}

#[test]
fn bad_files_name_what_is_wrong() {
    let path = Path::new("x.gguf");
    let e = GgufFile::parse(path, b"GGML\x03\0\0\0")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a GGUF file"), "{e}");
    let e = GgufFile::parse(path, b"GGUF\x01\0\0\0")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("version 1"), "{e}");
    // One tensor of an unknown ggml type (IQ2_XXS = 16).
    let mut b = b"GGUF\x03\0\0\0".to_vec();
    b.extend(1u64.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.push(b'w');
    b.extend(1u32.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(16u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.resize(4096, 0);
    let e = GgufFile::parse(path, &b).err().unwrap().to_string();
    assert!(e.contains("tensor w") && e.contains("ggml type 16"), "{e}");
}

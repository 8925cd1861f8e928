//! Auto-quantize's backward (src/ptq/backward.rs: `head_backward`, `LayerGrad::backward`) on
//! the device against the same code on the CPU, the reference: the tiny f32 Llama fixture
//! (also with 200 positions, so the attention backward takes two query blocks, and a sliding
//! window, so blocks start past key 0) and every reference family whose features the backward
//! has a branch for (../shared/reference/families: q/k norm, `1 + w` norms and tanh-GELU,
//! LayerNorm with biases and a plain MLP, relu² with partial RoPE, MoE with and without
//! renormalised top-k). Compared: every layer input of the forward, the loss, the head's
//! (x, dL/dz) blocks, the (x, dy) each linear reports and every dL/dh. Under the emulator
//! each value is bit-identical; on a GPU (expf / tanhf / log within an ulp, another GEMM
//! order) within 1e-4 of the tensor's largest magnitude.
#![cfg(any(feature = "cuda", feature = "cuda-emu"))]

#[allow(dead_code)]
mod common;

use common::{have_gpu, say};
use rq_min::compute::{take_device_error, Device};
use rq_min::io::safetensors::SafeTensors;
use rq_min::model::{Model, NoHooks};
use rq_min::ptq::backward::{head_backward, LayerGrad};
use std::path::Path;

/// What one backward produces, in the order it produces it: (what, values), and the loss.
struct Trace {
    loss: f64,
    tensors: Vec<(String, Vec<f32>)>,
}

/// The forward and backward of the model in `dir` on `ids`, on `device`; `window` replaces the
/// config's sliding window when given.
fn trace(dir: &Path, ids: &[u32], window: Option<usize>, device: Device) -> Trace {
    let mut model = Model::open(dir, None).unwrap();
    model.device = device;
    if window.is_some() {
        model.config.sliding_window = window;
    }
    let cfg = model.config.clone();
    let seq = ids.len();
    let rope = cfg.rope_table(seq);
    let layers: Vec<_> = (0..cfg.num_hidden_layers).map(|l| model.load_layer(l).unwrap()).collect();
    let mut tensors = Vec::new();
    let mut inputs = vec![model.embed(ids).unwrap()];
    for (l, layer) in layers.iter().enumerate() {
        let mut h = inputs[l].clone();
        layer.forward(&cfg, &rope, &mut h, seq, &mut NoHooks);
        tensors.push((format!("layer {l} output"), h.to_host().into_owned()));
        inputs.push(h);
    }
    let head = model.load_head().unwrap();
    let (loss, mut g) = head_backward(&head, &inputs[layers.len()], ids, &mut |x, dz| {
        tensors.push(("head x".into(), x.to_host().into_owned()));
        tensors.push(("head dL/dz".into(), dz.to_host().into_owned()));
    });
    tensors.push(("head dL/dh".into(), g.to_host().into_owned()));
    for (l, layer) in layers.iter().enumerate().rev() {
        let grad = LayerGrad::new(layer, &cfg, &rope);
        g = grad.backward(&inputs[l], seq, &g, &mut |kind, expert, x, dy| {
            tensors.push((format!("layer {l} {kind:?} expert {expert:?} x"), x.to_host().into_owned()));
            tensors.push((format!("layer {l} {kind:?} expert {expert:?} dy"), dy.to_host().into_owned()));
        });
        tensors.push((format!("layer {l} dL/dh_in"), g.to_host().into_owned()));
    }
    take_device_error().unwrap();
    Trace { loss, tensors }
}

/// The first `n` reference ids of the model in `dir`.
fn reference_ids(dir: &Path, n: usize) -> Vec<u32> {
    let reference = SafeTensors::open(&dir.join("reference_io.safetensors")).unwrap();
    reference.tensor("input_ids").unwrap().to_i64().unwrap()[..n].iter().map(|&i| u32::try_from(i).unwrap()).collect()
}

/// Device and CPU traces agree (bit for bit under the emulator); prints the largest error.
fn check(name: &str, dir: &Path, ids: &[u32], window: Option<usize>) {
    let cpu = trace(dir, ids, window, Device::Cpu);
    let gpu = trace(dir, ids, window, Device::Cuda);
    assert_eq!(cpu.tensors.len(), gpu.tensors.len(), "{name}: the device reports another number of tensors");
    let exact = cfg!(feature = "cuda-emu");
    let mut worst = 0f64;
    for ((what, c), (what_gpu, d)) in cpu.tensors.iter().zip(&gpu.tensors) {
        assert_eq!(what, what_gpu, "{name}: the device reports in another order");
        assert_eq!(c.len(), d.len(), "{name}, {what}: lengths");
        assert!(c.iter().all(|v| v.is_finite()), "{name}, {what}: the CPU reference is not finite");
        if exact {
            let differ = c.iter().zip(d).position(|(a, b)| a.to_bits() != b.to_bits());
            assert!(differ.is_none(), "{name}, {what}: element {} cpu {} device {}", differ.unwrap(), c[differ.unwrap()], d[differ.unwrap()]);
        } else {
            let scale = c.iter().fold(0f64, |m, &v| m.max(f64::from(v).abs())).max(f64::MIN_POSITIVE);
            let err = c.iter().zip(d).map(|(&a, &b)| (f64::from(a) - f64::from(b)).abs() / scale).fold(0f64, f64::max);
            assert!(err <= 1e-4, "{name}, {what}: max error {err:.2e} of the largest magnitude");
            worst = worst.max(err);
        }
    }
    if exact {
        assert_eq!(cpu.loss.to_bits(), gpu.loss.to_bits(), "{name}: loss cpu {} device {}", cpu.loss, gpu.loss);
    } else {
        assert!((cpu.loss - gpu.loss).abs() <= 1e-6 * cpu.loss, "{name}: loss cpu {} device {}", cpu.loss, gpu.loss);
    }
    say(&format!("{name}: {} tensors, loss {:.6}, max error {worst:.2e}", cpu.tensors.len(), cpu.loss));
}

#[test]
fn backward_on_the_device_matches_the_cpu() {
    if !have_gpu() {
        return;
    }
    let llama = common::repo_dir().join("tests/fixtures/families-llama");
    check("families-llama, 16 positions", &llama, &reference_ids(&llama, 16), None);
    let vocab = 512u32;
    let long: Vec<u32> = (0..200u32).map(|i| (i * 37 + i / 5) % vocab).collect();
    check("families-llama, 200 positions", &llama, &long, None);
    check("families-llama, 200 positions, sliding window 37", &llama, &long, Some(37));
}

#[test]
fn backward_on_the_device_matches_the_cpu_for_every_branch() {
    if !have_gpu() {
        return;
    }
    let Some(shared) = common::shared_dir() else { return };
    for name in ["qwen3", "gemma", "starcoder2", "nemotron", "mixtral", "qwen3_moe", "gemma2", "gemma3", "granite", "olmo2", "exaone4", "qwen2_moe", "phimoe", "gptj", "falcon", "falcon-mqa", "bloom", "mpt"] {
        let dir = shared.join("reference/families").join(name);
        check(name, &dir, &reference_ids(&dir, 16), None);
    }
}

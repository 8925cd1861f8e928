//! `rq-min eval --ids IDS.json --logits OUT.safetensors`, as a user runs it (the binary): the
//! reference ids of a family's tiny model scored without a tokenizer, and the logits it writes
//! against the ones transformers computed (reference_io.safetensors, max |a − b| / max |b| within
//! 1e-4); the printed perplexity against the one the written logits give (f64); the refusals
//! (rows of several lengths, a 1-token row, --text with --ids, a folder as the output), each
//! before any work and without writing the output.

mod common;

use rq_min::io::safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rq-min-eval-ids-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn eval(model: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rq-min")).args(["eval", "--model", model.to_str().unwrap(), "--quiet"]).args(args).output().unwrap()
}

/// The reference ids (`[rows, seq]`) and logits (`[rows, seq, vocab]`) of a family's model.
fn reference(dir: &Path) -> (Vec<Vec<u32>>, Vec<f32>) {
    let r = SafeTensors::open(&dir.join("reference_io.safetensors")).unwrap();
    let ids = r.tensor("input_ids").unwrap();
    let seq = ids.shape[1];
    let flat: Vec<u32> = ids.to_i64().unwrap().iter().map(|&i| u32::try_from(i).unwrap()).collect();
    (flat.chunks(seq).map(<[u32]>::to_vec).collect(), r.tensor("logits").unwrap().to_f32().unwrap())
}

fn write_ids(path: &Path, rows: &[Vec<u32>]) {
    let rows: Vec<String> = rows.iter().map(|r| format!("[{}]", r.iter().map(u32::to_string).collect::<Vec<_>>().join(","))).collect();
    std::fs::write(path, format!("[{}]", rows.join(","))).unwrap();
}

/// Scores the reference ids of the model in `dir`, compares the written logits with
/// transformers' and the printed perplexity with theirs; returns the max relative error.
fn check(dir: &Path, name: &str) -> f64 {
    let work = scratch(name);
    let (ids, want) = reference(dir);
    let (ids_file, out) = (work.join("ids.json"), work.join("logits.safetensors"));
    write_ids(&ids_file, &ids);
    let run = eval(dir, &["--ids", ids_file.to_str().unwrap(), "--logits", out.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{name}: {stdout}{}", String::from_utf8_lossy(&run.stderr));
    let (rows, seq) = (ids.len(), ids[0].len());
    assert!(stdout.contains(&format!("({rows} rows of {seq}, {} scored", rows * (seq - 1))), "{name}: {stdout}");

    let file = SafeTensors::open(&out).unwrap();
    let logits = file.tensor("logits").unwrap();
    let vocab = want.len() / (rows * seq);
    assert_eq!(logits.shape, [rows, seq, vocab], "{name}: shape");
    let got = logits.to_f32().unwrap();
    let diff = got.iter().zip(&want).map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs()).fold(0.0, f64::max);
    let err = diff / want.iter().map(|b| f64::from(*b).abs()).fold(0.0, f64::max);
    assert!(err <= 1e-4, "{name}: logits max relative error {err:.2e}");

    // The perplexity of the written logits, in f64.
    let mut nll = 0f64;
    for (r, row) in ids.iter().enumerate() {
        for t in 0..seq - 1 {
            let z = &got[(r * seq + t) * vocab..][..vocab];
            let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let lse = max + z.iter().map(|&v| (f64::from(v) - max).exp()).sum::<f64>().ln();
            nll += lse - f64::from(z[row[t + 1] as usize]);
        }
    }
    let ppl = (nll / (rows * (seq - 1)) as f64).exp();
    let printed: f64 = stdout.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((printed - ppl).abs() <= 5e-5 * ppl + 1e-4, "{name}: printed perplexity {printed}, from the logits {ppl}");
    println!("{name}: logits [{rows}, {seq}, {vocab}] max rel err {err:.2e}, perplexity {printed}");
    let _ = std::fs::remove_dir_all(&work);
    err
}

#[test]
fn logits_of_the_llama_fixture_match_transformers() {
    check(&common::repo_dir().join("tests/fixtures/families-llama"), "families-llama");
}

#[test]
fn logits_of_every_family_match_transformers() {
    let Some(shared) = common::shared_dir() else { return };
    let families = common::FAMILIES;
    for name in families {
        check(&shared.join("reference/families").join(name), name);
    }
}

#[test]
fn refusals_come_before_any_work_and_write_nothing() {
    let model = common::repo_dir().join("tests/fixtures/families-llama");
    let work = scratch("refusals");
    let out = work.join("logits.safetensors");
    let ids = work.join("ids.json");
    let refused = |args: &[&str], want: &str| {
        let run = eval(&model, args);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success() && stderr.contains(want), "{args:?}: want {want:?}, got {stderr}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    };
    let (ids_arg, out_arg) = (ids.to_str().unwrap(), out.to_str().unwrap());
    write_ids(&ids, &[vec![1, 2, 3], vec![4, 5]]);
    refused(&["--ids", ids_arg, "--logits", out_arg], "row 1 has 2 tokens, row 0 has 3");
    write_ids(&ids, &[vec![1, 2, 3], vec![4]]);
    refused(&["--ids", ids_arg], "row 1 has 1 token(s)");
    refused(&["--ids", ids_arg, "--text", ids_arg], "give --text or --ids, not both");
    write_ids(&ids, &[vec![1, 2, 3]]);
    refused(&["--ids", ids_arg, "--logits", work.to_str().unwrap()], "is a folder");
    write_ids(&ids, &[vec![1, 2, 512]]);
    refused(&["--ids", ids_arg, "--logits", out_arg], "512");
    // Rows of several lengths are scored when no logits are asked for.
    write_ids(&ids, &[vec![1, 2, 3], vec![4, 5]]);
    let run = eval(&model, &["--ids", ids_arg]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let _ = std::fs::remove_dir_all(&work);
}

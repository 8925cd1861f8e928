//! Auto-quantize on rq-tiny with ModelOpt's calibration ids (spec/algorithms.md §9): the budget
//! is met, the choice is at least as good as ModelOpt's own at the same budget (its
//! layer_formats.json applied with --layer-formats), better than the best uniform and than a
//! random assignment of the same bits, and the export reproduces the reported perplexity.

mod common;

use rq_min::cli::{quantize, QuantizeArgs}; use rq_min::ptq::calib::DEFAULT_EVAL_TEXT;
use rq_min::io::json::Json;
use rq_min::model::Model;
use rq_min::ptq::eval::{eval_windows, perplexity};
use rq_min::ptq::progress::Progress;
use rq_min::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

struct Paths {
    model: PathBuf,
    reference: PathBuf,
}

fn paths() -> Option<Paths> {
    let shared = common::shared_dir()?;
    Some(Paths { model: shared.join("models/rq-tiny"), reference: shared.join("reference/modelopt-0.47/rq-tiny") })
}

fn out_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("rq-min-auto-{}-{name}", std::process::id()))
}

fn args(p: &Paths, out: &Path) -> QuantizeArgs {
    QuantizeArgs {
        qformat: "nvfp4,fp8".into(),
        calib_ids: Some(p.reference.join("calib_ids.json")),
        calib_size: 64,
        calib_seq: Some(256),
        no_eval: true,
        force: true,
        quiet: true,
        ..QuantizeArgs::new(&p.model, out)
    }
}

fn ppl(dir: &Path, tok_dir: &Path) -> f64 {
    let ids = Tokenizer::from_dir(tok_dir).unwrap().encode(DEFAULT_EVAL_TEXT);
    perplexity(&Model::open(dir, None).unwrap(), &eval_windows(&ids, 256), &Progress::new("eval", true)).unwrap().ppl
}

/// Quantizes with `layer_formats` written to a file (module -> format).
fn with_layer_formats(p: &Paths, name: &str, formats: &[(String, &str)]) -> f64 {
    let file = std::env::temp_dir().join(format!("rq-min-auto-{}-{name}.json", std::process::id()));
    let j = Json::Obj(formats.iter().map(|(m, f)| (m.clone(), rq_min::io::json::str(f))).collect());
    std::fs::write(&file, j.to_pretty(1)).unwrap();
    let out = out_dir(name);
    quantize(&QuantizeArgs { qformat: "fp8".into(), layer_formats: Some(file), ..args(p, &out) }).unwrap();
    ppl(&out, &p.model)
}

/// (module, format) of every searched module in a report.
fn report_formats(report: &Json) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for g in report.get("groups").unwrap().as_array().unwrap() {
        let chosen = g.get("chosen").unwrap().as_str().unwrap().to_string();
        for m in g.get("members").unwrap().as_array().unwrap() {
            v.push((m.as_str().unwrap().to_string(), chosen.clone()));
        }
    }
    v
}

fn check_budget(budget: f64) {
    let Some(p) = paths() else { return };
    let out = out_dir(&format!("b{budget}"));
    // With the before/after evaluation, so the report holds the export's perplexity.
    quantize(&QuantizeArgs { auto_bits: Some(budget), exclude: vec!["none".into()], no_eval: false, ..args(&p, &out) })
        .unwrap();
    let report = Json::parse_file(&out.join("auto_quantize.json")).unwrap();
    let bits = report.get("effective_bits").unwrap().as_f64().unwrap();
    assert!(bits <= budget && bits >= budget - 0.1, "effective bits {bits} for budget {budget}");
    assert!(report.get("calibration_digest").unwrap().as_str().unwrap().starts_with("fnv1a64:"));
    let ours = ppl(&out, &p.model);
    // The export reproduces the perplexity `quantize` reported for it.
    let reported = report.get("perplexity").unwrap().as_f64().unwrap();
    assert!((reported / ours - 1.0).abs() < 1e-9, "reported {reported}, eval of the export {ours}");

    // ModelOpt's choice at the same budget, applied by hand.
    let lf = Json::parse_file(&p.reference.join(format!("autoq_{budget:.1}/layer_formats.json"))).unwrap();
    let theirs_formats: Vec<(String, String)> =
        lf.as_object().unwrap().iter().map(|(m, f)| (m.clone(), f.as_str().unwrap().to_string())).collect();
    let ours_formats = report_formats(&report);
    let differ = ours_formats.iter().filter(|(m, f)| theirs_formats.iter().any(|(n, g)| n == m && g != f)).count();
    let theirs_ref: Vec<(String, &str)> = theirs_formats.iter().map(|(m, f)| (m.clone(), f.as_str())).collect();
    let theirs = with_layer_formats(&p, &format!("mo{budget}"), &theirs_ref);

    // The best uniform assignment within the budget (every searchable module NVFP4), and a
    // random assignment of about the same bits (seeded: groups in random order get FP8 while
    // the budget allows).
    let uniform: Vec<(String, &str)> = ours_formats.iter().map(|(m, _)| (m.clone(), "nvfp4")).collect();
    let p_uniform = with_layer_formats(&p, &format!("uni{budget}"), &uniform);
    let groups: Vec<(Vec<String>, usize)> = report.get("groups").unwrap().as_array().unwrap().iter().map(|g| {
        let members = g.get("members").unwrap().as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect();
        (members, g.get("params").unwrap().as_i64().unwrap() as usize)
    }).collect();
    let total: usize = groups.iter().map(|g| g.1).sum();
    let order = rq_min::ptq::autoquant::score_indices(groups.len(), groups.len(), 99);
    let mut used: f64 = groups.iter().map(|g| g.1 as f64 * 4.5).sum();
    let mut random: Vec<(String, &str)> = Vec::new();
    let mut fp8 = vec![false; groups.len()];
    for &g in order.iter().rev() {
        if used + groups[g].1 as f64 * 3.5 <= budget * total as f64 {
            used += groups[g].1 as f64 * 3.5;
            fp8[g] = true;
        }
    }
    for (g, (members, _)) in groups.iter().enumerate() {
        random.extend(members.iter().map(|m| (m.clone(), if fp8[g] { "fp8" } else { "nvfp4" })));
    }
    let p_random = with_layer_formats(&p, &format!("rnd{budget}"), &random);
    println!(
        "budget {budget}: {bits:.3} bits; ppl rq-min {ours:.3}, ModelOpt's choice {theirs:.3} ({differ} modules differ), \
         uniform nvfp4 {p_uniform:.3}, random {:.3} bits {p_random:.3}",
        used / total as f64
    );
    assert!(ours <= theirs * 1.0005, "rq-min's choice {ours} worse than ModelOpt's {theirs}");
    assert!(ours < p_uniform, "not better than uniform nvfp4: {ours} vs {p_uniform}");
    assert!(ours < p_random, "not better than a random assignment: {ours} vs {p_random}");
}

#[test]
fn budget_5_bits() {
    check_budget(5.0);
}

#[test]
fn budget_6_bits() {
    check_budget(6.0);
}

/// With the default exclusions lm_head (8.2 M of 14.5 M linear weights) stays at 16 bits:
/// 12 bits works, 5 bits is refused before any work, naming the lowest reachable budget.
#[test]
fn default_exclusions_bound_the_budget() {
    let Some(p) = paths() else { return };
    let out = out_dir("b5-default");
    let t = std::time::Instant::now();
    let err = quantize(&QuantizeArgs { auto_bits: Some(5.0), ..args(&p, &out) }).unwrap_err().to_string();
    assert!(err.contains("lowest reachable effective bits") && err.contains("11.0"), "{err}");
    assert!(t.elapsed().as_secs_f64() < 5.0, "the budget check must come before the search");
    assert!(!out.exists());
    let out = out_dir("b12-default");
    quantize(&QuantizeArgs { auto_bits: Some(12.0), score_size: 16, ..args(&p, &out) }).unwrap();
    let report = Json::parse_file(&out.join("auto_quantize.json")).unwrap();
    let bits = report.get("effective_bits").unwrap().as_f64().unwrap();
    assert!((11.9..=12.0).contains(&bits), "{bits}");
    let lm = report.get("groups").unwrap().as_array().unwrap().iter().find(|g| g.get("group").unwrap().as_str() == Some("lm_head")).unwrap().clone();
    assert_eq!(lm.get("chosen").unwrap().as_str(), Some("none"));
}

/// AWQ and SmoothQuant formats as candidates (each calibrated with its own algorithm, §9.2):
/// lm_head is offered only the max-calibrated FP8, the budget is met, the 4-bit AWQ format is
/// used where the budget needs it, and the choice beats a random assignment of the same formats
/// and about the same bits.
#[test]
fn awq_and_smoothquant_candidates() {
    let Some(p) = paths() else { return };
    let out = out_dir("awq-sq");
    let budget = 7.0;
    let small = |a: QuantizeArgs| QuantizeArgs { calib_size: 16, score_size: 16, ..a };
    quantize(&small(QuantizeArgs {
        qformat: "int4_awq,int8_sq,fp8".into(),
        auto_bits: Some(budget),
        exclude: vec!["none".into()],
        ..args(&p, &out)
    }))
    .unwrap();
    let report = Json::parse_file(&out.join("auto_quantize.json")).unwrap();
    let bits = report.get("effective_bits").unwrap().as_f64().unwrap();
    assert!(bits <= budget && bits >= budget - 0.1, "effective bits {bits}");
    let groups = report.get("groups").unwrap().as_array().unwrap();
    let lm = groups.iter().find(|g| g.get("group").unwrap().as_str() == Some("lm_head")).unwrap();
    let lm_scores = lm.get("scores").unwrap();
    assert!(matches!(lm_scores.get("int4_awq"), Some(Json::Null)) && matches!(lm_scores.get("int8_sq"), Some(Json::Null)));
    assert!(lm_scores.get("fp8").unwrap().as_f64().unwrap() > 0.0);
    let chosen = report_formats(&report);
    let count = |f: &str| chosen.iter().filter(|(_, c)| c == f).count();
    assert!(count("int4_awq") > 0 && count("int8_sq") + count("fp8") > 0, "{chosen:?}");
    let ours = ppl(&out, &p.model);

    // Random: groups in a seeded order take int4_awq, the rest int8_sq (lm_head fp8), with at
    // least as many int4_awq weights as rq-min's choice (so no more bits).
    let params = |g: &Json| g.get("params").unwrap().as_i64().unwrap() as usize;
    let awq_params: usize = groups.iter().filter(|g| g.get("chosen").unwrap().as_str() == Some("int4_awq")).map(params).sum();
    let order = rq_min::ptq::autoquant::score_indices(groups.len(), groups.len(), 7);
    let mut taken = 0;
    let mut random: Vec<(String, &str)> = Vec::new();
    for &g in &order {
        let g = &groups[g];
        let name = g.get("group").unwrap().as_str().unwrap();
        let f = if name == "lm_head" {
            "fp8"
        } else if taken < awq_params {
            taken += params(g);
            "int4_awq"
        } else {
            "int8_sq"
        };
        random.extend(g.get("members").unwrap().as_array().unwrap().iter().map(|m| (m.as_str().unwrap().to_string(), f)));
    }
    let file = std::env::temp_dir().join(format!("rq-min-auto-{}-awq-random.json", std::process::id()));
    std::fs::write(&file, Json::Obj(random.iter().map(|(m, f)| (m.clone(), rq_min::io::json::str(f))).collect()).to_pretty(1))
        .unwrap();
    let out_random = out_dir("awq-sq-random");
    quantize(&small(QuantizeArgs { qformat: "fp8".into(), layer_formats: Some(file), ..args(&p, &out_random) })).unwrap();
    let p_random = ppl(&out_random, &p.model);
    println!("awq/sq candidates: {bits:.3} bits, ppl {ours:.3}; random same formats {p_random:.3}");
    assert!(ours < p_random, "not better than a random assignment: {ours} vs {p_random}");
}

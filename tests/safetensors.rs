//! The safetensors reader, checkpoint folders and writer: real files from the shared folder,
//! round trips of every dtype, sharding, exact bytes, and a mutation sweep of the parser.

mod common;

use common::Rng;

use rq_min::io::json::Json;
use rq_min::numerics::{bf16_to_f32, e4m3_to_f32, f16_to_f32};
use rq_min::io::safetensors::*;
use rq_min::Error;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// A fresh, empty scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("safetensors-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const ALL_DTYPES: [Dtype; 14] = [
    Dtype::Bool,
    Dtype::U8,
    Dtype::I8,
    Dtype::I16,
    Dtype::U16,
    Dtype::I32,
    Dtype::U32,
    Dtype::I64,
    Dtype::F16,
    Dtype::BF16,
    Dtype::F32,
    Dtype::F64,
    Dtype::F8E4M3,
    Dtype::F8E5M2,
];

fn meta(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn dtype_names_sizes() {
    let expect = [
        ("BOOL", 1),
        ("U8", 1),
        ("I8", 1),
        ("I16", 2),
        ("U16", 2),
        ("I32", 4),
        ("U32", 4),
        ("I64", 8),
        ("F16", 2),
        ("BF16", 2),
        ("F32", 4),
        ("F64", 8),
        ("F8_E4M3", 1),
        ("F8_E5M2", 1),
    ];
    for (d, (name, size)) in ALL_DTYPES.into_iter().zip(expect) {
        assert_eq!(d.name(), name);
        assert_eq!(d.size(), size, "{name}");
        assert_eq!(Dtype::from_name(name), Some(d));
    }
    for bad in ["F7", "bf16", "", "F8E4M3", "U64", "F4"] {
        assert_eq!(Dtype::from_name(bad), None, "{bad}");
    }
}

#[test]
fn real_sharded_checkpoint_rq_tiny() {
    let Some(shared) = common::shared_dir() else { return };
    let dir = shared.join("models/rq-tiny");
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.dir(), dir);
    assert_eq!(ck.shard_files().len(), 3);
    for (i, f) in ck.shard_files().iter().enumerate() {
        assert_eq!(
            f.file_name().unwrap().to_str().unwrap(),
            format!("model-{:05}-of-00003.safetensors", i + 1)
        );
    }
    assert_eq!(ck.metadata(), meta(&[("format", "pt")]));

    let index = Json::parse_file(&dir.join("model.safetensors.index.json")).unwrap();
    let map = index.get("weight_map").unwrap().as_object().unwrap();
    let total_size = index.get("metadata").unwrap().get("total_size").unwrap().as_usize().unwrap();
    assert_eq!(ck.names().len(), map.len());
    let mut total = 0;
    for (name, file) in map {
        assert!(ck.contains(name), "{name}");
        let t = ck.tensor(name).unwrap();
        assert_eq!(t.name, name);
        assert_eq!(t.data.len(), t.numel() * t.dtype.size());
        total += t.data.len();
        // The index's file really holds it.
        let shard = SafeTensors::open(&dir.join(file.as_str().unwrap())).unwrap();
        assert_eq!(shard.tensor(name).unwrap().data, t.data);
    }
    assert_eq!(total, total_size);
    let mut sorted = ck.names();
    sorted.sort();
    assert_eq!(sorted, ck.names());

    let q = ck.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.dtype, Dtype::BF16);
    assert_eq!(q.shape, [256, 256]);
    q.expect_shape(&[256, 256]).unwrap();
    let v = q.to_f32().unwrap();
    assert_eq!(v.len(), 256 * 256);
    assert!(v.iter().all(|x| x.is_finite()));
    assert!(v.iter().any(|&x| x != 0.0));

    assert!(ck.get("no.such.tensor").is_none());
    let e = ck.tensor("no.such.tensor").unwrap_err().to_string();
    assert!(e.contains("no.such.tensor") && e.contains("rq-tiny"), "{e}");
}

#[test]
fn real_fp8_reference() {
    let Some(shared) = common::shared_dir() else { return };
    let path = shared.join("reference/modelopt-0.47/rq-tiny/fp8/model.safetensors");
    let st = SafeTensors::open(&path).unwrap();
    assert_eq!(st.path(), path);
    let w = st.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!((w.dtype, w.shape), (Dtype::F8E4M3, &[256usize, 256][..]));
    assert_eq!(w.dtype.name(), "F8_E4M3");
    let wv = w.to_f32().unwrap();
    assert!(wv.iter().all(|x| x.is_finite() && x.abs() <= 448.0));
    let s = st.tensor("model.layers.0.self_attn.q_proj.weight_scale").unwrap();
    assert_eq!((s.dtype, s.shape, s.numel()), (Dtype::F32, &[][..], 1));
    let sv = s.to_f32().unwrap();
    assert_eq!(sv.len(), 1);
    assert!(sv[0].is_finite() && sv[0] > 0.0, "{}", sv[0]);
    // Offsets sorted and tiling the data section.
    let mut pos = 0;
    for t in st.tensors() {
        assert_eq!(t.start, pos);
        pos = t.end;
    }
    assert_eq!(st.metadata(), meta(&[("format", "pt")]));
}

#[test]
fn real_reference_io() {
    let Some(shared) = common::shared_dir() else { return };
    let st = SafeTensors::open(&shared.join("reference/families/llama/reference_io.safetensors")).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    assert_eq!((ids.dtype, ids.shape), (Dtype::I64, &[2usize, 24][..]));
    let v = ids.to_i64().unwrap();
    assert_eq!(v.len(), 48);
    assert!(v.iter().all(|&i| i >= 0));
    let e = ids.to_f32().unwrap_err().to_string();
    assert!(e.contains("input_ids") && e.contains("I64"), "{e}");
    let e = ids.expect_shape(&[2, 25]).unwrap_err().to_string();
    assert!(e.contains("input_ids") && e.contains("[2, 24] (I64) but expected [2, 25]"), "{e}");
}

/// Random tensors of every dtype and several shapes, including 0-d and zero-size ones.
fn sample_tensors(rng: &mut Rng) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let shapes: [&[usize]; 5] = [&[], &[0], &[3, 0, 2], &[5], &[2, 3, 4]];
    let mut out = Vec::new();
    for d in ALL_DTYPES {
        for (i, s) in shapes.iter().enumerate() {
            let n: usize = s.iter().product();
            out.push((format!("t.{}.{i}", d.name()), d, s.to_vec(), rng.bytes(n * d.size())));
        }
    }
    out
}

#[test]
fn round_trip_every_dtype() {
    let dir = scratch("round-trip");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let tensors = sample_tensors(&mut rng);
    let refs: Vec<(&str, Dtype, &[usize], &[u8])> =
        tensors.iter().rev().map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())).collect();
    let metadata = meta(&[("format", "pt"), ("quote\"d", "välue\n")]);
    let path = dir.join("all.safetensors");
    write_file(&path, &refs, &metadata).unwrap();

    let st = SafeTensors::open(&path).unwrap();
    assert_eq!(st.metadata(), metadata);
    assert_eq!(st.tensors().len(), tensors.len());
    // Written in name order, so offsets ascend with the names (zero-size ones share offsets).
    let mut names: Vec<&str> = tensors.iter().map(|t| t.0.as_str()).collect();
    names.sort();
    let by_offset: Vec<&str> =
        st.tensors().iter().filter(|t| t.end > t.start).map(|t| t.name.as_str()).collect();
    let nonempty: Vec<&str> =
        names.iter().copied().filter(|n| st.get(n).is_some_and(|v| !v.data.is_empty())).collect();
    assert_eq!(by_offset, nonempty);

    for (name, dtype, shape, data) in &tensors {
        let v = st.tensor(name).unwrap();
        assert_eq!(
            (v.name, v.dtype, v.shape, v.data),
            (name.as_str(), *dtype, shape.as_slice(), data.as_slice())
        );
        assert_eq!(v.numel(), shape.iter().product::<usize>());
        let expect_f32: Option<Vec<f32>> = match dtype {
            Dtype::F32 => Some(data.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
            Dtype::BF16 => {
                Some(data.chunks(2).map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect())
            }
            Dtype::F16 => {
                Some(data.chunks(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect())
            }
            Dtype::F8E4M3 => Some(data.iter().map(|&c| e4m3_to_f32(c)).collect()),
            _ => None,
        };
        match expect_f32 {
            Some(e) => {
                let got = v.to_f32().unwrap();
                assert_eq!(got.len(), v.numel());
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                // NaN payloads compare by bits.
                assert_eq!(bits(&got), bits(&e), "{name}");
            }
            None => assert!(v.to_f32().is_err(), "{name}"),
        }
        match dtype {
            Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64 | Dtype::F8E4M3 | Dtype::F8E5M2 => {
                assert!(v.to_i64().is_err(), "{name}")
            }
            _ => assert_eq!(v.to_i64().unwrap().len(), v.numel(), "{name}"),
        }
    }
    let i32s = st.tensor("t.I32.3").unwrap();
    let expect: Vec<i64> =
        i32s.data.chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect();
    assert_eq!(i32s.to_i64().unwrap(), expect);
    let u8s = st.tensor("t.U8.4").unwrap();
    assert_eq!(u8s.to_i64().unwrap(), u8s.data.iter().map(|&b| b as i64).collect::<Vec<_>>());

    // Header length is padded to a multiple of 8; no metadata means no __metadata__ key.
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(u64::from_le_bytes(bytes[..8].try_into().unwrap()) % 8, 0);
    let bare = dir.join("bare.safetensors");
    write_file(&bare, &refs[..3], &[]).unwrap();
    let bytes = std::fs::read(&bare).unwrap();
    assert!(!String::from_utf8_lossy(&bytes).contains("__metadata__"));
    assert!(SafeTensors::open(&bare).unwrap().metadata().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn write_file_exact_bytes() {
    let dir = scratch("exact");
    let path = dir.join("x.safetensors");
    let a: Vec<u8> = [1.0f32, -2.0].iter().flat_map(|f| f.to_le_bytes()).collect();
    let b: Vec<u8> = vec![0x3F, 0x80]; // one BF16, little-endian
    write_file(
        &path,
        &[("b", Dtype::BF16, &[1], &b), ("a", Dtype::F32, &[2], &a)],
        &meta(&[("format", "pt")]),
    )
    .unwrap();

    let mut json = br#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[1],"data_offsets":[8,10]}}"#.to_vec();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut expect = (json.len() as u64).to_le_bytes().to_vec();
    expect.extend_from_slice(&json);
    expect.extend_from_slice(&a);
    expect.extend_from_slice(&b);
    assert_eq!(std::fs::read(&path).unwrap(), expect);

    // A 0-d tensor and an empty header.
    write_file(&path, &[("s", Dtype::U8, &[], &[7])], &[]).unwrap();
    let json = br#"{"s":{"dtype":"U8","shape":[],"data_offsets":[0,1]}}    "#; // 52 + 4 spaces
    let mut expect = 56u64.to_le_bytes().to_vec();
    expect.extend_from_slice(json);
    expect.push(7);
    assert_eq!(std::fs::read(&path).unwrap(), expect);
    write_file(&path, &[], &[]).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"\x08\0\0\0\0\0\0\0{}      ");
    assert!(SafeTensors::open(&path).unwrap().tensors().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn write_rejects_bad_tensors() {
    let dir = scratch("reject");
    let path = dir.join("x.safetensors");
    let bad = [
        write_file(&path, &[("a", Dtype::F32, &[3], &[0; 8])], &[]),
        write_file(&path, &[("a", Dtype::U8, &[1], &[0]), ("a", Dtype::U8, &[1], &[0])], &[]),
        write_file(&path, &[("__metadata__", Dtype::U8, &[1], &[0])], &[]),
        write_file(&path, &[("a", Dtype::U8, &[1 << 40, 1 << 40], &[])], &[]),
    ];
    for r in bad {
        match r {
            Err(Error::Tensor { name, .. }) => assert!(name == "a" || name == "__metadata__"),
            other => panic!("expected a tensor error, got {other:?}"),
        }
    }
    let dup_meta = meta(&[("k", "1"), ("k", "2")]);
    let e = write_file(&path, &[], &dup_meta).unwrap_err().to_string();
    assert!(e.contains("x.safetensors") && e.contains("\"k\""), "{e}");

    let mut w = Writer::new(&dir.join("out"), 100, vec![]);
    w.add("a", Dtype::F32, &[2], vec![0; 8]).unwrap();
    let e = w.add("a", Dtype::F32, &[2], vec![0; 8]).unwrap_err();
    assert!(matches!(&e, Error::Tensor { name, .. } if name == "a"), "{e}");
    let e = w.add("b", Dtype::F32, &[2, 2], vec![0; 8]).unwrap_err().to_string();
    assert!(e.contains("tensor b") && e.contains("16 bytes") && e.contains("8 were given"), "{e}");
    assert!(w.add("__metadata__", Dtype::U8, &[], vec![0]).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sharded_writer_round_trip() {
    let dir = scratch("sharded");
    let mut rng = Rng(42);
    let mut tensors = sample_tensors(&mut rng);
    tensors.push(("big.one".to_string(), Dtype::F32, vec![100, 3], rng.bytes(1200)));
    tensors.push(("a.first".to_string(), Dtype::BF16, vec![64], rng.bytes(128)));
    let max = 256;
    let metadata = meta(&[("format", "pt")]);
    let mut w = Writer::new(&dir, max, metadata.clone());
    for (n, d, s, b) in &tensors {
        w.add(n, *d, s, b.clone()).unwrap();
    }
    let files = w.finish().unwrap();
    let n = files.len() - 1;
    assert!(n > 3, "{n} shards");
    for (i, f) in files[..n].iter().enumerate() {
        assert_eq!(f, &dir.join(format!("model-{:05}-of-{n:05}.safetensors", i + 1)));
    }
    assert_eq!(files[n], dir.join("model.safetensors.index.json"));
    assert!(!dir.join("model.safetensors").exists());
    let mut on_disk: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    on_disk.sort();
    let mut expect_files = files.clone();
    expect_files.sort();
    assert_eq!(on_disk, expect_files, "no temporary files left");

    // Shard sizes: within the limit unless a single tensor is larger.
    for f in &files[..n] {
        let st = SafeTensors::open(f).unwrap();
        assert_eq!(st.metadata(), metadata);
        let bytes: usize = st.tensors().iter().map(|t| t.end - t.start).sum();
        assert!(bytes <= max || st.tensors().len() == 1, "{} holds {bytes} bytes", f.display());
        let names: Vec<&str> =
            st.tensors().iter().filter(|t| t.end > t.start).map(|t| t.name.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "tensors in name order");
    }

    // The index: total_size, sorted weight_map, pretty with indent 2.
    let text = std::fs::read_to_string(&files[n]).unwrap();
    assert!(text.starts_with("{\n  \"metadata\": {\n    \"total_size\": "), "{text}");
    assert!(text.ends_with("}\n"));
    let index = Json::parse(text.as_bytes(), "index").unwrap();
    let total: usize = tensors.iter().map(|t| t.3.len()).sum();
    assert_eq!(index.get("metadata").unwrap().get("total_size").unwrap().as_usize(), Some(total));
    let map = index.get("weight_map").unwrap().as_object().unwrap();
    let keys: Vec<&str> = map.iter().map(|(k, _)| k.as_str()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    assert_eq!(keys.len(), tensors.len());

    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.shard_files(), files[..n].iter().map(PathBuf::as_path).collect::<Vec<_>>());
    assert_eq!(ck.metadata(), metadata);
    assert_eq!(ck.names(), sorted);
    for (name, dtype, shape, data) in &tensors {
        let v = ck.tensor(name).unwrap();
        assert_eq!((v.dtype, v.shape, v.data), (*dtype, shape.as_slice(), data.as_slice()), "{name}");
    }

    // Rewriting the folder as one file removes the old index so the folder reads as one file.
    let mut w = Writer::new(&dir, usize::MAX, vec![]);
    w.add("only", Dtype::I64, &[2], vec![1; 16]).unwrap();
    assert_eq!(w.finish().unwrap(), vec![dir.join("model.safetensors")]);
    assert!(!dir.join("model.safetensors.index.json").exists());
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.names(), ["only"]);
    assert_eq!(ck.tensor("only").unwrap().to_i64().unwrap(), [0x0101_0101_0101_0101; 2]);
    assert!(ck.metadata().is_empty());

    // No tensors at all: one empty file.
    let empty = dir.join("empty");
    let files = Writer::new(&empty, 10, meta(&[("format", "pt")])).finish().unwrap();
    assert_eq!(files, vec![empty.join("model.safetensors")]);
    assert!(Checkpoint::open(&empty).unwrap().names().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn checkpoint_errors() {
    let dir = scratch("ck-errors");
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(e.contains("ck-errors") && e.contains("model.safetensors"), "{e}");

    write_file(&dir.join("s1.safetensors"), &[("a", Dtype::U8, &[2], &[1, 2])], &[]).unwrap();
    let index = |map: &str| {
        let text = format!("{{\"metadata\": {{\"total_size\": 2}}, \"weight_map\": {{{map}}}}}");
        std::fs::write(dir.join("model.safetensors.index.json"), text).unwrap();
        Checkpoint::open(&dir).map(|ck| ck.names().len())
    };
    assert_eq!(index(r#""a": "s1.safetensors""#).unwrap(), 1);
    for (map, needle) in [
        (r#""a": "s2.safetensors""#, "s2.safetensors"),
        (r#""a": "s1.safetensors", "b": "s1.safetensors""#, "\"b\""),
        (r#""a": "../s1.safetensors""#, "../s1.safetensors"),
        (r#""a": "/etc/passwd""#, "/etc/passwd"),
        (r#""a": """#, "\"\""),
        (r#""a": 3"#, "\"a\""),
    ] {
        let e = index(map).unwrap_err().to_string();
        assert!(e.contains("model.safetensors.index.json") && e.contains(needle), "{map}: {e}");
    }
    std::fs::write(dir.join("model.safetensors.index.json"), "{\"weight_map\": [").unwrap();
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(e.contains("model.safetensors.index.json"), "{e}");
    std::fs::write(dir.join("model.safetensors.index.json"), "{}").unwrap();
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(e.contains("weight_map"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn truncated_file_on_disk() {
    let dir = scratch("truncated");
    let path = dir.join("cut-here.safetensors");
    write_file(&path, &[("w", Dtype::F32, &[4, 4], &[0; 64])], &meta(&[("format", "pt")])).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() - 1, bytes.len() - 64, 20, 7, 0] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let e = SafeTensors::open(&path).expect_err("truncated file must fail").to_string();
        assert!(e.contains("cut-here.safetensors"), "{keep}: {e}");
    }
    let e = SafeTensors::open(&dir.join("absent.safetensors")).unwrap_err().to_string();
    assert!(e.contains("absent.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A file image from a header text and a data section of `data_len` bytes.
fn image(header: &[u8], data_len: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header);
    v.extend(std::iter::repeat_n(0xA5, data_len));
    v
}

/// Parses `bytes` under catch_unwind; on success checks that every tensor lies in the data
/// section and matches its shape. Returns None if it panicked, else whether it parsed.
fn probe(bytes: &[u8]) -> Option<bool> {
    let path = Path::new("mutant.safetensors");
    let r = catch_unwind(AssertUnwindSafe(|| parse_header(bytes, path))).ok()?;
    match r {
        Ok(h) => {
            let data_len = bytes.len() - h.data_start;
            let mut pos = 0;
            for t in &h.tensors {
                assert!(t.start == pos && t.end <= data_len && t.start <= t.end, "{t:?}");
                let n: usize = t.shape.iter().product();
                assert_eq!(n * t.dtype.size(), t.end - t.start, "{t:?}");
                pos = t.end;
            }
            assert_eq!(pos, data_len);
            Some(true)
        }
        Err(e) => {
            assert!(e.to_string().contains("mutant.safetensors"), "{e}");
            Some(false)
        }
    }
}

#[test]
fn mutations_never_panic() {
    let dir = scratch("mutations");
    let path = dir.join("base.safetensors");
    let a: Vec<u8> = (0..24).collect();
    write_file(
        &path,
        &[
            ("embed", Dtype::BF16, &[3, 4], &a),
            ("scale", Dtype::F32, &[], &a[..4]),
            ("empty", Dtype::F16, &[0, 5], &[]),
            ("ids", Dtype::I64, &[1], &a[..8]),
        ],
        &meta(&[("format", "pt"), ("x", "y")]),
    )
    .unwrap();
    let base = std::fs::read(&path).unwrap();
    assert_eq!(probe(&base), Some(true));
    let n = u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let data_start = 8 + n;

    let mut panicked: Vec<String> = Vec::new();
    let mut run = |label: String, bytes: &[u8]| match probe(bytes) {
        None => {
            panicked.push(label);
            false
        }
        Some(ok) => ok,
    };

    // Every truncation: only the full length parses.
    for len in 0..base.len() {
        assert!(!run(format!("truncate to {len}"), &base[..len]), "truncated to {len} parsed");
    }

    // Every header byte replaced by several values.
    for i in 8..data_start {
        let edits: [fn(u8) -> u8; 10] = [
            |b| b ^ 0xFF,
            |_| b'"',
            |_| b'{',
            |_| b'}',
            |_| b'\\',
            |_| b'9',
            |_| b',',
            |_| 0x80,
            |_| b'[',
            |_| 0,
        ];
        for f in edits {
            let mut m = base.clone();
            m[i] = f(m[i]);
            if m != base {
                run(format!("byte {i} {:#04x} -> {:#04x}", base[i], m[i]), &m);
            }
        }
    }
    // Every data byte flipped (always still valid: the data are opaque).
    for i in data_start..base.len() {
        let mut m = base.clone();
        m[i] ^= 0xFF;
        assert!(run(format!("data byte {i}"), &m), "data byte {i} flipped: refused");
    }

    // The length field.
    for len in
        [u64::MAX, 1 << 63, 1 << 32, 100_000_001, 0, 1, n as u64 - 1, n as u64 + 1, base.len() as u64 + 1]
    {
        let mut m = base.clone();
        m[..8].copy_from_slice(&len.to_le_bytes());
        assert!(!run(format!("header length {len}"), &m), "header length {len} parsed");
    }

    // Hand-written headers that must be refused.
    let t = |offsets: &str| format!(r#"{{"a":{{"dtype":"U8","shape":[4],"data_offsets":{offsets}}}}}"#);
    let two = |a: &str, b: &str| {
        format!(
            r#"{{"a":{{"dtype":"U8","shape":[4],"data_offsets":{a}}},"b":{{"dtype":"U8","shape":[4],"data_offsets":{b}}}}}"#
        )
    };
    let deep = format!("{{\"a\":{}", "[".repeat(100_000));
    let deep_meta = format!("{{\"__metadata__\":{}1{}}}", "{\"k\":".repeat(200), "}".repeat(200));
    let bad: Vec<(String, Vec<u8>)> = vec![
        ("overlap".into(), image(two("[0,4]", "[2,6]").as_bytes(), 8)),
        ("same range".into(), image(two("[0,4]", "[0,4]").as_bytes(), 8)),
        ("gap".into(), image(two("[0,4]", "[5,9]").as_bytes(), 9)),
        ("gap at start".into(), image(t("[1,5]").as_bytes(), 5)),
        ("out of bounds".into(), image(t("[0,4]").as_bytes(), 3)),
        ("leftover data".into(), image(t("[0,4]").as_bytes(), 5)),
        ("reversed".into(), image(t("[4,0]").as_bytes(), 4)),
        ("negative".into(), image(t("[-4,0]").as_bytes(), 4)),
        ("float offsets".into(), image(t("[0.0,4.0]").as_bytes(), 4)),
        ("three offsets".into(), image(t("[0,4,4]").as_bytes(), 4)),
        ("huge offsets".into(), image(t("[18446744073709551615,3]").as_bytes(), 4)),
        ("end past usize".into(), image(t("[0,99999999999999999999]").as_bytes(), 4)),
        (
            "shape product overflow".into(),
            image(br#"{"a":{"dtype":"U8","shape":[1099511627776,1099511627776],"data_offsets":[0,0]}}"#, 0),
        ),
        (
            "bytes overflow".into(),
            image(br#"{"a":{"dtype":"I64","shape":[4611686018427387904],"data_offsets":[0,0]}}"#, 0),
        ),
        ("shape/size mismatch".into(), image(br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, 4)),
        ("unknown dtype".into(), image(br#"{"a":{"dtype":"F7","shape":[4],"data_offsets":[0,4]}}"#, 4)),
        ("dtype not a string".into(), image(br#"{"a":{"dtype":8,"shape":[4],"data_offsets":[0,4]}}"#, 4)),
        ("negative dim".into(), image(br#"{"a":{"dtype":"U8","shape":[-4],"data_offsets":[0,4]}}"#, 4)),
        ("no shape".into(), image(br#"{"a":{"dtype":"U8","data_offsets":[0,4]}}"#, 4)),
        ("entry not an object".into(), image(br#"{"a":[1,2]}"#, 0)),
        ("not an object".into(), image(b"[]", 0)),
        ("empty header".into(), image(b"", 0)),
        ("leading space".into(), image(b" {}", 0)),
        ("non-UTF-8".into(), image(b"{\"\xff\xfe\":{}}", 0)),
        ("non-UTF-8 in metadata".into(), image(b"{\"__metadata__\":{\"k\":\"\xc3\"}}", 0)),
        ("metadata not strings".into(), image(br#"{"__metadata__":{"k":1}}"#, 0)),
        ("metadata not a map".into(), image(br#"{"__metadata__":"pt"}"#, 0)),
        ("duplicate name".into(), image(two("[0,4]", "[4,8]").replace("\"b\"", "\"a\"").as_bytes(), 8)),
        (
            "duplicate escaped name".into(),
            image(br#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"\u0061":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}"#, 0),
        ),
        ("depth bomb".into(), image(deep.as_bytes(), 0)),
        ("deep metadata".into(), image(deep_meta.as_bytes(), 0)),
        ("trailing garbage".into(), image(b"{} x", 0)),
    ];
    for (label, bytes) in &bad {
        assert!(!run(label.clone(), bytes), "{label} parsed");
    }
    // And a few hand-written ones that are fine.
    let good: Vec<(&str, Vec<u8>)> = vec![
        ("two in order", image(two("[0,4]", "[4,8]").as_bytes(), 8)),
        ("two reversed in header", image(two("[4,8]", "[0,4]").as_bytes(), 8)),
        ("metadata null", image(br#"{"__metadata__":null}"#, 0)),
        ("extra fields", image(br#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"x":1}}"#, 4)),
        ("padded", image(b"{}       ", 0)),
        ("zero-size between", image(br#"{"z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[1],"data_offsets":[4,5]}}"#, 5)),
    ];
    for (label, bytes) in &good {
        assert!(run(label.to_string(), bytes), "{label} refused: {:?}", parse_header(bytes, Path::new("x")));
    }
    assert!(panicked.is_empty(), "parse_header panicked on: {panicked:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

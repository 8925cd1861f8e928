//! Hostile `.qnemo` / `.tar.gz` input (issue 12, items 1, 2, 6): gzip bombs stop at the declared
//! size, truncated or corrupt archives say so and name the file, tar members that could land
//! outside the extraction folder are refused, `verify` extracts into a private folder, and
//! temporary files never follow a planted symlink.

use rq_min::io::tar_gz::{crc32, gunzip, read_tar_gz, write_tar_gz, GzWriter};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rq-min-archive-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Bits packed LSB first, as DEFLATE stores them.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    fn bits(&mut self, v: u32, n: u32) {
        self.acc |= (v as u64) << self.n;
        self.n += n;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }
    /// A Huffman code: stored most significant bit first.
    fn code(&mut self, code: u32, len: u32) {
        self.bits(code.reverse_bits() >> (32 - len), len);
    }
    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// One fixed-Huffman DEFLATE block: the byte 0, then `matches` copies of (length 258,
/// distance 1): 1 + 258 * matches zero bytes from about 13 bits per match.
fn zero_bomb(matches: usize) -> Vec<u8> {
    let mut w = BitWriter::default();
    w.bits(1, 1); // BFINAL
    w.bits(1, 2); // fixed Huffman
    w.code(0x30, 8); // literal 0
    for _ in 0..matches {
        w.code(0xC5, 8); // length symbol 285 = 258
        w.code(0, 5); // distance symbol 0 = 1
    }
    w.code(0, 7); // end of block
    w.finish()
}

/// A gzip member around `deflate` with the trailer `crc`, `isize`.
fn gzip(deflate: &[u8], crc: u32, isize: u32) -> Vec<u8> {
    let mut b = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    b.extend_from_slice(deflate);
    b.extend_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(&isize.to_le_bytes());
    b
}

#[test]
fn gzip_bomb_stops_at_the_declared_size() {
    let matches = 65_000; // 16.8 MB of zeros from 106 kB
    let len = 1 + 258 * matches;
    let deflate = zero_bomb(matches);
    let zeros = vec![0u8; len];
    // Honest trailer: decompresses.
    let honest = gzip(&deflate, crc32(0, &zeros), len as u32);
    assert_eq!(gunzip(&honest).unwrap().len(), len);
    // A trailer that declares 1000 bytes: stopped there, with the file named.
    let file = Path::new("/models/bomb.qnemo");
    let lying = gzip(&deflate, crc32(0, &zeros), 1000);
    let e = read_tar_gz(&lying, file).unwrap_err().to_string();
    assert!(e.contains("bomb.qnemo") && e.contains("more than 1000 bytes") && e.contains("gzip bomb"), "{e}");
    // A trailer that declares more than DEFLATE can expand 1032:1 to.
    let tiny = gzip(&zero_bomb(10), 0, 0xFFFF_FFF0);
    let e = gunzip(&tiny).unwrap_err();
    assert!(e.contains("corrupt gzip") && e.contains("1032"), "{e}");
}

/// A `.tar.gz` made by `write_tar_gz` of two small files.
fn small_archive(dir: &Path) -> (PathBuf, Vec<u8>) {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("config.json"), br#"{"a": 1}"#).unwrap();
    std::fs::write(src.join("rank0.safetensors"), vec![7u8; 1500]).unwrap();
    let file = dir.join("small.qnemo");
    write_tar_gz(&src, &rq_min::io::tmp::Target::new(&file, true).unwrap()).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    (file, bytes)
}

#[test]
fn truncated_archives_say_truncated_and_name_the_file() {
    let dir = scratch("cut");
    let (file, bytes) = small_archive(&dir);
    assert_eq!(read_tar_gz(&bytes, &file).unwrap().len(), 2);
    for cut in 2..bytes.len() {
        let e = read_tar_gz(&bytes[..cut], &file).unwrap_err().to_string();
        assert!(e.contains("small.qnemo") && e.contains("truncated"), "cut at {cut}: {e}");
    }
    // A compressed (fixed Huffman) stream cut short.
    let deflate = zero_bomb(100);
    for cut in [1, 5, deflate.len() / 2] {
        let e = gunzip(&gzip(&deflate[..cut], 0, 0)).unwrap_err();
        assert!(e.contains("truncated"), "cut at {cut}: {e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A ustar header for `name` of type `kind` and `size` bytes, checksum filled in.
fn tar_header(name: &str, kind: u8, size: usize) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// `tar` bytes (header + padded data per member, end marker) gzipped.
fn tar_gz(members: &[([u8; 512], &[u8])]) -> Vec<u8> {
    let mut gz = GzWriter::new(Vec::new()).unwrap();
    for (h, data) in members {
        gz.write_all(h).unwrap();
        gz.write_all(data).unwrap();
        gz.write_all(&vec![0u8; (512 - data.len() % 512) % 512]).unwrap();
    }
    gz.write_all(&[0u8; 1024]).unwrap();
    gz.finish().unwrap()
}

#[test]
fn corrupt_tar_header_says_so() {
    let mut junk = [b'z'; 512];
    junk[148..156].copy_from_slice(b"9zzzzzz\0"); // once reported as "bad octal field"
    let bytes = tar_gz(&[(junk, &[])]);
    let e = read_tar_gz(&bytes, Path::new("junk.qnemo")).unwrap_err().to_string();
    assert!(e.contains("junk.qnemo") && e.contains("corrupt tar header"), "{e}");
    let mut bad_sum = tar_header("./a", b'0', 3);
    bad_sum[0] = b'b';
    let e = read_tar_gz(&tar_gz(&[(bad_sum, b"abc")]), Path::new("sum.qnemo")).unwrap_err().to_string();
    assert!(e.contains("sum.qnemo") && e.contains("corrupt tar header") && e.contains("checksum"), "{e}");
}

#[test]
fn tar_members_outside_the_folder_links_and_devices_are_refused() {
    let ok = tar_gz(&[(tar_header("./", b'5', 0), &[]), (tar_header("./config.json", b'0', 2), b"{}")]);
    assert_eq!(read_tar_gz(&ok, Path::new("ok.qnemo")).unwrap().len(), 1);
    let cases: [(&str, u8); 8] = [
        ("../evil", b'0'),
        ("./a/../../evil", b'0'),
        ("/etc/evil", b'0'),
        ("..", b'5'),
        ("./link", b'2'),
        ("./hard", b'1'),
        ("./dev", b'3'),
        ("./fifo", b'6'),
    ];
    for (name, kind) in cases {
        let bytes = tar_gz(&[(tar_header(name, kind, 0), &[])]);
        let e = read_tar_gz(&bytes, Path::new("evil.qnemo")).unwrap_err().to_string();
        assert!(e.contains("evil.qnemo") && e.contains("refusing") && e.contains(name), "{name} ({}): {e}", kind as char);
    }
}

/// Item 1: `verify X.qnemo` no longer extracts into the predictable
/// `/tmp/rq-min-verify-{pid}-{size}`; a file planted there stops nothing and is left alone.
#[test]
fn verify_extracts_into_a_private_folder() {
    let dir = scratch("verify");
    let (file, bytes) = small_archive(&dir);
    let planted = std::env::temp_dir().join(format!("rq-min-verify-{}-{}", std::process::id(), bytes.len()));
    std::fs::write(&planted, "planted").unwrap();
    let result = rq_min::export::verify::check_trtllm(&file);
    let planted_after = std::fs::read_to_string(&planted);
    let _ = std::fs::remove_file(&planted);
    assert_eq!(planted_after.unwrap(), "planted", "the planted file was touched");
    // The archive is not a real checkpoint: the check reports on its content, not on /tmp.
    if let Err(e) = result {
        assert!(!matches!(e, rq_min::Error::Io { .. }), "{e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn private_dir_is_0700_random_and_never_follows_links() {
    use std::os::unix::fs::PermissionsExt;
    let a = rq_min::io::tmp::PrivateDir::new("rq-min-archive-test-").unwrap();
    let b = rq_min::io::tmp::PrivateDir::new("rq-min-archive-test-").unwrap();
    assert_ne!(a.path(), b.path());
    assert_eq!(std::fs::metadata(a.path()).unwrap().permissions().mode() & 0o777, 0o700);
    a.write("config.json", b"{}").unwrap();
    assert_eq!(std::fs::metadata(a.path().join("config.json")).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(a.write("config.json", b"again").is_err(), "an existing file is not overwritten");
    let victim = scratch("private-victim").join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, a.path().join("rank0.safetensors")).unwrap();
    assert!(a.write("rank0.safetensors", b"evil").is_err(), "a planted symlink is not followed");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    for bad in ["../x", "a/b", "..", ""] {
        assert!(a.write(bad, b"x").is_err(), "{bad:?}");
    }
    let path = a.path().to_path_buf();
    drop(a);
    assert!(!path.exists(), "removed on drop");
    std::fs::remove_dir_all(victim.parent().unwrap()).unwrap();
}

/// Item 2: the `.qnemo` temp file is never written through a planted symlink.
#[test]
fn write_tar_gz_does_not_follow_a_planted_temp_symlink() {
    let dir = scratch("symlink");
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("config.json"), "{}").unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let out = dir.join("model.qnemo");
    // The name the old code used, and a few guesses at others.
    let old = dir.join(format!(".model.qnemo.rq-min-tmp-{}", std::process::id()));
    std::os::unix::fs::symlink(&victim, &old).unwrap();
    write_tar_gz(&src, &rq_min::io::tmp::Target::new(&out, true).unwrap()).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "the symlink target was overwritten");
    assert!(!std::fs::symlink_metadata(&out).unwrap().file_type().is_symlink());
    let members = read_tar_gz(&std::fs::read(&out).unwrap(), &out).unwrap();
    assert_eq!(members[0].name, "./config.json");
    // Only the output, the source, the victim and the planted link are there.
    let mut names: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    names.sort();
    assert_eq!(names.len(), 4, "{names:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn temp_names_beside_the_output_are_random_and_exclusive() {
    let dir = scratch("names");
    let out = dir.join("out");
    let a = rq_min::io::tmp::temp_dir_beside(&out, "tmp").unwrap();
    let b = rq_min::io::tmp::temp_dir_beside(&out, "tmp").unwrap();
    assert_ne!(a, b);
    let name = a.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with(".out.rq-min-tmp-") && !name.ends_with(&std::process::id().to_string()), "{name}");
    let (f, _) = rq_min::io::tmp::temp_file_beside(&out, "tmp").unwrap();
    assert!(rq_min::io::tmp::create_new_file(&f).is_err(), "O_EXCL");
    std::fs::remove_dir_all(&dir).unwrap();
}

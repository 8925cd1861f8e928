//! File formats, read and written here with no dependency: JSON, safetensors (single files,
//! sharded checkpoints, the shard writer) and the tar + gzip of `.qnemo` archives.

pub mod json;
pub mod safetensors;
pub mod tar_gz;

//! Errors of the inspector library.

use std::path::PathBuf;

/// Why an inspector operation failed.
#[derive(Debug, thiserror::Error)]
pub enum InspectorError {
    /// {op} {path}: {source}
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// no cgroup2 hierarchy is mounted
    #[error("no cgroup2 hierarchy is mounted")]
    NoCgroupV2,
    /// {path} is not inside the cgroup v2 hierarchy
    #[error("{path} is not inside the cgroup v2 hierarchy")]
    NotV2Cgroup { path: PathBuf },
    /// loading the eBPF object failed
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    /// eBPF program {program}: {source}
    #[error("eBPF program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// eBPF map {map}: {source}
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// eBPF program {program} is missing from the object
    #[error("eBPF program {program} is missing from the object")]
    MissingProgram { program: &'static str },
    /// eBPF map {map} is missing from the object
    #[error("eBPF map {map} is missing from the object")]
    MissingMap { map: &'static str },
    /// sandbox {id} is already watched
    #[error("sandbox {id} is already watched")]
    AlreadyWatched { id: String },
    /// sandbox {id} is not watched
    #[error("sandbox {id} is not watched")]
    UnknownSandbox { id: String },
    /// all {max} sandbox slots are in use
    #[error("all {max} sandbox slots are in use")]
    NoSlot { max: u32 },
}

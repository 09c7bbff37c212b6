//! Extracting CRIU's reason for a failed dump or restore from its log.
//!
//! CRIU logs every error as `(SS.ssssss) Error (file.c:line): message`. The first error that is
//! not a consequence of an earlier one (or the harmless RLIMIT_NOFILE complaint every dump makes
//! on these machines) is the reason; it is classified so callers can tell an unsupported sandbox
//! (publish a filesystem-only point that says why) from a transient failure (retry).

use serde::{Deserialize, Serialize};

/// What kind of thing made CRIU refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CriuFailureKind {
    /// A unix socket whose peer is outside the sandbox.
    ExternalUnixSocket,
    /// An established TCP connection (CRIU needs `--tcp-established`, which Crab does not use).
    TcpEstablished,
    /// A file descriptor CRIU cannot dump (a host file outside the sandbox's mounts, an
    /// unsupported fd type, a socket type CRIU does not know).
    UnsupportedFile,
    /// A mount or namespace CRIU cannot handle.
    Mount,
    /// The process tree changed under CRIU (a task vanished or appeared).
    TaskTree,
    /// A Crab hook run by CRIU (the filesystem snapshot or the restore check) failed.
    Hook,
    /// Anything else; `message` has CRIU's words.
    Unclassified,
}

impl CriuFailureKind {
    /// True when retrying the same sandbox is pointless until the sandbox changes: the
    /// checkpoint should degrade to filesystem-only and say so.
    pub fn is_unsupported_sandbox(self) -> bool {
        matches!(
            self,
            CriuFailureKind::ExternalUnixSocket
                | CriuFailureKind::TcpEstablished
                | CriuFailureKind::UnsupportedFile
                | CriuFailureKind::Mount
        )
    }
}

/// CRIU's reason for a failure, as recorded in a recovery point that could not carry a
/// process image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriuFailure {
    /// Classification of `message`.
    pub kind: CriuFailureKind,
    /// CRIU's first meaningful error line, without the timestamp and source location.
    pub message: String,
    /// Up to four further error lines for context.
    pub context: Vec<String>,
}

impl std::fmt::Display for CriuFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)
    }
}

/// Lines that follow from an earlier error or are harmless here.
fn is_noise(message: &str) -> bool {
    const NOISE: &[&str] = &[
        "RLIMIT_NOFILE",
        "failed with -1",
        "Dumping FAILED",
        "Restoring FAILED",
        "One of more action scripts failed",
        "Pre-resume script ret code",
        "Post-resume script ret code",
        "Unable to restore freezer state",
    ];
    NOISE.iter().any(|n| message.contains(n))
}

fn classify(message: &str) -> CriuFailureKind {
    let m = message;
    if m.contains("External socket")
        || m.contains("name-less external socket")
        || m.contains("half of stream unix")
    {
        CriuFailureKind::ExternalUnixSocket
    } else if m.contains("Connected TCP socket") {
        CriuFailureKind::TcpEstablished
    } else if m.contains("Can't dump file")
        || m.starts_with("sockets:")
        || m.contains("Can't lookup mount")
        || m.contains("inet socket")
        || m.contains("unsupported")
        || m.contains("Unsupported")
    {
        CriuFailureKind::UnsupportedFile
    } else if m.contains("mount") || m.contains("Mount") || m.contains("namespace") {
        CriuFailureKind::Mount
    } else if m.contains("No such process") || m.contains("new task") || m.contains("Unseizable") {
        CriuFailureKind::TaskTree
    } else if m.contains("script") {
        CriuFailureKind::Hook
    } else {
        CriuFailureKind::Unclassified
    }
}

/// The message part of a CRIU error line, or `None` for other lines.
fn error_message(line: &str) -> Option<&str> {
    let rest = line.trim_start();
    let rest = match rest.strip_prefix('(') {
        Some(r) => r.split_once(") ")?.1,
        None => rest,
    };
    let rest = rest.strip_prefix("Error (")?;
    let (_, msg) = rest.split_once("): ")?;
    Some(msg.trim())
}

/// Finds CRIU's reason in a dump or restore log. `None` when the log has no error line (CRIU
/// died before writing one; the caller reports the exit status instead).
pub fn failure_from_log(log: &str) -> Option<CriuFailure> {
    let errors: Vec<&str> = log.lines().filter_map(error_message).collect();
    let mut meaningful = errors.iter().copied().filter(|m| !is_noise(m));
    let first = meaningful.next().or_else(|| errors.last().copied())?;
    Some(CriuFailure {
        kind: classify(first),
        message: first.to_string(),
        context: meaningful.take(4).map(str::to_string).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tail of a real CRIU 4.1.1 dump log: the container's stdout was a host file.
    const HOST_FILE: &str = "\
(00.031346) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.045600) 	Dumping path for 1 fd via self 17 [/tmp/pexp/out1]
(00.045640) Error (criu/files-reg.c:1790): Can't lookup mount=27 for fd=1 path=/tmp/pexp/out1
(00.045649) Error (criu/cr-dump.c:1681): Dump files (pid: 16768) failed with -1
(00.115371) Unfreezing tasks into 1
(00.115436) Error (criu/cr-dump.c:2111): Dumping FAILED.
";

    #[test]
    fn finds_the_first_meaningful_error() {
        let f = failure_from_log(HOST_FILE).unwrap();
        assert_eq!(f.kind, CriuFailureKind::UnsupportedFile);
        assert_eq!(
            f.message,
            "Can't lookup mount=27 for fd=1 path=/tmp/pexp/out1"
        );
        assert!(f.context.is_empty());
        assert!(f.kind.is_unsupported_sandbox());
    }

    #[test]
    fn classifies_sockets() {
        let log = "(00.1) Error (criu/sk-unix.c:874): External socket is used. Consider using --ext-unix-sk option.\n\
                   (00.2) Error (criu/cr-dump.c:1681): Dump files (pid: 5) failed with -1\n";
        assert_eq!(
            failure_from_log(log).unwrap().kind,
            CriuFailureKind::ExternalUnixSocket
        );
        let log = "(00.1) Error (criu/sk-inet.c:191): Connected TCP socket, consider using --tcp-established option.\n";
        assert_eq!(
            failure_from_log(log).unwrap().kind,
            CriuFailureKind::TcpEstablished
        );
    }

    #[test]
    fn only_noise_still_gives_a_reason_and_no_errors_gives_none() {
        let log = "(00.1) Error (criu/cr-dump.c:2111): Dumping FAILED.\n";
        let f = failure_from_log(log).unwrap();
        assert_eq!(f.message, "Dumping FAILED.");
        assert_eq!(f.kind, CriuFailureKind::Unclassified);
        assert!(!f.kind.is_unsupported_sandbox());
        assert_eq!(
            failure_from_log("(00.1) Dumping finished successfully\n"),
            None
        );
        assert_eq!(failure_from_log(""), None);
    }
}

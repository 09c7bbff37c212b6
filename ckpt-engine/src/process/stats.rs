//! CRIU's `stats-dump` / `stats-restore` files, decoded without a protobuf toolchain.
//!
//! The files are CRIU "service" images: two little-endian `u32` magics (`IMG_SERVICE_MAGIC`,
//! `STATS_MAGIC`), one `u32` payload length, then one protobuf `stats_entry` message
//! (`images/stats.proto`). Only varint fields and nested messages occur, so a ~40-line reader
//! is enough; unknown fields are skipped so newer CRIU versions still decode.

use serde::{Deserialize, Serialize};

/// `IMG_SERVICE_MAGIC` from CRIU's `magic.h`.
const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// `STATS_MAGIC` from CRIU's `magic.h`.
const STATS_MAGIC: u32 = 0x5709_3306;
/// A stats file is a few dozen bytes; anything bigger is not one.
const MAX_STATS_LEN: usize = 4096;

/// What CRIU measured while dumping (times in microseconds, memory in 4 KiB pages).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriuDumpStats {
    /// Time to stop (freeze/seize) every task.
    pub freezing_time_us: u64,
    /// Time CRIU held the tasks; includes the FS snapshot only when it ran in CRIU's post-dump
    /// window (a container frozen by someone else); otherwise the snapshot follows, the
    /// cgroup still frozen.
    pub frozen_time_us: u64,
    /// Time spent collecting memory.
    pub memdump_time_us: u64,
    /// Time spent writing memory pages to the image.
    pub memwrite_time_us: u64,
    /// Pages looked at.
    pub pages_scanned: u64,
    /// Pages not written because a parent image had them (pre-dump chains; 0 here).
    pub pages_skipped_parent: u64,
    /// Pages written to the image.
    pub pages_written: u64,
    /// Pages left for lazy restore.
    pub pages_lazy: u64,
}

/// What CRIU measured while restoring (times in microseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriuRestoreStats {
    /// Pages compared against a parent image.
    pub pages_compared: u64,
    /// Pages skipped because copy-on-write already shared them.
    pub pages_skipped_cow: u64,
    /// Time to fork the task tree.
    pub forking_time_us: u64,
    /// Total restore time measured by CRIU.
    pub restore_time_us: u64,
    /// Pages restored.
    pub pages_restored: u64,
}

/// Why a stats file could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatsDecodeError {
    /// the file is shorter than its header or its declared payload
    #[error("stats file truncated")]
    Truncated,
    /// the magics are not CRIU's stats magics
    #[error("not a criu stats file (magic {service:#x} {stats:#x})")]
    BadMagic {
        /// First magic found.
        service: u32,
        /// Second magic found.
        stats: u32,
    },
    /// the declared payload length is implausible
    #[error("stats payload length {len} out of range")]
    BadLength {
        /// Declared length.
        len: usize,
    },
    /// the protobuf payload is malformed
    #[error("malformed protobuf in stats file at byte {offset}")]
    Malformed {
        /// Offset in the payload.
        offset: usize,
    },
    /// the file has no entry of the requested kind (dump vs restore)
    #[error("stats file has no {kind} entry")]
    Missing {
        /// "dump" or "restore".
        kind: &'static str,
    },
}

/// One decoded protobuf field: number and value (varint, or a length-delimited slice).
enum Field<'a> {
    Varint(u32, u64),
    Bytes(u32, &'a [u8]),
}

/// Iterates over the top-level fields of a protobuf message.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Fields { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, StatsDecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .buf
                .get(self.pos)
                .ok_or(StatsDecodeError::Malformed { offset: self.pos })?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(StatsDecodeError::Malformed { offset: self.pos })
    }

    fn next_field(&mut self) -> Option<Result<Field<'a>, StatsDecodeError>> {
        if self.pos >= self.buf.len() {
            return None;
        }
        Some(self.read_field())
    }

    fn read_field(&mut self) -> Result<Field<'a>, StatsDecodeError> {
        let start = self.pos;
        let key = self.varint()?;
        let number =
            u32::try_from(key >> 3).map_err(|_| StatsDecodeError::Malformed { offset: start })?;
        match key & 7 {
            0 => Ok(Field::Varint(number, self.varint()?)),
            1 => self.skip(8).map(|s| Field::Bytes(number, s)),
            2 => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| StatsDecodeError::Malformed { offset: start })?;
                self.skip(len).map(|s| Field::Bytes(number, s))
            }
            5 => self.skip(4).map(|s| Field::Bytes(number, s)),
            _ => Err(StatsDecodeError::Malformed { offset: start }),
        }
    }

    fn skip(&mut self, len: usize) -> Result<&'a [u8], StatsDecodeError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|end| *end <= self.buf.len())
            .ok_or(StatsDecodeError::Malformed { offset: self.pos })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
}

/// Checks the header and returns the `stats_entry` payload.
fn payload(file: &[u8]) -> Result<&[u8], StatsDecodeError> {
    let word = |i: usize| -> Result<u32, StatsDecodeError> {
        let b = file
            .get(i * 4..i * 4 + 4)
            .ok_or(StatsDecodeError::Truncated)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let (service, stats) = (word(0)?, word(1)?);
    if service != IMG_SERVICE_MAGIC || stats != STATS_MAGIC {
        return Err(StatsDecodeError::BadMagic { service, stats });
    }
    let len = word(2)? as usize;
    if len > MAX_STATS_LEN {
        return Err(StatsDecodeError::BadLength { len });
    }
    file.get(12..12 + len).ok_or(StatsDecodeError::Truncated)
}

/// Finds the nested message with field number `wanted` in a `stats_entry`.
fn entry(file: &[u8], wanted: u32) -> Result<Option<&[u8]>, StatsDecodeError> {
    let mut fields = Fields::new(payload(file)?);
    while let Some(field) = fields.next_field() {
        if let Field::Bytes(n, body) = field?
            && n == wanted
        {
            return Ok(Some(body));
        }
    }
    Ok(None)
}

/// Decodes the contents of a `stats-dump` file.
pub fn decode_dump_stats(file: &[u8]) -> Result<CriuDumpStats, StatsDecodeError> {
    let body = entry(file, 1)?.ok_or(StatsDecodeError::Missing { kind: "dump" })?;
    let mut stats = CriuDumpStats::default();
    let mut fields = Fields::new(body);
    while let Some(field) = fields.next_field() {
        if let Field::Varint(n, v) = field? {
            match n {
                1 => stats.freezing_time_us = v,
                2 => stats.frozen_time_us = v,
                3 => stats.memdump_time_us = v,
                4 => stats.memwrite_time_us = v,
                5 => stats.pages_scanned = v,
                6 => stats.pages_skipped_parent = v,
                7 => stats.pages_written = v,
                9 => stats.pages_lazy = v,
                _ => {}
            }
        }
    }
    Ok(stats)
}

/// Decodes the contents of a `stats-restore` file.
pub fn decode_restore_stats(file: &[u8]) -> Result<CriuRestoreStats, StatsDecodeError> {
    let body = entry(file, 2)?.ok_or(StatsDecodeError::Missing { kind: "restore" })?;
    let mut stats = CriuRestoreStats::default();
    let mut fields = Fields::new(body);
    while let Some(field) = fields.next_field() {
        if let Field::Varint(n, v) = field? {
            match n {
                1 => stats.pages_compared = v,
                2 => stats.pages_skipped_cow = v,
                3 => stats.forking_time_us = v,
                4 => stats.restore_time_us = v,
                5 => stats.pages_restored = v,
                _ => {}
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A `stats-dump` written by CRIU 4.1.1 (`runc checkpoint --leave-running` of a busybox
    /// shell loop on this project's machine).
    const DUMP: &str = "4059105506330957230000000a2108dc0310a0a20718fb0320a901283230\
                        0038244000480050085808600068007000";
    /// The matching `stats-restore`.
    const RESTORE: &str = "40591055063309570e000000120c08091002184020bcf5092822";

    #[test]
    fn decodes_a_real_dump_stats_file() {
        let s = decode_dump_stats(&hex(DUMP)).unwrap();
        assert_eq!(s.freezing_time_us, 476);
        assert_eq!(s.frozen_time_us, 119_072);
        assert_eq!(s.memdump_time_us, 507);
        assert_eq!(s.memwrite_time_us, 169);
        assert_eq!(s.pages_scanned, 50);
        assert_eq!(s.pages_skipped_parent, 0);
        assert_eq!(s.pages_written, 36);
        assert_eq!(s.pages_lazy, 0);
    }

    #[test]
    fn decodes_a_real_restore_stats_file() {
        let s = decode_restore_stats(&hex(RESTORE)).unwrap();
        assert_eq!(s.pages_compared, 9);
        assert_eq!(s.pages_skipped_cow, 2);
        assert_eq!(s.forking_time_us, 64);
        assert_eq!(s.restore_time_us, 162_492);
        assert_eq!(s.pages_restored, 34);
        // A restore file has no dump entry.
        assert_eq!(
            decode_dump_stats(&hex(RESTORE)),
            Err(StatsDecodeError::Missing { kind: "dump" })
        );
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        let dump = hex(DUMP);
        assert!(matches!(
            decode_dump_stats(&dump[..8]),
            Err(StatsDecodeError::Truncated)
        ));
        assert!(matches!(
            decode_dump_stats(&dump[..20]),
            Err(StatsDecodeError::Truncated)
        ));
        let mut bad = dump.clone();
        bad[0] ^= 1;
        assert!(matches!(
            decode_dump_stats(&bad),
            Err(StatsDecodeError::BadMagic { .. })
        ));
        let mut long = dump.clone();
        long[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_dump_stats(&long),
            Err(StatsDecodeError::BadLength { .. })
        ));
        // Every truncation and every single-byte corruption either decodes or errors cleanly.
        for cut in 0..dump.len() {
            let _ = decode_dump_stats(&dump[..cut]);
        }
        for i in 12..dump.len() {
            for b in [0x00, 0x7f, 0x80, 0xff] {
                let mut c = dump.clone();
                c[i] = b;
                let _ = decode_dump_stats(&c);
            }
        }
    }
}

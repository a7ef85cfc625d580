//! CPU time of a process as Linux accounts it, for benchmarks that say how busy the machine
//! was (a rate measured on saturated cores says more about the machine than the code).

/// Clock ticks a second in `/proc/<pid>/stat` (`getconf CLK_TCK`: 100 on Linux).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time `pid` has used, user and system, in clock ticks; 0 if it cannot be read.
pub fn ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are the 14th and 15th fields: the 12th and 13th after the name.
    field(11) + field(12)
}

/// Seconds of CPU between two readings of [`ticks`].
pub fn seconds(before: u64, after: u64) -> f64 {
    after.saturating_sub(before) as f64 / TICKS_PER_SECOND
}

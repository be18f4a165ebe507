//! System pressure at a moment: what the `writer-timeout` message reports (the seed's "the
//! machine lacks CPU and memory").

/// Load average, available memory and pressure stall information, as one line.
pub fn snapshot() -> String {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into());
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let field = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        };
        Some(format!("{} of {} MiB available", field("MemAvailable:")? / 1024, field("MemTotal:")? / 1024))
    });
    let psi = |resource: &str| {
        std::fs::read_to_string(format!("/proc/pressure/{resource}")).ok().and_then(|text| {
            text.lines().next().and_then(|l| l.split_whitespace().nth(1)).map(|v| format!("{resource} {v}"))
        })
    };
    let mut parts = vec![format!("load {load}"), available.unwrap_or_else(|| "memory unknown".into())];
    let stalls: Vec<String> = ["cpu", "memory", "io"].iter().filter_map(|r| psi(r)).collect();
    if !stalls.is_empty() {
        parts.push(format!("PSI some {}", stalls.join(", ")));
    }
    parts.join(", ")
}

//! System pressure at a moment: what the `writer-timeout` error carries (the seed's "the
//! machine lacks CPU and memory") and what the doctor judges.

use serde::{Deserialize, Serialize};

/// Load, memory and pressure stall information at one moment; a field the kernel did not give
/// is `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Pressure {
    /// The load averages over 1, 5 and 15 minutes.
    pub load: Option<[f64; 3]>,
    /// Memory available, MiB.
    pub memory_available_mib: Option<u64>,
    /// Memory in all, MiB.
    pub memory_total_mib: Option<u64>,
    /// PSI `some avg10` of the CPU, percent.
    pub psi_cpu: Option<f64>,
    /// PSI `some avg10` of memory, percent.
    pub psi_memory: Option<f64>,
    /// PSI `some avg10` of I/O, percent.
    pub psi_io: Option<f64>,
}

impl Pressure {
    /// The pressure now, from `/proc`.
    pub fn now() -> Pressure {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let load = read("/proc/loadavg").and_then(|text| {
            let mut values = text.split_whitespace().map(|v| v.parse::<f64>().ok());
            Some([values.next()??, values.next()??, values.next()??])
        });
        let meminfo = read("/proc/meminfo").unwrap_or_default();
        let field = |name: &str| {
            meminfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .map(|kib| kib / 1024)
        };
        let psi = |resource: &str| {
            read(&format!("/proc/pressure/{resource}")).and_then(|text| {
                let line = text.lines().next()?;
                line.split_whitespace().find_map(|part| part.strip_prefix("avg10=")?.parse().ok())
            })
        };
        Pressure {
            load,
            memory_available_mib: field("MemAvailable:"),
            memory_total_mib: field("MemTotal:"),
            psi_cpu: psi("cpu"),
            psi_memory: psi("memory"),
            psi_io: psi("io"),
        }
    }

    /// What says the machine was short of resources, on a machine of `cores` cores: a load
    /// above twice the cores, less than a tenth of memory available, or a stall above 10%.
    pub fn shortage(&self, cores: usize) -> Option<String> {
        let mut reasons = Vec::new();
        if let Some([load, ..]) = self.load.filter(|[load, ..]| *load > 2.0 * cores as f64) {
            reasons.push(format!("load {load} on {cores} cores"));
        }
        if let (Some(available), Some(total)) = (self.memory_available_mib, self.memory_total_mib) {
            if total > 0 && available * 10 < total {
                reasons.push(format!("only {available} of {total} MiB memory available"));
            }
        }
        for (resource, stall) in [("cpu", self.psi_cpu), ("memory", self.psi_memory), ("io", self.psi_io)] {
            if let Some(stall) = stall.filter(|stall| *stall > 10.0) {
                reasons.push(format!("{resource} pressure stalls at {stall}%"));
            }
        }
        (!reasons.is_empty()).then(|| reasons.join(", "))
    }
}

impl std::fmt::Display for Pressure {
    /// `load 0.5 0.4 0.3, 1024 of 2048 MiB available, PSI some avg10 cpu 0.5%, io 1.2%`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.load {
            Some([one, five, fifteen]) => write!(f, "load {one} {five} {fifteen}")?,
            None => f.write_str("load unknown")?,
        }
        match (self.memory_available_mib, self.memory_total_mib) {
            (Some(available), Some(total)) => write!(f, ", {available} of {total} MiB available")?,
            _ => f.write_str(", memory unknown")?,
        }
        let stalls: Vec<String> = [("cpu", self.psi_cpu), ("memory", self.psi_memory), ("io", self.psi_io)]
            .into_iter()
            .filter_map(|(resource, stall)| Some(format!("{resource} {}%", stall?)))
            .collect();
        if !stalls.is_empty() {
            write!(f, ", PSI some avg10 {}", stalls.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shortage_is_named_and_calm_is_not() {
        let calm = Pressure {
            load: Some([0.5, 0.4, 0.3]),
            memory_available_mib: Some(1000),
            memory_total_mib: Some(2000),
            psi_cpu: Some(0.2),
            psi_memory: Some(0.0),
            psi_io: Some(1.0),
        };
        assert_eq!(calm.shortage(2), None);
        let busy =
            Pressure { load: Some([9.0, 5.0, 2.0]), memory_available_mib: Some(100), psi_io: Some(40.0), ..calm };
        let shortage = busy.shortage(2).unwrap();
        assert!(shortage.contains("load 9 on 2 cores"), "{shortage}");
        assert!(shortage.contains("only 100 of 2000 MiB"), "{shortage}");
        assert!(shortage.contains("io pressure stalls at 40%"), "{shortage}");
        assert_eq!(
            busy.to_string(),
            "load 9 5 2, 100 of 2000 MiB available, PSI some avg10 cpu 0.2%, memory 0%, io 40%"
        );
    }

    #[test]
    fn the_pressure_now_is_read() {
        let now = Pressure::now();
        assert!(now.load.is_some() && now.memory_total_mib.is_some(), "{now:?}");
    }
}

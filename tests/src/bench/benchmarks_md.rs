//! `BENCHMARKS.md`: one section per bench (`## lb-bench all ...`, `## lb-bench failover ...`),
//! each rewritten by its own bench and left alone by the other's.

use std::path::Path;

use anyhow::{Context, Result};

/// The file's first lines, above every section.
pub const INTRO: &str = "# Benchmarks\n\nlb against the direct path, HAProxy 2.6 with the Neo4j manual's configuration and nftables DNAT, on one 2-core VM in network namespaces. `cargo xtask bench` regenerates every section below (`cargo xtask bench all`, `churn`, `synflood`, `idle` or `failover` one of them); raw records in `target/bench/<bench>.json`.\n";

/// `doc` with the section whose heading line starts with `heading` (up to the next `## `
/// heading) replaced by `section`, or `section` appended; the intro is put back if missing.
pub fn with_section(doc: &str, heading: &str, section: &str) -> String {
    let section = format!("{}\n", section.trim_end());
    let mut lines: Vec<&str> = doc.lines().collect();
    if !doc.starts_with("# Benchmarks") {
        lines.clear();
    }
    let start = lines.iter().position(|l| l.starts_with(heading));
    let mut out = String::new();
    match start {
        Some(i) => {
            let end = lines[i + 1..]
                .iter()
                .position(|l| l.starts_with("## "))
                .map_or(lines.len(), |n| i + 1 + n);
            for l in &lines[..i] {
                out += l;
                out += "\n";
            }
            out += &section;
            if end < lines.len() {
                out += "\n";
                for l in &lines[end..] {
                    out += l;
                    out += "\n";
                }
            }
        }
        None if lines.is_empty() => {
            out += INTRO;
            out += "\n";
            out += &section;
        }
        None => {
            for l in &lines {
                out += l;
                out += "\n";
            }
            out = format!("{}\n\n{section}", out.trim_end());
        }
    }
    out
}

/// Rewrites the section `heading` of the file at `path` (created if missing).
pub fn write_section(path: &Path, heading: &str, section: &str) -> Result<()> {
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    std::fs::write(path, with_section(&doc, heading, section))
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bench_rewrites_its_own_section_only() {
        let all1 = "## lb-bench all (3 rounds)\n\n| a |\n\n### CPU\n\nx\n";
        let doc = with_section("", "## lb-bench all", all1);
        assert_eq!(doc, format!("{INTRO}\n{all1}"));
        let fo = "## lb-bench failover (3 runs)\n\n| f |\n";
        let doc = with_section(&doc, "## lb-bench failover", fo);
        assert_eq!(doc, format!("{INTRO}\n{all1}\n{fo}"));
        // A new `all` keeps the failover section, a new failover keeps `all`'s.
        let all2 = "## lb-bench all (1 round)\n\n| b |\n";
        let doc = with_section(&doc, "## lb-bench all", all2);
        assert_eq!(doc, format!("{INTRO}\n{all2}\n{fo}"));
        let fo2 = "## lb-bench failover (5 runs)\n\n| g |\n";
        let doc = with_section(&doc, "## lb-bench failover", fo2);
        assert_eq!(doc, format!("{INTRO}\n{all2}\n{fo2}"));
        // Text before the first section is kept.
        assert!(with_section(&doc, "## lb-bench all", all1).starts_with(INTRO));
    }
}

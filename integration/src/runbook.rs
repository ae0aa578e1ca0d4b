//! A document's shell blocks as the script a test runs, so the document cannot drift from what
//! works (docs/install.md, run by `integration/tests/install.rs` on fresh machines).
//!
//! Every ```` ```sh ```` block of the document says where it runs on its first line:
//! `# on node1`, `# on node1, node2, node3` or `# on the laptop` (run in each machine named, in
//! turn); `# copy ...` (each further line `SOURCE -> DESTINATION`, both `machine:/path`: what a
//! person does with scp; a source ending in `/` copies the directory's contents into the
//! destination directory); or `# on the build host` (commands `./lab test` runs before the
//! test). A shell block that says none of these is an error: a command the test would not run.
//! Each block keeps the `## ` section it is in, so a test can check what a section promised
//! before going on.

use anyhow::{bail, Result};

/// Where a block runs, and what it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A shell script run in each machine, in the order named.
    Run { machines: Vec<String>, script: String },
    /// Files copied between machines.
    Copy(Vec<CopyLine>),
    /// Run by `./lab test` on the host before the test (packaging).
    BuildHost,
}

/// One `machine:/path -> machine:/path` line of a copy block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyLine {
    pub from: (String, String),
    pub to: (String, String),
}

/// One shell block of the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The `## ` heading above it ("" before the first).
    pub section: String,
    /// Its first line in the document (1-based), for messages.
    pub line: usize,
    pub action: Action,
}

/// The shell blocks of `markdown`, in order; an error names a block that says nowhere to run.
pub fn parse(markdown: &str) -> Result<Vec<Block>> {
    let mut blocks = Vec::new();
    let mut section = String::new();
    let mut lines = markdown.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let trimmed = line.trim_start();
        if let Some(h) = line.strip_prefix("## ") {
            section = h.trim().to_string();
            continue;
        }
        let Some(info) = trimmed.strip_prefix("```") else { continue };
        // The fence's indentation (a block inside a list item) is taken off every line.
        let indent = line.len() - trimmed.len();
        let mut body = Vec::new();
        for (_, l) in lines.by_ref() {
            if l.trim_start().starts_with("```") {
                break;
            }
            body.push(l.get(indent..).unwrap_or(l.trim_start()));
        }
        if !matches!(info.trim(), "sh" | "bash" | "shell") {
            continue;
        }
        let line_no = i + 1;
        let Some(head) = body.first().map(|h| h.trim()) else {
            bail!("line {line_no}: an empty shell block");
        };
        let action = if head == "# on the build host" {
            Action::BuildHost
        } else if head.starts_with("# copy") {
            let mut copies = Vec::new();
            for l in body[1..].iter().map(|l| l.trim()).filter(|l| !l.is_empty() && !l.starts_with('#')) {
                copies.push(copy_line(l).map_err(|e| anyhow::anyhow!("line {line_no}: {e}"))?);
            }
            if copies.is_empty() {
                bail!("line {line_no}: a copy block copies nothing");
            }
            Action::Copy(copies)
        } else if let Some(names) = head.strip_prefix("# on ") {
            let names = names.split('(').next().unwrap_or(names);
            let machines: Vec<String> = names
                .split(',')
                .map(|n| n.trim().trim_start_matches("the ").trim().to_string())
                .filter(|n| !n.is_empty())
                .collect();
            if machines.is_empty() || machines.iter().any(|m| m.contains(char::is_whitespace)) {
                bail!("line {line_no}: {head:?} should name machines: `# on node1, node2`");
            }
            Action::Run { machines, script: body[1..].join("\n") + "\n" }
        } else {
            bail!(
                "line {line_no}: a shell block must say where it runs on its first line \
                 (`# on MACHINE[, MACHINE]`, `# copy`, `# on the build host`), not {head:?}"
            );
        };
        blocks.push(Block { section: section.clone(), line: line_no, action });
    }
    Ok(blocks)
}

fn copy_line(l: &str) -> Result<CopyLine> {
    let Some((from, to)) = l.split_once("->") else { bail!("{l:?}: a copy is `machine:/path -> machine:/path`") };
    let place = |s: &str| -> Result<(String, String)> {
        match s.trim().split_once(':') {
            Some((m, p)) if !m.is_empty() && p.starts_with('/') => Ok((m.to_string(), p.to_string())),
            _ => bail!("{s:?}: a copy's ends are `machine:/absolute/path`"),
        }
    };
    Ok(CopyLine { from: place(from)?, to: place(to)? })
}

/// `text` with every address `10.0.0.N` of the document replaced by `map(N)`: the document
/// speaks of 10.0.0.0/24, the test runs on the lab's own subnet.
pub fn map_addresses(text: &str, map: impl Fn(u8) -> String) -> String {
    const DOC_NET: &str = "10.0.0.";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(DOC_NET) {
        let (before, after) = rest.split_at(at);
        out.push_str(before);
        let digits = after[DOC_NET.len()..].chars().take_while(char::is_ascii_digit).count();
        // Not part of a longer number (110.0.0.1) and a host number that fits.
        let standalone = !before.ends_with(|c: char| c.is_ascii_digit() || c == '.');
        match after[DOC_NET.len()..DOC_NET.len() + digits].parse::<u8>() {
            Ok(n) if standalone && digits > 0 => {
                out.push_str(&map(n));
                rest = &after[DOC_NET.len() + digits..];
            }
            _ => {
                out.push_str(DOC_NET);
                rest = &after[DOC_NET.len()..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "# Title\n\n```sh\n# on the build host\n./lab package\n```\n\n## Three machines\n\n1. First:\n\n   ```sh\n   # on node1, node2 (each in turn)\n   apt install -y ./x.deb\n     echo indented\n   ```\n\n```toml\nnot = \"run\"\n```\n\n## Adding\n\n```sh\n# copy (scp)\nnode1:/root/node2/ -> node2:/etc/fleet/pki/\n\nlaptop:/root/join-token -> node4:/root/\n```\n\n```sh\n# on the laptop\nfleetctl list-machines\n```\n";

    #[test]
    fn blocks_say_where_they_run_and_keep_their_section() {
        let blocks = parse(DOC).expect("parses");
        assert_eq!(blocks.len(), 4);
        assert_eq!(blocks[0].action, Action::BuildHost);
        assert_eq!(blocks[0].section, "");
        assert_eq!(
            blocks[1].action,
            Action::Run {
                machines: vec!["node1".into(), "node2".into()],
                script: "apt install -y ./x.deb\n  echo indented\n".into()
            }
        );
        assert_eq!(blocks[1].section, "Three machines");
        assert_eq!(blocks[1].line, 12);
        let Action::Copy(copies) = &blocks[2].action else { panic!("a copy: {:?}", blocks[2]) };
        assert_eq!(copies.len(), 2);
        assert_eq!(copies[0].from, ("node1".to_string(), "/root/node2/".to_string()));
        assert_eq!(copies[1].to, ("node4".to_string(), "/root/".to_string()));
        assert_eq!(
            blocks[3].action,
            Action::Run { machines: vec!["laptop".into()], script: "fleetctl list-machines\n".into() }
        );
        assert_eq!(blocks[3].section, "Adding");
    }

    #[test]
    fn a_block_that_says_nowhere_to_run_is_an_error() {
        let err = parse("```sh\nfleetctl start x.service\n```\n").expect_err("no place");
        assert!(err.to_string().contains("line 1") && err.to_string().contains("must say where"), "{err}");
        let err = parse("```sh\n# copy\nnode1:root/x -> node2:/root/\n```\n").expect_err("relative path");
        assert!(err.to_string().contains("machine:/absolute/path"), "{err}");
        assert!(parse("```sh\n# copy\n```\n").is_err(), "a copy of nothing");
        assert!(parse("```sh\n# on two machines\n```\n").is_err(), "not machine names");
    }

    #[test]
    fn the_documents_addresses_map_to_the_labs() {
        let map = |n: u8| format!("10.231.90.{}", 220 + u32::from(n));
        assert_eq!(
            map_addresses("https://10.0.0.1:2379,https://10.0.0.12:2379 110.0.0.1 10.0.0.x", map),
            "https://10.231.90.221:2379,https://10.231.90.232:2379 110.0.0.1 10.0.0.x"
        );
    }
}

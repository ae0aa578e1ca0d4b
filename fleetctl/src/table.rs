//! Column output like fleetctl's Go tabwriter (tab padding, tab width 8, padding 1), so scripts
//! that split the original's output on whitespace keep working.

pub fn render(header: Option<&[String]>, rows: &[Vec<String>]) -> String {
    let mut lines: Vec<&[String]> = Vec::new();
    if let Some(h) = header {
        lines.push(h);
    }
    lines.extend(rows.iter().map(|r| r.as_slice()));
    let cols = lines.iter().map(|l| l.len()).max().unwrap_or(0);
    let mut widths = vec![0usize; cols];
    for l in &lines {
        for (i, c) in l.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count() + 1);
        }
    }
    let mut out = String::new();
    for l in &lines {
        for (i, c) in l.iter().enumerate() {
            out.push_str(c);
            if i + 1 < l.len() {
                let cell = widths[i].div_ceil(8) * 8;
                let pad = cell - c.chars().count();
                out.push_str(&"\t".repeat(pad.div_ceil(8)));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn matches_the_originals_bytes() {
        let h = s(&["UNIT", "MACHINE", "ACTIVE", "SUB"]);
        assert_eq!(render(Some(&h), &[]), "UNIT\tMACHINE\tACTIVE\tSUB\n");
        let rows = vec![s(&["hello.service", "0f1ee701.../10.231.77.11", "active", "running"])];
        assert_eq!(
            render(Some(&h), &rows),
            "UNIT\t\tMACHINE\t\t\t\tACTIVE\tSUB\nhello.service\t0f1ee701.../10.231.77.11\tactive\trunning\n"
        );
    }
}

//! Column output like fleetctl's Go tabwriter (tab padding, tab width 8, padding 1), so scripts
//! that split the original's output on whitespace keep working.

pub fn render(header: Option<&[String]>, rows: &[Vec<String>]) -> String {
    let mut lines: Vec<&[String]> = Vec::new();
    if let Some(h) = header {
        lines.push(h);
    }
    lines.extend(rows.iter().map(|r| r.as_slice()));
    let cols = lines.iter().map(|l| l.len()).max().unwrap_or(0);
    let mut longest = vec![0usize; cols];
    for l in &lines {
        for (i, c) in l.iter().enumerate() {
            longest[i] = longest[i].max(c.chars().count());
        }
    }
    let layout = Layout::new(&longest);
    let mut out = String::new();
    for l in &lines {
        layout.line(l, &mut out);
    }
    out
}

/// Column widths known ahead (the longest value of each column), so rows can be written as they
/// come: a listing too long to hold is printed the way [`render`] would have printed it whole.
pub struct Layout {
    /// Each column's cell in characters: its longest value plus one, rounded up to a tab stop.
    cells: Vec<usize>,
}

impl Layout {
    pub fn new(longest: &[usize]) -> Layout {
        Layout { cells: longest.iter().map(|l| (l + 1).div_ceil(8) * 8).collect() }
    }

    /// Appends one line: each cell but the last padded with tabs to its column's stop.
    pub fn line(&self, cells: &[String], out: &mut String) {
        for (i, c) in cells.iter().enumerate() {
            out.push_str(c);
            if i + 1 < cells.len() {
                let cell = self.cells.get(i).copied().unwrap_or(8);
                // A value longer than announced still gets one tab.
                let pad = cell.saturating_sub(c.chars().count()).max(1);
                for _ in 0..pad.div_ceil(8) {
                    out.push('\t');
                }
            }
        }
        out.push('\n');
    }
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

#[cfg(test)]
mod layout_tests {
    use super::*;

    /// A listing printed row by row from announced widths is the listing printed whole.
    #[test]
    fn rows_laid_out_ahead_are_the_bytes_of_the_whole_table() {
        let header: Vec<String> = ["UNIT", "MACHINE", "ACTIVE", "SUB"].map(String::from).to_vec();
        let rows: Vec<Vec<String>> = (0..40)
            .map(|i| {
                vec![
                    format!("unit-{}.service", "x".repeat(i % 13)),
                    format!("{:08x}.../10.0.{}.{}", i, i, i * 7),
                    ["active", "deactivating", "failed"][i % 3].to_string(),
                    ["running", "stop-sigterm", "dead"][i % 3].to_string(),
                ]
            })
            .collect();
        let mut longest = vec![0usize; 4];
        for r in rows.iter().chain([&header]) {
            for (l, c) in longest.iter_mut().zip(r) {
                *l = (*l).max(c.len());
            }
        }
        let layout = Layout::new(&longest);
        let mut streamed = String::new();
        layout.line(&header, &mut streamed);
        for r in &rows {
            layout.line(r, &mut streamed);
        }
        assert_eq!(streamed, render(Some(&header), &rows));
        // A value longer than announced still leaves a tab before the next column.
        let mut short = String::new();
        Layout::new(&[1, 1]).line(&["longer".to_string(), "b".to_string()], &mut short);
        assert_eq!(short, "longer\tb\n");
    }
}

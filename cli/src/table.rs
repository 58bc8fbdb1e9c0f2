//! Tables as the docker CLI prints them: left-aligned columns, three spaces apart.

/// Formats `rows` under `header`; every row has as many cells as the header.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 == widths.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::render;

    #[test]
    fn pads_columns_like_docker() {
        let table =
            render(&["ID", "HOSTNAME"], &[vec!["abc *".into(), "mgr1".into()], vec!["d".into(), "wrk10".into()]]);
        assert_eq!(table, "ID      HOSTNAME\nabc *   mgr1\nd       wrk10\n");
    }
}

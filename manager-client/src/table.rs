//! Plain aligned text tables for `-o table`.

/// Prints `rows` under `headers`, columns padded to their widest cell.
pub fn print(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Prints `key: value` lines, keys sorted.
pub fn print_pairs<'a>(pairs: impl IntoIterator<Item = (&'a String, &'a String)>) {
    let mut pairs: Vec<_> = pairs.into_iter().collect();
    pairs.sort();
    for (key, value) in pairs {
        println!("  {key}: {value}");
    }
}

//! HAProxy's word splitting, as its configuration parser does it (`parse_line`):
//! words are separated by spaces or tabs; `#` outside quotes starts a comment; a backslash
//! escapes the next character (`\ `, `\#`, `\\`, `\'`, `\"`) or writes a control character
//! (`\r`, `\n`, `\t`, `\xHH`); text in double quotes keeps its spaces and still honours escapes;
//! text in single quotes is taken literally.

/// Splits one configuration line into words. `Err` says why the line cannot be split (an
/// unterminated quote or a bad `\x` escape).
pub fn words(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    // A word exists (possibly empty, e.g. `""`) once something was written or quoted.
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some('\''), '\'') => quote = None,
            (Some('\''), c) => cur.push(c),
            (Some('"'), '"') => quote = None,
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (_, '\\') => {
                in_word = true;
                match chars.next() {
                    None => cur.push('\\'),
                    Some('r') => cur.push('\r'),
                    Some('n') => cur.push('\n'),
                    Some('t') => cur.push('\t'),
                    Some('x') => {
                        let hex: String = (0..2).filter_map(|_| chars.next()).collect();
                        let b = u8::from_str_radix(&hex, 16)
                            .map_err(|_| format!("bad escape \\x{hex}: two hex digits expected"))?;
                        cur.push(char::from(b));
                    }
                    Some(e @ (' ' | '#' | '\\' | '\'' | '"' | '$')) => cur.push(e),
                    Some(other) => {
                        cur.push('\\');
                        cur.push(other);
                    }
                }
            }
            (None, ' ' | '\t' | '\r' | '\n') => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, '#') => break,
            (_, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if let Some(q) = quote {
        return Err(format!("unterminated {q} quote"));
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::words;

    #[test]
    fn splits_on_blanks_and_drops_comments() {
        assert_eq!(
            words("  server db01 10.0.1.10:7687\tcheck port 7474 # the first").unwrap(),
            ["server", "db01", "10.0.1.10:7687", "check", "port", "7474"]
        );
        assert!(words("   # only a comment").unwrap().is_empty());
        assert!(words("").unwrap().is_empty());
    }

    #[test]
    fn the_manuals_header_after_version_trick_becomes_one_word_with_crlf() {
        let w = words(r"option httpchk HEAD /db/manage/server/ha/master HTTP/1.0\r\nAuthorization:\ Basic\ bmVvNGo6c2VjcmV0")
            .unwrap();
        assert_eq!(w.len(), 5);
        assert_eq!(w[4], "HTTP/1.0\r\nAuthorization: Basic bmVvNGo6c2VjcmV0");
    }

    #[test]
    fn quotes_and_escapes() {
        assert_eq!(
            words(r#"hdr "Authorization" "Basic a b" 'x\ y' a\#b "" c\x41"#).unwrap(),
            [
                "hdr",
                "Authorization",
                "Basic a b",
                r"x\ y",
                "a#b",
                "",
                "cA"
            ]
        );
        assert!(words("say \"oops").unwrap_err().contains("unterminated"));
        assert!(words(r"a\xZZ").unwrap_err().contains("hex"));
    }
}
